"""One artifact cache per storage (metakd.jobs.cache): runs under other names reuse its teachers,
two runs started together train a shared teacher once (the cache claims of metakd.jobs.claims
decide between their separate registries), and an older directory's own artifacts are adopted.
The event files of each run prove what it trained."""

from __future__ import annotations

import threading
import time

import pytest

from metakd.config import from_dict
from metakd.jobs.cache import LINK, artifact_store
from metakd.jobs.events import STUDENT, TEACHER, read_events
from metakd.jobs.run import run_local
from metakd.storage import Store

pytestmark = pytest.mark.usefixtures("single_thread_torch")

TINY = {
    "methods": ["metakd"], "seeds": [0], "device": "cpu",
    "data": {"max_length": 16, "vocab_size": 200,
             "synthetic": {"num_domains": 2, "examples_per_domain": 60, "words_per_example": 8}},
    "teacher": {"preset": "tiny-teacher", "epochs": 1, "batch_size": 32},
    "student": "tiny-student",
    "distill": {"stage1_epochs": 0, "stage2_epochs": 1, "batch_size": 32},
    "students": {"keep": "none"},
}


def _cfg(tmp_path, name: str, gamma2: float):
    return from_dict({**TINY, "name": name, "output_dir": str(tmp_path), "distill": {**TINY["distill"], "gamma2": gamma2}})


def _quiet(*_a, **_k):
    pass


def _trained(root, event) -> list[dict]:
    return read_events(Store(str(root)), event)


@pytest.mark.slow  # trains two runs in-process (about 10 s)
def test_a_run_under_another_name_and_gamma2_trains_no_teacher(tmp_path):
    first = run_local(_cfg(tmp_path, "first", 0.5), log=_quiet)
    second = run_local(_cfg(tmp_path, "second", 1.0), log=_quiet)
    cache = tmp_path / "cache"
    assert first["cache"] == second["cache"] == str(cache)
    assert len(_trained(tmp_path / "first", TEACHER)) == 1  # the meta-teacher
    assert _trained(tmp_path / "second", TEACHER) == []  # found in the cache: the events prove it
    assert len(_trained(tmp_path / "second", STUDENT)) == 2  # its own students (gamma2 differs)
    assert second["teacher_keys"] == first["teacher_keys"]
    assert (cache / "teachers" / first["teacher_keys"][0] / "_COMPLETE").is_file()
    for name in ("first", "second"):  # a run's directory holds its results and events, not artifacts
        assert not (tmp_path / name / "teachers").exists() and (tmp_path / name / "results").is_dir()
        assert artifact_store(str(tmp_path / name)).root == str(cache)


@pytest.mark.slow  # trains two runs in-process (about 10 s)
def test_two_runs_started_together_train_their_shared_teacher_once(tmp_path, monkeypatch):
    from metakd.jobs import workers

    real = workers.train_one_teacher

    def slow(*args, **kwargs):  # a teacher that takes a while: the other run meets its claim on the cache
        time.sleep(3)
        return real(*args, **kwargs)

    monkeypatch.setattr(workers, "train_one_teacher", slow)
    outs, errors, logs = {}, [], {"left": [], "right": []}
    start = threading.Barrier(2)

    def run(name, gamma2):
        start.wait()
        try:
            outs[name] = run_local(_cfg(tmp_path, name, gamma2), log=logs[name].append)
        except BaseException as e:  # noqa: BLE001 - re-raised by the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=a) for a in (("left", 0.0), ("right", 1.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    teachers = _trained(tmp_path / "left", TEACHER) + _trained(tmp_path / "right", TEACHER)
    assert len(teachers) == 1, teachers  # one of the two trained it, the other waited for it
    assert outs["left"]["teacher_keys"] == outs["right"]["teacher_keys"] == [teachers[0]["key"]]
    for name in ("left", "right"):  # each trained its own students, from that one teacher
        students = _trained(tmp_path / name, STUDENT)
        assert len(students) == 2 and {s["teacher_key"] for s in students} == {teachers[0]["key"]}
        assert all(s["start"] >= teachers[0]["end"] for s in students)
    waiter = "right" if _trained(tmp_path / "left", TEACHER) else "left"  # the run that did not train it
    assert any("being trained by another sweep" in line and "teachers/" in line for line in logs[waiter]), logs[waiter]
    assert len(list((tmp_path / "cache" / "data").iterdir())) == 1  # prepared once
    assert list((tmp_path / "cache" / "claims").iterdir()) == []  # every claim released


@pytest.mark.slow  # trains two runs in-process (about 10 s)
def test_an_older_directory_s_own_artifacts_are_adopted_into_the_cache(tmp_path):
    old = tmp_path / "old"
    run_local(_cfg(tmp_path, "old", 0.5), root=str(old), log=_quiet)  # self-contained: artifacts in old/
    assert (old / "teachers").is_dir() and not (old / LINK).exists()
    again = run_local(_cfg(tmp_path, "old", 0.5), log=_quiet)  # the default layout: the shared cache
    assert len(_trained(old, TEACHER)) == 1 and len(_trained(old, STUDENT)) == 2  # the first run's, no new ones
    key = again["teacher_keys"][0]
    assert (tmp_path / "cache" / "teachers" / key / "_COMPLETE").is_file()
    assert (old / "teachers" / key / "_COMPLETE").is_file()  # hard links: the old directory keeps its files
    assert artifact_store(str(old)).root == str(tmp_path / "cache")


def test_a_run_named_like_the_cache_is_refused(tmp_path):
    from metakd.config import ConfigError

    with pytest.raises(ConfigError, match="cache"):
        run_local(_cfg(tmp_path, "cache", 0.5), log=_quiet)
