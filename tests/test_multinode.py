"""A sweep on a multi-node Ray cluster survives a worker node that dies mid-run (issue 16).

A real cluster on this machine (``ray.cluster_utils.Cluster``): a head with the ``trial_driver``
resource and no CPUs, two worker nodes of 1 CPU. ``metakd sweep --address`` runs a ``gamma2``
grid against it (3 configurations x 2 seeds x {metakd, kd_single} x 2 domains: 6 distinct
teachers, 16 distinct students, 48 rows); one worker node is removed without warning while a
teacher trains on it (or, in the second case, while students train), and a fresh node is
added, as an autoscaler would. The sweep must finish on its own, every row ok and once, and
every teacher and student trained (published) once; the events say what was interrupted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from metakd.config import load_sweep
from metakd.jobs.cache import artifact_store
from metakd.jobs.events import RUN_FAILED, STUDENT, TEACHER, read_events
from metakd.jobs.registry import NAMESPACE
from metakd.report import results
from metakd.storage import Store

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NAME = "mn"

# Teachers of a few seconds (long enough to kill one mid-training, checkpointed after every
# epoch), students of about a second.
SWEEP = {
    "name": NAME,
    "methods": ["metakd", "kd_single"],
    "seeds": [0, 1],
    "data": {"source": "synthetic", "domains": ["alpha", "beta"], "max_length": 24, "vocab_size": 400,
             "synthetic": {"num_domains": 3, "examples_per_domain": 200, "words_per_example": 16,
                           "shared_vocab": 40, "domain_vocab": 20, "label_noise": 0.05}},
    "teacher": {"preset": "tiny-teacher", "epochs": 12, "lr": 2e-3, "batch_size": 16, "checkpoint_interval_s": 0},
    "student": {"preset": "tiny-student"},
    "distill": {"stage1_epochs": 1, "stage1_lr": 3e-3, "stage2_epochs": 3, "stage2_lr": 5e-3, "batch_size": 16},
    "search": {"algorithm": "grid", "num_samples": 1,
               "params": {"gamma2": {"type": "grid", "values": [0.0, 0.5, 1.0]}},
               "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "student_workers": 1,
                             "max_concurrent_trials": 3}},
}
TEACHERS, STUDENTS, ROWS = 6, 16, 3 * 2 * 2 * 2 * 2


def _registry_counts(ray) -> dict:
    """{artifact: {needed, done, running}} from the sweep's registry actor ({} before it exists)."""
    try:
        registry = ray.get_actor(f"registry-{NAME}", namespace=NAMESPACE)
        return ray.get(registry.progress.remote(10**9), timeout=10)[2]
    except (ValueError, ray.exceptions.RayError):
        return {}


def _runs_actor(node, actor_class: str) -> bool:
    """Whether a process of ``node`` (a ``Cluster`` node) is an actor of ``actor_class`` (Ray titles
    an actor's process ``ray::<class>``): read from the processes, as the dashboard may be off."""
    import psutil

    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    for p in raylet.children(recursive=True):
        try:
            if f"ray::{actor_class}" in " ".join(p.cmdline()):
                return True
        except psutil.Error:  # it ended while we looked
            pass
    return False


def _checkpointed_runs(root: Path) -> list[str]:
    """Runs with a checkpoint Ray Train registered (it lists them in the run's snapshot)."""
    return sorted(p.parent.name for p in root.glob("train/*/checkpoint_manager_snapshot.json"))


def _teacher_mid_training(counts: dict, root: Path) -> bool:
    """Teachers train on both worker nodes, none is done yet, and both runs have a checkpoint of
    their teacher on storage (the point to resume from)."""
    t = counts.get("teacher", {})
    return t.get("running", 0) >= 2 and t.get("done", 0) == 0 and len(_checkpointed_runs(root)) >= 2


def _students_training(counts: dict, root: Path) -> bool:
    """Every teacher is done and students train on both worker nodes."""
    t, s = counts.get("teacher", {}), counts.get("student", {})
    return t.get("needed") == t.get("done") == TEACHERS and s.get("running", 0) >= 2


def _sweep_with_a_lost_node(tmp_path: Path, monkeypatch, when) -> tuple[int, str, Path, dict]:
    """Run the sweep on a 3-node cluster and remove a worker node (not gracefully) with a Train worker
    on it once ``when(registry counts, sweep root)``; then add a fresh node. Returns (rc, console,
    sweep root, what was killed)."""
    import ray
    from ray.cluster_utils import Cluster

    # the nodes' processes (raylets, Train workers, trial drivers) inherit this environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    storage = tmp_path / "store"
    path = tmp_path / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "search": {**SWEEP["search"], "storage": str(storage)}}, sort_keys=False))
    load_sweep(path)
    root = storage / NAME
    # no dashboard: its fixed port may be taken by another Ray on this machine, and nothing here needs it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {"trial_driver": 100},
                                                            "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    log_path = tmp_path / "sweep.log"
    killed: dict = {}
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "metakd.cli", "sweep", str(path), "--address",
                                     cluster.address], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            ray.init(address=cluster.address, log_to_driver=False)
            deadline = time.monotonic() + 300
            while proc.poll() is None and not killed and time.monotonic() < deadline:
                time.sleep(0.2)
                counts = _registry_counts(ray)
                if not when(counts, root):
                    continue
                victim = next((w for w in workers if _runs_actor(w, "RayTrainWorker")), None)
                if victim is None:
                    continue
                killed = {"node": victim.node_id, "counts": counts,
                          "registry_on_head": _runs_actor(cluster.head_node, "RegistryState"),
                          "checkpointed": _checkpointed_runs(root)}
                cluster.remove_node(victim, allow_graceful=False)
                workers.remove(victim)
                workers.append(cluster.add_node(num_cpus=1))
            try:
                rc = proc.wait(timeout=max(60.0, deadline + 240 - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    finally:
        ray.shutdown()
        cluster.shutdown()
    return rc, log_path.read_text(), root, killed


def _check_nothing_lost_nothing_twice(rc: int, console: str, root: Path, killed: dict) -> list[dict]:
    """The common assertions; returns the run_failed events."""
    assert killed, "no worker node was killed: the moment to kill never came\n" + console[-4000:]
    assert killed["registry_on_head"], "the registry actor is not on the head node"
    assert rc == 0, console[-6000:]
    df = results.load(str(root))
    assert len(df) == ROWS and (df["status"] == "ok").all(), df[df["status"] != "ok"]
    assert not df.duplicated(["trial_id", "seed", "method", "domain", "split"]).any()
    assert df.groupby("gamma2")["trial_id"].nunique().to_dict() == {0.0: 1, 0.5: 1, 1.0: 1}
    store = Store(str(root))
    teachers, students = read_events(store, TEACHER), read_events(store, STUDENT)
    # each distinct teacher and student trained (published) once: one event each
    assert sorted(e["key"] for e in teachers) == sorted({e["key"] for e in teachers}) and len(teachers) == TEACHERS
    assert sorted(e["key"] for e in students) == sorted(set(df["student_key"])) and len(students) == STUDENTS
    assert all(e.get("status", "ok") == "ok" for e in teachers + students)
    cache = artifact_store(str(root))  # teachers and students live in the storage's artifact cache
    assert all(cache.is_complete(f"teachers/{e['key']}") for e in teachers)
    assert all(cache.is_complete(f"students/{k}") for k in df["student_key"].unique())
    failed = read_events(store, RUN_FAILED)
    # the run on the lost node (a 1-CPU node holds one Train worker) and no run of the others
    assert 1 <= len(failed) <= 2, failed
    assert all(e["lost_node"] and e["retried"] for e in failed), failed
    assert "lost its node" in console and "starting it again" in console  # the console says so
    return failed


def test_a_worker_node_lost_while_a_teacher_trains(tmp_path, monkeypatch):
    rc, console, root, killed = _sweep_with_a_lost_node(tmp_path, monkeypatch, _teacher_mid_training)
    failed = _check_nothing_lost_nothing_twice(rc, console, root, killed)
    teachers = {e["key"]: e for e in read_events(Store(str(root)), TEACHER)}
    interrupted = [(e, k) for e in failed for k in e["interrupted"] if k in teachers]
    assert interrupted, failed  # a teacher was cut off ...
    for e, key in interrupted:
        again = teachers[key]  # ... and trained once more, after, by this run launched again or by another
        assert again["start"] > e["start"]
        # from the checkpoint the lost run left on storage, not from scratch, whoever took it
        if e["run"] in killed["checkpointed"]:
            assert again["resumed_epochs"] >= 1, (e, again)
        if again["run"] == e["run"]:
            assert again["attempt"] == e["attempt"] + 1
    assert any(e["run"] in killed["checkpointed"] for e, _ in interrupted), (killed, failed)
    # every other teacher was trained once, from its start
    assert all(t["resumed_epochs"] == 0 for k, t in teachers.items() if k not in {k for _, k in interrupted})


def test_a_worker_node_lost_while_students_train(tmp_path, monkeypatch):
    rc, console, root, killed = _sweep_with_a_lost_node(tmp_path, monkeypatch, _students_training)
    failed = _check_nothing_lost_nothing_twice(rc, console, root, killed)
    students = {e["key"] for e in read_events(Store(str(root)), STUDENT)}
    assert all(k in students for e in failed for k in e["interrupted"])
    assert all(e["phase"] in ("both", "students") for e in failed)
