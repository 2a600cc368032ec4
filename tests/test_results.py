import json
import os

import pandas as pd
import pyarrow.parquet as pq
import pytest

from metakd.report import results


def _row(**kw):
    row = dict(
        sweep="smoke",
        trial_id="t0",
        status="ok",
        seed=0,
        method="metakd",
        domain="books",
        split="test",
        accuracy=0.8125,
        gamma2=0.5,
        sample_rate=0.1,
        student="bert-mini",
        student_layers=4,
        student_hidden=256,
        student_params=11_170_560,
        latency_ms_b1=1.25,
        search_params={"gamma2": 0.5, "student": "bert-mini"},
    )
    row.update(kw)
    return row


def _files(directory):
    return sorted(os.listdir(directory))


def test_round_trip_keeps_values_and_schema(tmp_path):
    rows = [_row(), _row(domain="dvd", seed=1, accuracy=0.75, student_layers=None, loss=float("nan"), teacher=pd.NA)]
    path = results.write_part(str(tmp_path / "sweep"), rows, "t0")

    assert path == str(tmp_path / "sweep" / "results" / "t0.parquet")
    assert pq.read_schema(path).remove_metadata().equals(results.RESULT_SCHEMA)
    df = results.load(str(tmp_path / "sweep"))
    assert list(df.columns) == results.RESULT_SCHEMA.names
    assert len(df) == 2
    first = df[df["domain"] == "books"].iloc[0]
    assert first["accuracy"] == 0.8125
    assert first["seed"] == 0
    assert first["student_params"] == 11_170_560
    assert json.loads(first["search_params"]) == {"gamma2": 0.5, "student": "bert-mini"}
    # missing keys and None are null; integer columns stay integers even with nulls
    assert pd.isna(first["loss"]) and pd.isna(first["config_json"])
    assert str(df["student_layers"].dtype) == "Int64"
    assert pd.isna(df.loc[df["domain"] == "dvd", "student_layers"].iloc[0])
    assert df["accuracy"].dtype == "float64"
    assert pd.api.types.is_string_dtype(df["method"])


def test_write_leaves_no_temporary_files(tmp_path):
    results.write_part(str(tmp_path), [_row()], "t0")
    assert _files(tmp_path / "results") == ["t0.parquet"]


def test_failed_write_keeps_previous_part_and_cleans_up(tmp_path, monkeypatch):
    results.write_part(str(tmp_path), [_row(accuracy=0.5)], "t0")

    def crash(table, where, **kw):
        where.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(results.pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        results.write_part(str(tmp_path), [_row(accuracy=0.9)], "t0")
    monkeypatch.undo()

    assert _files(tmp_path / "results") == ["t0.parquet"]
    assert results.load(str(tmp_path))["accuracy"].tolist() == [0.5]


def test_rewriting_a_part_replaces_it(tmp_path):
    results.write_part(str(tmp_path), [_row(accuracy=0.5), _row(domain="dvd")], "t0")
    results.write_part(str(tmp_path), [_row(accuracy=0.5), _row(domain="dvd")], "t0")
    assert len(results.load(str(tmp_path))) == 2
    results.write_part(str(tmp_path), [_row(accuracy=0.6)], "t0")
    df = results.load(str(tmp_path))
    assert df["accuracy"].tolist() == [0.6]


def test_load_concatenates_parts_and_drops_exact_duplicates(tmp_path):
    results.write_part(str(tmp_path), [_row(trial_id="a"), _row(trial_id="a", domain="dvd")], "a")
    results.write_part(str(tmp_path), [_row(trial_id="b")], "b")
    results.write_part(str(tmp_path), [_row(trial_id="a")], "a-copy")  # same row as in part "a"
    df = results.load(str(tmp_path))
    assert sorted(zip(df["trial_id"], df["domain"])) == [("a", "books"), ("a", "dvd"), ("b", "books")]


def test_load_ignores_leftover_temporary_files(tmp_path):
    results.write_part(str(tmp_path), [_row()], "t0")
    (tmp_path / "results" / ".t1.parquet.tmp-0123abcd").write_bytes(b"PAR1 truncated")
    assert len(results.load(str(tmp_path))) == 1
    assert pq.read_table(str(tmp_path / "results")).num_rows == 1


def test_load_accepts_sweep_dir_results_dir_and_single_file(tmp_path):
    path = results.write_part(str(tmp_path), [_row(), _row(domain="dvd")], "t0")
    results.write_part(str(tmp_path), [_row(trial_id="t1")], "t1")
    assert len(results.load(str(tmp_path))) == 3
    assert len(results.load(str(tmp_path / "results"))) == 3
    assert len(results.load(path)) == 2


def test_unknown_column_is_rejected_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"gama2"):
        results.write_part(str(tmp_path), [_row(gama2=0.3)], "t0")
    assert not (tmp_path / "results").exists() or _files(tmp_path / "results") == []


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(status="done"), r"status.*done.*allowed"),
        (dict(split="train"), r"split.*train"),
        (dict(seed="zero"), r"seed.*integer"),
        (dict(seed=1.5), r"seed.*integer"),
        (dict(accuracy="high"), r"accuracy.*number"),
        (dict(method=3), r"method.*string"),
    ],
)
def test_values_that_do_not_fit_the_schema_are_rejected(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        results.write_part(str(tmp_path), [_row(**bad)], "t0")


@pytest.mark.parametrize("part", ["", "../escape", "a/b", ".hidden", "x.tmp-1", "a b", "a\\b"])
def test_unsafe_part_names_are_rejected(tmp_path, part):
    with pytest.raises(ValueError, match="filesystem-safe"):
        results.write_part(str(tmp_path), [_row()], part)


@pytest.mark.parametrize("part", ["6e2a8_00000", "run", "teacher-abc123", "trial=3.v2"])
def test_ray_trial_ids_are_valid_part_names(tmp_path, part):
    path = results.write_part(str(tmp_path), [_row(trial_id=part)], part)
    assert path.endswith(f"/results/{part}.parquet")
    assert results.load(path)["trial_id"].tolist() == [part]


def test_unknown_table_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown table 'metrics'"):
        results.write_part(str(tmp_path), [_row()], "t0", table="metrics")


def test_missing_path_raises_file_not_found_naming_it(tmp_path):
    missing = tmp_path / "no-such-sweep"
    with pytest.raises(FileNotFoundError, match="no-such-sweep"):
        results.load(str(missing))
    (tmp_path / "empty" / "results").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="empty"):
        results.load(str(tmp_path / "empty"))


def test_reading_a_results_file_as_curves_is_an_error(tmp_path):
    path = results.write_part(str(tmp_path), [_row()], "t0")
    with pytest.raises(ValueError, match="lacks column"):
        results.load(path, table="curves")


def test_curves_table_round_trip(tmp_path):
    rows = [
        dict(sweep="s", trial_id="t0", seed=0, method="metakd", domain="all", stage="teacher",
             epoch=e, step=10 * e, train_loss=1.0 / (e + 1), dev_accuracy=0.5 + 0.1 * e, seconds=2.0 * e,
             teacher_key="abc123")
        for e in range(3)
    ]
    results.write_part(str(tmp_path), rows, "teacher-abc123", table="curves")
    df = results.load_curves(str(tmp_path))
    assert list(df.columns) == results.CURVE_SCHEMA.names
    assert df.sort_values("epoch")["step"].tolist() == [0, 10, 20]
    assert df["dev_accuracy"].tolist() == pytest.approx([0.5, 0.6, 0.7])
    with pytest.raises(ValueError, match="stage"):
        results.write_part(str(tmp_path), [dict(rows[0], stage="warmup")], "x", table="curves")
    # the results table of the same sweep is separate
    with pytest.raises(FileNotFoundError):
        results.load(str(tmp_path))


def test_parts_are_readable_by_plain_pyarrow(tmp_path):
    results.write_part(str(tmp_path), [_row(), _row(domain="dvd")], "t0")
    results.write_part(str(tmp_path), [_row(trial_id="t1", accuracy=0.25)], "t1")
    table = pq.read_table(str(tmp_path / "results"))
    assert table.num_rows == 3
    assert table.schema.field("seed").type == results.RESULT_SCHEMA.field("seed").type
    assert sorted(table.column("accuracy").to_pylist()) == [0.25, 0.8125, 0.8125]


def test_parts_are_readable_by_duckdb(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    results.write_part(str(tmp_path), [_row(), _row(domain="dvd", accuracy=0.5)], "t0")
    results.write_part(str(tmp_path), [_row(trial_id="t1", accuracy=0.25)], "t1")
    (tmp_path / "results" / ".t2.parquet.tmp-deadbeef").write_bytes(b"garbage")
    glob = str(tmp_path / "results" / "*.parquet")
    n, mean = duckdb.sql(f"SELECT count(*), avg(accuracy) FROM read_parquet('{glob}')").fetchall()[0]
    assert n == 3
    assert mean == pytest.approx((0.8125 + 0.5 + 0.25) / 3)
    (typ,) = duckdb.sql(f"SELECT typeof(seed) FROM read_parquet('{glob}') LIMIT 1").fetchall()[0]
    assert typ == "BIGINT"


def test_file_uri_is_resolved_through_pyarrow_filesystems(tmp_path):
    root = f"file://{tmp_path}/uri-sweep"
    path = results.write_part(root, [_row()], "t0")
    assert path == f"{root}/results/t0.parquet"
    assert (tmp_path / "uri-sweep" / "results" / "t0.parquet").is_file()
    assert _files(tmp_path / "uri-sweep" / "results") == ["t0.parquet"]
    results.write_part(root + "/", [_row(accuracy=0.5)], "t0")  # trailing slash, same part
    assert results.load(root)["accuracy"].tolist() == [0.5]
    assert len(results.load(f"{root}/results")) == 1
    assert len(results.load(path)) == 1
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        results.load(f"file://{tmp_path}/nothing-here")


def test_the_public_loader_is_the_reports_loader():
    """Users load tables with ``metakd.results.load`` (the system notes); it is the report layer's reader."""
    import metakd.results
    from metakd.report import results as report_results

    assert metakd.results.load is report_results.load and metakd.results.load_curves is report_results.load_curves
