"""One experiment (or one sweep trial): prepared data -> teachers (each trained once) -> students.

The same function serves ``metakd run`` (in-process or on a local Ray instance) and every
sweep trial; what differs is the *runner* (how worker functions run) and the *registry*
(who may train a missing artifact).
"""

from __future__ import annotations

import tempfile
import time
import uuid
from dataclasses import asdict
from typing import Callable, Protocol

from ..config import ExperimentConfig
from ..data import data_key, prepare
from ..storage import Store
from .student import student_worker
from .teacher import TeacherSpec, teacher_spec, teacher_worker


class Registry(Protocol):
    def claim(self, key: str) -> str: ...  # "mine" | "wait" | "done"
    def finish(self, key: str) -> None: ...
    def release(self, key: str) -> None: ...  # the owner failed: the next claim gets it


class LocalRegistry:
    """One process: whoever asks first trains."""

    def __init__(self):
        self.state: dict[str, str] = {}

    def claim(self, key: str) -> str:
        if self.state.get(key) == "done":
            return "done"
        if self.state.get(key) == "running":
            return "wait"
        self.state[key] = "running"
        return "mine"

    def finish(self, key: str) -> None:
        self.state[key] = "done"

    def release(self, key: str) -> None:
        self.state.pop(key, None)


class LocalRunner:
    """Runs the worker functions in this process (tests, ``metakd run`` without Ray)."""

    def train_teachers(self, config: dict) -> list[dict]:
        return teacher_worker({**config, "runtime": "local"})

    def train_students(self, config: dict) -> list[dict]:
        return student_worker({**config, "runtime": "local"})


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


def plan(cfg: ExperimentConfig, domains: list[str]) -> tuple[list[TeacherSpec], list[dict]]:
    """The distinct teachers and the student jobs of an experiment, over all seeds and methods."""
    specs: dict[str, TeacherSpec] = {}
    jobs = []
    for seed in cfg.seeds:
        for method in cfg.methods:
            if method == "metakd_no_target" and len(domains) < 2:
                raise ValueError("metakd_no_target needs at least 2 domains (the teacher skips the target)")
            for domain in domains:  # already restricted to data.domains when given
                spec = teacher_spec(cfg, method, domain, seed)
                if spec is not None:
                    specs.setdefault(spec.key, spec)
                jobs.append({"method": method, "domain": domain, "seed": seed,
                             "teacher_key": spec.key if spec else None, "teacher_rel": spec.rel if spec else None})
    return list(specs.values()), jobs


def run_experiment(cfg: ExperimentConfig, store: Store, registry: Registry, runner, log=print,
                   rows_part: dict | None = None) -> dict:
    """Prepare data, make sure every needed teacher exists (training the missing ones), train the students.

    ``rows_part`` ({root, sweep, trial_id, part, search_params}) makes the student worker write
    the results part after every finished student, so a trial stopped early (ASHA) or killed
    keeps the rows it has.

    Returns {"students": [...], "teachers_trained": [...], "teacher_keys": [...], "domains": [...]}.
    """
    data_rels = ensure_data(cfg, store, registry, log)
    domains = store.read_json(f"{next(iter(data_rels.values()))}/meta.json")["domains"]
    specs, jobs = plan(cfg, domains)
    common = {"experiment": cfg.to_dict(), "store": store.root, "data": {str(s): r for s, r in data_rels.items()}}
    trained: list[dict] = []
    by_key = {s.key: s for s in specs}

    def build(keys: list[str]) -> None:
        log(f"training {len(keys)} teacher(s): " + ", ".join(f"{by_key[k].kind}/{k}" for k in keys))
        summaries = runner.train_teachers({**common, "specs": [asdict(by_key[k]) for k in keys]})
        for s in summaries:
            store.write_json(f"events/teacher_trained/{s['key']}-{uuid.uuid4().hex[:8]}.json",
                             {k: v for k, v in s.items() if k != "curve"})
        trained.extend(summaries)

    reused = len(specs) - len(ensure(store, registry, {s.key: s.rel for s in specs}, build, log))
    if specs:
        log(f"teachers: {len(specs)} needed, {len(specs) - reused} trained here, {reused} reused")
    students = runner.train_students({**common, "jobs": jobs, "rows_part": rows_part}) if jobs else []
    return {"students": students, "teachers_trained": trained, "teacher_keys": [s.key for s in specs],
            "domains": domains}


def count_teacher_trainings(store: Store) -> int:
    """How many teacher trainings ever ran against this store (one event file per training)."""
    return len([1 for _ in _list_files(store, "events/teacher_trained")])


def _list_files(store: Store, rel: str):
    import pyarrow.fs as pafs

    sel = pafs.FileSelector(store.path(rel), allow_not_found=True)
    return [i.path for i in store.fs.get_file_info(sel) if i.type == pafs.FileType.File and i.path.endswith(".json")]
