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

Faults of one training are that training's outcome, not the run's: a student job whose loss
goes NaN or infinite, or that runs out of device memory, gets a failed result naming it
(``status: failed``, ``error``) and the worker goes on; a teacher whose loss goes NaN fails with
``teachers/<key>/failed.json``, and the jobs that need it get failed results naming it instead
of waiting for it. Rank 0 asks the registry right before publishing whether the key is still
its own (``RegistryClient.still_mine``): a trainer whose lease ran out drops its work. It learns
sooner when a lease renewal finds the key taken over: the training stops at its next progress
line or epoch end (``Superseded``), not at its end.

What a run's workers receive is one :class:`WorkerConfig` (a dataclass: Ray pickles it into
every Train worker); its ``phase`` picks the function (:data:`WORKER_FN`).
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import Enum
from typing import Literal

import torch

from ..config import ExperimentConfig
from ..data import load_prepared
from ..storage import Store
from .claims import StoreClaims
from .events import RUN_FAILED, STUDENT, TEACHER, read_events, worker_name, write_event
from .registry import RegistryClient
from ..train.loop import NonFiniteLoss, Superseded
from ..train.runtime import LocalRuntime, make_runtime
from ..train.student import StudentJob, failed_student, train_student
from ..train.teacher_cache import free_device_memory
from ..train.teacher import TeacherSpec, train_one_teacher
from ..tracking import Tracking, Training, track_training

POLL_S = 1.0
TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's registered checkpoints
TEACHER_FAILED = "failed.json"  # teachers/<key>/failed.json: why a teacher failed (no _COMPLETE marker beside it)


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
    store: str  # the root of the store the artifacts are on (the cache: metakd.jobs.cache)
    data: dict[int, str]  # seed -> store rel path of the prepared data
    registry: RegistryClient
    source: dict  # {trial_id, part} of the trial: recorded with each student result as ``trained_by``
    specs: tuple[TeacherSpec, ...] = ()  # the trial's teachers
    jobs: tuple[StudentJob, ...] = ()  # the trial's student jobs
    runtime: Literal["local", "ray"] = "local"  # in this process, or a Ray Train worker
    ddp: bool = False  # student runs on Ray: all workers are DDP ranks of one job at a time (student_ddp)
    gpu_share: float = 1.0  # of its GPU each worker has (student_gpus_per_worker 0.25: 0.25); sizes the teacher cache
    tracking: Tracking | None = None  # the experiment trackers each training's curve goes to (metakd.tracking)
    attempt: int = 1  # this launch of the run: 1, or 1 + its failed launches (metakd.jobs.schedule), in events
    events: str | None = None  # the root of the store the event files go to (the sweep's; None: store)
    checkpoints: str | None = None  # where Ray Train keeps each run's checkpoints, <checkpoints>/<run>/ (on Ray)


def _stores(config: WorkerConfig) -> tuple[Store, Store, StoreClaims]:
    """(artifacts, events, claims on the artifacts): the worker's view of its cache and its sweep."""
    store = Store(config.store)
    events = Store(config.events) if config.events else store
    return store, events, StoreClaims(store, events.root, config.run)


def _from_rank_zero(runtime, value):
    """Rank 0's ``value`` on every rank of a DDP group (the value itself for one worker)."""
    if runtime.world_size == 1:
        return value
    from ray.train.collective import broadcast_from_rank_zero

    return broadcast_from_rank_zero(value)


def _record(what: str, runtime, run: str, start: float, end: float, **fields) -> dict:
    return {"type": what, **fields, "start": start, "end": end, "run": run, "worker": worker_name(),
            "rank": runtime.rank, "world_size": runtime.world_size, "device": str(runtime.device),
            "gpu_share": getattr(runtime, "gpu_share", 1.0)}


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
    one after another; one that another run lost with its node resumes from that run's last
    checkpoint (:func:`_resume_point`). Returns the summaries of the teachers trained here."""
    cfg = config.experiment
    store, events, claims = _stores(config)
    runtime = make_runtime(config.runtime, cfg.device, epoch_checkpoints=True, gpu_share=config.gpu_share)
    registry = config.registry.for_owner(config.run)
    specs = config.specs
    prepared = _Prepared(store, config.data)
    if runtime.is_main:
        registry.started(config.run)
    summaries = []
    try:
        while True:
            index = _claim_teacher(specs, registry, store, claims) if runtime.is_main else None
            index = _from_rank_zero(runtime, index)
            if index is None:
                break
            spec = specs[index]
            resume = _resume_point(events, config, spec.key) if runtime.is_main else None
            resume = _from_rank_zero(runtime, resume)
            with tempfile.TemporaryDirectory(prefix="metakd-teacher-") as out, \
                    tempfile.TemporaryDirectory(prefix="metakd-resume-") as resume_dir:
                runtime.resume_dir = _fetch_checkpoint(resume, resume_dir)
                start = time.time()
                try:
                    with track_training(config.tracking, Training.of_teacher(spec), runtime) as curves, \
                            _stops_when_lost(runtime, registry, spec.key):
                        summary = train_one_teacher(spec, cfg, prepared(spec.seed), runtime, out, store,
                                                    claims=registry)
                        curves.finish(summary)
                except Superseded as e:  # every rank stops at once: another owner trains it and publishes it
                    runtime.log(str(e))
                    continue
                except NonFiniteLoss as e:  # every rank stops at once (train_stage agrees): the run goes on
                    if runtime.is_main:
                        _teacher_failed(store, registry, runtime, config.run, spec, f"{e} (teacher {spec.key})",
                                        start, events)
                    continue
                end = time.time()
                summary["wall_seconds"] = end - start
                if runtime.is_main:
                    if not _still_mine(registry, spec.key, runtime):
                        continue  # another owner trains it now and publishes it
                    store.publish_dir(out, spec.rel)
                    record = _record("teacher", runtime, config.run, start, end, key=spec.key, kind=spec.kind,
                                     domain=spec.domain, seed=spec.seed, dev_accuracy=summary["dev_accuracy"],
                                     train_seconds=summary["train_seconds"], train_examples=summary["train_examples"],
                                     resumed_epochs=summary.get("resumed_epochs", 0), attempt=config.attempt)
                    _finished(events, registry, TEACHER, record)
            summaries.append(summary)
    finally:
        claims.close()
        registry.close()
    return summaries


def _teacher_failed(store: Store, registry: RegistryClient, runtime, run: str, spec: TeacherSpec, error: str,
                    start: float, events: Store | None = None) -> None:
    """A teacher whose training failed on its own (a non-finite loss): why is written to
    ``teachers/<key>/failed.json`` (no _COMPLETE marker) and its key is done in the registry, so
    the student jobs waiting for it become failed results naming it (:func:`_teacher_failure`)
    instead of waiting forever. A later run of the sweep (a restarted driver) trains it again."""
    runtime.log(error)
    if not _still_mine(registry, spec.key, runtime):
        return
    end = time.time()
    store.write_json(f"{spec.rel}/{TEACHER_FAILED}", {"key": spec.key, "kind": spec.kind, "domain": spec.domain,
                                                      "seed": spec.seed, "status": "failed", "error": error})
    record = _record("teacher", runtime, run, start, end, key=spec.key, kind=spec.kind, domain=spec.domain,
                     seed=spec.seed, dev_accuracy=None, train_seconds=end - start, train_examples=None,
                     status="failed", error=error)
    _finished(events or store, registry, TEACHER, record)


def _teacher_failure(store: Store, job: StudentJob) -> str | None:
    """Why ``job`` cannot be trained: its teacher failed (:func:`_teacher_failed`); None when the
    teacher is published or the job needs none."""
    if job.teacher_rel is None or store.is_complete(job.teacher_rel):
        return None
    try:
        failure = store.read_json(f"{job.teacher_rel}/{TEACHER_FAILED}")
    except FileNotFoundError:
        return None  # neither published nor failed: fetch_dir says so
    return (f"student {job.method}:{job.domain} seed={job.seed} (job {job.key}) not trained: its teacher failed: "
            f"{failure['error']}")


@contextmanager
def _stops_when_lost(runtime, registry: RegistryClient, key: str):
    """Within: the training of ``key`` stops (:class:`Superseded`, at its next progress line or epoch end)
    once a lease renewal finds that another owner has taken ``key`` over; :func:`_still_mine` is the
    last check, right before publishing."""
    runtime.superseded = (lambda: registry.lost_lease(key)) if runtime.is_main else None
    try:
        yield
    finally:
        runtime.superseded = None


def _still_mine(registry: RegistryClient, key: str, runtime) -> bool:
    """Asked right before publishing ``key``: whether this owner still holds it. A lease that ran out
    while the training went on (renewals failed for longer than the lease) may have let another
    owner take the key over; then this owner's work is dropped, not published over theirs."""
    if registry.still_mine(key):
        return True
    runtime.log(f"lost the lease on {key} while training it: another owner took it over, so this training "
                f"is dropped, not published")
    return False


def _resume_point(events: Store, config: WorkerConfig, key: str) -> str | None:
    """Where this run resumes teacher ``key`` that another run lost (a node died under it: its
    ``run_failed`` event names the teacher): the URI of the latest checkpoint Ray Train registered
    for that run (its ``checkpoint_manager_snapshot.json``), or None. This run's own checkpoint Ray
    Train restores anyway; train_stage takes whichever of the two belongs to this teacher and is
    further on."""
    if config.checkpoints is None:
        return None
    lost = [e["run"] for e in read_events(events, RUN_FAILED) if key in (e.get("interrupted") or ())]
    runs = Store(config.checkpoints)
    for run in reversed([r for r in lost if r != config.run]):  # the newest failure first
        try:
            latest = runs.read_json(f"{run}/{TRAIN_SNAPSHOT}")["latest_checkpoint_result"]["checkpoint_dir_name"]
        except (OSError, KeyError, TypeError, ValueError):  # none registered, or a snapshot we cannot read
            continue
        return runs.uri(f"{run}/{latest}")
    return None


def _fetch_checkpoint(uri: str | None, into: str) -> str | None:
    """A copy under ``into`` of the Ray Train checkpoint at ``uri`` (a path or an s3:// / gs:// URI);
    None when there is none, or it went away meanwhile (its run went on and replaced it)."""
    if uri is None:
        return None
    import ray.train

    try:
        return ray.train.Checkpoint(uri).to_directory(f"{into}/checkpoint")
    except Exception:  # noqa: BLE001 - no resume point: the teacher trains from its start
        return None


def _claim_teacher(specs: tuple[TeacherSpec, ...], registry, store: Store,
                   claims: StoreClaims | None = None) -> int | None:
    """Index of the next teacher this run trains (claimed), or None when every one is done or taken."""
    if claims is not None:
        claims.release_all()  # one teacher at a time: the one before is published, or failed
    states = registry.states([s.key for s in specs])
    for i, spec in enumerate(specs):
        state, holder = states[spec.key]
        if state == "done" or (state == "running" and holder != registry.owner):  # own claim: a restarted run
            continue
        if _claim(spec, registry, store, claims):
            return i
    return None


def _claim(item: TeacherSpec | StudentJob, registry: RegistryClient, store: Store,
           claims: StoreClaims | None = None) -> bool:
    """Whether this owner now trains ``item``: claimed in the registry and, with ``claims``, on the
    cache (another sweep may train it now: then the registry claim goes back), and not published
    already (before a restart, or by another sweep; then it is marked done instead)."""
    if registry.claim(item.key) != "mine":
        return False
    if not store.is_complete(item.rel) and claims is not None and not claims.acquire(item.rel):
        registry.release(item.key)
        return False
    if store.is_complete(item.rel):  # looked at again: published by whoever held the cache claim before
        if claims is not None:
            claims.release(item.rel)
        registry.finish(item.key)
        return False
    return True


def student_worker(config: WorkerConfig) -> list[dict]:
    """Per-worker function of a student run: train the trial's student jobs (``config.jobs``) as
    their teachers appear. Returns the results trained here."""
    cfg = config.experiment
    store, events, claims = _stores(config)
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
            step = _next_student(jobs, registry, store, teachers_published, claims) if runtime.is_main else None
            step = _from_rank_zero(runtime, step)
            if step == "stop":
                break
            if step == "wait":
                time.sleep(POLL_S)
                continue
            job = jobs[step]
            failure = _teacher_failure(store, job)
            teacher_dir = store.fetch_dir(job.teacher_rel) if job.teacher_rel and failure is None else None
            start = time.time()
            published = False
            with tempfile.TemporaryDirectory(prefix="metakd-student-") as out:
                # students.keep all: the student itself beside result.json, published with it in one artifact
                keep_dir = out if cfg.students.keep == "all" else None
                if failure is not None:
                    runtime.log(failure)
                    result = failed_student(job, failure, 0.0)
                else:
                    try:
                        with track_training(config.tracking, Training.of_student(job), runtime) as curves, \
                                _stops_when_lost(runtime, registry, job.key):
                            result = _train_or_fail(job, cfg, prepared(job.seed), teacher_dir, runtime, keep_dir,
                                                    store, registry)
                            curves.finish(result)
                    except Superseded as e:  # another owner trains this job now and publishes it
                        runtime.log(str(e))
                        continue
                end = time.time()
                result.update(student_key=job.key, trained_by=config.source)
                if runtime.is_main:
                    with open(f"{out}/result.json", "w") as f:
                        json.dump(result, f)
                    published = _publish_result(store, registry, out, job, result, runtime)
            if published:
                record = _record("student", runtime, config.run, start, end, key=job.key, method=job.method,
                                 domain=job.domain, seed=job.seed, teacher_key=job.teacher_key,
                                 dev_accuracy=result["dev_accuracy"], train_seconds=result["train_seconds"],
                                 trial_id=config.source.get("trial_id"), status=result.get("status", "ok"),
                                 error=result.get("error"), attempt=config.attempt)
                if failure is None:
                    _finished(events, registry, STUDENT, record)
                else:  # nothing was trained: no event (they count trainings); the console still says why
                    registry.finish(job.key, record)
            results.append(result)
    finally:
        claims.close()
        registry.close()
    return results


def _train_or_fail(job: StudentJob, cfg: ExperimentConfig, prepared, teacher_dir: str | None, runtime,
                   keep_dir: str | None, store=None, claims=None) -> dict:
    """:func:`train_student`'s result; or a failed result naming the job (:func:`failed_student`),
    so that the worker's other jobs, and the other workers, go on, when the job failed on its own:

    - its training loss became NaN or infinite (:class:`NonFiniteLoss`: its numbers would be noise);
      DDP ranks stop together there, so this holds for a DDP job too;
    - it ran out of device memory on a worker of its own. DDP ranks wait for each other in
      collectives, so there the error fails the run.

    Any other error is a bug, not an outcome of the job: it fails the run."""
    start = time.time()
    try:
        return train_student(job, cfg, prepared, teacher_dir, runtime, keep_dir, store, claims)
    except NonFiniteLoss as e:  # its message starts with the job: "student <method>:<domain> seed=<seed>: ..."
        error = (f"{e} (job {job.key}) -- recorded as failed, the worker's other jobs go on and a later run of "
                 f"this sweep trains it again")
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


def _publish_result(store: Store, registry: RegistryClient, out: str, job: StudentJob, result: dict,
                    runtime) -> bool:
    """A trained job's directory becomes its complete artifact. A failed job's result.json is written
    without the _COMPLETE marker: this run's trials read it as the job's result (a failed row), and
    a later run (a restarted sweep driver) trains the job again. Neither when this owner lost the
    job to another (:func:`_still_mine`): then False, and the job is not finished here."""
    if not _still_mine(registry, job.key, runtime):
        return False
    if result.get("status", "ok") == "ok":
        store.publish_dir(out, job.rel)
    else:
        store.write_json(f"{job.rel}/result.json", result)
    return True


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


def _next_student(jobs: tuple[StudentJob, ...], registry, store: Store, teachers_published: set[str],
                  claims: StoreClaims | None = None):
    """The index of the next job this worker trains (claimed), "wait" or "stop".

    "wait": nothing to claim now, but a teacher some remaining job needs is being trained (here,
    or by another sweep on the same cache).
    "stop": every remaining job is done, taken by another worker, or waits for a teacher that
    nobody trains yet (the trial driver starts a teacher run for it, and students again after).
    """
    if claims is not None:
        claims.release_all()  # one job at a time: the one before is published, or failed
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
                waiting = waiting or state == "running" or (
                    state == "missing" and claims is not None and claims.foreign(job.teacher_rel) is not None)
                continue
        if _claim(job, registry, store, claims):
            return i
    return "wait" if waiting else "stop"
