"""The result tables of a sweep: Parquet schema, writer and reader.

A sweep stores two tables under its directory (``<storage>/<name>``), one Parquet file per
part (one part per trial), so any Parquet reader sees a table by globbing a directory:

    <storage>/<name>/results/<part>.parquet   one row per (trial, seed, method, domain, split)
    <storage>/<name>/curves/<part>.parquet    one row per logged step of a training stage

``accuracy`` is a fraction in [0, 1]; the analysis and the plots convert to % for display.

A student job that several trials need (a baseline in a sweep over ``gamma2``) is trained once;
every trial still lists it, and the rows of the trials that did not train it carry
``reused_from`` (the trial that did). ``student_key`` names the trained student: count trainings
with the rows whose ``reused_from`` is null; ``metakd.report.analysis`` counts each student once per cell.

The writer replaces a part atomically, so a crash never leaves a truncated file and a
resumed trial that writes its part again never duplicates rows. The reader needs neither
Ray nor torch; pandas, ``pyarrow.parquet.read_table(<dir>)`` and DuckDB
(``read_parquet('<dir>/*.parquet')``) read the same files.
"""

from __future__ import annotations

import json
import math
import numbers
import posixpath
import re
import uuid
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

_S, _I, _F, _B = pa.string(), pa.int64(), pa.float64(), pa.bool_()

RESULT_SCHEMA = pa.schema(
    [
        ("sweep", _S),
        ("trial_id", _S),
        ("status", _S),  # "ok" | "failed"
        ("seed", _I),
        ("method", _S),  # metakd | student_ft | kd_single | kd_mix | kd_mtl | metakd_no_target
        ("domain", _S),  # target domain
        ("split", _S),  # "dev" | "test"
        ("accuracy", _F),  # fraction in [0, 1]
        ("loss", _F),
        ("majority_rate", _F),  # share of the most frequent label in this split of the domain
        ("collapsed", _B),  # dev accuracy <= the dev split's majority rate (same value on both rows)
        ("gamma1", _F),
        ("gamma2", _F),
        ("sample_rate", _F),
        ("alpha", _F),
        ("temperature", _F),
        ("prototype", _S),
        ("tda_target", _S),
        ("schedule", _S),
        ("pred_loss", _S),
        ("student", _S),  # preset name or "custom"
        ("student_layers", _I),
        ("student_hidden", _I),
        ("student_heads", _I),
        ("student_intermediate", _I),
        ("teacher", _S),  # preset name or checkpoint
        ("teacher_key", _S),  # content hash of everything that determines the teacher
        ("student_key", _S),  # content hash of everything that determines this student's result
        ("reused_from", _S),  # trial that trained this student for its configuration; null: trained here
        ("teacher_epochs", _I),
        ("teacher_lr", _F),
        ("stage1_epochs", _I),
        ("stage2_epochs", _I),
        ("stage1_lr", _F),
        ("stage2_lr", _F),
        ("train_seconds", _F),
        ("student_params", _I),
        ("teacher_params", _I),
        ("latency_ms_b1", _F),  # ms per example of an inference forward at batch 1 (median timed pass)
        ("latency_ms_b32", _F),
        ("latency_precision", _S),  # fp32 | bf16: the autocast the latency passes ran in (the student's)
        ("latency_warmup", _I),  # untimed passes before the timed ones, per batch size
        ("latency_repeats_b1", _I),  # timed passes behind latency_ms_b1
        ("latency_repeats_b32", _I),
        ("latency_shared", _B),  # the GPU was shared with other workers (a GPU fraction < 1); null on a CPU
        # pruned students (student.prune, cap-pruning spec §4); null for a dense student except latency_kind
        ("latency_kind", _S),  # dense | dense_masked (zeros in dense matrices) | physical (pruned units removed)
        ("prune_structure", _S),  # unstructured | heads_ffn
        ("prune_criterion", _S),  # movement | soft_movement | magnitude | first_order
        ("prune_target", _F),  # the configured sparsity
        ("prune_contrastive", _S),  # the contrastive modules, e.g. "prc+snc+fic"; "none" for none
        ("prune_achieved", _F),  # share of the six matrices' weights removed (soft_movement: set by training)
        ("encoder_remaining", _F),  # share of the transformer layers' parameters left, as the CAP paper counts
        ("student_nonzero_params", _I),  # inference parameters less the pruned ones; dense: = student_params
        ("heads_kept", _I),
        ("ffn_kept", _I),
        ("error", _S),  # status failed: why (e.g. the job ran out of GPU memory); null otherwise
        ("device", _S),
        ("dataset", _S),
        ("search_params", _S),  # JSON object of the trial's searched values
        ("config_json", _S),  # the full resolved config, JSON
    ]
)

CURVE_SCHEMA = pa.schema(
    [
        ("sweep", _S),
        ("trial_id", _S),
        ("seed", _I),
        ("method", _S),
        ("domain", _S),  # target domain, or "all" for a teacher trained on every domain
        ("stage", _S),  # "teacher" | "stage1" | "stage2" | "joint" | "finetune" | "prune"
        ("epoch", _I),
        ("step", _I),
        ("train_loss", _F),
        ("dev_accuracy", _F),
        ("seconds", _F),
        ("teacher_key", _S),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {"results": RESULT_SCHEMA, "curves": CURVE_SCHEMA}

# Columns added after the first release: parts written before them read as null there.
ADDED_LATER = {"results": ("majority_rate", "collapsed", "student_key", "reused_from", "latency_precision",
                           "latency_warmup", "latency_repeats_b1", "latency_repeats_b32", "latency_shared",
                           "error", "latency_kind", "prune_structure", "prune_criterion", "prune_target",
                           "prune_contrastive", "prune_achieved", "encoder_remaining", "student_nonzero_params",
                           "heads_kept", "ffn_kept")}

# Columns with a closed set of values: a typo here would silently drop rows from analyses.
_ALLOWED = {
    "status": ("ok", "failed"),
    "split": ("dev", "test"),
    "stage": ("teacher", "stage1", "stage2", "joint", "finetune", "prune"),
    "latency_kind": ("dense", "dense_masked", "physical"),
}

_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]{0,199}$")
_TMP_MARK = ".tmp-"
# Object stores publish an object only when its single PUT completes, so writing straight
# to the final key is already atomic; their "move" is a copy + delete that gains nothing.
_OBJECT_STORES = {"s3", "gcs"}


def _schema(table: str) -> pa.Schema:
    if table not in SCHEMAS:
        raise ValueError(f"unknown table {table!r}; expected one of {sorted(SCHEMAS)}")
    return SCHEMAS[table]


def _resolve(path_or_uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, '/'-separated path inside it) for a local path or an s3://, gs://, file:// URI."""
    path_or_uri = str(path_or_uri)
    if "://" in path_or_uri:
        return pafs.FileSystem.from_uri(path_or_uri)
    return pafs.LocalFileSystem(), Path(path_or_uri).expanduser().resolve().as_posix()


def _coerce(value, name: str, typ: pa.DataType, row: int):
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None  # NaN is stored as null so that SQL readers see a missing value
    where = f"row {row}, column {name!r}"
    if pa.types.is_string(typ):
        if isinstance(value, str):
            return value
        if isinstance(value, (dict, list, tuple)):
            return json.dumps(value, sort_keys=True, default=str)
        raise ValueError(f"{where}: expected a string (or a dict to store as JSON), got {value!r}")
    if pa.types.is_int64(typ):
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real) and float(value).is_integer():
            return int(value)
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if pa.types.is_boolean(typ):
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if pa.types.is_float64(typ):
        if isinstance(value, numbers.Real):
            value = float(value)
            return None if math.isnan(value) else value
        raise ValueError(f"{where}: expected a number, got {value!r}")
    raise AssertionError(f"unhandled type {typ}")  # the schemas only use the four above


def to_table(rows: list[dict], table: str = "results") -> pa.Table:
    """Coerce ``rows`` to the table's schema: missing keys become null, unknown keys raise."""
    schema = _schema(table)
    names = set(schema.names)
    unknown = sorted({k for r in rows for k in r} - names)
    if unknown:
        raise ValueError(f"unknown column(s) for table {table!r}: {unknown}")
    columns = {}
    for field in schema:
        values = [_coerce(r.get(field.name), field.name, field.type, i) for i, r in enumerate(rows)]
        allowed = _ALLOWED.get(field.name)
        if allowed:
            bad = sorted({v for v in values if v is not None and v not in allowed})
            if bad:
                raise ValueError(f"column {field.name!r} has value(s) {bad}; allowed: {list(allowed)}")
        columns[field.name] = pa.array(values, type=field.type)
    return pa.table(columns, schema=schema)


def write_part(root: str, rows: list[dict], part: str, table: str = "results") -> str:
    """Write ``rows`` to ``<root>/<table>/<part>.parquet`` atomically and return its path.

    ``root`` is the sweep directory: a local path or a URI (s3://, gs://, file://).
    Writing the same part again replaces it, so a resumed trial never duplicates rows.
    """
    if not isinstance(part, str) or not _PART_RE.match(part) or ".." in part or _TMP_MARK in part:
        raise ValueError(
            f"part name {part!r} is not filesystem-safe: use 1-200 characters from "
            "[A-Za-z0-9_.=+-], starting with a letter or digit, without '..' or '.tmp-'"
        )
    data = to_table(rows, table)
    fs, base = _resolve(root)
    directory = posixpath.join(base, table)
    fs.create_dir(directory, recursive=True)
    final = posixpath.join(directory, f"{part}.parquet")

    if fs.type_name in _OBJECT_STORES:
        with fs.open_output_stream(final) as out:
            pq.write_table(data, out)
    else:
        # Dot-prefixed so that pyarrow's dataset discovery (which skips '.' and '_' files) and
        # a '*.parquet' glob never read a half-written file; the rename onto the final name is
        # atomic on POSIX filesystems and replaces an earlier version of the part.
        tmp = posixpath.join(directory, f".{part}.parquet{_TMP_MARK}{uuid.uuid4().hex}")
        try:
            with fs.open_output_stream(tmp) as out:
                pq.write_table(data, out)
            fs.move(tmp, final)
        except BaseException:
            try:
                fs.delete_file(tmp)
            except OSError:
                pass
            raise
    root = str(root)
    return posixpath.join(root.rstrip("/"), table, f"{part}.parquet") if "://" in root else final


def _part_files(fs: pafs.FileSystem, directory: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=False))
    files = []
    for info in infos:
        name = info.base_name
        if (
            info.type == pafs.FileType.File
            and name.endswith(".parquet")
            and not name.startswith((".", "_"))
            and _TMP_MARK not in name
        ):
            files.append(info.path)
    return sorted(files)


def _int_as_nullable(typ: pa.DataType):
    # Nullable integers / booleans stay so (pandas would make floats / objects of them with nulls).
    if pa.types.is_boolean(typ):
        return pd.BooleanDtype()
    return pd.Int64Dtype() if pa.types.is_int64(typ) else None


class CorruptPartWarning(UserWarning):
    """A part of a table could not be read and was skipped (``load(..., strict=True)`` raises instead)."""


def load(path_or_uri: str, table: str = "results", strict: bool = False) -> pd.DataFrame:
    """Read every part of a table into one DataFrame typed per the schema.

    ``path_or_uri`` is the sweep directory, its ``<table>/`` directory, or one .parquet file.
    Temporary files of an unfinished write are ignored and exact duplicate rows dropped.
    A part of a directory that cannot be read (truncated, not Parquet, not this table's columns)
    is skipped with a :class:`CorruptPartWarning` naming it, and listed as (path, reason) in
    ``df.attrs["skipped_parts"]``, so one bad file never hides the rest; ``strict=True`` raises
    ``ValueError`` instead. One named .parquet file that cannot be read always raises.
    """
    _schema(table)  # an unknown table name raises here, before any read
    fs, path = _resolve(path_or_uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        files = [path]
    elif info.type == pafs.FileType.Directory:
        sub = posixpath.join(path, table)
        directory = sub if fs.get_file_info(sub).type == pafs.FileType.Directory else path
        files = _part_files(fs, directory)
    else:
        files = []
    if not files:
        raise FileNotFoundError(
            f"no {table} parquet parts at {path_or_uri!r} "
            f"(looked for {table}/*.parquet, *.parquet, or a .parquet file)"
        )

    tables, skipped = [], []
    for f in files:
        try:
            tables.append(_read_part(fs, f, table))
        except (pa.ArrowException, OSError, ValueError) as e:
            if strict or info.type == pafs.FileType.File:
                raise ValueError(f"{f}: cannot read this {table} part: {e}") from None
            reason = " ".join(str(e).split())
            skipped.append((f, reason))
            warnings.warn(f"skipped corrupt {table} part {f}: {reason}", CorruptPartWarning, stacklevel=2)
    if not tables:
        raise ValueError(f"no readable {table} parquet parts at {path_or_uri!r}: all {len(files)} are corrupt "
                         f"(first: {skipped[0][0]}: {skipped[0][1]})")
    df = pa.concat_tables(tables).to_pandas(types_mapper=_int_as_nullable)
    df = df.drop_duplicates().reset_index(drop=True)
    df.attrs["skipped_parts"] = skipped
    return df


def _read_part(fs: pafs.FileSystem, f: str, table: str) -> pa.Table:
    schema = _schema(table)
    t = pq.read_table(f, filesystem=fs)
    for name in ADDED_LATER.get(table, ()):
        if name not in t.column_names:
            t = t.append_column(name, pa.nulls(len(t), schema.field(name).type))
    missing = [n for n in schema.names if n not in t.column_names]
    if missing:
        raise ValueError(f"{f} lacks column(s) {missing}: is it a {table!r} part?")
    return t.select(schema.names).cast(schema)


def load_curves(path_or_uri: str) -> pd.DataFrame:
    """``load(path_or_uri, table="curves")``: the training curves of a sweep."""
    return load(path_or_uri, table="curves")
