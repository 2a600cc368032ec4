"""The artifact cache of a storage location, shared by every sweep and ``metakd run`` there.

    <storage>/cache/data/<key>/        prepared data (split, subsampled, tokenised)
    <storage>/cache/features/<key>/    prototype features of an initial encoder
    <storage>/cache/teachers/<key>/    a teacher with its outputs and prototype scores
    <storage>/cache/students/<key>/    a student job's result (students.keep all: and the student)
    <storage>/cache/claims/            who trains which artifact now (:mod:`metakd.jobs.claims`)
    <storage>/<name>/cache.json        {"cache": URI}: where the sweep's (or run's) artifacts are

Keys are content hashes of everything that determines an artifact, so a sweep reuses whatever
any other sweep on the storage made: a renamed sweep, another gamma2 grid or a figure that needs
the same meta-teacher trains nothing twice. ``search.cache`` puts the cache elsewhere (a path or
URI). What belongs to one sweep stays under ``<storage>/<name>/``: results, curves, events, Tune
state, the stored configuration and its study.

A sweep directory made before the cache holds its artifacts itself (``<name>/teachers/...``):
:func:`adopt` publishes them into the cache under the same keys the first time the sweep (or a
run with that output) starts again, by hard links where both are on one local filesystem.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from ..storage import MARKER, Store, is_uri

DIR = "cache"
LINK = "cache.json"
KINDS = ("data", "features", "teachers", "students")


def cache_root(storage: str, cache: str | None = None) -> str:
    """Where the artifacts of sweeps on ``storage`` live: ``cache`` (``search.cache``) when given,
    else ``<storage>/cache``."""
    where = cache or f"{storage.rstrip('/')}/{DIR}"
    return where if is_uri(where) else str(Path(os.path.expanduser(where)).resolve())


def artifact_store(root: str) -> Store:
    """The store holding the artifacts of the sweep or run at ``root``: the cache its ``cache.json``
    names; a directory without one (made before the cache, or a self-contained
    ``run_local(cfg, root)``) holds its own."""
    store = Store(root)
    if store.exists(LINK):
        return Store(store.read_json(LINK)["cache"])
    return store


def link(root: Store, cache: Store, log=print) -> None:
    """Record in ``root`` where its artifacts are; first publish the ones it holds itself (an older
    sweep directory) into ``cache``."""
    if root.exists(LINK) and root.read_json(LINK).get("cache") == cache.root:
        return
    adopted = adopt(root, cache)
    if adopted:
        log(f"cache: {adopted} artifact(s) of {root.root} (made before the shared cache) published into {cache.root}")
    root.write_json(LINK, {"cache": cache.root})


def adopt(root: Store, cache: Store) -> int:
    """Publish the complete artifacts ``root`` holds itself (``<root>/teachers/<key>``, ...) into
    ``cache`` under the same rel path; returns how many were new there. Local to local: hard links
    (no copy, the old directory keeps its files); otherwise a copy."""
    count = 0
    for kind in KINDS:
        for key in root.list_dirs(kind):
            rel = f"{kind}/{key}"
            if key.startswith(".") or not root.is_complete(rel) or cache.is_complete(rel):
                continue
            if root.local_root is not None and cache.local_root is not None:
                if not _link_tree(root.local_root / rel, cache.local_root / rel):
                    continue
            elif cache.local_root is None and root.fs.type_name == cache.fs.type_name:
                pafs.copy_files(root.path(rel), cache.path(rel), source_filesystem=root.fs,
                                destination_filesystem=cache.fs)  # the marker came along, last or not: re-put it last
                with cache.fs.open_output_stream(cache.path(f"{rel}/{MARKER}")) as f:
                    f.write(b"ok\n")
            else:
                cache.publish_dir(root.fetch_dir(rel), rel)
            count += 1
    return count


def _link_tree(src: Path, final: Path) -> bool:
    """``src`` (complete, its marker included) as ``final``: hard-linked beside it, renamed into place.
    False when an incomplete copy is in the way (an interrupted write: the artifact is built again)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"

    def hard_link(a, b):
        try:
            os.link(a, b)
        except OSError:  # another filesystem (search.cache elsewhere): copy
            shutil.copy2(a, b)

    try:
        shutil.copytree(src, staging, copy_function=hard_link)
        os.replace(staging, final)
        return True
    except OSError:
        return False
    finally:
        shutil.rmtree(staging, ignore_errors=True)
