"""The Ray runner without Ray: what a run of each phase asks for, the checkpoints a finished fit drops,
and which failures of a fit are a lost node."""

from __future__ import annotations

import os
from types import SimpleNamespace

from metakd.config import ResourcesConfig
from metakd.jobs.ray_runner import RayRunner, drop_orphan_checkpoints, lost_node
from metakd.jobs.workers import RunPhase


def _runner(**resources) -> RayRunner:
    return RayRunner(ResourcesConfig(**resources), "unused")


def test_teacher_runs_are_whole_ddp_groups_and_student_workers_are_units():
    r = _runner(workers_per_trial=2, cpus_per_worker=2, gpus_per_worker=1, student_workers=4,
                student_gpus_per_worker=0.25)
    assert not r.combined()
    # a teacher run: 2 DDP ranks of 2 CPUs and 1 GPU, admitted whole
    assert r.demand(RunPhase.TEACHERS) == {"CPU": 4.0, "GPU": 2.0}
    assert r.workers(RunPhase.TEACHERS, 1) == 2 and r.max_units(RunPhase.TEACHERS) == 1
    # a student run: up to 4 independent workers of a quarter GPU, as many as were admitted
    assert r.demand(RunPhase.STUDENTS) == {"CPU": 2.0, "GPU": 0.25}
    assert r.max_units(RunPhase.STUDENTS) == 4 and r.workers(RunPhase.STUDENTS, 3) == 3


def test_student_ddp_makes_a_student_run_one_unit_of_all_its_workers():
    r = _runner(student_workers=2, student_ddp=True)
    assert r.demand(RunPhase.STUDENTS) == {"CPU": 2.0}  # no GPU asked for on a CPU cluster
    assert r.max_units(RunPhase.STUDENTS) == 1 and r.workers(RunPhase.STUDENTS, 1) == 2
    assert not r.combined()  # a student run is not a teacher worker


def test_a_teacher_worker_that_takes_a_student_workers_resources_runs_both():
    assert _runner().combined()
    assert _runner(gpus_per_worker=1, student_workers=3).combined()
    assert not _runner(gpus_per_worker=1, student_gpus_per_worker=0.5).combined()
    assert not _runner(workers_per_trial=2).combined()
    r = _runner(gpus_per_worker=1)
    assert r.demand(RunPhase.BOTH) == r.demand(RunPhase.TEACHERS) == {"CPU": 1.0, "GPU": 1.0}
    assert r.workers(RunPhase.BOTH, 1) == 1


def test_a_finished_fit_drops_checkpoints_train_never_registered(tmp_path):
    """A worker killed between writing and reporting a checkpoint leaves an unregistered one behind."""
    run_dir = tmp_path / "run-both-0"
    for name in ("checkpoint_1", "checkpoint_2", "checkpoint_3"):
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "state.pt").write_bytes(b"x")
    (run_dir / "result.json").write_text("{}")
    kept = SimpleNamespace(path=str(run_dir / "checkpoint_2"))
    dropped = drop_orphan_checkpoints(SimpleNamespace(path=str(run_dir), checkpoint=kept))
    assert sorted(os.path.basename(p) for p in dropped) == ["checkpoint_1", "checkpoint_3"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint_2", "result.json"]
    # a cloud storage path is not a local directory: nothing is touched
    assert drop_orphan_checkpoints(SimpleNamespace(path="s3://bucket/run", checkpoint=None)) == []


def _actor_died(message: str, reason: str = "UNEXPECTED_TERMINATION"):
    """An ActorDiedError as Ray builds it from the GCS's death context (message: the GCS's own text)."""
    from ray.core.generated.common_pb2 import ActorDiedErrorContext, NodeDeathInfo
    from ray.exceptions import ActorDiedError

    return ActorDiedError(ActorDiedErrorContext(error_message=message, actor_id=b"\x01" * 16, class_name="RayTrainWorker",
                                                node_death_info=NodeDeathInfo(reason=getattr(NodeDeathInfo, reason))))


def _worker_group_error(*failures):
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    from ray.train.v2.api.exceptions import WorkerGroupError

    return WorkerGroupError("workers failed", {rank: WorkerHealthCheckFailedError("A worker health check failed.", f)
                                               for rank, f in enumerate(failures)})


NODE_DIED = ("The actor died because its node has died. Node Id: 5d1f\n\tthe actor's node was terminated "
             "unexpectedly: health check failed")
PROCESS_DIED = "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR"


def test_a_fit_that_lost_a_node_is_told_from_one_that_failed_on_its_own():
    from ray.exceptions import NodeDiedError, RayTaskError

    runner = _runner()
    # a rank on the dead node (the others fail with collective errors of their own), however deep
    assert runner.lost_node(_worker_group_error(RuntimeError("gloo: connection reset"), _actor_died(NODE_DIED)))
    assert lost_node(_actor_died("Node was forcibly preempted", "AUTOSCALER_DRAIN_PREEMPTED"))  # preempted
    try:
        try:
            raise NodeDiedError("node 5d1f is dead")
        except NodeDiedError as e:
            raise RuntimeError("fit failed") from e
    except RuntimeError as chained:
        assert lost_node(chained)
    # not a lost node: a worker process that died on a live node, a Python error in training
    assert not lost_node(_worker_group_error(_actor_died(PROCESS_DIED)))
    task_error = RayTaskError("train_fn", "Traceback ...", ValueError("loss is nan"))
    assert not lost_node(_worker_group_error(task_error))
    assert not runner.lost_node(ValueError("a bad batch"))
