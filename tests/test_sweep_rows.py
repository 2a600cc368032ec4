"""A failing trial keeps the rows of the students that finished before the failure."""

from metakd.report import results
from metakd.config import from_dict
from metakd.sweep.tuner import _failed_rows, _finished_rows
from metakd.report.rows import result_rows


def test_failed_trial_keeps_finished_rows_and_marks_the_failure(tmp_path):
    cfg = from_dict({"methods": ["metakd"], "seeds": [0]})
    root = str(tmp_path)
    done = [{"method": "metakd", "domain": "alpha", "seed": 0, "dev_accuracy": 0.9, "test_accuracy": 0.8,
             "dev_loss": 0.3, "test_loss": 0.4}]
    results.write_part(root, result_rows(cfg, "s", "t1", done, {"gamma2": 0.5}), "cfg-x")
    assert _finished_rows(root, "cfg-missing") == []

    why = "trial t1 failed: RuntimeError: boom"
    results.write_part(root, _finished_rows(root, "cfg-x") + _failed_rows(cfg, "s", "t1", {"gamma2": 0.5}, why),
                       "cfg-x")
    df = results.load(root)
    ok = df[df["status"] == "ok"].sort_values("split")
    assert ok["accuracy"].tolist() == [0.9, 0.8] and ok["domain"].tolist() == ["alpha", "alpha"]
    assert ok["error"].isna().all()
    failed = df[df["status"] == "failed"]
    assert len(failed) == 2 and (failed["error"] == why).all()  # one seed x one method x 2 splits, with the reason
