"""``metakd export | predict``: write one student (or teacher) of a sweep as a standard model
directory with its model card; run a model on texts.

``register(subparsers)`` adds both subcommands; each sets ``func(args) -> exit code``. A model
that cannot be chosen, found or loaded prints ``metakd: error: ...`` and returns 2.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..jobs.cache import artifact_store
from ..report.cli import guarded
from ..storage import Store
from .artifacts import ExportError, read_model_json, student_dir, teacher_dir, tokenizer_dir
from .card import student_card, teacher_card
from .select import choose, configurations

_SPLITS = ("dev", "test")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write one student (or --teacher) as a standard Hugging Face model directory with a model card",
        description="Chooses one kept student of a sweep (--method, --domain, then --trial or --best, then the seed), "
                    "says which and why, and writes it to -o as a directory that plain transformers loads offline "
                    "(config.json, model.safetensors, tokenizer), or as an ONNX graph where no standard class "
                    "computes its head, with a README.md model card.")
    p.add_argument("path", help="sweep or run directory (<storage>/<name>, or <output_dir>/<name> of metakd run)")
    p.add_argument("-o", "--out", required=True, help="directory to write (new or empty)")
    p.add_argument("--method", default="metakd", help="method of the student (default: metakd)")
    p.add_argument("--domain", default=None, help="target domain of the student (required unless --teacher); "
                                                  "with --teacher, the head of a multitask (kd_mtl) teacher")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--trial", default=None, help="the configuration of this trial id")
    which.add_argument("--best", action="store_true",
                       help="the configuration with the best dev accuracy for the method and domain, averaged "
                            "over seeds (the default when the directory has one configuration)")
    p.add_argument("--seed", type=int, default=None,
                   help="this seed's student (default: the seed whose dev accuracy is closest to the mean)")
    p.add_argument("--teacher", default=None, metavar="KEY", help="export the teacher with this key instead")
    p.add_argument("--write-split", choices=_SPLITS, default=None,
                   help="also write the target domain's examples of this split to OUT/<split>.jsonl (text, label), "
                        "to check the card's accuracy with `metakd predict OUT --file OUT/<split>.jsonl --eval`")
    p.set_defaults(func=_guard(cmd_export))

    p = subparsers.add_parser(
        "predict", help="labels and probabilities of an exported directory or a kept student on texts",
        description="Runs an exported directory (metakd export) or a student of a sweep (its directory "
                    "students/<key>, or its key with --sweep) on --text or a JSONL --file, encoding texts as "
                    "training did. --file writes one JSON line per input row with its prediction.")
    p.add_argument("model", help="exported directory, student directory, or student key (with --sweep)")
    p.add_argument("--sweep", default=None, help="sweep or run directory holding students/<key>")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="a text to classify (repeatable)")
    src.add_argument("--file", help="JSONL, one object per line with the text (and optionally a label)")
    p.add_argument("-o", "--out", default=None, help="--file: where the predictions go "
                                                     "(default: <file stem>.predictions.jsonl beside it)")
    p.add_argument("--eval", action="store_true", help="--file: print the accuracy on the rows that have a label")
    p.add_argument("--text-column", default="text", help="--file: field holding the text (default: text)")
    p.add_argument("--pair-column", default=None, help="--file: field holding the second text of a pair")
    p.add_argument("--label-column", default="label", help="--file: field holding the label, an id or a name")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward (default: 64)")
    p.set_defaults(func=_guard(cmd_predict))


_guard = guarded(ExportError, ImportError, FileExistsError, FileNotFoundError)


# ----------------------------------------------------------------------------- export


def cmd_export(args) -> int:
    from ..report import results

    store = artifact_store(args.path)  # the cache the sweep's artifacts are in (metakd.jobs.cache)
    df = results.load(args.path)
    sweep = Path(str(args.path).rstrip("/")).name
    if args.teacher:
        return _export_teacher(args, store, df, sweep)
    if args.domain is None:
        raise ExportError("--domain: which target domain's student (or --teacher KEY)")
    if args.trial is None and not args.best and len(configurations(df, args.method, args.domain)) > 1:
        raise ExportError(f"{args.path} holds several configurations: say --best or --trial TRIAL_ID")
    choice = choose(df, args.method, args.domain, trial=args.trial, seed=args.seed)
    print(f"chose student {choice.student_key} ({args.method} on {args.domain}, seed {choice.seed}, "
          f"trial {choice.trial_id}): {choice.reason}", flush=True)
    keep = choice.config.get("students", {}).get("keep")
    directory = student_dir(store, choice.student_key, keep)
    model_json = read_model_json(directory)
    source = {"kind": "student", "student_key": choice.student_key, "method": choice.method, "domain": choice.domain,
              "seed": choice.seed, "trial_id": choice.trial_id, "teacher_key": model_json.get("teacher_key"),
              "sweep": str(args.path)}
    meta = _export(directory, directory / "tokenizer", model_json.get("label_names"), model_json["max_length"],
                   model_json.get("truncation", "head"), args.out, source)
    data_meta = _data_meta(store, model_json.get("data_key"))
    Path(args.out, "README.md").write_text(student_card(choice, df, meta, data_meta, sweep))
    if args.write_split:
        _write_split(choice.config, args.domain, args.write_split, Path(args.out), meta)
    _report(args.out, meta)
    return 0


def _export_teacher(args, store: Store, df, sweep: str) -> int:
    from ..config import from_dict

    rows = df[(df["teacher_key"] == args.teacher).fillna(False)]
    if rows.empty:
        raise ExportError(f"--teacher {args.teacher}: no results row names this teacher in {args.path}")
    cfg_dict = json.loads(rows["config_json"].iloc[0])
    directory = teacher_dir(store, args.teacher)
    summary = json.loads((directory / "teacher.json").read_text()) if (directory / "teacher.json").is_file() else {}
    cfg = from_dict(cfg_dict)
    # teacher.json names its prepared data (older teachers: the metadata of the outputs stored with them)
    key = summary.get("data_key") or _outputs_data_key(directory)
    if key is None:
        raise ExportError(f"teacher {args.teacher}: {directory} does not name its prepared data (no data_key in "
                          f"teacher.json or its stored outputs), so its tokenizer is unknown")
    data_meta = _data_meta(store, key) or {}
    domains = data_meta.get("domains") or summary.get("domains") or []
    model_json = read_model_json(directory)
    index = None
    if model_json.get("multitask"):
        if args.domain not in domains:
            raise ExportError(f"--teacher {args.teacher} is multitask (one head per domain): say --domain, one of "
                              f"{domains}")
        index = domains.index(args.domain)
    source = {"kind": "teacher", "teacher_key": args.teacher, "teacher_kind": summary.get("kind"),
              "domain": summary.get("domain"), "head": args.domain if index is not None else None,
              "seed": summary.get("seed"),
              "sweep": str(args.path)}
    print(f"teacher {args.teacher}: {summary.get('kind')}, seed {summary.get('seed')}", flush=True)
    meta = _export(directory, tokenizer_dir(store, key), data_meta.get("label_names"), cfg.data.max_length,
                   cfg.data.truncation, args.out, source, index)
    Path(args.out, "README.md").write_text(teacher_card(args.teacher, summary, cfg_dict, meta, data_meta, sweep))
    _report(args.out, meta)
    return 0


def _export(directory: Path, tokenizer: Path, label_names, max_length: int, truncation: str, out: str,
            source: dict, domain_index: int | None = None) -> dict:
    from transformers import AutoTokenizer

    from ..models import load_model
    from .hf import Packaging, export_model

    model = load_model(directory)
    names = label_names or [str(i) for i in range(model.num_labels)]
    pack = Packaging(dict(enumerate(names)), max_length, truncation, domain_index, source)
    return export_model(model, AutoTokenizer.from_pretrained(str(tokenizer)), out, pack)


def _outputs_data_key(directory: Path) -> str | None:
    from safetensors import safe_open

    from ..train.teacher_cache import OUTPUTS_FILE

    if not (directory / OUTPUTS_FILE).is_file():
        return None
    with safe_open(str(directory / OUTPUTS_FILE), "pt") as f:
        return (f.metadata() or {}).get("data_key")


def _data_meta(store: Store, key: str | None) -> dict | None:
    rel = f"data/{key}"
    return store.read_json(f"{rel}/meta.json") if key and store.is_complete(rel) else None


def _write_split(config: dict, domain: str, split: str, out: Path, meta: dict) -> None:
    """The target domain's examples of ``split``, read from the data source as training read them."""
    from ..config import from_dict
    from ..data import load_full

    data = load_full(from_dict(config).data)
    part = getattr(data, split).for_domains([data.domains.index(domain)])
    names = meta["id2label"]
    with open(out / f"{split}.jsonl", "w") as f:
        for i in range(len(part)):
            row = {"text": part.texts[i]}
            if part.text_pairs is not None:
                row["text_pair"] = part.text_pairs[i]
            row.update(label=names[str(int(part.labels[i]))], domain=domain)
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(part)} {split} examples of {domain} to {out / f'{split}.jsonl'}")


def _report(out: str, meta: dict) -> None:
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    files = sorted(str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB: {', '.join(files)}): {meta['architecture']}, "
          f"{meta['parameters']:,} parameters; logits within {meta['max_abs_diff']:.1e} of metakd's")


# ----------------------------------------------------------------------------- predict


def cmd_predict(args) -> int:
    from .predict import label_ids, load_predictor, load_student, predict

    if args.sweep:
        predictor = load_student(student_dir(artifact_store(args.sweep), args.model))
    else:
        predictor = load_predictor(args.model)
    labels = predictor.id2label
    if args.text:
        probs = predict(predictor, args.text, batch_size=args.batch_size)
        for text, p in zip(args.text, probs):
            best = int(p.argmax())
            others = ", ".join(f"{labels[i]} {p[i]:.4f}" for i in range(len(p)))
            print(f"{labels[best]}\t{p[best]:.4f}\t({others})\t{text}")
        return 0
    rows = _read_jsonl(Path(args.file), args.text_column, args.pair_column)
    texts = [r[args.text_column] for r in rows]
    pairs = [r[args.pair_column] for r in rows] if args.pair_column else None
    probs = predict(predictor, texts, pairs, batch_size=args.batch_size, progress=True)
    out = Path(args.out) if args.out else Path(args.file).with_suffix(".predictions.jsonl")
    with open(out, "w") as f:
        for r, p in zip(rows, probs):
            best = int(p.argmax())
            f.write(json.dumps({**r, "prediction": labels[best], "prediction_id": best,
                                "probabilities": {labels[i]: float(p[i]) for i in range(len(p))}}) + "\n")
    print(f"wrote {len(rows)} predictions to {out}")
    if args.eval:
        gold = label_ids([r.get(args.label_column) for r in rows], predictor, args.file)
        scored = [(g, int(p.argmax())) for g, p in zip(gold, probs) if g is not None]
        if not scored:
            raise ExportError(f"--eval: no row of {args.file} has a {args.label_column!r} field")
        correct = sum(g == y for g, y in scored)
        print(f"accuracy {100 * correct / len(scored):.2f}% ({correct}/{len(scored)} labelled rows)")
    return 0


def _read_jsonl(path: Path, text_column: str, pair_column: str | None) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ExportError(f"{path}, line {i}: not JSON ({e})") from None
        for col in (text_column, pair_column):
            if col and not isinstance(row.get(col), str):
                raise ExportError(f"{path}, line {i}: no text in field {col!r} (--text-column / --pair-column)")
        rows.append(row)
    return rows
