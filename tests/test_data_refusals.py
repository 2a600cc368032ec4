"""Bad data is refused before any work with one line naming the file and rows (or the field);
what has a correct handling is handled (BOMs, hidden files, pandas' JSON layouts, ``~``,
label normalisation, unlabelled rows, MNLI's layouts). metakd/data/sources.py and splits.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from metakd import data as D
from metakd.cli import main
from metakd.config import DataConfig

from data_files import make_rows, write_jsonl


def _files(path: Path, **kw) -> DataConfig:
    return DataConfig(source="files", path=str(path), **kw)


def _jsonl_lines(path: Path, records: list, raw: dict[int, bytes] | None = None) -> Path:
    """JSON Lines of ``records``; ``raw`` replaces the bytes of some lines (0-based) as given."""
    lines = [json.dumps(r).encode() for r in records]
    for i, b in (raw or {}).items():
        lines[i] = b
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _csv(path: Path, records: list, encoding: str = "utf-8") -> Path:
    pd.DataFrame(records).to_csv(path, index=False, encoding=encoding)
    return path


# ----------------------------------------------------------------------------- refused, one line each
# case -> (write the data under tmp and return its DataConfig, fragments the error must hold)


def _latin1_jsonl(tmp):
    rows = make_rows()
    f = _jsonl_lines(tmp / "reviews.jsonl", rows,
                     {2: json.dumps({**rows[2], "text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1")})
    return _files(f), ["reviews.jsonl", "line 3", "byte offset", "0xe9", "not UTF-8", "save the file as UTF-8"]


def _latin1_csv(tmp):
    rows = make_rows()
    rows[4]["text"] = "na\u00efve"
    return _files(_csv(tmp / "reviews.csv", rows, "latin-1")), ["reviews.csv", "line 6", "0xef", "not UTF-8"]


def _corrupt_parquet(tmp):
    f = tmp / "part.parquet"
    pd.DataFrame(make_rows()).to_parquet(f)
    f.write_bytes(f.read_bytes()[:200])  # an interrupted copy
    return _files(f), ["part.parquet", "not a readable Parquet file"]


def _values_json(tmp):
    f = tmp / "rows.json"
    pd.DataFrame(make_rows()).to_json(f, orient="values")
    return _files(f), ["rows.json", "no column names", "orient='records'"]


def _empty_label_csv(tmp):
    rows = make_rows()
    rows[3]["label"], rows[25]["label"] = "", " "
    return _files(_csv(tmp / "l.csv", rows)), ["l.csv", "rows 4, 26", "'label'", "data.label_column", "empty"]


def _null_label_jsonl(tmp):
    rows = make_rows()
    rows[6]["label"] = None
    return _files(write_jsonl(tmp / "l.jsonl", rows)), ["l.jsonl", "line 7", "data.label_column", "empty or missing"]


def _mixed_labels(tmp):
    rows = make_rows(label=lambda i: "positive" if i % 2 else 0)
    return _files(write_jsonl(tmp / "m.jsonl", rows)), ["m.jsonl", "mixes integer labels", "'positive'", "line 1"]


def _fractional_label(tmp):
    rows = make_rows()
    rows[9]["label"] = 0.5
    return _files(write_jsonl(tmp / "f.jsonl", rows)), ["f.jsonl", "line 10", "0.5", "not an integer"]


def _negative_label(tmp):
    rows = make_rows()
    rows[1]["label"] = -3
    return _files(write_jsonl(tmp / "n.jsonl", rows)), ["n.jsonl", "line 2", "label -3 outside",
                                                        "-1 marks an unlabelled"]


def _num_labels_above_data(tmp):
    return _files(write_jsonl(tmp / "b.jsonl", make_rows()), num_labels=5), [
        "data.num_labels: 5", "2 classes", "num_labels: 2"]


def _num_labels_below_data(tmp):
    return _files(write_jsonl(tmp / "b.jsonl", make_rows(label=lambda i: i % 3, n=30)), num_labels=2), [
        "b.jsonl", "line 3", "label 2 outside [0, 2)", "data.num_labels=2"]


def _empty_domain(tmp):
    rows = make_rows()
    rows[0]["domain"], rows[30]["domain"] = None, ""
    return _files(write_jsonl(tmp / "d.jsonl", rows)), ["d.jsonl", "lines 1, 31", "data.domain_column", "2 rows"]


def _null_text(tmp):
    rows = make_rows()
    rows[12]["text"] = None
    return _files(write_jsonl(tmp / "t.jsonl", rows)), ["t.jsonl", "line 13", "'text'", "data.text_column"]


def _blank_text_csv(tmp):
    rows = make_rows()
    rows[5]["text"] = "   "
    return _files(_csv(tmp / "t.csv", rows)), ["t.csv", "row 6", "data.text_column", "every row needs a text"]


def _empty_text_pair(tmp):
    rows = make_rows(pair=lambda d, i: "" if i == 8 else f"hyp {i}")
    return _files(write_jsonl(tmp / "p.jsonl", rows), text_pair_column="pair"), [
        "p.jsonl", "lines 9, 29", "2 rows", "'pair'", "data.text_pair_column"]


def _tiny_domain(tmp):
    rows = make_rows() + make_rows(("golf",), n=3)
    return _files(write_jsonl(tmp / "s.jsonl", rows)), [
        "domain 'golf'", "rows per class: 0: 2, 1: 1", "at least 10 rows of each class", "data.domains"]


def _one_class_domain(tmp):
    rows = make_rows() + make_rows(("golf",), label=lambda i: 1)
    return _files(write_jsonl(tmp / "s.jsonl", rows)), ["domain 'golf'", "0 labelled rows of class 0", "at least 10"]


def _split_names_mixed(tmp):
    (tmp / "data").mkdir()
    write_jsonl(tmp / "data" / "train.jsonl", make_rows())
    write_jsonl(tmp / "data" / "extra.jsonl", make_rows())
    return _files(tmp / "data"), ["train.jsonl", "extra.jsonl", "named by its split", "or none"]


def _split_name_and_column(tmp):
    (tmp / "data").mkdir()
    write_jsonl(tmp / "data" / "train.jsonl", make_rows(split=lambda d, i: "train"))
    write_jsonl(tmp / "data" / "test.jsonl", make_rows(split=lambda d, i: "test"))
    return _files(tmp / "data"), ["test.jsonl", "'split' column", "file name already gives its split"]


def _hf_missing_local_path(tmp):
    return DataConfig(source="hf", path="./no/such/mnli"), ["data.path", "./no/such/mnli", "does not exist",
                                                           "not a hub id"]


def _uri_path(tmp):
    return _files("s3://bucket/reviews"), ["data.path", "s3://bucket/reviews", "URI"]


REFUSED = {f.__name__[1:]: f for f in (
    _latin1_jsonl, _latin1_csv, _corrupt_parquet, _values_json, _empty_label_csv, _null_label_jsonl, _mixed_labels,
    _fractional_label, _negative_label, _num_labels_above_data, _num_labels_below_data, _empty_domain, _null_text,
    _blank_text_csv, _empty_text_pair, _tiny_domain, _one_class_domain, _split_names_mixed, _split_name_and_column,
    _hf_missing_local_path, _uri_path)}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_data_is_refused_naming_the_file_and_rows(case, tmp_path):
    cfg, fragments = REFUSED[case](tmp_path)
    start = time.perf_counter()
    with pytest.raises(D.DataError) as e:
        D.prepare(cfg, seed=0, checkpoint=None, cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, (f, msg)
    assert time.perf_counter() - start < 10  # no network retries
    assert not (tmp_path / "cache").exists()  # nothing prepared


def _yaml(tmp_path: Path, data: dict, **extra) -> str:
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump({"name": "d", "methods": ["kd_single"], "device": "cpu",
                                 "output_dir": str(tmp_path / "out"), "data": data, **extra}))
    return str(p)




@pytest.mark.parametrize("case", ["latin1_jsonl", "empty_label_csv", "tiny_domain", "hf_missing_local_path"])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_validate_and_run_refuse_in_one_line(case, command, tmp_path, capsys, no_training):
    cfg, fragments = REFUSED[case](tmp_path)
    data = {k: v for k, v in cfg.__dict__.items() if k in ("source", "path", "num_labels", "text_pair_column")}
    assert main([command, _yaml(tmp_path, data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metakd: error: ") and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, (f, err)
    assert not (tmp_path / "out" / "d").exists() or not any((tmp_path / "out" / "d").rglob("_COMPLETE"))


def test_utf8_check_in_chunks_finds_the_line_and_offset(tmp_path):
    from metakd.data.sources import check_utf8

    f = tmp_path / "t.jsonl"
    good = "caf\u00e9 \u2603\n".encode() * 50  # multi-byte characters across every chunk boundary
    f.write_bytes(b"\xef\xbb\xbf" + good + b"bad \xe9\n")
    with pytest.raises(D.DataError, match=rf"line 51 \(byte offset {3 + len(good) + 4}\) holds byte 0xe9"):
        check_utf8(f, chunk=7)
    f.write_bytes(b"\xef\xbb\xbf" + good)
    assert check_utf8(f, chunk=7) is True
    f.write_bytes(good + "\u2603".encode()[:2])
    with pytest.raises(D.DataError, match=rf"line 51 \(byte offset {len(good)}\)"):
        check_utf8(f, chunk=7)


def test_nullable_parquet_label_is_empty_not_a_class(tmp_path):
    df = pd.DataFrame(make_rows())
    df["label"] = df["label"].astype("Int64")
    df.loc[4, "label"] = pd.NA
    df.to_parquet(tmp_path / "n.parquet")
    with pytest.raises(D.DataError, match=r"n\.parquet: row 5: column 'label' \(data.label_column\) is empty"):
        D.load_full(_files(tmp_path / "n.parquet"))


# ----------------------------------------------------------------------------- handled


def test_utf8_bom_is_dropped(tmp_path):
    rows = make_rows()
    plain = D.load_full(_files(write_jsonl(tmp_path / "plain.jsonl", rows)))
    for f in (tmp_path / "bom.jsonl", tmp_path / "bom.csv"):
        if f.suffix == ".csv":
            _csv(f, rows, "utf-8-sig")
        else:
            f.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "plain.jsonl").read_bytes())
        data = D.load_full(_files(f))
        assert data.train.texts == plain.train.texts and data.test.texts == plain.test.texts


def test_hidden_and_macos_resource_files_are_skipped(tmp_path):
    for d in ("books", "dvd"):
        write_jsonl(tmp_path / f"{d}.jsonl", make_rows((d,)))
    (tmp_path / "._books.jsonl").write_bytes(b"\x00\x05\x16\x07Mac OS X        \xff\xfe")  # AppleDouble
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / ".hidden.csv").write_text("not,a,table\n")
    assert D.load_full(DataConfig(source="amazon", path=str(tmp_path))).domains == ["books", "dvd"]
    files = tmp_path / "files"
    files.mkdir()
    write_jsonl(files / "all.jsonl", make_rows())
    (files / "._all.jsonl").write_bytes(b"\x00\x05\x16\x07\xff")
    assert D.load_full(_files(files)).domains == ["news", "sport"]


@pytest.mark.parametrize("orient", ["columns", "index", "split", "table", "records"])
def test_pandas_to_json_layouts_are_read(orient, tmp_path):
    rows = make_rows()
    f = tmp_path / "rows.json"
    pd.DataFrame(rows).to_json(f, orient=orient)  # "columns" is pandas' default
    data = D.load_full(_files(f))
    ref = D.load_full(_files(write_jsonl(tmp_path / "ref.jsonl", rows)))
    assert data.train.texts == ref.train.texts and data.test.labels.tolist() == ref.test.labels.tolist()


def test_tilde_is_expanded_by_the_reader(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl(tmp_path / "rows.jsonl", make_rows())
    cfg = DataConfig(source="files", path="~/rows.jsonl")  # not through the YAML loader, which expands it too
    assert D.load_full(cfg).domains == ["news", "sport"]
    assert D.fingerprint(cfg) == D.fingerprint(_files(tmp_path / "rows.jsonl"))


def test_integer_valued_labels_are_one_class(tmp_path):
    forms = [0, "0", "0.0", 0.0, " 0 "]
    rows = make_rows(label=lambda i: forms[i // 2 % 5] if i % 2 == 0 else ["1", 1.0, "1.0"][i % 3])
    ref = D.load_full(_files(write_jsonl(tmp_path / "ref.jsonl", make_rows())))
    for f in (_csv(tmp_path / "l.csv", rows), write_jsonl(tmp_path / "l.jsonl", rows)):  # strings; JSON numbers
        data = D.load_full(_files(f))
        assert data.num_labels == 2 and data.label_names is None
        assert data.train.labels.tolist() == ref.train.labels.tolist()


def test_label_names_fold_case_unless_label_case_keep(tmp_path):
    spell = ["positive", "Positive", " POSITIVE"]
    rows = make_rows(n=60, label=lambda i: spell[i % 3] if i % 2 else "negative")
    f = write_jsonl(tmp_path / "l.jsonl", rows)
    data = D.load_full(_files(f))
    assert data.label_names == ["negative", "positive"] and data.num_labels == 2
    kept = D.load_full(_files(f, label_case="keep"))
    assert kept.label_names == ["POSITIVE", "Positive", "negative", "positive"]
    assert D.data_key(_files(f), 0, None) != D.data_key(_files(f, label_case="keep"), 0, None)


def test_star_ratings_1_to_5_are_five_classes(tmp_path):
    rows = make_rows(n=50, label=lambda i: i % 5 + 1)
    data = D.load_full(_files(write_jsonl(tmp_path / "stars.jsonl", rows), num_labels=5))
    assert data.num_labels == 5 and data.label_names == ["1", "2", "3", "4", "5"]
    label = {t: y for s in D.SPLITS for t, y in zip(getattr(data, s).texts, getattr(data, s).labels)}
    assert label["news text 0"] == 0 and label["news text 4"] == 4  # 1 star -> class 0, 5 stars -> class 4


def _with_unlabelled(records: list, every: int = 7, mark=-1) -> list:
    return [{**r, "label": mark} if i % every == 3 else r for i, r in enumerate(records)]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def test_unlabelled_rows_are_dropped_and_counted_alike_for_files_and_hf(tmp_path, hf_cache):
    rows = _with_unlabelled(make_rows(n=30))
    f = write_jsonl(tmp_path / "rows.jsonl", rows)
    dropped = sum(r["label"] == -1 for r in rows)
    files = D.load_full(_files(f))
    hf = D.load_full(DataConfig(source="hf", path=str(f)))
    assert files.notes == [f"{dropped} unlabelled rows (label -1 or '-') dropped: {f}: {dropped}"]
    assert hf.notes == [f"{dropped} unlabelled rows (label -1 or '-') dropped: {f} [split train]: {dropped}"]
    assert files.train.texts == hf.train.texts and files.test.texts == hf.test.texts
    assert sum(len(getattr(files, s)) for s in D.SPLITS) == len(rows) - dropped


# ----------------------------------------------------------------------------- MNLI as users hold it locally

GENRES = ("fiction", "travel")


def _mnli(split: str, n: int, genres=GENRES, gold=False) -> list[dict]:
    names = ["entailment", "neutral", "contradiction"]
    return [{"premise": f"{split} p{i}", "hypothesis": f"{split} h{i}", "genre": g,
             **({"gold_label": "-" if i == 5 else names[i % 3]} if gold else {"label": -1 if i == 5 else i % 3})}
            for g in genres for i in range(n)]


_MNLI = dict(text_column="premise", text_pair_column="hypothesis", domain_column="genre")
_SPLITS = {"train": _mnli("train", 60), "validation_matched": _mnli("validation_matched", 12),
           "validation_mismatched": _mnli("validation_mismatched", 12, ("letters", "verbatim"))}


def _check_mnli(data: D.MultiDomainData) -> None:
    assert data.domains == list(GENRES)
    fiction_train = [f"train p{i}" for i in range(60) if i != 5]  # 59 labelled rows, in file order
    assert data.train.for_domains(0).texts == fiction_train[:53]  # the MNLI rule: last 10% (6) are dev
    assert data.dev.for_domains(0).texts == fiction_train[53:]
    assert data.test.for_domains(0).texts == [f"validation_matched p{i}" for i in range(12) if i != 5]
    assert not any("mismatched" in t for s in D.SPLITS for t in getattr(data, s).texts)


def test_mnli_files_folder_keeps_the_named_splits(tmp_path):
    for split, rows in _SPLITS.items():
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    data = D.load_full(_files(tmp_path, **_MNLI))
    _check_mnli(data)
    assert any("train.jsonl -> train" in n and "validation_matched.jsonl -> test" in n
               and "not used: validation_mismatched.jsonl" in n for n in data.notes), data.notes
    assert any("4 unlabelled rows" in n for n in data.notes), data.notes


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_mnli_flat_hf_folder_loads_each_split_by_file_name(ext, tmp_path, hf_cache):
    for split, rows in _SPLITS.items():
        f = tmp_path / "mnli" / f"{split}-00000-of-00001.{ext}"
        f.parent.mkdir(exist_ok=True)
        pd.DataFrame(rows).to_parquet(f) if ext == "parquet" else write_jsonl(f, rows)
    for test_split in ("validation_matched", None):  # None: validation_matched is the test set all the same
        data = D.load_full(DataConfig(source="hf", path=str(tmp_path / "mnli"), hf_test_split=test_split, **_MNLI))
        _check_mnli(data)


def test_mnli_original_gold_label_dash_is_unlabelled(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", _mnli("train", 60, gold=True))
    write_jsonl(tmp_path / "validation_matched.jsonl", _mnli("validation_matched", 12, gold=True))
    data = D.load_full(_files(tmp_path, label_column="gold_label", **_MNLI))
    assert data.num_labels == 3 and data.label_names == ["contradiction", "entailment", "neutral"]
    assert any("4 unlabelled rows" in n for n in data.notes), data.notes


def test_validate_prints_rows_per_domain_and_class_and_dropped_rows(tmp_path, capsys):
    f = write_jsonl(tmp_path / "rows.jsonl", _with_unlabelled(make_rows(n=30)))
    assert main(["validate", _yaml(tmp_path, {"source": "files", "path": str(f)})]) == 0
    out = capsys.readouterr().out
    assert "rows per domain and class (train + dev + test): news {0: 13, 1: 13}; sport {0: 13, 1: 12}" in out
    assert f"9 unlabelled rows (label -1 or '-') dropped: {f}: 9" in out


def test_hf_path_that_looks_local_is_refused_by_validate(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("metakd.preflight.hub_unreachable", lambda: None)  # as with network
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").mkdir()
    for path in ("./mnli", "data/mnli", "~/nowhere/mnli", "a/b/c"):
        assert main(["validate", _yaml(tmp_path, {"source": "hf", "path": path})]) == 2, path
        err = capsys.readouterr().err
        assert f"{path.lstrip('~')}' does not exist" in err and "not a hub id" in err, err
    assert main(["validate", _yaml(tmp_path, {"source": "hf", "path": "org/mnli"})]) == 0  # a hub id: noted
    assert "a Hugging Face hub dataset" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the data key holds the contents


def test_data_key_follows_the_contents_not_the_mtime(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    f = write_jsonl(d / "rows.jsonl", make_rows())
    cfg = _files(d)
    key, fp = D.data_key(cfg, 0, None), D.fingerprint(cfg)
    assert fp.startswith("sha256:")
    f.touch()
    (d / "._rows.jsonl").write_bytes(b"\x00\x05")  # skipped by the reader, so not in the fingerprint
    assert D.data_key(cfg, 0, None) == key and D.fingerprint(cfg) == fp
    rows = make_rows()
    rows[0]["label"] = 1 - rows[0]["label"]  # one label fixed
    write_jsonl(f, rows)
    assert D.data_key(cfg, 0, None) != key
    write_jsonl(f, make_rows())  # back as it was
    assert D.data_key(cfg, 0, None) == key
    write_jsonl(d / "more.jsonl", make_rows(("golf",)))
    assert D.data_key(cfg, 0, None) != key
    assert D.fingerprint(DataConfig()) is None  # synthetic: the config is the content


def test_teacher_and_student_keys_hold_the_fingerprint(tmp_path):
    from metakd.config import from_dict
    from metakd.jobs.experiment import plan, student_identity
    from metakd.train.teacher import teacher_identity

    cfg = from_dict({"methods": ["metakd", "kd_single", "student_ft"], "data": {"source": "files", "path": "x"}})
    specs, jobs = plan(cfg, ["a", "b"], data_fingerprint="sha256:1")
    again = plan(cfg, ["a", "b"], data_fingerprint="sha256:1")
    edited = plan(cfg, ["a", "b"], data_fingerprint="sha256:2")
    assert [s.key for s in specs] == [s.key for s in again[0]] and [j.key for j in jobs] == [j.key for j in again[1]]
    assert not {s.key for s in specs} & {s.key for s in edited[0]}
    assert not {j.key for j in jobs} & {j.key for j in edited[1]}
    # without a fingerprint (synthetic) the data part of the keys is the config, as before data.label_case
    synthetic = from_dict({})
    before = {k: v for k, v in synthetic.to_dict()["data"].items() if k != "label_case"}
    assert teacher_identity(synthetic, "meta", None, 0, "fp32")["data"] == before
    assert student_identity(synthetic, "student_ft", "a", 0, None, "fp32")["data"] == before


@pytest.mark.usefixtures("single_thread_torch")
def test_edited_data_retrains_and_unedited_data_is_reused(tmp_path, capsys, monkeypatch):
    """``metakd run`` three times on a tiny files dataset: unchanged (touched) data trains nothing
    again; one edited label prepares the data and trains the students again."""
    import metakd.jobs.workers as workers

    trained = []
    real = workers.train_student

    def counting(job, *a, **k):
        trained.append(job.key)
        return real(job, *a, **k)

    monkeypatch.setattr(workers, "train_student", counting)
    f = write_jsonl(tmp_path / "rows.jsonl", _with_unlabelled(make_rows(n=24)))
    raw = {"methods": ["student_ft"], "data": {"source": "files", "path": str(f), "max_length": 16, "vocab_size": 200},
           "student": {"preset": "tiny-student-1l"}, "distill": {"epochs": 1, "batch_size": 16},
           "teacher": {"preset": "tiny-teacher"}}
    exp = _yaml(tmp_path, **raw)

    def run() -> str:
        assert main(["run", exp]) == 0
        return capsys.readouterr().out

    out = run()
    assert len(trained) == 2 and "data: 7 unlabelled rows (label -1 or '-') dropped" in out
    f.touch()
    out = run()
    assert len(trained) == 2 and "data: 7 unlabelled rows" in out  # reused: nothing trained, the count still said
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    rows[0]["text"] = "an edited review"
    write_jsonl(f, rows)
    run()
    assert len(trained) == 4 and len(set(trained)) == 4  # new keys: trained again
    assert len(list((tmp_path / "out" / "cache" / "data").iterdir())) == 2  # one prepared copy per content
