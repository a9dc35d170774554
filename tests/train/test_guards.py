"""Non-finite guard policies: abort names the step; skip drops and counts updates, then gives up; state restores."""

from __future__ import annotations

import pytest

from brainfm.train.guards import NonFiniteError, NonFiniteGuard


def test_guard_policies() -> None:
    with pytest.raises(NonFiniteError, match="at step 7"):
        NonFiniteGuard("abort", 5).allow_update(7, "loss", False, "nan")
    guard = NonFiniteGuard("skip", 1)
    assert guard.allow_update(1, "loss", True)
    assert not guard.allow_update(2, "loss", False, "nan")
    assert guard.state_dict() == {"skipped": 1, "skipped_steps": [2]}
    with pytest.raises(NonFiniteError, match="more than train.max_nonfinite_skips=1"):
        guard.allow_update(3, "loss", False, "inf")
    restored = NonFiniteGuard("skip", 1)
    restored.load_state_dict({"skipped": 1, "skipped_steps": [2]})
    assert restored.skipped == 1 and restored.skipped_steps == [2]
    with pytest.raises(ValueError, match="'abort' or 'skip'"):
        NonFiniteGuard("ignore", 1)  # type: ignore[arg-type]
