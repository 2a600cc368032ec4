"""One experiment (or one sweep trial): prepared data -> its teachers and student jobs, each
trained once (by whoever claims it first) and reused from the store afterwards.

The same function serves ``metakd run`` (in-process or on a local Ray instance) and every
sweep trial; what differs is the *runner* (a :class:`metakd.jobs.schedule.Runner`: how runs of
the per-worker functions start: threads here, ``TorchTrainer`` fits in :mod:`metakd.jobs.ray_runner`)
and the *registry* (who may train a missing artifact, :mod:`metakd.jobs.registry`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import fields, replace
from typing import Callable

from ..config import ExperimentConfig, ModelConfig, content_hash
from ..data import data_identity, data_key, fingerprint, prepare, publish_prepared
from ..methods import METHODS, STUDENT_KINDS
from ..storage import Store
from .claims import StoreClaims
from .registry import RegistryClient
from .schedule import Runner, TrialSchedule
from ..train.precision import planned
from ..train.student import StudentJob
from ..train.teacher import TeacherSpec, teacher_spec
from .workers import WORKER_FN, RunPhase, WorkerConfig

STUDENT_VERSION = "student-v1"  # bump when student training changes so that stale results are not reused
# sections that never reach a student (run bookkeeping, or covered by the teacher key)
_NOT_STUDENT = ("name", "methods", "seeds", "output_dir", "search", "data", "teacher", "student", "meta_teacher",
                "distill")


class LocalRunner:
    """The :class:`~metakd.jobs.schedule.Runner` of tests and ``metakd run`` without Ray: runs the
    per-worker functions in this process, one run of one worker at a time (the teachers first,
    then the students)."""

    poll_s = 0.05
    max_failures = 0  # a run in this process fails only on an error of its own: launching it again repeats it

    def __init__(self):
        self._lock = threading.Lock()
        self._active = 0

    def lost_node(self, error: BaseException) -> bool:
        return False  # one process, no nodes

    def demand(self, phase: RunPhase) -> dict[str, float]:
        return {"run": 1.0}

    def workers(self, phase: RunPhase, units: int) -> int:
        return 1

    def max_units(self, phase: RunPhase) -> int:
        return 1

    def available(self) -> dict:
        return {"run": 0.0 if self._active else 1.0}

    def fits(self, per_unit: dict) -> bool:
        return True

    def combined(self) -> bool:
        return False

    def gpus_per_worker(self, phase: RunPhase) -> None:
        return None  # the worker is this process: a GPU when CUDA is available here

    def start(self, config: WorkerConfig, workers: int) -> list[dict]:
        with self._lock:
            self._active += 1
            try:
                return WORKER_FN[config.phase](replace(config, runtime="local"))
            finally:
                self._active -= 1


def ensure(store: Store, registry: RegistryClient, items: dict[str, str], build: Callable[[list[str]], None], *,
           poll_s: float = 1.0, timeout_s: float | None = None, claims: StoreClaims | None = None) -> list[str]:
    """Make every artifact in ``items`` (key -> store rel path) complete; return the keys built here.

    Keys already complete on the store are reused. Missing keys are claimed through the
    registry, and with ``claims`` on the store too (another sweep on the same cache may build
    them now); the ones this caller owns are built together by ``build(keys)``; the others
    are waited for, and taken over if their owner releases them (it failed).
    """
    built: list[str] = []
    pending = {k: rel for k, rel in items.items() if not store.is_complete(rel)}
    start = time.monotonic()
    while pending:
        mine = []
        for key in list(pending):
            if store.is_complete(pending[key]):
                registry.finish(key)
                del pending[key]
                continue
            if registry.claim(key) == "mine":
                if claims is None or claims.acquire(pending[key]):
                    mine.append(key)
                else:  # another sweep builds it: wait for its marker
                    registry.release(key)
        if mine:
            try:
                build(mine)
            except BaseException:
                for key in mine:
                    registry.release(key)
                    if claims is not None:
                        claims.release(pending[key])
                raise
            for key in mine:
                if not store.is_complete(pending[key]):
                    registry.release(key)
                    raise RuntimeError(f"building {pending[key]} finished without a complete artifact on {store}")
                registry.finish(key)
                if claims is not None:
                    claims.release(pending[key])
                del pending[key]
            built.extend(mine)
        elif pending:
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise TimeoutError(f"waited {timeout_s:.0f}s for {sorted(pending.values())}")
            time.sleep(poll_s)
    return built


def ensure_data(cfg: ExperimentConfig, store: Store, registry: RegistryClient, log=print,
                events: Store | None = None) -> dict[int, str]:
    """Prepared (split, subsampled, tokenised) data per seed, built once and shared: seed -> rel.

    The keys hold the fingerprint of the source's contents, hashed once here: edited files are
    prepared again (and what was trained on them, whose keys hold it too, trained again)."""
    checkpoint = cfg.teacher.checkpoint or cfg.student.checkpoint
    contents = fingerprint(cfg.data)
    rels = {seed: f"data/{data_key(cfg.data, seed, checkpoint, contents)}" for seed in cfg.seeds}
    by_key = {rel.split("/", 1)[1]: rel for rel in rels.values()}

    def build(keys: list[str]) -> None:
        for seed, rel in rels.items():
            if rel.split("/", 1)[1] in keys and not store.is_complete(rel):
                log(f"preparing data for seed {seed} -> {store.uri(rel)}")
                publish_prepared(prepare(cfg.data, seed, checkpoint, fingerprint=contents), store, rel)

    claims = StoreClaims(store, events.root if events is not None else store.root, "data")
    try:
        ensure(store, registry, by_key, build, claims=claims)
    finally:
        claims.close()
    return rels


def student_identity(cfg: ExperimentConfig, method: str, domain: str, seed: int, teacher_key: str | None,
                     precision: str | None = None, data_fingerprint: str | None = None) -> dict:
    """Exactly what determines a student job's result: its teacher, method, domain, seed, the
    student model, the data (config and ``data_fingerprint``: :func:`metakd.data.data_identity`),
    and the settings this method reads.

    The precision is the resolved one (``precision`` from :func:`metakd.train.precision.planned`;
    None: planned for this process), never ``auto``: an fp32 (CPU) student is not a bf16 one.

    gamma2 enters only for metakd / metakd_no_target; student_ft (no teacher) keeps the
    fine-tuning settings and the teacher's architecture (its layer map, ``init_from_teacher``)
    but no distillation setting. A sweep over gamma2 thus shares every baseline student.
    """
    full = cfg.to_dict()
    # the settings this method and this kind of student (dense, pruned: metakd/methods.py) read
    distill = METHODS[method].student_distill(full["distill"], STUDENT_KINDS[cfg.student.kind])
    student = full["student"]
    prune = student.pop("prune", None)  # absent, not None, for a dense student: dense keys stay as they were
    if prune is not None:
        student["prune"] = cfg.student.prune.used()
    ident = {"version": STUDENT_VERSION, "method": method, "domain": domain, "seed": seed,
             "teacher_key": teacher_key, "student": student, "data": data_identity(cfg.data, data_fingerprint),
             "distill": distill,
             "run": {k: v for k, v in full.items() if k not in _NOT_STUDENT}}  # device, precision, ...
    ident["run"]["precision"] = precision or planned(cfg.precision, cfg.device)
    if teacher_key is None:
        model_fields = {f.name for f in fields(ModelConfig)}
        ident["teacher_model"] = {k: v for k, v in full["teacher"].items() if k in model_fields}
    return ident


def plan(cfg: ExperimentConfig, domains: list[str], teacher_gpus: float | None = None,
         student_gpus: float | None = None, data_fingerprint: str | None = None
         ) -> tuple[list[TeacherSpec], list[StudentJob]]:
    """The distinct teachers and the student jobs of an experiment, over all seeds and methods.

    A job's ``key`` is a content hash of :func:`student_identity`; its teacher is None for student_ft.
    ``teacher_gpus`` / ``student_gpus``: GPUs per teacher / student worker (None: this process),
    which resolve ``precision: auto`` for the keys and for the workers (``TeacherSpec.precision``,
    ``StudentJob.precision``), here, where the work is planned: a trial driver on a CPU-only head
    plans bf16 for GPU workers.
    """
    specs: dict[str, TeacherSpec] = {}
    jobs: list[StudentJob] = []
    precision = planned(cfg.precision, cfg.device, student_gpus)
    for seed in cfg.seeds:
        for method in cfg.methods:
            if len(domains) < METHODS[method].min_domains:
                raise ValueError(f"{method} needs at least {METHODS[method].min_domains} domains")
            for domain in domains:  # already restricted to data.domains when given
                spec = teacher_spec(cfg, method, domain, seed, teacher_gpus, data_fingerprint)
                if spec is not None:
                    specs.setdefault(spec.key, spec)
                key = content_hash(student_identity(cfg, method, domain, seed, spec.key if spec else None,
                                                    precision, data_fingerprint))
                jobs.append(StudentJob(method, domain, seed, key, spec.key if spec else None,
                                       spec.rel if spec else None, precision))
    return list(specs.values()), jobs


def run_experiment(cfg: ExperimentConfig, store: Store, registry: RegistryClient, runner: Runner, log=print,
                   on_students: Callable[[list[dict], list[dict]], None] | None = None,
                   source: dict | None = None, run_prefix: str = "run", tracking=None,
                   events: Store | None = None) -> dict:
    """Prepare data, then train every missing teacher and student job as soon as it can start
    (:class:`metakd.jobs.schedule.TrialSchedule`), reusing whatever the store already holds.

    ``store`` holds the artifacts (the cache of :mod:`metakd.jobs.cache`), ``events`` the event
    files of the sweep or run (its directory; None: ``store``).

    ``source`` ({trial_id, part}) is recorded with every student trained here; a result whose
    ``part`` differs (another trial's configuration trained the same job) comes back with
    ``reused_from`` = that trial's id. ``on_students(new, so_far)`` is called whenever jobs
    finish, so a sweep trial writes its rows after every student. ``tracking`` (a
    :class:`metakd.tracking.Tracking`): where the workers log each training's curve.

    Returns {"students": [...] (job order), "teachers_trained": [...], "teacher_keys": [...],
    "domains": [...]}.
    """
    source = source or {"trial_id": run_prefix, "part": run_prefix}
    data_rels = ensure_data(cfg, store, registry, log, events)
    data_meta = store.read_json(f"{next(iter(data_rels.values()))}/meta.json")
    domains = data_meta["domains"]
    for note in data_meta.get("notes", []):  # e.g. how many unlabelled rows were dropped
        log(f"data: {note}")
    specs, jobs = plan(cfg, domains, runner.gpus_per_worker(RunPhase.TEACHERS),
                       runner.gpus_per_worker(RunPhase.STUDENTS), data_meta.get("fingerprint"))

    def annotate(results: list[dict]) -> list[dict]:
        for r in results:
            by = r.get("trained_by") or {}
            r["reused_from"] = by.get("trial_id") if by.get("part") != source["part"] else None
        return results

    def finished(new: list[dict], so_far: list[dict]) -> None:
        if on_students is not None:
            on_students(annotate(new), annotate(so_far))

    schedule = TrialSchedule(cfg, specs, jobs, data_rels, store, registry, runner, source, run_prefix, log, finished,
                             tracking, events)
    students, trained = schedule.run()
    reused = len(specs) - len(trained)
    if specs:
        log(f"teachers: {len(specs)} needed, {len(trained)} trained here, {reused} reused")
    return {"students": annotate(students), "teachers_trained": trained, "teacher_keys": [s.key for s in specs],
            "domains": domains}
