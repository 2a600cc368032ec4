"""Rows of results: the running metrics a sweep trial reports to Tune."""

from __future__ import annotations

import pytest

from metakd.report.rows import running_metrics


def test_running_metrics_average_the_first_method():
    res = [{"method": "metakd", "dev_accuracy": 0.8, "test_accuracy": 0.6},
           {"method": "kd_single", "dev_accuracy": 0.5, "test_accuracy": 0.4},
           {"method": "metakd", "dev_accuracy": 0.6, "test_accuracy": 0.9}]
    m = running_metrics(res, ["metakd", "kd_single"])
    assert m["jobs_done"] == 3
    assert m["dev_accuracy"] == pytest.approx(0.7) and m["test_accuracy"] == pytest.approx(0.75)
    assert m["kd_single/dev_accuracy"] == pytest.approx(0.5)
    # the first method has no result yet: everything so far
    m = running_metrics(res[1:2], ["metakd", "kd_single"])
    assert m["dev_accuracy"] == pytest.approx(0.5) and "metakd/dev_accuracy" not in m
