"""Shared fixtures of the training / model / CLI tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread_torch():
    """Run a module's tiny models on one intra-op thread, then restore the setting.

    For models this small, thread start-up and synchronisation cost more than they save, and
    on a small machine that is busy with other work, several OpenMP threads spin-waiting
    against each other can make a few-second training run take minutes.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_training(monkeypatch):
    """Any teacher or student training fails the test (the names the per-worker functions call)."""

    def fail(*_a, **_k):
        raise AssertionError("training started")

    monkeypatch.setattr("metakd.jobs.workers.train_one_teacher", fail)
    monkeypatch.setattr("metakd.jobs.workers.train_student", fail)
