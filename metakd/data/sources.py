"""The readers of the four sources (``DataConfig.source``) into one table of rows.

- ``synthetic``: :func:`metakd.synthetic.generate_corpus`;
- ``amazon``: a directory with one ``<domain>.jsonl`` per domain (domain = file stem);
- ``files``: a JSONL/JSON/CSV/Parquet file, or a directory of them, with text [text pair],
  label and domain columns; the split of a row comes from its file's name when every file of
  the directory is named by a split (``train.jsonl``, ``validation_matched-00000.parquet``:
  :data:`SPLIT_ROLES`), else from an optional ``split`` column, else from the 81/9/10 rule;
- ``hf``: ``datasets.load_dataset`` on a hub id or a local dataset directory, ``load_from_disk``
  on a ``save_to_disk`` directory, or the local json/jsonl/csv/parquet files of a file or a flat
  directory, one split per file-name prefix (``datasets`` itself would merge
  ``validation_matched-*`` and ``validation_mismatched-*`` into one "validation" split).

Every local path has ``~`` expanded. In a directory, hidden files (a leading ``.``: macOS
``._*`` resource forks, ``.DS_Store``, editors' temp files) are skipped. Text files must be
UTF-8 (a leading BOM is dropped); anything else is refused with the file, line and byte offset.

:func:`read_source` checks that every file has the configured columns (an error names the
file, the field and the columns it has), refuses empty texts and domains with their rows,
and concatenates the files into :class:`SourceRows`, labels still as read. Label ids and
splits are :mod:`metakd.data.splits`' job. :func:`fingerprint` hashes what a source reads.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import DataConfig
from ..errors import DataError

SOURCES = ("synthetic", "amazon", "files", "hf")
SPLIT_COLUMN = "split"
LABEL_CASES = ("fold", "keep")

# A split's name (a file name's prefix, a ``split`` column's value) -> the split its rows go to;
# None: not used. MNLI: validation_matched is the test set; the mismatched genres and the
# unlabelled test splits are left out.
SPLIT_ROLES = {"train": "train", "dev": "dev", "validation": "dev", "valid": "dev", "val": "dev", "test": "test",
               "validation_matched": "test", "validation_mismatched": None, "test_matched": None,
               "test_mismatched": None}
MNLI_TEST_SPLIT = "validation_matched"  # source hf: the test split when data.hf_test_split is None and it exists

_FILE_EXTS = (".jsonl", ".json", ".csv", ".parquet")
_HF_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_SYNTHETIC_COLUMNS = dict(text_column="text", text_pair_column=None, label_column="label", domain_column="domain")
_BOM = codecs.BOM_UTF8
_SHOW_ROWS = 5  # rows named in an error; the rest are counted


@dataclass
class SourceRows:
    """Every row of a source, in file order, before label ids and splits.

    ``labels`` holds the values as read (ints, strings, ...); ``domains`` the domain names
    (object array); ``splits`` the given split of each row ("train" / "dev" / "test"), or None
    when the source gives none; ``origin_of`` the index in ``origins`` (file path or
    "dataset [split]") of each row's file and ``positions`` its 1-based line (JSON Lines) or
    row (other tables) there, for error messages; ``notes`` what was skipped or inferred."""

    name: str
    texts: list[str]
    text_pairs: list[str] | None
    labels: list
    domains: np.ndarray
    splits: np.ndarray | None
    origin_of: np.ndarray
    origins: list[str]
    positions: np.ndarray
    by_line: list[bool]  # per origin: positions are line numbers
    label_column: str
    label_names: list[str] | None  # hf ClassLabel names
    notes: list[str] = field(default_factory=list)

    def where(self, i: int) -> str:
        """``<file>: line N`` (JSON Lines) or ``<file>: row N`` of row ``i``."""
        j = int(self.origin_of[i])
        return f"{self.origins[j]}: {'line' if self.by_line[j] else 'row'} {int(self.positions[i])}"

    def describe(self, idx) -> str:
        """Where the rows ``idx`` are, one line: ``<file>: lines 3, 9 (and 12 more rows)``."""
        idx = np.asarray(idx, dtype=np.int64)
        j = int(self.origin_of[idx[0]])
        shown = idx[self.origin_of[idx] == j][:_SHOW_ROWS]
        unit = "line" if self.by_line[j] else "row"
        more = len(idx) - len(shown)
        return (f"{self.origins[j]}: {unit}{'s' if len(shown) > 1 else ''} "
                + ", ".join(str(int(self.positions[i])) for i in shown)
                + (f" (and {more} more row{'s' if more > 1 else ''})" if more else ""))


@dataclass
class _Frame:
    """A table read from one file or one dataset split, before validation."""

    origin: str  # file path or "dataset [split]", for error messages
    df: pd.DataFrame
    domain: str | None = None  # forced domain (amazon: the file stem)
    split: str | None = None  # forced split (file name, hf)
    label_names: list[str] | None = None  # hf ClassLabel names
    lines: list[int] | None = None  # JSON Lines: the line of each row


def read_source(cfg: DataConfig) -> SourceRows:
    """Read ``cfg.source``, check the configured columns of every file and concatenate them."""
    _check_config(cfg)
    notes: list[str] = []
    if cfg.source == "synthetic":
        from metakd.synthetic import generate_corpus

        frames = [_Frame("synthetic corpus", pd.DataFrame(generate_corpus(cfg.synthetic)))]
        cols = _SYNTHETIC_COLUMNS
        name = "synthetic"
    else:
        reader = {"amazon": _read_amazon, "files": _read_files, "hf": _read_hf}[cfg.source]
        frames = reader(cfg, notes)
        cols = _columns(cfg)
        name = "amazon" if cfg.source == "amazon" else str(cfg.path)
        if cfg.source == "hf" and cfg.hf_config:
            name = f"{cfg.path}/{cfg.hf_config}"
    for fr in frames:
        _check_columns(fr, cols)
    rows = _concat(name, frames, cols)
    rows.notes = notes + rows.notes
    return rows


def _check_config(cfg: DataConfig) -> None:
    # sample_rate is DataConfig.validate's to check; these guard the readers below.
    if cfg.source not in SOURCES:
        raise DataError(f"data.source: {cfg.source!r} is not one of {', '.join(SOURCES)}")
    if cfg.source != "synthetic" and not cfg.path:
        raise DataError(f"data.path: required for source {cfg.source!r} (got {cfg.path!r})")
    if cfg.source != "synthetic" and "://" in str(cfg.path):
        raise DataError(f"data.path: {cfg.path!r} is a URI; source {cfg.source!r} reads local files (or, for hf, "
                        f"a hub id): copy the data to a path that every node can read")
    if cfg.domains is not None and (len(cfg.domains) == 0 or len(set(cfg.domains)) != len(cfg.domains)):
        raise DataError(f"data.domains: {cfg.domains!r} must be None or a non-empty list of distinct names")
    if cfg.num_labels is not None and cfg.num_labels < 2:
        raise DataError(f"data.num_labels: {cfg.num_labels!r}; classification needs None (inferred) or >= 2")
    if label_case(cfg) not in LABEL_CASES:
        raise DataError(f"data.label_case: {label_case(cfg)!r} is not one of {', '.join(LABEL_CASES)}")


def label_case(cfg: DataConfig) -> str:
    """``data.label_case`` (fold: label names compared case-insensitively; keep: as written)."""
    return getattr(cfg, "label_case", "fold")


def _columns(cfg: DataConfig) -> dict:
    return dict(text_column=cfg.text_column, text_pair_column=cfg.text_pair_column,
                label_column=cfg.label_column, domain_column=cfg.domain_column)


def local_path(path: str | os.PathLike) -> Path:
    """A local data path with ``~`` expanded (the config expands it too; the readers do not rely on that)."""
    return Path(os.path.expanduser(str(path)))


def looks_like_path(path: str) -> bool:
    """``path`` is meant as a local path, not a hub id ('name' or 'namespace/name'): it starts
    with ``./``, ``../``, ``/`` or ``~``, has a backslash or more than one ``/``, or its first
    component is a directory here (``data/mnli`` where ``./data`` exists)."""
    if path in (".", "..") or path.startswith(("./", "../", "/", "~", ".\\", "..\\")):
        return True
    if "\\" in path or path.count("/") > 1:
        return True
    return "/" in path and Path(path.split("/", 1)[0]).is_dir()


def data_files(directory: Path, exts) -> list[Path]:
    """The data files of ``directory`` (not recursive) with these extensions, sorted; hidden
    files (macOS ``._*``, ``.DS_Store``, ...) are skipped."""
    return sorted(f for f in directory.iterdir()
                  if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in exts)


def split_name(f: Path) -> str:
    """The split a file's name gives: its name up to the first ``-`` or ``.``
    (``validation_matched-00000-of-00001.parquet`` -> ``validation_matched``)."""
    return re.split(r"[-.]", f.name, maxsplit=1)[0].lower()


def _amazon_files(cfg: DataConfig) -> list[Path]:
    root = local_path(cfg.path)
    if not root.is_dir():
        raise DataError(f"data.path: {cfg.path} is not a directory (source 'amazon' expects <domain>.jsonl files "
                        f"in it)")
    available = [p.stem for p in data_files(root, (".jsonl",))]
    wanted = cfg.domains if cfg.domains is not None else available
    if not wanted:
        raise DataError(f"data.path: no <domain>.jsonl files in {root}")
    files = []
    for d in wanted:
        f = root / f"{d}.jsonl"
        if not f.is_file():
            raise DataError(f"data.domains: {d!r}: file {f} not found; available domains: {available}")
        files.append(f)
    return files


def _read_amazon(cfg: DataConfig, notes: list[str]) -> list[_Frame]:
    return [_read_table(f, domain=f.stem) for f in _amazon_files(cfg)]


def _files_files(cfg: DataConfig) -> list[Path]:
    p = local_path(cfg.path)
    if p.is_dir():
        files = data_files(p, _FILE_EXTS)
        if not files:
            raise DataError(f"data.path: no {'/'.join(_FILE_EXTS)} files in directory {p} (hidden files are skipped)")
        return files
    if p.is_file():
        if p.suffix.lower() not in _FILE_EXTS:
            raise DataError(f"data.path: {p} has extension {p.suffix!r}; expected one of {_FILE_EXTS}")
        return [p]
    raise DataError(f"data.path: {cfg.path} not found (source 'files' expects a file or a directory)")


def _read_files(cfg: DataConfig, notes: list[str]) -> list[_Frame]:
    files = _files_files(cfg)
    roles = _roles_from_names(files) if local_path(cfg.path).is_dir() else None
    if roles is not None:
        used = [f"{f.name} -> {roles[f]}" for f in files if roles[f] is not None]
        unused = [f.name for f in files if roles[f] is None]
        notes.append("splits from file names: " + ", ".join(used) + ("; dev: the last 10% of each domain's train rows"
                                                                      if "dev" not in roles.values() else "")
                     + (f"; not used: {', '.join(unused)}" if unused else ""))
    return [_read_table(f, split=roles[f] if roles else None) for f in files if roles is None or roles[f] is not None]


def _roles_from_names(files: list[Path]) -> dict[Path, str | None] | None:
    """{file: split} when every file is named by a split (:data:`SPLIT_ROLES`); None when none is."""
    named = [f for f in files if split_name(f) in SPLIT_ROLES]
    if not named:
        return None
    if len(named) != len(files):
        other = next(f for f in files if f not in named)
        raise DataError(f"data.path: {named[0]} is named by its split ({split_name(named[0])!r}) but {other.name} is "
                        f"not; name every file <split>[-*].<ext> with a split in {sorted(SPLIT_ROLES)}, or none")
    roles = {f: SPLIT_ROLES[split_name(f)] for f in files}
    if "train" not in roles.values():
        raise DataError(f"data.path: the file names give splits {sorted({split_name(f) for f in files})} "
                        f"but no train split (a file named train.<ext> or train-*.<ext>)")
    return roles


def _read_table(f: Path, domain: str | None = None, split: str | None = None) -> _Frame:
    ext = f.suffix.lower()
    lines = None
    if ext in (".jsonl", ".json"):
        df, lines = _read_json(f)
    elif ext == ".csv":
        df = _read_csv(f)
    else:
        df = _read_parquet(f)
    if split is not None and SPLIT_COLUMN in df.columns:
        raise DataError(f"{f}: has a {SPLIT_COLUMN!r} column, but its file name already gives its split "
                        f"({split_name(f)!r}); drop the column or rename the files")
    return _Frame(str(f), df, domain=domain, split=split, lines=lines)


def read_text(path: Path) -> str:
    """The file as UTF-8 text, a leading BOM dropped. Another encoding (e.g. Latin-1) is refused
    with the line and byte offset of the first byte that is not UTF-8; there is no fallback,
    since guessing an encoding silently changes the texts."""
    data = path.read_bytes()
    start = len(_BOM) if data.startswith(_BOM) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, data, start + e.start) from None


def _not_utf8(path: Path, data: bytes, offset: int) -> DataError:
    line = data.count(b"\n", 0, offset) + 1
    return DataError(f"{path}: line {line} (byte offset {offset}) holds byte 0x{data[offset]:02x}, which is not "
                     f"UTF-8; save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 {path.name})")


def check_utf8(path: Path, chunk: int = 1 << 24) -> bool:
    """Refuse a text file that is not UTF-8 (as :func:`read_text`), reading it in chunks (datasets
    reads it itself). True when it starts with a BOM."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = 0
    with open(path, "rb") as f:
        head = f.read(len(_BOM))
        bom = head == _BOM
        block = b"" if bom else head
        offset = len(head) - len(block)
        while True:
            block += f.read(chunk)
            pending = decoder.getstate()[0]
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                seen = pending + block
                bad = offset - len(pending) + e.start
                line = lines + seen.count(b"\n", 0, e.start) + 1
                raise DataError(f"{path}: line {line} (byte offset {bad}) holds byte 0x{seen[e.start]:02x}, which is "
                                f"not UTF-8; save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 {path.name})"
                                ) from None
            if not block:
                return bom
            offset += len(block)
            lines += block.count(b"\n")
            block = b""


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        # All as strings: a numeric-looking text stays text; labels are parsed later; an empty cell is "".
        return pd.read_csv(io.StringIO(read_text(path)), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{path}: not a readable CSV file ({one_line(e)})") from None


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {one_line(e)}); "
                        f"an interrupted copy or download? write or fetch it again") from None


def one_line(e: BaseException) -> str:
    """An exception's message on one line (pyarrow's and datasets' span several)."""
    return " ".join(str(e).split())[:500]


def _read_json(path: Path) -> tuple[pd.DataFrame, list[int] | None]:
    """JSON Lines (-> the line of each row), a JSON list of records, or one of pandas'
    ``to_json`` layouts: ``columns`` (its default), ``index``, ``split``, ``table``, or a
    JSON object of column lists."""
    text = read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("[") or (stripped.startswith("{") and path.suffix.lower() == ".json"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if stripped.startswith("["):
                raise DataError(f"{path}: line {e.lineno} is not valid JSON ({e.msg})") from None
            obj = None  # JSON Lines in a .json file, as Hugging Face writes them
        table = _json_table(path, obj) if obj is not None else None
        if table is not None:
            return table, None
    records, lines = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}: line {lineno} is a JSON {type(rec).__name__}, not an object; JSON Lines "
                                f"hold one object per line ({{\"text\": ..., \"label\": ..., ...}})")
            records.append(rec)
            lines.append(lineno)
    return pd.DataFrame.from_records(records), lines


def _json_table(path: Path, obj: Any) -> pd.DataFrame | None:
    """The table of a whole-file JSON value; None for one object of scalars (a one-line JSON Lines file)."""
    if isinstance(obj, list):
        if all(isinstance(r, dict) for r in obj):
            return pd.DataFrame.from_records(obj)
        raise DataError(f"{path}: a JSON list of {type(next(r for r in obj if not isinstance(r, dict))).__name__}s "
                        f"has no column names (pandas' orient='values'?); write records: "
                        f"df.to_json(path, orient='records', lines=True)")
    if not isinstance(obj, dict) or not obj:
        raise DataError(f"{path}: a JSON {type(obj).__name__}, not a table")
    try:
        if "columns" in obj and "data" in obj:  # orient="split"
            return pd.DataFrame(obj["data"], columns=obj["columns"])
        if "schema" in obj and "data" in obj:  # orient="table"
            return pd.DataFrame.from_records(obj["data"])
        if all(isinstance(v, list) for v in obj.values()):
            return pd.DataFrame(obj)
        if all(isinstance(v, dict) for v in obj.values()):
            if all(re.fullmatch(r"\d+", str(k)) for k in obj):  # orient="index": {row: {column: value}}
                return pd.DataFrame.from_dict(obj, orient="index")
            return pd.DataFrame(obj)  # orient="columns", pandas' default: {column: {row: value}}
    except ValueError as e:
        raise DataError(f"{path}: a JSON object that is not a table ({one_line(e)})") from None
    if any(isinstance(v, (list, dict)) for v in obj.values()):
        raise DataError(f"{path}: a JSON object that is not a table; expected JSON Lines, a list of records, or "
                        f"pandas' to_json layouts (columns, index, split, table)")
    return None


def _hf_local_files(local: Path, cfg: DataConfig) -> dict[str, list[Path]] | None:
    """{split name: files} of a local data file or a flat directory of them; None for another directory."""
    if local.is_file():
        if local.suffix.lower() not in _HF_BUILDERS:
            raise DataError(f"data.path: {local} has extension {local.suffix!r}; source 'hf' reads "
                            f"{sorted(_HF_BUILDERS)} files, a dataset directory or a hub id")
        return {"train": [local]}
    files = data_files(local, _HF_BUILDERS)
    if not files:
        return None
    builders = {_HF_BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise DataError(f"data.path: {local} mixes {sorted(builders)} files; keep one format per directory")
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(split_name(f), []).append(f)
    return groups


def _read_hf(cfg: DataConfig, notes: list[str]) -> list[_Frame]:
    import datasets

    path = str(cfg.path)
    local = local_path(path)
    if not local.exists() and looks_like_path(path):
        raise DataError(f"data.path: {path} does not exist (a local path, not a hub id 'name' or 'namespace/name'); "
                        f"relative paths are resolved from {os.getcwd()}")
    groups = _hf_local_files(local, cfg) if local.exists() else None
    test_split = cfg.hf_test_split
    try:
        if groups is not None:
            if test_split is None and MNLI_TEST_SPLIT in groups:
                test_split = MNLI_TEST_SPLIT
            wanted = [s for s in (cfg.hf_train_split, test_split) if s is not None]
            for fname, s in (("hf_train_split", cfg.hf_train_split), ("hf_test_split", test_split)):
                if s is not None and s not in groups:
                    raise DataError(f"data.{fname}: split {s!r} not in {path}; available splits: {sorted(groups)} "
                                    f"(a file's split is its name up to the first '-' or '.')")
            builder = _HF_BUILDERS[groups[cfg.hf_train_split][0].suffix.lower()]
            kwargs = {}
            if builder != "parquet" and any(check_utf8(f) for s in wanted for f in groups[s]):
                kwargs["encoding"] = "utf-8-sig"
            ds = datasets.load_dataset(builder, data_files={s: [str(f) for f in groups[s]] for s in wanted}, **kwargs)
        elif local.is_dir() and any((local / f).exists() for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(str(local))  # a save_to_disk directory
        else:
            ds = datasets.load_dataset(str(local) if local.exists() else path, cfg.hf_config)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear data error
        raise DataError(f"data.path: datasets could not load {path!r} (hf_config={cfg.hf_config!r}): "
                        f"{type(e).__name__}: {one_line(e)}") from e
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({"train": ds})
    if test_split is None and MNLI_TEST_SPLIT in ds:
        test_split = MNLI_TEST_SPLIT
    if test_split is not None and cfg.hf_test_split is None:
        notes.append(f"data.hf_test_split: {MNLI_TEST_SPLIT} is the test set (the MNLI rule; set data.hf_test_split "
                     f"to choose another split)")
    wanted = [("hf_train_split", cfg.hf_train_split, "train")]
    if test_split is not None:
        wanted.append(("hf_test_split", test_split, "test"))
    frames = []
    for fname, split, role in wanted:
        if split not in ds:
            raise DataError(f"data.{fname}: split {split!r} not in {path}; available splits: {sorted(ds)}")
        d = ds[split]
        needed = [c for c in (cfg.text_column, cfg.text_pair_column, cfg.label_column, cfg.domain_column) if c]
        origin = f"{path} [split {split}]"
        _check_columns(_Frame(origin, pd.DataFrame(columns=d.column_names)), _columns(cfg))
        feat = d.features.get(cfg.label_column)
        names = list(feat.names) if isinstance(feat, datasets.ClassLabel) else None
        df = d.select_columns(list(dict.fromkeys(needed))).to_pandas()
        frames.append(_Frame(origin, df, split=role if test_split is not None else None, label_names=names))
    return frames


def _check_columns(frame: _Frame, cols: dict) -> None:
    needed = ["text_column", "label_column"]
    if cols["text_pair_column"]:
        needed.append("text_pair_column")
    if frame.domain is None:
        needed.append("domain_column")
    available = [str(c) for c in frame.df.columns]
    for f in needed:
        if cols[f] not in frame.df.columns:
            raise DataError(f"{frame.origin}: column {cols[f]!r} (data.{f}) not found; available columns: {available}")


def _concat(name: str, frames: list[_Frame], cols: dict) -> SourceRows:
    texts: list[str] = []
    pairs: list[str] | None = [] if cols["text_pair_column"] else None
    labels: list = []
    domains: list[str] = []
    splits: list[str | None] = []
    origin_of: list[int] = []
    positions: list[np.ndarray] = []
    has_split = [f.split is not None or SPLIT_COLUMN in f.df.columns for f in frames]
    if any(has_split) and not all(has_split):
        raise DataError(f"column {SPLIT_COLUMN!r}: present in {frames[has_split.index(True)].origin} but not in "
                        f"{frames[has_split.index(False)].origin}; give it in every file or in none")
    for j, fr in enumerate(frames):
        df, n = fr.df, len(fr.df)
        texts += df[cols["text_column"]].tolist()
        if pairs is not None:
            pairs += df[cols["text_pair_column"]].tolist()
        labels += df[cols["label_column"]].tolist()
        domains += [fr.domain] * n if fr.domain is not None else df[cols["domain_column"]].tolist()
        if fr.split is not None:
            splits += [fr.split] * n
        elif has_split[j]:
            for k, v in enumerate(df[SPLIT_COLUMN].tolist()):
                s = str(v).strip().lower()
                if s not in SPLIT_ROLES:
                    where = f"line {fr.lines[k]}" if fr.lines else f"row {k + 1}"
                    raise DataError(f"{fr.origin}: {where}: column {SPLIT_COLUMN!r} has value {v!r}; "
                                    f"expected one of {sorted(SPLIT_ROLES)}")
                splits.append(SPLIT_ROLES[s])
        origin_of += [j] * n
        positions.append(np.asarray(fr.lines, dtype=np.int64) if fr.lines is not None else np.arange(1, n + 1))
    rows = SourceRows(name=name, texts=[], text_pairs=None, labels=labels, domains=np.zeros(0, dtype=object),
                      splits=None, origin_of=np.array(origin_of, dtype=np.int64), origins=[f.origin for f in frames],
                      positions=np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64),
                      by_line=[f.lines is not None for f in frames], label_column=cols["label_column"],
                      label_names=next((f.label_names for f in frames if f.label_names), None))
    rows.texts = _nonempty(rows, texts, cols["text_column"], "text_column", "a text")
    if pairs is not None:
        rows.text_pairs = _nonempty(rows, pairs, cols["text_pair_column"], "text_pair_column", "a second text")
    rows.domains = np.array(_nonempty(rows, domains, cols["domain_column"], "domain_column", "a domain", strip=True),
                            dtype=object)
    if any(has_split):
        rows.splits = np.array(splits, dtype=object)
        unused = np.flatnonzero(rows.splits == None)  # noqa: E711 - elementwise on an object array
        if len(unused):
            rows.notes.append(f"{len(unused)} rows of a split that is not used (e.g. validation_mismatched) left out")
    return rows


def _nonempty(rows: SourceRows, values: list, column: str, fname: str, what: str, strip: bool = False) -> list[str]:
    """``values`` as strings; a missing (null, NaN) or blank value is refused with its rows."""
    out = ["" if is_missing(v) else str(v) for v in values]
    bad = [i for i, v in enumerate(out) if not v.strip()]
    if bad:
        raise DataError(f"{rows.describe(bad)}: column {column!r} (data.{fname}) is empty or missing in {len(bad)} "
                        f"row{'s' if len(bad) > 1 else ''}; every row needs {what}")
    return [v.strip() for v in out] if strip else out


def is_missing(v: Any) -> bool:
    """A missing table cell: None, NaN or pandas' NA (a nullable Parquet column)."""
    return v is None or v is pd.NA or (isinstance(v, (float, np.floating)) and math.isnan(v))


# ----------------------------------------------------------------------------- fingerprint


def fingerprint(cfg: DataConfig) -> str | None:
    """What the data's contents are, for :func:`metakd.data.prepared.data_key`:

    - local files (amazon, files, hf on a local file or directory): ``sha256:`` of every file's
      name (relative to ``data.path``), size and sha256 of its bytes, in name order; hidden
      files are left out, as the readers skip them;
    - a hub dataset id: ``hub:`` and the commit sha of its revision (asked of the hub, else
      the one in the local hub cache; None when neither answers);
    - synthetic: None (the corpus is a function of ``data.synthetic``, already in the key).
    """
    if cfg.source == "synthetic":
        return None
    _check_config(cfg)
    local = local_path(cfg.path)
    if cfg.source == "amazon":
        files = _amazon_files(cfg)
    elif cfg.source == "files":
        files = _files_files(cfg)
    elif local.is_file():
        files = [local]
    elif local.is_dir():
        files = sorted(f for f in local.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(local).parts))
    else:
        if looks_like_path(str(cfg.path)):
            raise DataError(f"data.path: {cfg.path} does not exist (a local path, not a hub id)")
        return _hub_revision(str(cfg.path))
    h = hashlib.sha256()
    for f in files:
        name = f.relative_to(local).as_posix() if local.is_dir() else f.name
        h.update(f"{name}\0{f.stat().st_size}\0".encode())
        h.update(_file_sha256(f))
    return "sha256:" + h.hexdigest()


def _file_sha256(path: Path, chunk: int = 1 << 22) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.digest()


def _hub_revision(repo_id: str) -> str | None:
    from huggingface_hub import HfApi, constants

    try:
        return "hub:" + HfApi().dataset_info(repo_id, timeout=10).sha
    except Exception:  # noqa: BLE001 - offline, unknown, private: fall back to the revision cached here
        ref = Path(constants.HF_HUB_CACHE) / ("datasets--" + repo_id.replace("/", "--")) / "refs" / "main"
        return "hub:" + ref.read_text().strip() if ref.is_file() else None
