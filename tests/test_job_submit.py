"""The README's laptop `ray job submit` recipe, run as written on a fresh machine (an empty HOME).

Only what would collide with another Ray instance on this machine is changed: the ports, the
Ray temp directory and the storage path. The smoke sweep it submits must show the method
learning (the learning floor of the quick start).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from metakd.report import analysis, results

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MARKER = "<!-- recipe:job-submit -->"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe() -> list[str]:
    """The shell lines of the README block after the job-submit marker."""
    block = README.split(MARKER, 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def isolate(lines: list[str], port: int, dashboard: int, temp_dir: str, storage: str) -> list[str]:
    """The recipe with this test's ports, Ray temp dir and storage; everything else as written."""
    out = []
    for line in lines:
        if line.startswith("ray start --head"):
            line += (f" --port={port} --dashboard-port={dashboard} --temp-dir={temp_dir}"
                     f" --node-ip-address=127.0.0.1 --disable-usage-stats")
        line = line.replace("http://127.0.0.1:8265", f"http://127.0.0.1:{dashboard}")
        line = line.replace("$PWD/runs/sweeps", storage).replace("runs/sweeps/smoke", f"{storage}/smoke")
        out.append(line)
    return out


def _bash(lines: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", "set -euo pipefail\n" + "\n".join(lines)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def test_readme_recipe_has_the_token_step_before_ray_start():
    lines = recipe()
    starts = [i for i, line in enumerate(lines) if line.startswith("ray start")]
    tokens = [i for i, line in enumerate(lines) if "get-auth-token --generate" in line]
    assert starts and tokens and tokens[0] < starts[0], lines
    assert any(line.startswith("export RAY_AUTH_MODE=token") for line in lines[:starts[0]])
    assert lines[-1] == "ray stop"


@pytest.mark.slow
def test_readme_job_submit_recipe_on_a_fresh_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    assert not (home / ".ray").exists()  # no token left behind by anything
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths have a length limit
    storage = str(tmp_path / "store")
    lines = isolate(recipe(), free_port(), free_port(), temp_dir, storage)
    venv = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=f"{venv}:{os.environ['PATH']}", OMP_NUM_THREADS="1", RAY_TMPDIR=temp_dir)
    if not (ROOT / ".venv" / "bin" / "activate").exists():  # a venv elsewhere: activate that one
        lines = [f". {venv}/activate" if line == ". .venv/bin/activate" else line for line in lines]
    start = next(i for i, line in enumerate(lines) if line.startswith("ray start")) + 1
    setup, submit = lines[:start], lines[start:-1]  # ray stop runs in finally
    try:
        proc = _bash(setup, env)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        for _ in range(3):  # the head's job agent may still be starting (the README says to retry)
            proc = _bash(lines[:1] + ["export RAY_AUTH_MODE=token"] + submit, env)
            if "No available agent to submit job" not in proc.stdout + proc.stderr:
                break
            time.sleep(10)
    finally:
        stop = _bash(["export RAY_AUTH_MODE=token", "ray stop --force"], env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert (home / ".ray" / "auth_token").is_file()  # the recipe's token step made it
    assert "succeeded" in out and "connected to" in out

    df = results.load(f"{storage}/smoke")
    # smoke: 2 gamma2 values x 1 seed x 2 methods x 2 domains x 2 splits
    assert len(df) == 2 * 1 * 2 * 2 * 2
    assert set(df["method"]) == {"metakd", "kd_single"} and set(df["status"]) == {"ok"}
    assert sorted(df["gamma2"].unique()) == [0.0, 0.5]
    # `metakd results` (the recipe's next line) printed the table
    assert re.search(r"metakd\s+\d+\.\d+", out), out[-3000:]

    # The quick start's promise: the method learns. Floor asserted, ranking only shown.
    test = analysis.main_table(df, split="test")
    average = test[test["domain"] == analysis.AVERAGE].set_index("method")["mean"]
    print("smoke sweep, test accuracy by method (average over domains):\n" + average.to_string())
    assert average["metakd"] >= 0.75, test.to_string()
