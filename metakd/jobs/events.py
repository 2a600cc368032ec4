"""One file per training under ``<storage>/<name>/events/``: the schedule, visible after the fact.

    events/teacher_trained/<teacher key>-<id>.json
    events/student_trained/<student key>-<id>.json

Each holds the key, what was trained (kind or method, domain, seed), ``start`` and ``end``
(Unix seconds, taken around the training itself), ``worker`` (host:pid), ``rank``,
``world_size``, ``device``, ``run`` (the trial / run that trained it) and the summary numbers
(dev accuracy, ``train_seconds``). A retrained artifact (a trainer died after its work was
published by nobody) leaves a second file: counting files counts trainings.
"""

from __future__ import annotations

import json
import os
import socket
import uuid

from ..storage import Store

TEACHER = "teacher_trained"
STUDENT = "student_trained"


def write_event(store: Store, event: str, record: dict) -> None:
    """One file for one ``event`` (TEACHER or STUDENT) of the training ``record`` describes."""
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
