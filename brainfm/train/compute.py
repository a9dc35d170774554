"""Training compute of one run folder, recorded in ``RUN/compute.json`` by the main process.

What the model card reports under "Training compute": the hardware every process ran on (gathered from all of
them: machines, GPU and CPU models and counts), world size, precision and distributed type, and per session (a
run resumed after a preemption appends one) its wall time, time in the training loop, steps, steps/s and
samples/s, plus the totals. The file is rewritten at every checkpoint, so a run that dies keeps the record of
what it did up to its last checkpoint; samples are optimizer steps x the global batch (micro-batch x gradient
accumulation x processes).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any

from brainfm.io import write_json

log = logging.getLogger(__name__)

COMPUTE_FILE = "compute.json"


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def process_hardware(device: Any) -> dict[str, Any]:
    """What this process runs on. ``machine`` tells launcher nodes apart even when they share a host name
    (torch's elastic agent sets GROUP_RANK to the machine rank)."""
    import torch

    gpu = torch.cuda.get_device_name(device) if getattr(device, "type", "") == "cuda" else None
    return {"host": socket.gethostname(), "machine": int(os.environ.get("GROUP_RANK", 0)), "gpu": gpu,
            "cpu": cpu_model(), "cpu_cores": os.cpu_count()}


def summarize_hardware(processes: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and models over every process of the run."""
    machines = sorted({(p["host"], p["machine"]) for p in processes})
    gpus = [p["gpu"] for p in processes if p["gpu"]]
    cores = {(p["host"], p["machine"]): p["cpu_cores"] for p in processes}
    return {
        "machines": len(machines),
        "processes": len(processes),
        "gpus": len(gpus),
        "gpu_models": sorted(set(gpus)),
        "cpu_models": sorted({p["cpu"] for p in processes}),
        "cpu_cores_per_machine": sorted(set(cores.values())),
        "hosts": sorted({host for host, _ in machines}),
    }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class ComputeRecorder:
    """Collects the run's compute facts; ``start`` is collective (every rank must call it)."""

    def __init__(self, run_dir: Path, task_name: str, global_batch: int, created: float | None = None) -> None:
        self.path = Path(run_dir) / COMPUTE_FILE
        self.task_name = task_name
        self.global_batch = global_batch
        self.created = time.monotonic() if created is None else created  # time.monotonic() at session start
        self.started_at = _now()
        self._loop_start = 0.0
        self._start_step = 0
        self._previous: list[dict[str, Any]] = []
        self._facts: dict[str, Any] = {}

    def start(self, accelerator: Any, step: int, resumed: bool) -> None:
        """Gather every process's hardware and note where this session's training loop begins."""
        from accelerate.utils import gather_object

        processes = gather_object([process_hardware(accelerator.device)])
        distributed = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
        self._facts = {
            "task": self.task_name,
            "world_size": accelerator.num_processes,
            "precision": accelerator.mixed_precision,
            "distributed_type": distributed,
            "global_batch": self.global_batch,
            "hardware": summarize_hardware(processes),
        }
        if resumed and self.path.is_file():
            try:
                self._previous = list(json.loads(self.path.read_bytes()).get("sessions", []))
            except (OSError, json.JSONDecodeError, AttributeError):
                log.warning("%s: unreadable; the compute of earlier sessions is not carried over", self.path)
        self._start_step = step
        self._loop_start = time.monotonic()

    def record(self, step: int) -> dict[str, Any]:
        """This session up to ``step`` and the totals over all sessions, as written to ``compute.json``."""
        now = time.monotonic()
        train_time = max(now - self._loop_start, 1e-9)
        steps = step - self._start_step
        session = {
            "started": self.started_at, "updated": _now(), "start_step": self._start_step, "end_step": step,
            "wall_time_s": now - self.created, "train_time_s": train_time,
            "steps_per_s": steps / train_time, "samples_per_s": steps * self.global_batch / train_time,
            **self._facts,
        }
        sessions = [*self._previous, session]
        total_train = sum(s["train_time_s"] for s in sessions)
        total_steps = sum(s["end_step"] - s["start_step"] for s in sessions)
        return {
            **self._facts,
            "steps": step,
            "samples": step * self.global_batch,
            "wall_time_s": sum(s["wall_time_s"] for s in sessions),
            "train_time_s": total_train,
            "steps_per_s": total_steps / total_train if total_train > 0 else None,
            "samples_per_s": total_steps * self.global_batch / total_train if total_train > 0 else None,
            "sessions": sessions,
        }

    def write(self, step: int) -> None:
        """Main process only: rewrite ``compute.json`` atomically."""
        write_json(self.path, self.record(step))


def read_compute(stage_dir: str | os.PathLike) -> dict[str, Any] | None:
    """A stage run folder's ``compute.json``, or None when the run did not leave one (or it is unreadable)."""
    path = Path(stage_dir) / COMPUTE_FILE
    try:
        record = json.loads(path.read_bytes())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """A record without its per-session list (what a model folder carries): the totals and the hardware."""
    return {**{k: v for k, v in record.items() if k != "sessions"}, "sessions": len(record.get("sessions", []))}


def format_seconds(value: float) -> str:
    return f"{value:.0f} s ({value / 3600:.2f} h)" if value >= 3600 else f"{value:.1f} s"


def hardware_text(hardware: dict[str, Any]) -> str:
    """E.g. "4 machines; 32 x NVIDIA H100 80GB HBM3; CPU AMD EPYC 9654 (192 cores per machine)"."""
    machines = hardware.get("machines", 0)
    parts = [f"{machines} machine{'s' if machines != 1 else ''}"]
    gpus = hardware.get("gpus", 0)
    parts.append(f"{gpus} x {' / '.join(hardware.get('gpu_models', []))}" if gpus else "no GPU")
    cores = "/".join(str(c) for c in hardware.get("cpu_cores_per_machine", []))
    parts.append(f"CPU {' / '.join(hardware.get('cpu_models', []))}" + (f" ({cores} cores per machine)" if cores
                                                                           else ""))
    return "; ".join(parts)


def card_row(stage: str, record: dict[str, Any]) -> dict[str, str]:
    """One row of the model card's "Training compute" table."""
    def rate(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, int | float) else "not recorded"

    sessions = record.get("sessions")
    count = sessions if isinstance(sessions, int) else len(sessions or [])
    return {
        "stage": stage,
        "steps": f"{record.get('steps')}" + (f" ({count} sessions)" if count > 1 else ""),
        "wall_time": format_seconds(float(record["wall_time_s"])) if "wall_time_s" in record else "not recorded",
        "steps_per_s": rate(record.get("steps_per_s")),
        "samples_per_s": rate(record.get("samples_per_s")),
        "setup": f"{record.get('world_size')} process(es), {record.get('distributed_type')}, "
                 f"precision {record.get('precision')}, global batch {record.get('global_batch')}",
        "hardware": hardware_text(record.get("hardware") or {}),
    }


__all__ = ["COMPUTE_FILE", "ComputeRecorder", "card_row", "cpu_model", "format_seconds", "hardware_text",
           "process_hardware", "read_compute", "summarize_hardware", "summary"]
