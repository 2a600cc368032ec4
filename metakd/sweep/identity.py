"""A sweep's identity on its storage: the configuration it was started with, and who runs it now.

    <storage>/<name>/sweep_config.json   the resolved configuration of the Tune run in this directory
    <storage>/<name>/_running.json       the driver running it: host, pid, heartbeat (renewed every 30 s)
    <storage>/<name>/previous/<time>/    what ``--restart`` moved aside: results, curves, tune, events, study

A rerun under the same name resumes only with the same configuration (:func:`check_config`
refuses another, listing the fields that differ); ``--restart`` (:func:`archive_run`) starts a
new Tune run and keeps the old one's tables apart. Teachers, students and prepared data stay:
they are content-addressed, so the new run reuses whatever it shares with the old.

One difference is an extension, not another configuration: a searched sweep (optuna, random)
whose only change is a larger ``search.num_samples`` adds trials to the same Optuna study
(:mod:`metakd.sweep.study`). The added trials run as a new Tune run,
``tune-extensions/n<num_samples>/`` (:func:`tune_run`), their rows beside the earlier ones.

:class:`SweepLock` refuses a second driver of the same sweep while one runs. On a local
filesystem the lock file is created with ``O_EXCL`` (atomic); on an object store (s3://, gs://)
it is read, then written: two drivers started within a second of each other can both pass.
A lock whose heartbeat is older than ``STALE_S``, or whose process is gone (same host), is taken over.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
import uuid

import pyarrow.fs as pafs

from ..config import ConfigError, ExperimentConfig, SearchConfig
from ..storage import Store
from .study import JOURNAL, RECORD, check_extendable

CONFIG = "sweep_config.json"
LOCK = "_running.json"
TUNE = "tune"
EXTENSIONS = "tune-extensions"  # the Tune runs of extensions: tune-extensions/n<num_samples>
ARCHIVED = ("results", "curves", TUNE, EXTENSIONS, "events", JOURNAL, RECORD, CONFIG)
HEARTBEAT_S = 30.0
STALE_S = 120.0  # four missed heartbeats


def identity(cfg: ExperimentConfig) -> dict:
    """What a sweep's trials and rows depend on: the resolved config without its name, storage,
    resources (a rerun may come from another machine, onto a bigger cluster), trackers (a rerun may
    log elsewhere) and max_failures (how hard to try, not what). JSON types."""
    d = cfg.to_dict()
    for key in ("name", "output_dir"):
        d.pop(key, None)
    how = ("storage", "resources", "tracking", "max_failures", "cache", "study_storage")
    d["search"] = {k: v for k, v in (d.get("search") or {}).items() if k not in how}
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def _flat(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict) and obj:
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def differences(old: dict, new: dict) -> list[str]:
    """``field: old -> new`` for every dotted field that differs; a field the stored config lacks
    (added by a newer metakd) counts only when it is set to something other than its default."""
    a, b = _flat(old), _flat(new)
    defaults = _flat(identity(ExperimentConfig(search=SearchConfig())))
    lines = []
    for key in sorted(set(a) | set(b)):
        if key not in a and b.get(key) == defaults.get(key, object()):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: {json.dumps(a.get(key, '<absent>'))} -> {json.dumps(b.get(key, '<absent>'))}")
    return lines


def check_config(store: Store, cfg: ExperimentConfig, sweep: str) -> str:
    """Store ``cfg``'s identity with a new sweep, or refuse one that differs from the stored; a status line."""
    new = identity(cfg)
    if store.exists(CONFIG):
        stored = store.read_json(CONFIG)
        old = stored["config"]
        diff = differences(old, new)
        grown = _extension(old, new, diff)
        if grown is not None:
            check_extendable(cfg, store, sweep, study_name(store, sweep))
            extended = stored.get("extended", []) + [{"num_samples": list(grown), "at": _now()}]
            store.write_json(CONFIG, {**stored, "config": new, "extended": extended,
                                      "tune_run": f"{EXTENSIONS}/n{grown[1]}"})
            return (f"extending sweep '{sweep}': search.num_samples {grown[0]} -> {grown[1]}; the new trials join "
                    f"its Optuna study, as the Tune run {EXTENSIONS}/n{grown[1]}")
        if diff:
            raise ConfigError(
                f"sweep '{sweep}' at {store.root} was started with another configuration ({store.uri(CONFIG)}); "
                f"resuming would run the old search on the new settings. Start a new run with --restart (the "
                f"old results move to {store.uri('previous/')}<time>/) or pick another --name. Differences "
                f"(stored -> now):\n  " + "\n  ".join(diff))
        return f"same configuration as {store.uri(CONFIG)}"
    started = store.exists("tune")
    store.write_json(CONFIG, {"config": new, "saved": _now()})
    if started:
        return f"note: {store.uri('tune')} predates stored configurations; this one is stored as {CONFIG}"
    return f"configuration stored in {store.uri(CONFIG)}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _extension(old: dict, new: dict, diff: list[str]) -> tuple[int, int] | None:
    """(stored, new) ``search.num_samples`` when raising it is the only difference of a searched
    (optuna, random) sweep, else None."""
    if len(diff) != 1 or not diff[0].startswith("search.num_samples:"):
        return None
    a, b = (d.get("search", {}).get("num_samples") for d in (old, new))
    searched = new.get("search", {}).get("algorithm") != "grid"
    return (a, b) if searched and isinstance(a, int) and isinstance(b, int) and b > a else None


def study_name(store: Store, sweep: str) -> str:
    """The name of the sweep's Optuna study (:mod:`metakd.sweep.study`): ``<sweep>-<UTC time its
    configuration was first stored>``, the same across resumes and extensions, new after ``--restart``."""
    saved = store.read_json(CONFIG).get("saved", "") if store.exists(CONFIG) else ""
    return f"{sweep}-{saved.replace('-', '').replace(':', '')}" if saved else sweep


def tune_run(store: Store) -> str:
    """The directory of the sweep's current Tune run under its root: ``tune``, or the latest extension's."""
    return store.read_json(CONFIG).get("tune_run", TUNE) if store.exists(CONFIG) else TUNE


def archive_run(store: Store) -> str | None:
    """Move this sweep's results, curves, Tune state, events and stored config to ``previous/<UTC time>/``.

    Returns the new location, or None when there was nothing to move."""
    present = [name for name in ARCHIVED if store.exists(name)]
    if not present:
        return None
    dest = f"previous/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    for name in present:
        src, dst = store.path(name), store.path(f"{dest}/{name}")
        if store.local_root is not None:
            (store.local_root / dest).mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)  # a rename: atomic, and nothing is copied
        elif store.fs.get_file_info(src).type == pafs.FileType.File:
            store.fs.copy_file(src, dst)
            store.fs.delete_file(src)
        else:  # object stores have no directories to rename: copy, then delete
            pafs.copy_files(src, dst, source_filesystem=store.fs, destination_filesystem=store.fs)
            store.fs.delete_dir(src)
    return store.uri(dest)


@dataclasses.dataclass
class Holder:
    host: str
    pid: int
    token: str
    started: float
    heartbeat: float


class SweepLock:
    """``<root>/_running.json`` while a driver runs the sweep; ``with SweepLock(store, sweep):``."""

    def __init__(self, store: Store, sweep: str):
        self.store, self.sweep = store, sweep
        now = time.time()
        self.me = Holder(socket.gethostname(), os.getpid(), uuid.uuid4().hex, now, now)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> Holder | None:
        if not self.store.exists(LOCK):
            return None
        try:
            return Holder(**self.store.read_json(LOCK))
        except FileNotFoundError:  # removed between the two calls
            return None
        except (OSError, ValueError, TypeError):  # unreadable: a write cut short, taken over below
            return Holder("?", -1, "", 0.0, 0.0)

    def _alive(self, other: Holder) -> bool:
        if time.time() - other.heartbeat > STALE_S:
            return False
        if other.host == self.me.host:
            if other.pid == self.me.pid:
                return False  # this process's own lock, left by a run that did not release it
            try:
                os.kill(other.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
        return True

    def _refuse(self, other: Holder) -> None:
        age = time.time() - other.heartbeat
        raise ConfigError(
            f"sweep '{self.sweep}' is already running at {self.store.root}: driver {other.host}:{other.pid}, "
            f"started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(other.started))}, last heartbeat "
            f"{age:.0f}s ago ({self.store.uri(LOCK)}); a second driver would reset its claims. Wait for it, stop "
            f"it, or use another --name (a lock without a heartbeat for {STALE_S:.0f}s is taken over)")

    def acquire(self) -> None:
        other = self._holder()
        if other is not None and self._alive(other):
            self._refuse(other)
        data = json.dumps(dataclasses.asdict(self.me)).encode()
        if self.store.local_root is None:
            self.store.write_json(LOCK, dataclasses.asdict(self.me))
        else:
            path = self.store.local_root / LOCK
            path.parent.mkdir(parents=True, exist_ok=True)
            if other is not None:
                path.unlink(missing_ok=True)  # stale: the process is gone or stopped renewing
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:  # another driver created it between our read and our create
                now = time.time()
                self._refuse(self._holder() or Holder("?", -1, "", now, now))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        self._thread = threading.Thread(target=self._renew, name=f"sweep-lock-{self.sweep}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.me.heartbeat = time.time()
            try:
                self.store.write_json(LOCK, dataclasses.asdict(self.me))
            except OSError as e:  # a transient storage error: the next beat tries again
                print(f"warning: could not renew {self.store.uri(LOCK)}: {e}", flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._holder()
        if holder is not None and holder.token == self.me.token:
            try:
                self.store.fs.delete_file(self.store.path(LOCK))
            except OSError:
                pass

    def __enter__(self) -> "SweepLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
