"""`ray job submit` against a head node on loopback, exactly as the README shows it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from metakd import results

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node():
    """A 2-CPU head on 127.0.0.1 started from this environment (so `metakd` is on the job's PATH)."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    assert ray, "the ray CLI (ray[default]) is not installed"
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", RAY_AUTH_MODE="token",
               OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    start = [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}", "--num-cpus=2",
             "--num-gpus=0", '--resources={"trial_driver": 1000}', "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}",
             "--disable-usage-stats"]
    proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    try:
        yield ray, f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_smoke_sweep(head_node, tmp_path):
    ray, address, env = head_node
    storage = tmp_path / "store"
    cmd = [ray, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
           "metakd", "sweep", "sweeps/smoke.yaml", "--storage", str(storage)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "succeeded" in out and "connected to" in out
    df = results.load(str(storage / "smoke"))
    # smoke: 2 gamma2 values x 1 seed x 2 methods x 2 domains x 2 splits
    assert len(df) == 2 * 1 * 2 * 2 * 2
    assert set(df["method"]) == {"metakd", "kd_single"} and set(df["status"]) == {"ok"}
    assert sorted(df["gamma2"].unique()) == [0.0, 0.5]
