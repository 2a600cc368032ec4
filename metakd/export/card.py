"""The model card (README.md) of an exported student or teacher: what it is, how it was made, how
well it does, and how to load it.

Accuracies over seeds are of the exported student's configuration (same resolved config, one
student per seed): mean, sample std and the 95% t-interval mean -/+ t_{0.975, n-1} sd / sqrt(n)
(no interval with one seed). The paired difference against ``kd_single`` is
:func:`metakd.report.analysis.compare_methods` on that configuration's rows.
"""

from __future__ import annotations

import math

import pandas as pd
import yaml

from ..methods import METHODS
from ..report import analysis
from .select import Choice, configuration_key

CONFIDENCE = 0.95


def seed_stats(accuracies: list[float]) -> dict:
    """mean, std (ddof=1), the 95% t-interval (NaN below 2 seeds) and n, in points (%)."""
    from scipy import stats

    a = [100 * float(x) for x in accuracies]
    n = len(a)
    mean = sum(a) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": math.nan, "low": math.nan, "high": math.nan}
    std = math.sqrt(sum((x - mean) ** 2 for x in a) / (n - 1))
    half = float(stats.t.ppf((1 + CONFIDENCE) / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half}


def configuration_rows(df: pd.DataFrame, choice: Choice) -> pd.DataFrame:
    """The ``status == "ok"`` rows of the chosen configuration, every method, one per (student, split)."""
    ok = df[(df["status"] == "ok").fillna(False)]
    rows = ok[ok["config_json"].map(configuration_key) == choice.configuration]
    return rows.drop_duplicates(["student_key", "split", "seed", "method", "domain"])


def student_card(choice: Choice, df: pd.DataFrame, export: dict, data_meta: dict | None, sweep: str) -> str:
    """README.md of an exported student (``export``: the metakd.json of the directory)."""
    cfg = choice.config
    rows = configuration_rows(df, choice)
    mine = rows[(rows["method"] == choice.method) & (rows["domain"] == choice.domain)]
    row = mine[(mine["seed"] == choice.seed) & (mine["split"] == "test")].iloc[0]
    method = METHODS.get(choice.method)
    teacher = cfg.get("teacher", {})
    data = cfg.get("data", {})
    lines = _front_matter(export) + [
        f"# {choice.method} student for domain `{choice.domain}`", "",
        f"Distilled by metakd (Meta-KD: Pan et al., ACL 2021) in `{sweep}` and exported by `metakd export`.", "",
        "| | |", "| --- | --- |",
        f"| method | `{choice.method}`: {method.label if method else ''} |",
        f"| target domain | `{choice.domain}` (of {', '.join(f'`{d}`' for d in (data_meta or {}).get('domains', []))}) |",
        f"| teacher | {_teacher_text(teacher, row.get('teacher_key'), method)} |",
        f"| data | {_data_text(data, data_meta, choice.domain)} |",
        f"| sample rate | {data.get('sample_rate')} (share of the target domain's training split used) |",
        f"| seed | {choice.seed} |",
        f"| why this student | {choice.reason} |",
        f"| configuration | {_params_text(choice.search_params)} (trial `{choice.trial_id}`) |",
        f"| student key | `{choice.student_key}` (`students/{choice.student_key}` in the artifact cache of `{sweep}`) |",
        f"| architecture | {export['architecture']}, `{export['pooling']}` pooling, "
        f"{_int(row.get('student_layers'))} layers, hidden {_int(row.get('student_hidden'))}, "
        f"{_int(row.get('student_heads'))} heads |",
        f"| parameters | {export['parameters']:,} (encoder + classifier; the training-only domain head and "
        f"projections W_h, W_d are not exported) |",
        f"| latency | {_latency_text(row)} |",
        f"| labels | {', '.join(f'{i}: `{n}`' for i, n in export['id2label'].items())} |",
        "",
        "## Accuracy", "",
        f"Over the {len(choice.dev_by_seed)} seed(s) of this configuration (one student per seed; mean, std and "
        f"{int(CONFIDENCE * 100)}% t-interval, %):", "",
        "| split | this student | mean | std | 95% interval | seeds |", "| --- | --- | --- | --- | --- | --- |",
    ]
    for split in ("dev", "test"):
        per = mine[mine["split"] == split].groupby("seed")["accuracy"].mean()
        s = seed_stats(per.tolist())
        this = 100 * float(per.get(choice.seed, math.nan))
        lines.append(f"| {split} | {this:.2f} | {s['mean']:.2f} | {_num(s['std'])} | {_interval(s)} | {s['n']} |")
    lines += ["", _paired_text(rows, choice), ""]
    lines += _how_to_load(export)
    lines += ["## Full configuration", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def teacher_card(key: str, summary: dict, cfg: dict, export: dict, data_meta: dict | None, sweep: str) -> str:
    """README.md of an exported teacher (``summary``: its teacher.json)."""
    teacher = cfg.get("teacher", {})
    lines = _front_matter(export) + [
        f"# metakd teacher `{key}` ({summary.get('kind')})", "",
        f"A teacher trained by metakd in sweep `{sweep}`, exported by `metakd export --teacher`.",
        "",
        "| | |", "| --- | --- |",
        f"| kind | `{summary.get('kind')}`, trained on {', '.join(f'`{d}`' for d in summary.get('trained_domains', []))}"
        f"{' (the exported head: `' + export['source']['head'] + '`)' if export['source'].get('head') else ''} |",
        f"| model | {teacher.get('checkpoint') or teacher.get('preset') or 'custom sizes'} |",
        f"| data | {_data_text(cfg.get('data', {}), data_meta, None)} |",
        f"| sample rate | {cfg.get('data', {}).get('sample_rate')} |",
        f"| seed | {summary.get('seed')} |",
        f"| dev accuracy | {100 * summary['dev_accuracy']:.2f}% (best epoch, its training domains) |"
        if summary.get("dev_accuracy") is not None else "| dev accuracy | - |",
        f"| parameters | {export['parameters']:,} (encoder + classifier) |",
        f"| labels | {', '.join(f'{i}: `{n}`' for i, n in export['id2label'].items())} |",
        "",
    ]
    lines += _how_to_load(export)
    lines += ["## Full configuration", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _front_matter(export: dict) -> list[str]:
    library = "transformers" if export["route"] == "transformers" else "onnx"
    return ["---", f"library_name: {library}", "pipeline_tag: text-classification",
            "tags: [metakd, knowledge-distillation, text-classification]", "---", ""]


def _how_to_load(export: dict) -> list[str]:
    measured = (f"The logits are metakd's to within {export['max_abs_diff']:.1e} (max |difference| on a padded "
                f"batch, measured at export, fp32).")
    predict = ["`metakd predict DIR --text \"...\"` (or `--file rows.jsonl [--eval]`) runs it with the "
               "tokenisation of training."]
    if export.get("truncation", "head") != "head":
        predict.append(f"Training cut long texts `{export['truncation']}` (first quarter + last three quarters of "
                       f"{export['max_length']} tokens); a plain tokenizer keeps the first {export['max_length']}, "
                       f"`metakd predict` cuts as training did.")
    if export["route"] == "transformers":
        return ["## How to load", "", "Plain `transformers`, offline, no custom code:", "", "```python",
                "import torch",
                "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
                "model = AutoModelForSequenceClassification.from_pretrained(DIR).eval()",
                "tokenizer = AutoTokenizer.from_pretrained(DIR)",
                "batch = tokenizer([\"a text\"], truncation=True, padding=True, return_tensors=\"pt\")",
                "probs = torch.softmax(model(**batch).logits, -1)",
                "print(model.config.id2label[int(probs.argmax())])", "```", "", measured, "", *predict, ""]
    pooled = ("the mean of `last_hidden_state` over non-padding positions" if export["pooling"] == "mean"
              else "`last_hidden_state[:, 0]`")
    return ["## How to load", "",
            f"No standard `*ForSequenceClassification` class computes this head (`{export['pooling']}` pooling on "
            f"{export['encoder']}), so the whole model, tokens -> logits, is `model.onnx`:", "",
            "```python",
            "import numpy as np, onnxruntime as ort",
            "from transformers import AutoTokenizer", "",
            "tokenizer = AutoTokenizer.from_pretrained(DIR)",
            "session = ort.InferenceSession(f\"{DIR}/model.onnx\")",
            "batch = tokenizer([\"a text\"], truncation=True, padding=True, return_tensors=\"np\")",
            "names = [i.name for i in session.get_inputs()]",
            "logits = session.run([\"logits\"], {n: batch[n].astype(np.int64) for n in names})[0]", "```", "",
            measured, "",
            f"The PyTorch weights: `encoder/` (`AutoModel.from_pretrained(DIR + \"/encoder\")`) and "
            f"`encoder/classifier.safetensors` (weight, bias): logits = weight @ pooled + bias, pooled = {pooled}.",
            "", *predict, ""]


def _teacher_text(teacher: dict, key, method) -> str:
    if method is not None and not method.distills:
        return "none (fine-tuned on the target domain)"
    model = teacher.get("checkpoint") or teacher.get("preset") or "custom sizes"
    kind = f"{method.teacher} teacher, " if method is not None else ""
    return f"{kind}{model}, key `{key}` (`teachers/{key}`)"


def _data_text(data: dict, data_meta: dict | None, domain: str | None) -> str:
    where = f" `{data['path']}`" if data.get("path") else ""
    text = f"{data.get('source')}{where}, max_length {data.get('max_length')}, split seed {data.get('split_seed')}"
    counts = (data_meta or {}).get("counts")
    if counts and domain is not None:
        text += "; " + ", ".join(f"{s} {counts[s].get(domain, 0)}" for s in ("train", "dev", "test")) + \
                f" examples of `{domain}` (train after the sample rate)"
    elif counts:
        text += "; " + ", ".join(f"{s} {sum(counts[s].values())}" for s in ("train", "dev", "test")) + " examples"
    return text


def _paired_text(rows: pd.DataFrame, choice: Choice) -> str:
    if choice.method == "kd_single":
        return "Paired difference against `kd_single`: this is `kd_single`."
    try:
        cmp = analysis.compare_methods(rows, choice.method, "kd_single", split="test")
    except ValueError:
        return "Paired difference against `kd_single`: the sweep has no `kd_single` student to pair with."
    r = cmp[cmp["domain"] == choice.domain]
    if r.empty:
        return f"Paired difference against `kd_single`: no `kd_single` student for `{choice.domain}`."
    r = r.iloc[0]
    return (f"Paired difference against `kd_single` on `{choice.domain}` (test, points, same seeds, "
            f"{int(CONFIDENCE * 100)}% t-interval): **{analysis.difference_cell(r)}**, {r['n']} seed(s), "
            f"wins/ties/losses {r['wins']}/{r['ties']}/{r['losses']} ({r['method_mean']:.2f} vs "
            f"{r['baseline_mean']:.2f}).")


def _latency_text(row) -> str:
    b1, b32 = row.get("latency_ms_b1"), row.get("latency_ms_b32")
    if b1 is None or pd.isna(b1):
        return "not measured"
    return (f"{b1:.3f} ms per example at batch 1, {b32:.3f} ms at batch 32 (forward of the training model at "
            f"max_length on `{row.get('device')}`)")


def _params_text(params: dict) -> str:
    return ", ".join(f"`{k}` = {v}" for k, v in sorted(params.items())) or "no searched parameters"


def _interval(s: dict) -> str:
    return "-" if math.isnan(s["low"]) else f"[{s['low']:.2f}, {s['high']:.2f}]"


def _num(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"


def _int(x) -> str:
    return "?" if x is None or pd.isna(x) else str(int(x))
