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
"""

from __future__ import annotations

import os
import shutil
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

    def __init__(self, resources: ResourcesConfig, storage_path: str, max_failures: int = 1):
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
            train_loop_config={"worker": replace(config, runtime="ray", ddp=ddp, gpu_share=min(1.0, gpus) or 1.0)},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(gpus), resources_per_worker=per_worker),
            # independent student workers never talk to each other: gloo, whatever the devices
            torch_config=TorchConfig(backend="nccl" if gpus and ddp else "gloo"),
            run_config=RunConfig(name=config.run, storage_path=self.storage_path,
                                 failure_config=FailureConfig(max_failures=self.max_failures),
                                 # resume needs only the latest checkpoint; older ones are deleted
                                 checkpoint_config=CheckpointConfig(num_to_keep=1)),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        drop_orphan_checkpoints(result)
        return result.return_value or []


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
