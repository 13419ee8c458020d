"""`python -m bench` end to end at a tiny shape: the table's JSON holds every component with the fields the issue
asks for, and the end_to_end row comes from the real training loop. (GPU sessions are short: a bench that broke
unnoticed would cost one.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_cli_writes_every_component_with_its_check_and_a_measured_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--size", "debug", "--modes", "eager", "--threads", "1", "--repeat", "2"]
    args += ["--batch-size", "2", "--batch-length", "8", "--imag-length", "3", "--e2e-seconds", "0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    meta, rows = result["meta"], result["rows"]
    assert meta["device_type"] == "cpu" and meta["torch"] and meta["flops_per_update"] > 0
    assert meta["batch_size"] == 2 and meta["batch_length"] == 8
    assert meta["precision"] == {"eager": "fp32"} and set(meta["matmul_peak_tflops"]) == {"fp32", "bf16"}
    assert meta["cpu_allocator_tuned"] is sys.platform.startswith("linux")
    got = {r["component"] for r in rows}
    assert got == {
        "env_step",
        "replay_sample",
        "wm_update",
        "imagine",
        "ac_update",
        "full_update",
        "act_step",
        "end_to_end",
    }
    for r in rows:
        assert r["mode"] == "eager" and r["ok"] is True
        assert r["median_ms"] > 0 and r["spread_ms"] >= 0, r
    e2e = next(r for r in rows if r["component"] == "end_to_end")
    # The cartpole preset's 4 envs at ratio 64 with 2x8 batches: 16 updates per loop iteration.
    assert e2e["num_envs"] == 4 and e2e["updates_per_env_step"] == 16 and e2e["chunks"] >= 5
    assert e2e["env_steps_per_s"] == pytest.approx(4 / e2e["median_ms"] * 1e3)
    assert "end_to_end" in proc.stdout and "steps/s" in proc.stdout
