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
trial trained reads it instead of training it again.
"""

from __future__ import annotations

import json
import tempfile
import time

import torch

from ..config import from_dict
from ..data import load_prepared
from ..storage import Store
from .events import STUDENT, TEACHER, worker_name, write_event
from ..train.runtime import LocalRuntime, make_runtime
from ..train.student import train_student
from ..train.teacher import TeacherSpec, train_one_teacher

POLL_S = 1.0


def _from_rank_zero(runtime, value):
    """Rank 0's ``value`` on every rank of a DDP group (the value itself for one worker)."""
    if runtime.world_size == 1:
        return value
    from ray.train.collective import broadcast_from_rank_zero

    return broadcast_from_rank_zero(value)


def _record(what: str, runtime, run: str, start: float, end: float, **fields) -> dict:
    return {"type": what, **fields, "start": start, "end": end, "run": run, "worker": worker_name(),
            "rank": runtime.rank, "world_size": runtime.world_size, "device": str(runtime.device)}


class _Prepared:
    """Prepared data per seed, loaded once per worker."""

    def __init__(self, store: Store, rels: dict):
        self.store, self.rels, self.cache = store, rels, {}

    def __call__(self, seed: int):
        rel = self.rels[str(seed)]
        if rel not in self.cache:
            self.cache[rel] = load_prepared(self.store.fetch_dir(rel))
        return self.cache[rel]


def teacher_worker(config: dict) -> list[dict]:
    """Per-worker function of a teacher run: train the trial's missing teachers one after another.

    config: experiment (dict), store (root), data (seed -> rel path of the prepared data), specs
    (TeacherSpec dicts, the trial's teachers), registry (a RegistryClient), run (this run's id,
    the owner of its claims), runtime ("ray" | "local"). Returns the summaries of the teachers
    trained here.
    """
    cfg = from_dict(config["experiment"])
    store = Store(config["store"])
    runtime = make_runtime(config.get("runtime", "local"), cfg.device, epoch_checkpoints=True)
    registry = config["registry"].for_owner(config["run"])
    specs = [TeacherSpec(**s) for s in config["specs"]]
    prepared = _Prepared(store, config["data"])
    if runtime.is_main:
        registry.started(config["run"])
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
                summary = train_one_teacher(spec, cfg, prepared(spec.seed), runtime, out, store)
                end = time.time()
                summary["wall_seconds"] = end - start
                if runtime.is_main:
                    store.publish_dir(out, spec.rel)
                    record = _record("teacher", runtime, config["run"], start, end, key=spec.key, kind=spec.kind,
                                     domain=spec.domain, seed=spec.seed, dev_accuracy=summary["dev_accuracy"],
                                     train_seconds=summary["train_seconds"],
                                     **{k: summary.get(k) for k in ("train_examples", "rank_examples")})
                    write_event(store, TEACHER, record)
                    registry.finish(spec.key, record)
            summaries.append(summary)
    finally:
        registry.close()
    return summaries


def _claim_teacher(specs: list[TeacherSpec], registry, store: Store) -> int | None:
    """Index of the next teacher this run trains (claimed), or None when every one is done or taken."""
    states = registry.states([s.key for s in specs])
    for i, spec in enumerate(specs):
        state, holder = states[spec.key]
        if state == "done" or (state == "running" and holder != registry.owner):  # own claim: a restarted run
            continue
        if registry.claim(spec.key) == "mine":
            if store.is_complete(spec.rel):  # published before a restart
                registry.finish(spec.key)
                continue
            return i
    return None


def student_worker(config: dict) -> list[dict]:
    """Per-worker function of a student run: train the trial's student jobs as their teachers appear.

    config: experiment (dict), store, data, jobs (dicts with key, rel, method, domain, seed,
    teacher_key, teacher_rel), registry, run, source ({trial_id, part}: recorded with each result),
    ddp (all workers train one job together), runtime. Returns the results trained here.
    """
    cfg = from_dict(config["experiment"])
    store = Store(config["store"])
    ddp = config.get("ddp", False)
    if config.get("runtime", "local") == "ray" and not ddp:
        import ray.train.torch

        # one job per worker: no process group, no sharding, the worker's own device (or GPU fraction);
        # the CPU where the YAML says so, or where the GPUs Ray advertises are not CUDA devices here
        device = ray.train.torch.get_device()
        if device.type == "cuda" and (cfg.device == "cpu" or not torch.cuda.is_available()):
            device = torch.device("cpu")
        runtime = LocalRuntime(str(device))
        owner = f"{config['run']}/w{ray.train.get_context().get_world_rank()}"
    else:
        runtime = make_runtime(config.get("runtime", "local"), cfg.device, epoch_checkpoints=False)
        owner = config["run"]
    registry = config["registry"].for_owner(owner)
    jobs = config["jobs"]
    prepared = _Prepared(store, config["data"])
    teachers_published: set[str] = set()
    if runtime.is_main:
        registry.started(config["run"])
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
            teacher_dir = store.fetch_dir(job["teacher_rel"]) if job.get("teacher_rel") else None
            start = time.time()
            result = train_student(job, cfg, prepared(job["seed"]), teacher_dir, runtime)
            end = time.time()
            result.update(student_key=job["key"], trained_by=config["source"])
            if runtime.is_main:
                with tempfile.TemporaryDirectory(prefix="metakd-student-") as out:
                    with open(f"{out}/result.json", "w") as f:
                        json.dump(result, f)
                    store.publish_dir(out, job["rel"])
                record = _record("student", runtime, config["run"], start, end, key=job["key"],
                                 method=job["method"], domain=job["domain"], seed=job["seed"],
                                 teacher_key=job.get("teacher_key"), dev_accuracy=result["dev_accuracy"],
                                 train_seconds=result["train_seconds"], trial_id=config["source"].get("trial_id"))
                write_event(store, STUDENT, record)
                registry.finish(job["key"], record)
            results.append(result)
    finally:
        registry.close()
    return results


def teacher_then_student_worker(config: dict) -> list[dict]:
    """Per-worker function of a one-worker run whose worker trains the trial's missing teachers
    (:func:`teacher_worker`) and then its student jobs (:func:`student_worker`): used when a teacher
    worker and a student worker take the same resources, so a freed worker goes straight on to the
    students that the teachers it just published unblocked, without a new fit. Returns the
    teacher summaries."""
    summaries = teacher_worker(config)
    student_worker({**config, "ddp": False})
    return summaries


def _next_student(jobs: list[dict], registry, store: Store, teachers_published: set[str]):
    """The index of the next job this worker trains (claimed), "wait" or "stop".

    "wait": nothing to claim now, but a teacher some remaining job needs is being trained.
    "stop": every remaining job is done, taken by another worker, or waits for a teacher that
    nobody trains yet (the trial driver starts a teacher run for it, and students again after).
    """
    keys = [j["key"] for j in jobs] + sorted({j["teacher_key"] for j in jobs if j.get("teacher_key")})
    states = registry.states(keys)
    waiting = False
    for i, job in enumerate(jobs):
        state, holder = states[job["key"]]
        if state == "done" or (state == "running" and holder != registry.owner):  # own claim: a restarted worker
            continue
        teacher = job.get("teacher_key")
        if teacher and teacher not in teachers_published:
            state = states[teacher][0]
            if state == "done" or (state == "missing" and store.is_complete(job["teacher_rel"])):
                teachers_published.add(teacher)
            else:
                waiting = waiting or state == "running"
                continue
        if registry.claim(job["key"]) == "mine":
            if store.is_complete(job["rel"]):  # published before a restart
                registry.finish(job["key"])
                continue
            return i
    return "wait" if waiting else "stop"
