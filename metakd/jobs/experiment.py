"""One experiment (or one sweep trial): prepared data -> its teachers and student jobs, each
trained once (by whoever claims it first) and reused from the store afterwards.

The same function serves ``metakd run`` (in-process or on a local Ray instance) and every
sweep trial; what differs is the *runner* (how runs of the per-worker functions start: threads
here, ``TorchTrainer`` fits in :mod:`metakd.jobs.ray_runner`) and the *registry* (who may train
a missing artifact, :mod:`metakd.jobs.registry`).
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import fields
from typing import Callable

from ..config import ExperimentConfig, ModelConfig, content_hash
from ..data import data_key, prepare
from ..methods import METHODS
from ..storage import Store
from .events import count_student_trainings, count_teacher_trainings  # noqa: F401 (re-exported)
from .registry import LocalRegistry, RegistryClient  # noqa: F401 (LocalRegistry re-exported)
from .schedule import TrialSchedule
from ..train.teacher import TeacherSpec, teacher_spec
from .workers import student_worker, teacher_worker

Registry = RegistryClient  # claim / finish / release / states / admit ...: metakd.jobs.registry

STUDENT_VERSION = "student-v1"  # bump when student training changes so that stale results are not reused
# sections that never reach a student (run bookkeeping, or covered by the teacher key)
_NOT_STUDENT = ("name", "methods", "seeds", "output_dir", "search", "data", "teacher", "student", "meta_teacher",
                "distill")


class LocalRunner:
    """Runs the per-worker functions in this process, one run at a time (tests, ``metakd run``
    without Ray): the teachers first, then the students."""

    poll_s = 0.05

    def __init__(self):
        self._lock = threading.Lock()
        self._active = 0

    def demand(self, kind: str) -> dict:
        return {"run": 1.0}

    def workers(self, kind: str, units: int) -> int:
        return 1

    def max_units(self, kind: str) -> int:
        return 1

    def available(self) -> dict:
        return {"run": 0.0 if self._active else 1.0}

    def fits(self, per_unit: dict) -> bool:
        return True

    def combined(self) -> bool:
        return False

    def start(self, kind: str, config: dict, workers: int, run_id: str) -> list[dict]:
        fn = teacher_worker if kind == "teachers" else student_worker
        with self._lock:
            self._active += 1
            try:
                return fn({**config, "runtime": "local"})
            finally:
                self._active -= 1


def ensure(store: Store, registry: Registry, items: dict[str, str], build: Callable[[list[str]], None],
           log=print, poll_s: float = 1.0, timeout_s: float | None = None) -> list[str]:
    """Make every artifact in ``items`` (key -> store rel path) complete; return the keys built here.

    Keys already complete on the store are reused. Missing keys are claimed through the
    registry; the ones this caller owns are built together by ``build(keys)``; the others
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
                mine.append(key)
        if mine:
            try:
                build(mine)
            except BaseException:
                for key in mine:
                    registry.release(key)
                raise
            for key in mine:
                if not store.is_complete(pending[key]):
                    registry.release(key)
                    raise RuntimeError(f"building {pending[key]} finished without a complete artifact on {store}")
                registry.finish(key)
                del pending[key]
            built.extend(mine)
        elif pending:
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise TimeoutError(f"waited {timeout_s:.0f}s for {sorted(pending.values())}")
            time.sleep(poll_s)
    return built


def ensure_data(cfg: ExperimentConfig, store: Store, registry: Registry, log=print) -> dict[int, str]:
    """Prepared (split, subsampled, tokenised) data per seed, built once and shared: seed -> rel."""
    checkpoint = cfg.teacher.checkpoint or cfg.student.checkpoint
    rels = {seed: f"data/{data_key(cfg.data, seed, checkpoint)}" for seed in cfg.seeds}
    by_key = {rel.split("/", 1)[1]: rel for rel in rels.values()}

    def build(keys: list[str]) -> None:
        for seed, rel in rels.items():
            if rel.split("/", 1)[1] in keys and not store.is_complete(rel):
                log(f"preparing data for seed {seed} -> {store.uri(rel)}")
                if store.local_root is not None:
                    prepare(cfg.data, seed, checkpoint, cache_dir=str(store.local_root / "data"),
                            vocab_size=cfg.data.vocab_size)
                else:
                    with tempfile.TemporaryDirectory() as tmp:
                        prepare(cfg.data, seed, checkpoint, cache_dir=tmp, vocab_size=cfg.data.vocab_size)
                        store.publish_dir(f"{tmp}/{rel.split('/', 1)[1]}", rel)

    ensure(store, registry, by_key, build, log)
    return rels


def student_identity(cfg: ExperimentConfig, method: str, domain: str, seed: int, teacher_key: str | None) -> dict:
    """Exactly what determines a student job's result: its teacher, method, domain, seed, the
    student model, the data, and the settings this method reads.

    gamma2 enters only for metakd / metakd_no_target; student_ft (no teacher) keeps the
    fine-tuning settings and the teacher's architecture (its layer map, ``init_from_teacher``)
    but no distillation setting. A sweep over gamma2 thus shares every baseline student.
    """
    full = cfg.to_dict()
    distill = METHODS[method].student_distill(full["distill"])  # the settings this method reads
    ident = {"version": STUDENT_VERSION, "method": method, "domain": domain, "seed": seed,
             "teacher_key": teacher_key, "student": full["student"], "data": full["data"], "distill": distill,
             "run": {k: v for k, v in full.items() if k not in _NOT_STUDENT}}  # device, precision, ...
    if teacher_key is None:
        model_fields = {f.name for f in fields(ModelConfig)}
        ident["teacher_model"] = {k: v for k, v in full["teacher"].items() if k in model_fields}
    return ident


def plan(cfg: ExperimentConfig, domains: list[str]) -> tuple[list[TeacherSpec], list[dict]]:
    """The distinct teachers and the student jobs of an experiment, over all seeds and methods.

    A job: method, domain, seed, teacher_key / teacher_rel (None for student_ft), and its own
    ``key`` (a content hash of :func:`student_identity`) with ``rel`` = ``students/<key>``.
    """
    specs: dict[str, TeacherSpec] = {}
    jobs = []
    for seed in cfg.seeds:
        for method in cfg.methods:
            if len(domains) < METHODS[method].min_domains:
                raise ValueError(f"{method} needs at least {METHODS[method].min_domains} domains")
            for domain in domains:  # already restricted to data.domains when given
                spec = teacher_spec(cfg, method, domain, seed)
                if spec is not None:
                    specs.setdefault(spec.key, spec)
                key = content_hash(student_identity(cfg, method, domain, seed, spec.key if spec else None))
                jobs.append({"method": method, "domain": domain, "seed": seed, "key": key, "rel": f"students/{key}",
                             "teacher_key": spec.key if spec else None, "teacher_rel": spec.rel if spec else None})
    return list(specs.values()), jobs


def run_experiment(cfg: ExperimentConfig, store: Store, registry: Registry, runner, log=print,
                   on_students: Callable[[list[dict], list[dict]], None] | None = None,
                   source: dict | None = None, run_prefix: str = "run") -> dict:
    """Prepare data, then train every missing teacher and student job as soon as it can start
    (:class:`metakd.jobs.schedule.TrialSchedule`), reusing whatever the store already holds.

    ``source`` ({trial_id, part}) is recorded with every student trained here; a result whose
    ``part`` differs (another trial's configuration trained the same job) comes back with
    ``reused_from`` = that trial's id. ``on_students(new, so_far)`` is called whenever jobs
    finish, so a sweep trial writes its rows after every student.

    Returns {"students": [...] (job order), "teachers_trained": [...], "teacher_keys": [...],
    "domains": [...]}.
    """
    source = source or {"trial_id": run_prefix, "part": run_prefix}
    data_rels = ensure_data(cfg, store, registry, log)
    domains = store.read_json(f"{next(iter(data_rels.values()))}/meta.json")["domains"]
    specs, jobs = plan(cfg, domains)
    common = {"experiment": cfg.to_dict(), "store": store.root, "data": {str(s): r for s, r in data_rels.items()},
              "registry": registry, "source": source}

    def annotate(results: list[dict]) -> list[dict]:
        for r in results:
            by = r.get("trained_by") or {}
            r["reused_from"] = by.get("trial_id") if by.get("part") != source["part"] else None
        return results

    def finished(new: list[dict], so_far: list[dict]) -> None:
        if on_students is not None:
            on_students(annotate(new), annotate(so_far))

    schedule = TrialSchedule(specs, jobs, common, store, registry, runner, run_prefix, log, finished,
                             getattr(runner, "poll_s", 1.0))
    students, trained = schedule.run()
    reused = len(specs) - len(trained)
    if specs:
        log(f"teachers: {len(specs)} needed, {len(trained)} trained here, {reused} reused")
    return {"students": annotate(students), "teachers_trained": trained, "teacher_keys": [s.key for s in specs],
            "domains": domains}
