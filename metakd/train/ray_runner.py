"""Run the per-worker functions as Ray Train workers: one ``TorchTrainer.fit()`` per call.

A fit costs ~11 s of fixed overhead on a small machine, so a runner trains *all* missing
teachers of a trial in one fit and *all* its students in another.
"""

from __future__ import annotations

import os

from ..config import ResourcesConfig
from .student import student_worker
from .teacher import teacher_worker

# Train V2 polls workers every 2 s and watches for preemption by default; both add seconds
# to every short fit.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Train V2 tees print() to stdout and to its logger, which prints every progress line twice.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


class RayRunner:
    """``TorchTrainer`` per call; ``callbacks`` (e.g. Tune's report callback) go to student fits only."""

    def __init__(self, resources: ResourcesConfig, storage_path: str, run_prefix: str,
                 student_callbacks: list | None = None, max_failures: int = 1):
        self.resources = resources
        self.storage_path = storage_path
        self.run_prefix = run_prefix
        self.student_callbacks = student_callbacks or []
        self.max_failures = max_failures

    def _fit(self, fn, config: dict, name: str, workers: int, gpus: float, callbacks: list) -> list[dict]:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        resources = {"CPU": self.resources.cpus_per_worker}
        if gpus:
            resources["GPU"] = gpus
        trainer = TorchTrainer(
            fn,
            train_loop_config={**config, "runtime": "ray"},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(gpus), resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
            run_config=RunConfig(name=f"{self.run_prefix}-{name}", storage_path=self.storage_path,
                                 failure_config=FailureConfig(max_failures=self.max_failures),
                                 callbacks=callbacks),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        return result.return_value or []

    def train_teachers(self, config: dict) -> list[dict]:
        keys = "-".join(sorted(s["key"][:6] for s in config["specs"]))
        return self._fit(teacher_worker, config, f"teachers-{keys}", self.resources.workers_per_trial,
                         self.resources.gpus_per_worker, [])

    def train_students(self, config: dict) -> list[dict]:
        return self._fit(student_worker, config, "students", self.resources.student_workers,
                         self.resources.student_gpus(), self.student_callbacks)
