"""Publishing artifacts under faults: a failed publish is an error, a complete copy is never
deleted, and two publishers of one key leave exactly one complete artifact."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from metakd.storage import MARKER, Store


def _artifact(tmp_path: Path, name: str) -> Path:
    d = tmp_path / "src" / name
    d.mkdir(parents=True)
    (d / "who.txt").write_text(name)
    return d


def _leftovers(store: Store, rel: str) -> list[str]:
    """Staging or set-aside directories beside the artifact (hidden names)."""
    return sorted(p.name for p in (store.local_root / rel).parent.iterdir() if p.name.startswith("."))


def test_a_failing_rename_is_an_error_and_leaves_no_artifact_and_no_staging(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    src = _artifact(tmp_path, "a")
    real = os.replace

    def failing(a, b):
        if ".tmp-" in str(a):
            raise OSError(errno.EIO, "I/O error")
        return real(a, b)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="could not publish .*teachers/k.*I/O error"):
        store.publish_dir(src, "teachers/k")
    assert not store.is_complete("teachers/k") and not store.exists("teachers/k")
    assert _leftovers(store, "teachers/k") == []


def test_a_complete_copy_survives_a_failing_publish_over_it(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    store.publish_dir(_artifact(tmp_path, "first"), "teachers/k")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    store.publish_dir(_artifact(tmp_path, "second"), "teachers/k")  # complete already: nothing to do
    assert store.is_complete("teachers/k")
    assert (Path(store.fetch_dir("teachers/k")) / "who.txt").read_text() == "first"


def test_an_incomplete_copy_is_replaced(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.write_json("students/k/result.json", {"status": "failed"})  # a failed job's result, no marker
    store.publish_dir(_artifact(tmp_path, "a"), "students/k")
    final = Path(store.fetch_dir("students/k"))
    assert sorted(p.name for p in final.iterdir()) == [MARKER, "who.txt"]
    assert _leftovers(store, "students/k") == []


def test_a_complete_copy_published_between_the_look_and_the_removal_of_an_incomplete_one_is_kept(tmp_path,
                                                                                                 monkeypatch):
    """A finds an incomplete copy (a failed job's result.json) and removes it; right after A's look,
    B publishes a complete copy. A must not delete B's copy (a reader may hold it): B's stays."""
    store = Store(str(tmp_path / "store"))
    store.write_json("students/k/result.json", {"status": "failed"})
    final = store.local_root / "students/k"
    a, b = _artifact(tmp_path, "a"), _artifact(tmp_path, "b")
    real = Path.exists
    raced = []

    def looking(path, *args, **kwargs):
        found = real(path, *args, **kwargs)
        if path == final / MARKER and not found and not raced:  # A has just seen an incomplete copy
            raced.append(True)
            store.publish_dir(b, "students/k")  # B, all at once
            assert (final / "who.txt").read_text() == "b"
        return found

    monkeypatch.setattr(Path, "exists", looking)
    store.publish_dir(a, "students/k")
    monkeypatch.setattr(Path, "exists", real)
    assert raced and store.is_complete("students/k")
    assert (final / "who.txt").read_text() == "b"
    assert _leftovers(store, "students/k") == []


def test_two_publishers_of_one_key_leave_one_complete_artifact(tmp_path):
    store = Store(str(tmp_path / "store"))
    for round_ in range(5):
        rel = f"teachers/k{round_}"
        store.write_json(f"{rel}/failed.json", {"status": "failed"})  # an earlier failure to replace
        sources = [_artifact(tmp_path, f"{round_}-{i}") for i in range(4)]
        start, errors = threading.Barrier(len(sources)), []

        def publish(src):
            start.wait()
            try:
                store.publish_dir(src, rel)
            except BaseException as e:  # noqa: BLE001 - collected for the assertion
                errors.append(e)

        threads = [threading.Thread(target=publish, args=(s,)) for s in sources]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and store.is_complete(rel)
        final = Path(store.fetch_dir(rel))
        assert sorted(p.name for p in final.iterdir()) == [MARKER, "who.txt"]  # one writer's copy, whole
        assert (final / "who.txt").read_text() in {s.name for s in sources}
        assert _leftovers(store, rel) == []
