"""Start runs of the per-worker functions as Ray Train workers: one ``TorchTrainer.fit()`` per run.

A fit costs ~11 s of fixed overhead on a small machine, so a run's workers pull work until
none is left (:mod:`metakd.jobs.workers`) instead of one fit per teacher or student.

- teacher run: ``workers_per_trial`` workers of ``cpus_per_worker`` CPUs and ``gpus_per_worker``
  GPUs, DDP ranks of one teacher at a time (NCCL on GPUs, gloo on CPUs);
- student run: up to ``student_workers`` workers of ``cpus_per_worker`` CPUs and
  ``student_gpus_per_worker`` GPUs (fractions allowed), each training its own jobs; with
  ``student_ddp: true`` all of them are DDP ranks of one student at a time instead;
- ``RunPhase.BOTH``: when a teacher worker and a student worker are the same (``workers_per_trial: 1``,
  equal GPUs per worker, no ``student_ddp``), a teacher run's one worker goes on to train student
  jobs once no teacher is left to claim, instead of ending and leaving them to a new fit.

A fit that fails is not restarted by Train (``FailureConfig(max_failures=0,
max_preemption_failures=0)``): the failure goes to the trial's driver, which can tell a lost
node from other causes (:func:`lost_node`; Train itself tells only preemptions apart) and
launches the run again under the same name, so that Train restores the run's latest checkpoint
(:class:`~metakd.jobs.schedule.TrialSchedule`). One place counts every failure of a run.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace

from ..config import ResourcesConfig
from .workers import WORKER_FN, RunPhase, WorkerConfig

# Train V2 polls workers every 2 s and watches for preemption by default; both add seconds
# to every short fit.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Train V2 tees print() to stdout and to its logger, which prints every progress line twice.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def ray_train_worker(loop_config: dict) -> list[dict]:
    """What every Train worker of a run runs: its phase's per-worker function. Train takes a dict
    (it exports it as JSON), so the typed config travels in it under ``"worker"``."""
    config: WorkerConfig = loop_config["worker"]
    return WORKER_FN[config.phase](config)


class RayRunner:
    """The :class:`~metakd.jobs.schedule.Runner` of sweeps and ``metakd run --ray``: starts teacher
    and student runs as ``TorchTrainer`` fits (see the module doc)."""

    poll_s = 1.0

    def __init__(self, resources: ResourcesConfig, storage_path: str, max_failures: int = 3):
        self.resources = resources
        self.storage_path = storage_path
        self.max_failures = max_failures

    def combined(self) -> bool:
        """Whether teacher runs are ``RunPhase.BOTH`` runs (see the module doc)."""
        r = self.resources
        return r.workers_per_trial == 1 and r.gpus_per_worker == r.student_gpus() and not r.student_ddp

    def gpus_per_worker(self, phase: RunPhase) -> float:
        """GPUs each worker of a run of ``phase`` gets (what decides ``precision: auto`` for its artifacts)."""
        r = self.resources
        return float(r.student_gpus() if phase is RunPhase.STUDENTS else r.gpus_per_worker)

    def _per_worker(self, phase: RunPhase) -> dict[str, float]:
        gpus = self.gpus_per_worker(phase)
        return {"CPU": float(self.resources.cpus_per_worker), **({"GPU": gpus} if gpus else {})}

    def demand(self, phase: RunPhase) -> dict[str, float]:
        """Resources of one admission unit: a whole teacher run; one student worker (a whole run with DDP)."""
        ranks = self.workers(phase, 1)
        return {res: v * ranks for res, v in self._per_worker(phase).items()}

    def workers(self, phase: RunPhase, units: int) -> int:
        if phase is not RunPhase.STUDENTS:
            return self.resources.workers_per_trial
        return self.resources.student_workers if self.resources.student_ddp else units

    def max_units(self, phase: RunPhase) -> int:
        if phase is not RunPhase.STUDENTS or self.resources.student_ddp:
            return 1
        return self.resources.student_workers

    def available(self) -> dict[str, float]:
        import ray

        return ray.available_resources()

    def fits(self, per_unit: dict[str, float]) -> bool:
        """Whether the cluster as it is now could hold one unit at all (else it has to scale up)."""
        import ray

        total = ray.cluster_resources()
        return all(total.get(res, 0.0) >= need for res, need in per_unit.items())

    def start(self, config: WorkerConfig, workers: int) -> list[dict]:
        """Run one fit to its end; returns what its rank-0 worker trained."""
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        phase = config.phase
        per_worker = self._per_worker(phase)
        gpus = per_worker.get("GPU", 0)
        ddp = phase is RunPhase.TEACHERS or (phase is RunPhase.STUDENTS and self.resources.student_ddp)
        trainer = TorchTrainer(
            ray_train_worker,
            # a fractional GPU (0.25: four workers on one) is what the worker's teacher cache may plan on
            train_loop_config={"worker": replace(config, runtime="ray", ddp=ddp, gpu_share=min(1.0, gpus) or 1.0,
                                                 checkpoints=self.storage_path)},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(gpus), resources_per_worker=per_worker),
            # independent student workers never talk to each other: gloo, whatever the devices
            torch_config=TorchConfig(backend="nccl" if gpus and ddp else "gloo"),
            run_config=RunConfig(name=config.run, storage_path=self.storage_path,
                                 # every failure goes to the trial's driver (see the module doc)
                                 failure_config=FailureConfig(max_failures=0, max_preemption_failures=0),
                                 # resume needs only the latest checkpoint; older ones are deleted
                                 checkpoint_config=CheckpointConfig(num_to_keep=1)),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        drop_orphan_checkpoints(result)
        return result.return_value or []

    def lost_node(self, error: BaseException) -> bool:
        """Whether a failed run's ``error`` says one of its nodes died (:func:`lost_node`). Asks for at
        most 40 s, within the registry's 60 s lease that keeps the run's claims held meanwhile."""
        return lost_node(error, wait_s=40.0)


# What Ray's GCS says of an actor whose node died ("The actor died because its node has died.
# Node Id: ...\n\tthe actor's node was terminated unexpectedly: ..."); ActorDiedError keeps only
# this message (and ``preempted``) of the node's death info.
NODE_DIED = "because its node has died"


def lost_node(error: BaseException, wait_s: float = 60.0) -> bool:
    """Whether a failed fit's ``error`` was caused by a node that died, as far as Ray tells.

    Anywhere in its chain (``__cause__``, ``__context__``, a Train worker group's failures per
    rank, a worker health check's failure, a controller's failure, a task error's cause): a
    ``NodeDiedError``; an actor error that is a preemption (``RayActorError.preempted``) or names
    its node's death; or an actor error that does not say why (a health check that lost its worker
    before Ray decided the node was dead: ``ActorUnavailableError``, connection reset) whose actor's
    node the GCS marks dead within ``wait_s`` (:func:`_node_died_under`). One rank on a lost node is
    enough: the other ranks of a DDP group then fail with collective errors of their own.
    """
    from ray.exceptions import NodeDiedError, RayActorError

    todo, seen, actors = [error], set(), []
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, NodeDiedError):
            return True
        if isinstance(e, RayActorError):
            if e.preempted or NODE_DIED in str(e):
                return True
            if e.actor_id:
                actors.append(e.actor_id)
        linked = [e.__cause__, e.__context__, getattr(e, "health_check_failure", None),
                  getattr(e, "controller_failure", None), getattr(e, "cause", None),
                  *(getattr(e, "worker_failures", None) or {}).values()]
        todo += [x for x in linked if isinstance(x, BaseException)]
    deadline = time.monotonic() + wait_s
    return any(_node_died_under(actor, deadline) for actor in actors)


def _node_died_under(actor_id: str, deadline: float) -> bool:
    """Whether actor ``actor_id`` (hex) died with its node, waiting until ``deadline`` for the GCS to
    say: it marks a node dead only after missed health checks (seconds), and the actor may be dead
    already, killed by Train tearing down the failed run's workers (``RAY_KILL``). An actor whose
    own process died (``WORKER_DIED``, out of memory) on a live node is not a lost node. False when
    Ray cannot tell (not connected, the actor unknown)."""
    import ray
    from ray.core.generated.common_pb2 import ActorDiedErrorContext

    if not ray.is_initialized():
        return False
    try:
        # no public API reads an actor's node without the dashboard's state server
        from ray._private.state import actors

        while True:
            info = actors(actor_id=actor_id)
            node = (info.get("Address") or {}).get("NodeID")
            if not node:
                return False
            if not {n["NodeID"]: n["Alive"] for n in ray.nodes()}.get(node, False):
                return True
            cause = info.get("DeathCause")
            if info.get("State") == "DEAD" and cause is not None:
                if cause.HasField("oom_context"):
                    return False
                reason = cause.actor_died_error_context.reason
                if reason == ActorDiedErrorContext.NODE_DIED:
                    return True
                if reason == ActorDiedErrorContext.WORKER_DIED:
                    return False
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)
    except Exception:  # noqa: BLE001 - an answer we cannot get is "not a lost node": the failure counts
        return False


def drop_orphan_checkpoints(result) -> list[str]:
    """Delete checkpoint directories of a finished fit that Train never registered.

    ``num_to_keep`` deletes only checkpoints Train registered; a worker killed between writing a
    checkpoint and reporting it leaves that directory behind, unregistered, forever. Local
    storage only (a cloud ``storage_path`` is left alone). Returns the deleted paths.
    """
    run_dir = getattr(result, "path", None)
    if not run_dir or not os.path.isdir(run_dir):
        return []
    kept = os.path.realpath(result.checkpoint.path) if result.checkpoint is not None else None
    dropped = []
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if name.startswith("checkpoint_") and os.path.isdir(path) and os.path.realpath(path) != kept:
            shutil.rmtree(path, ignore_errors=True)
            dropped.append(path)
    return dropped
