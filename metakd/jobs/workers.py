"""The per-worker functions: what each Ray Train worker (or this process, in-process) runs.

Both pull their work from the registry instead of being handed a fixed list, so a run keeps
its workers busy for as long as it has work, whoever else is training:

- :func:`teacher_worker`: the ranks of one run (``workers_per_trial``, DDP when more than one)
  train one teacher at a time: rank 0 claims the next missing teacher of the trial, every rank
  trains it, rank 0 publishes it to the store. The run ends when no teacher is left to claim.
- :func:`student_worker`: by default every worker trains student jobs on its own (one job, one
  worker, one device or GPU fraction), claiming the next job whose teacher is published. With
  ``student_ddp`` all workers of the run are DDP ranks of one student at a time instead. A worker
  waits while a teacher its remaining jobs need is being trained, and ends otherwise.
- :func:`teacher_then_student_worker`: one worker that does both in turn, when teachers and
  students take the same resources (one teacher worker, the same GPUs per worker).

Every training leaves an event file (:mod:`metakd.jobs.events`) and a registry record that
the sweep console prints. A student job's result is an artifact like a teacher:
``students/<key>/result.json`` with a ``_COMPLETE`` marker, so a trial that needs a job another
trial trained reads it instead of training it again; under ``students.keep: all`` the student's
weights, architecture and tokenizer are published in the same directory (``metakd export`` reads them).

What a run's workers receive is one :class:`WorkerConfig` (a dataclass: Ray pickles it into
every Train worker); its ``phase`` picks the function (:data:`WORKER_FN`).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, replace
from enum import Enum
from typing import Literal

import torch

from ..config import ExperimentConfig
from ..data import load_prepared
from ..storage import Store
from .events import STUDENT, TEACHER, worker_name, write_event
from .registry import RegistryClient
from ..train.runtime import LocalRuntime, make_runtime
from ..train.student import StudentJob, failed_student, train_student
from ..train.teacher_cache import free_device_memory
from ..train.teacher import TeacherSpec, train_one_teacher
from ..tracking import Tracking, Training, track_training

POLL_S = 1.0


class RunPhase(str, Enum):
    """What one run trains: the trial's missing teachers, its student jobs, or (one worker that
    takes the same resources either way) the teachers and then the students."""

    TEACHERS = "teachers"
    STUDENTS = "students"
    BOTH = "both"

    def __str__(self) -> str:  # run ids read "<trial>-teachers-0"
        return self.value

    @property
    def trains_teachers(self) -> bool:
        return self is not RunPhase.STUDENTS

    @property
    def trains_students(self) -> bool:
        return self is not RunPhase.TEACHERS


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker of one run receives."""

    phase: RunPhase
    run: str  # this run's id: the owner of its registry claims
    experiment: ExperimentConfig
    store: str  # the store's root
    data: dict[int, str]  # seed -> store rel path of the prepared data
    registry: RegistryClient
    source: dict  # {trial_id, part} of the trial: recorded with each student result as ``trained_by``
    specs: tuple[TeacherSpec, ...] = ()  # the trial's teachers
    jobs: tuple[StudentJob, ...] = ()  # the trial's student jobs
    runtime: Literal["local", "ray"] = "local"  # in this process, or a Ray Train worker
    ddp: bool = False  # student runs on Ray: all workers are DDP ranks of one job at a time (student_ddp)
    gpu_share: float = 1.0  # of its GPU each worker has (student_gpus_per_worker 0.25: 0.25); sizes the teacher cache
    tracking: Tracking | None = None  # the experiment trackers each training's curve goes to (metakd.tracking)


def _from_rank_zero(runtime, value):
    """Rank 0's ``value`` on every rank of a DDP group (the value itself for one worker)."""
    if runtime.world_size == 1:
        return value
    from ray.train.collective import broadcast_from_rank_zero

    return broadcast_from_rank_zero(value)


def _record(what: str, runtime, run: str, start: float, end: float, **fields) -> dict:
    return {"type": what, **fields, "start": start, "end": end, "run": run, "worker": worker_name(),
            "rank": runtime.rank, "world_size": runtime.world_size, "device": str(runtime.device)}


def _finished(store: Store, registry: RegistryClient, event: str, record: dict) -> None:
    """A training is over: its event file, and its key done in the registry (whose log the sweep console prints)."""
    write_event(store, event, record)
    registry.finish(record["key"], record)


class _Prepared:
    """Prepared data per seed, loaded once per worker."""

    def __init__(self, store: Store, rels: dict[int, str]):
        self.store, self.rels, self.cache = store, rels, {}

    def __call__(self, seed: int):
        rel = self.rels[seed]
        if rel not in self.cache:
            self.cache[rel] = load_prepared(self.store.fetch_dir(rel))
        return self.cache[rel]


def teacher_worker(config: WorkerConfig) -> list[dict]:
    """Per-worker function of a teacher run: train the trial's missing teachers (``config.specs``)
    one after another. Returns the summaries of the teachers trained here."""
    cfg = config.experiment
    store = Store(config.store)
    runtime = make_runtime(config.runtime, cfg.device, epoch_checkpoints=True, gpu_share=config.gpu_share)
    registry = config.registry.for_owner(config.run)
    specs = config.specs
    prepared = _Prepared(store, config.data)
    if runtime.is_main:
        registry.started(config.run)
    summaries = []
    try:
        while True:
            index = _claim_teacher(specs, registry, store) if runtime.is_main else None
            index = _from_rank_zero(runtime, index)
            if index is None:
                break
            spec = specs[index]
            with tempfile.TemporaryDirectory(prefix="metakd-teacher-") as out:
                start = time.time()
                with track_training(config.tracking, Training.of_teacher(spec), runtime) as curves:
                    summary = train_one_teacher(spec, cfg, prepared(spec.seed), runtime, out, store)
                    curves.finish(summary)
                end = time.time()
                summary["wall_seconds"] = end - start
                if runtime.is_main:
                    store.publish_dir(out, spec.rel)
                    record = _record("teacher", runtime, config.run, start, end, key=spec.key, kind=spec.kind,
                                     domain=spec.domain, seed=spec.seed, dev_accuracy=summary["dev_accuracy"],
                                     train_seconds=summary["train_seconds"], train_examples=summary["train_examples"])
                    _finished(store, registry, TEACHER, record)
            summaries.append(summary)
    finally:
        registry.close()
    return summaries


def _claim_teacher(specs: tuple[TeacherSpec, ...], registry, store: Store) -> int | None:
    """Index of the next teacher this run trains (claimed), or None when every one is done or taken."""
    states = registry.states([s.key for s in specs])
    for i, spec in enumerate(specs):
        state, holder = states[spec.key]
        if state == "done" or (state == "running" and holder != registry.owner):  # own claim: a restarted run
            continue
        if _claim(spec, registry, store):
            return i
    return None


def _claim(item: TeacherSpec | StudentJob, registry: RegistryClient, store: Store) -> bool:
    """Whether this owner now trains ``item``: claimed, and not published already (before a restart;
    then it is marked done instead)."""
    if registry.claim(item.key) != "mine":
        return False
    if store.is_complete(item.rel):
        registry.finish(item.key)
        return False
    return True


def student_worker(config: WorkerConfig) -> list[dict]:
    """Per-worker function of a student run: train the trial's student jobs (``config.jobs``) as
    their teachers appear. Returns the results trained here."""
    cfg = config.experiment
    store = Store(config.store)
    if config.runtime == "ray" and not config.ddp:
        import ray.train.torch

        # one job per worker: no process group, no sharding, the worker's own device (or GPU fraction);
        # the CPU where the YAML says so, or where the GPUs Ray advertises are not CUDA devices here
        device = ray.train.torch.get_device()
        if device.type == "cuda" and (cfg.device == "cpu" or not torch.cuda.is_available()):
            device = torch.device("cpu")
        runtime = LocalRuntime(str(device), gpu_share=config.gpu_share)
        owner = f"{config.run}/w{ray.train.get_context().get_world_rank()}"
    else:
        runtime = make_runtime(config.runtime, cfg.device, epoch_checkpoints=False, gpu_share=config.gpu_share)
        owner = config.run
    registry = config.registry.for_owner(owner)
    jobs = config.jobs
    prepared = _Prepared(store, config.data)
    teachers_published: set[str] = set()
    if runtime.is_main:
        registry.started(config.run)
    results = []
    try:
        while True:
            step = _next_student(jobs, registry, store, teachers_published) if runtime.is_main else None
            step = _from_rank_zero(runtime, step)
            if step == "stop":
                break
            if step == "wait":
                time.sleep(POLL_S)
                continue
            job = jobs[step]
            teacher_dir = store.fetch_dir(job.teacher_rel) if job.teacher_rel else None
            start = time.time()
            with tempfile.TemporaryDirectory(prefix="metakd-student-") as out:
                # students.keep all: the student itself beside result.json, published with it in one artifact
                keep_dir = out if cfg.students.keep == "all" else None
                with track_training(config.tracking, Training.of_student(job), runtime) as curves:
                    result = _train_or_fail(job, cfg, prepared(job.seed), teacher_dir, runtime, keep_dir)
                    curves.finish(result)
                end = time.time()
                result.update(student_key=job.key, trained_by=config.source)
                if runtime.is_main:
                    with open(f"{out}/result.json", "w") as f:
                        json.dump(result, f)
                    _publish_result(store, out, job, result)
            if runtime.is_main:
                record = _record("student", runtime, config.run, start, end, key=job.key, method=job.method,
                                 domain=job.domain, seed=job.seed, teacher_key=job.teacher_key,
                                 dev_accuracy=result["dev_accuracy"], train_seconds=result["train_seconds"],
                                 trial_id=config.source.get("trial_id"), status=result.get("status", "ok"),
                                 error=result.get("error"))
                _finished(store, registry, STUDENT, record)
            results.append(result)
    finally:
        registry.close()
    return results


def _train_or_fail(job: StudentJob, cfg: ExperimentConfig, prepared, teacher_dir: str | None, runtime,
                   keep_dir: str | None) -> dict:
    """:func:`train_student`'s result; or, when the job runs out of device memory on a worker of its
    own, a failed result naming the job (:func:`failed_student`), so that the worker's other jobs,
    and the other workers, go on. DDP ranks wait for each other in collectives, so there the
    error fails the run."""
    start = time.time()
    try:
        return train_student(job, cfg, prepared, teacher_dir, runtime, keep_dir)
    except torch.cuda.OutOfMemoryError as e:
        if runtime.world_size > 1:
            raise
        share = f", {runtime.gpu_share:g} of the GPU" if getattr(runtime, "gpu_share", 1.0) < 1 else ""
        error = (f"student {job.method}:{job.domain} seed={job.seed} (job {job.key}) ran out of memory on "
                 f"{runtime.device}{share}: {str(e).splitlines()[0]} -- recorded as failed, the worker's other "
                 f"jobs go on and a later run of this sweep trains it again; lower distill.batch_size or "
                 f"distill.teacher_cache_gb, or give students more of a GPU (student_gpus_per_worker)")
    free_device_memory()  # the failed job's model, optimizer and cache, now unreachable
    runtime.log(error)
    return failed_student(job, error, time.time() - start)


def _publish_result(store: Store, out: str, job: StudentJob, result: dict) -> None:
    """A trained job's directory becomes its complete artifact. A failed job's result.json is written
    without the _COMPLETE marker: this run's trials read it as the job's result (a failed row), and
    a later run (a restarted sweep driver) trains the job again."""
    if result.get("status", "ok") == "ok":
        store.publish_dir(out, job.rel)
    else:
        store.write_json(f"{job.rel}/result.json", result)


def teacher_then_student_worker(config: WorkerConfig) -> list[dict]:
    """Per-worker function of a one-worker run whose worker trains the trial's missing teachers
    (:func:`teacher_worker`) and then its student jobs (:func:`student_worker`): used when a teacher
    worker and a student worker take the same resources, so a freed worker goes straight on to the
    students that the teachers it just published unblocked, without a new fit. Returns the
    teacher summaries."""
    summaries = teacher_worker(config)
    student_worker(replace(config, ddp=False))
    return summaries


WORKER_FN = {RunPhase.TEACHERS: teacher_worker, RunPhase.STUDENTS: student_worker,
             RunPhase.BOTH: teacher_then_student_worker}


def _next_student(jobs: tuple[StudentJob, ...], registry, store: Store, teachers_published: set[str]):
    """The index of the next job this worker trains (claimed), "wait" or "stop".

    "wait": nothing to claim now, but a teacher some remaining job needs is being trained.
    "stop": every remaining job is done, taken by another worker, or waits for a teacher that
    nobody trains yet (the trial driver starts a teacher run for it, and students again after).
    """
    keys = [j.key for j in jobs] + sorted({j.teacher_key for j in jobs if j.teacher_key})
    states = registry.states(keys)
    waiting = False
    for i, job in enumerate(jobs):
        state, holder = states[job.key]
        if state == "done" or (state == "running" and holder != registry.owner):  # own claim: a restarted worker
            continue
        teacher = job.teacher_key
        if teacher and teacher not in teachers_published:
            state = states[teacher][0]
            if state == "done" or (state == "missing" and store.is_complete(job.teacher_rel)):
                teachers_published.add(teacher)
            else:
                waiting = waiting or state == "running"
                continue
        if _claim(job, registry, store):
            return i
    return "wait" if waiting else "stop"
