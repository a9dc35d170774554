"""Non-finite loss / gradient guard.

A NaN that reaches the optimizer poisons every weight for good, and a run that silently skips bad steps can
train on nothing for hours. So every optimizer step passes through :class:`NonFiniteGuard`: under ``abort`` the
first non-finite value stops the run with its step number; under ``skip`` the update is dropped, counted,
logged and checkpointed, and the run stops once the count exceeds ``max_skips``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient that the policy does not allow to pass."""

    def __init__(self, step: int, what: str, detail: str) -> None:
        self.step = step
        super().__init__(f"non-finite {what} at step {step}: {detail}")


class NonFiniteGuard:
    """Decides, per optimizer step, whether an update may be applied; state goes into checkpoints."""

    def __init__(self, policy: Literal["abort", "skip"], max_skips: int) -> None:
        if policy not in ("abort", "skip"):
            raise ValueError(f"nonfinite policy must be 'abort' or 'skip', got {policy!r}")
        self.policy = policy
        self.max_skips = max_skips
        self.skipped = 0
        self.skipped_steps: list[int] = []

    def allow_update(self, step: int, what: str, finite: bool, detail: str = "") -> bool:
        """Return True when the update at ``step`` may proceed; raise or count otherwise."""
        if finite:
            return True
        if self.policy == "abort":
            raise NonFiniteError(step, what, detail or "policy 'abort' (set train.nonfinite_policy: skip to skip)")
        self.skipped += 1
        self.skipped_steps.append(step)
        log.warning("skipping update at step %d: non-finite %s (%s); %d skipped so far", step, what, detail,
                    self.skipped)
        if self.skipped > self.max_skips:
            raise NonFiniteError(
                step, what, f"{self.skipped} updates skipped, more than train.max_nonfinite_skips={self.max_skips}"
            )
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "skipped_steps": list(self.skipped_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state["skipped"])
        self.skipped_steps = [int(s) for s in state.get("skipped_steps", [])]
