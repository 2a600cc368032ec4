"""One file per training under ``<storage>/<name>/events/``: the schedule, visible after the fact.

    events/teacher_trained/<teacher key>-<id>.json
    events/student_trained/<student key>-<id>.json
    events/run_failed/<run id>-<id>.json

A training's file holds the key, what was trained (kind or method, domain, seed), ``start`` and
``end`` (Unix seconds, taken around the training itself), ``worker`` (host:pid), ``rank``,
``world_size``, ``device``, ``run`` (the trial / run that trained it), its ``attempt`` (1, or 1 +
the run's failed launches before it) and the summary numbers (dev accuracy, ``train_seconds``; a
teacher's ``resumed_epochs``: epochs restored from the run's checkpoint instead of trained). A
retrained artifact (a trainer died after its work was published by nobody) leaves a second
file: counting files counts trainings.

A ``run_failed`` file is written by a trial driver whose run failed (``metakd.jobs.schedule``):
the run, its ``attempt``, ``lost_node`` (a node died under it), ``interrupted`` (the claims it
gave back: what it was training), ``retried``, ``start`` / ``end`` of the failed launch and the
error. With the training files it says which training was interrupted and where it went on.
"""

from __future__ import annotations

import json
import os
import socket
import uuid

from ..storage import Store

TEACHER = "teacher_trained"
STUDENT = "student_trained"
RUN_FAILED = "run_failed"


def write_event(store: Store, event: str, record: dict) -> None:
    """One file for one ``event`` (TEACHER, STUDENT or RUN_FAILED) of what ``record`` describes
    (its ``key``: the trained key, or the failed run's id)."""
    store.write_json(f"events/{event}/{record['key']}-{uuid.uuid4().hex[:8]}.json", record)


def read_events(store: Store, event: str) -> list[dict]:
    """Every ``event`` (TEACHER or STUDENT) on the store, oldest start first."""
    import pyarrow.fs as pafs

    sel = pafs.FileSelector(store.path(f"events/{event}"), allow_not_found=True)
    out = []
    for info in store.fs.get_file_info(sel):
        if info.type == pafs.FileType.File and info.path.endswith(".json") and not info.base_name.startswith("."):
            with store.fs.open_input_stream(info.path) as f:
                out.append(json.loads(f.read()))
    return sorted(out, key=lambda e: e.get("start", 0.0))


def count_teacher_trainings(store: Store) -> int:
    """How many teacher trainings ever ran against this store (one event file per training)."""
    return len(read_events(store, TEACHER))


def count_student_trainings(store: Store) -> int:
    """How many student trainings ever ran against this store (one event file per training)."""
    return len(read_events(store, STUDENT))


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
