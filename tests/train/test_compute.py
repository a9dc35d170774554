"""compute.json: the hardware, world size, precision, wall time and throughput a run records, per session and in
total, and kept across a resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from brainfm.train.compute import COMPUTE_FILE, cpu_model, summarize_hardware
from brainfm.train.pretrain import pretrain


def test_hardware_summary_counts_machines_gpus_and_models() -> None:
    gpu = {"gpu": "NVIDIA H100 80GB HBM3", "cpu": "AMD EPYC 9654", "cpu_cores": 192}
    processes = [{"host": "node1", "machine": 0, **gpu}, {"host": "node1", "machine": 0, **gpu},
                 {"host": "node2", "machine": 1, **gpu}, {"host": "node2", "machine": 1, **gpu}]
    summary = summarize_hardware(processes)
    assert summary == {"machines": 2, "processes": 4, "gpus": 4, "gpu_models": ["NVIDIA H100 80GB HBM3"],
                       "cpu_models": ["AMD EPYC 9654"], "cpu_cores_per_machine": [192], "hosts": ["node1", "node2"]}
    # two launcher "machines" on one host are still two machines
    same_host = [{"host": "h", "machine": m, "gpu": None, "cpu": "x", "cpu_cores": 2} for m in (0, 1)]
    assert summarize_hardware(same_host)["machines"] == 2 and summarize_hardware(same_host)["gpus"] == 0


def test_run_records_compute_and_a_resume_appends_a_session(tiny_shards: Path, tmp_path: Path, tiny_config) -> None:
    config = tiny_config("2d", tiny_shards, tmp_path, vae={"adv_weight": 0.0}, optim={"max_steps": 2},
                         train={"checkpoint_every": 2, "sample_every": 0})
    run = pretrain("vae", config)
    first = json.loads((run / COMPUTE_FILE).read_text())
    global_batch = config.data.batch_size * config.optim.grad_accum
    assert first["task"] == "pretrain-vae" and first["world_size"] == 1 and first["precision"] == "no"
    assert first["global_batch"] == global_batch and first["steps"] == 2 and first["samples"] == 2 * global_batch
    hardware = first["hardware"]
    assert hardware["machines"] == 1 and hardware["processes"] == 1 and hardware["gpus"] == 0
    assert hardware["cpu_models"] == [cpu_model()] and cpu_model() != "unknown"
    (session,) = first["sessions"]
    assert (session["start_step"], session["end_step"]) == (0, 2)
    assert 0 < session["train_time_s"] <= session["wall_time_s"]
    assert session["steps_per_s"] == pytest.approx(2 / session["train_time_s"], rel=1e-9)
    assert session["samples_per_s"] == pytest.approx(session["steps_per_s"] * global_batch, rel=1e-9)

    config.optim = dataclasses.replace(config.optim, max_steps=4)
    pretrain("vae", config, resume="auto")  # a second session continues from step-2
    second = json.loads((run / COMPUTE_FILE).read_text())
    assert [(s["start_step"], s["end_step"]) for s in second["sessions"]] == [(0, 2), (2, 4)]
    assert second["sessions"][0] == session  # the first session's record is kept as it was
    assert second["steps"] == 4 and second["samples"] == 4 * global_batch
    assert second["train_time_s"] == pytest.approx(sum(s["train_time_s"] for s in second["sessions"]), rel=1e-9)
    assert second["steps_per_s"] == pytest.approx(4 / second["train_time_s"], rel=1e-9)
