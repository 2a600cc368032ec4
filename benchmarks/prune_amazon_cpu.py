"""Real-data benchmark on CPU: pruned students (CAP) beside the dense student on the Amazon reviews.

Distil to a smaller model, or prune the teacher? The teacher and the dense 3-layer student are those
of ``benchmarks/amazon_cpu.py`` (all-MiniLM-L6-v2, mean pooling; ``pip install -e '.[bench]'``);
the pruned students keep the teacher's 6 layers and lose weights (``student.prune``, the
cap-pruning spec), each without (``contrastive: []``) and with CAP's three contrastive modules:

    movement 0.5, movement 0.9 (unstructured, cubic schedule), heads_ffn 0.5 (heads + FFN neurons)

for ``metakd`` and ``kd_single``, 3 seeds. One store under ``runs/benchmarks/prune_amazon_cpu``:
the teachers are trained once per seed and shared by every student (the teacher key does not see
the student), so a rerun with other student settings trains only students.

    python benchmarks/prune_amazon_cpu.py              # the measured shape below (99.7 min on 2 cores)
    python benchmarks/prune_amazon_cpu.py --estimate   # what it would train and how long, without training
    python benchmarks/prune_amazon_cpu.py --domains books dvd electronics kitchen --sample-rate 0.2

The shape that fits about 90 minutes on 2 CPU cores (measured: README, "Pruned students (CAP)"):
two domains (books, kitchen: amazon_cpu's largest and smallest metakd - kd_single gap), 35 % of
each domain's training split (567 reviews; dev and test splits whole), 32 tokens, batch 16;
teachers 2 epochs at 1e-4; the dense student as amazon_cpu (stage 1 and stage 2 one epoch each);
pruned students from the pre-trained encoder (CAP's init) at lr 1e-4 (CAP's 3e-5 is for 10 BERT-base
epochs): movement 3 epochs (one dense, so that the scores learn before they prune, one pruning,
one at the final mask), heads_ffn two steps of 25 % with one retraining epoch each (one snapshot).
Without the dense epoch, every movement student of a one-seed check stayed at the majority rate.
168 student jobs (four domains) do not fit in 90 minutes on 2 cores at a useful data size, so the
default runs 2 domains: 84 jobs.

Prints the accuracy table (test, mean ± std over seeds, average over domains) with
student_nonzero_params, encoder_remaining, latency at batch 1 and its kind, train time; the CAP
effect (contrastive minus none, paired by seed and domain); metakd - kd_single per student.
``--tune`` prints dev numbers only.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import amazon_cpu  # noqa: E402  (the teacher, the dense student, the data settings)
from metakd.config import from_dict  # noqa: E402
from metakd.jobs.run import run_local  # noqa: E402
from metakd.report import analysis  # noqa: E402
from metakd.report.cli import format_comparison  # noqa: E402

METHODS = ["metakd", "kd_single"]
# the pruned students: (label, prune block without the contrastive modules); each runs with [] and all three
PRUNED = {
    "movement 0.5": {"sparsity": 0.5, "epochs": 3, "dense_epochs": 1, "final_epochs": 1},
    "movement 0.9": {"sparsity": 0.9, "epochs": 3, "dense_epochs": 1, "final_epochs": 1},
    "heads_ffn 0.5": {"structure": "heads_ffn", "sparsity": 0.5, "step": 0.25, "retrain_epochs": 1},
}
CONTRASTIVE = {"none": [], "cap": ["prc", "snc", "fic"]}
PRUNED_LR = 1e-4

# 2-core rates in 64-token examples/s, fitted to a one-seed check of this benchmark (books, kd_single,
# 32 tokens, 50 %: the dense student 34 s, heads_ffn 70 s, movement 3 epochs 80 s of training):
# MiniLM-L6 training ~22, its forward ~120; the 3-layer student about twice as fast; per job ~10 s of
# loading, evaluation (dev + test) and latency passes. Movement recomputes its topK masks every step.
RATE = {"train6": 22.0, "forward6": 120.0, "train3": 44.0, "movement": 0.7}
JOB_FIXED_S = 10.0


def experiments(args) -> list[tuple[str, dict]]:
    """(label, experiment dict) for the dense student and each pruned student, on one shared recipe."""
    base = amazon_cpu.experiment(argparse.Namespace(
        data=args.data, domains=args.domains, max_length=args.max_length, sample_rate=args.sample_rate,
        methods=args.methods, seeds=args.seeds,
        # amazon_cpu's measured shape: stage 2 one epoch
        set=["teacher.epochs=2", "distill.stage2_epochs=1", f"distill.batch_size={args.batch_size}", *args.set]))
    base["name"] = "prune_amazon_cpu"
    runs = [("dense 3L", base)]
    for label, prune in PRUNED.items():
        for cap, modules in CONTRASTIVE.items():
            raw = copy.deepcopy(base)
            # the teacher's shape, pruned: pooling as the teacher's (a mean-pooled sentence encoder)
            block = {**prune, "contrastive": modules, "lr": PRUNED_LR}
            for item in args.prune:  # --prune KEY=VALUE: every pruned student
                key, _, value = item.partition("=")
                block[key] = amazon_cpu._parse(value)
            raw["student"] = {"pooling": "mean", "prune": block}
            runs.append((f"{label} {cap}", raw))
    return runs


def estimate_minutes(args, labels: set[str]) -> float:
    """Minutes on 2 cores by the rates above for the students ``labels`` (a model of the run, not a measurement)."""
    n = 1620 * args.sample_rate * args.max_length / 64  # training reviews per domain, in 64-token units
    domains, seeds, methods = len(args.domains or ["books", "dvd", "electronics", "kitchen"]), len(args.seeds), \
        len(args.methods)
    r6, f6, r3 = RATE["train6"], RATE["forward6"], RATE["train3"]
    teachers = seeds * ((1 + domains) * 20.0 + 2 * 2 * domains * n / r6 + (1 + domains + 1) * domains * n / f6)
    dense = seeds * methods * domains * (JOB_FIXED_S + n / f6 + 2 * n / r3) if "dense 3L" in labels else 0.0
    # PrC: phi_pre over every training example, once per seed (stored, shared by domains and methods);
    # FiC comes with the teacher's outputs
    pruned = seeds * domains * n / f6
    for label, prune in PRUNED.items():
        for cap in CONTRASTIVE:
            if f"{label} {cap}" not in labels:
                continue
            forwards = n / f6  # the teacher's states
            if prune.get("structure") == "heads_ffn":
                steps = round(prune["sparsity"] / prune["step"])
                training = steps * (1 + prune["retrain_epochs"]) * n / r6  # importance pass + retraining
            else:
                training = prune["epochs"] * n / (r6 * RATE["movement"])  # (--prune overrides not counted)
            pruned += seeds * methods * domains * (JOB_FIXED_S + forwards + training)
    return (teachers + dense + pruned) / 60


def cap_effect(df: pd.DataFrame, split: str) -> list[str]:
    """contrastive minus none per method and pruned student, paired by seed and domain."""
    out = []
    pruned = df[df["prune_structure"].notna()].copy()
    for method in sorted(set(pruned["method"])):
        rows = pruned[pruned["method"] == method].copy()
        rows["method"] = method + "@" + rows["prune_contrastive"].map(lambda c: "none" if c == "none" else "cap")
        if set(rows["method"]) != {f"{method}@cap", f"{method}@none"}:
            continue  # --students without a pair
        rows = rows.drop(columns=[c for c in analysis.PAIR_COLUMNS if c in rows.columns])  # pair on seed, domain
        cmp = analysis.compare_methods(rows, f"{method}@cap", f"{method}@none", split,
                                       by=["prune_structure", "prune_criterion", "prune_target"])
        out.append(format_comparison(cmp))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "amazon_reviews"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS,
                        choices=[m for m in amazon_cpu.METHODS if m != "student_ft"])  # fic needs a teacher
    parser.add_argument("--domains", nargs="+", default=["books", "kitchen"], help="default: books kitchen")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--sample-rate", type=float, default=0.35, help="share of each domain's training split")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the shared recipe, e.g. --set teacher.epochs=2 (repeatable)")
    parser.add_argument("--prune", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of every prune block, e.g. --prune dense_epochs=1 (repeatable)")
    parser.add_argument("--students", nargs="+", metavar="LABEL", default=None,
                        help="only these students, by label (e.g. 'dense 3L' 'movement 0.5 none'; default: all)")
    parser.add_argument("--tune", action="store_true", help="report the dev split only")
    parser.add_argument("--root", default=str(ROOT / "runs" / "benchmarks" / "prune_amazon_cpu"),
                        help="the store: data, teachers and students, reused by a rerun")
    parser.add_argument("--estimate", action="store_true", help="print the plan and its estimated time; train nothing")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    split = "dev" if args.tune else "test"
    runs = experiments(args)
    if args.students:
        labels = [label for label, _ in runs]
        unknown = [x for x in args.students if x not in labels]
        if unknown:
            parser.error(f"--students: {', '.join(map(repr, unknown))} not among {', '.join(map(repr, labels))}")
        runs = [(label, raw) for label, raw in runs if label in args.students]
    jobs = len(runs) * len(args.methods) * len(args.domains) * len(args.seeds)
    print("command: python benchmarks/prune_amazon_cpu.py " + " ".join(sys.argv[1:]), flush=True)
    print(f"plan: {len(runs)} students ({', '.join(label for label, _ in runs)}) x {len(args.methods)} methods x "
          f"{len(args.domains)} domains x {len(args.seeds)} seeds = {jobs} student jobs; estimated "
          f"{estimate_minutes(args, {label for label, _ in runs}):.0f} min on 2 cores", flush=True)
    if args.estimate:
        return
    start = time.perf_counter()
    root = args.root
    frames, trained = [], 0
    for label, raw in runs:
        cfg = from_dict(raw)
        t0 = time.perf_counter()
        out = run_local(cfg, root=root)
        trained += len(out["teachers_trained"])
        df = pd.DataFrame(out["rows"])
        df["label"] = label
        frames.append(df)
        print(f"=== {label}: {len(out['students'])} students, {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    df = pd.concat(frames, ignore_index=True)
    wall = time.perf_counter() - start

    rows = df[(df["split"] == split) & (df["status"] == "ok")]
    per_seed = rows.groupby(["label", "method", "seed"], sort=False).agg(
        accuracy=("accuracy", "mean"), nonzero=("student_nonzero_params", "median"),
        remaining=("encoder_remaining", "mean"), latency=("latency_ms_b1", "mean"),
        kind=("latency_kind", "first"), seconds=("train_seconds", "mean"))
    table = per_seed.groupby(["label", "method"], sort=False).agg(
        accuracy=("accuracy", "mean"), std=("accuracy", "std"), nonzero=("nonzero", "median"),
        remaining=("remaining", "mean"), latency_ms_b1=("latency", "mean"), latency_kind=("kind", "first"),
        train_s=("seconds", "mean"))
    table["accuracy"] = [f"{100 * m:.2f}" + (f" ± {100 * sd:.2f}" if pd.notna(sd) else "")
                         for m, sd in zip(table["accuracy"], table["std"])]
    table["nonzero_M"] = (table.pop("nonzero") / 1e6).round(2)
    print(f"\n{split} accuracy (%), average over {len(args.domains)} domains, mean ± std over "
          f"{len(args.seeds)} seeds; nonzero parameters, encoder_remaining, latency (ms/example at batch 1), "
          f"mean train seconds per student")
    print(table.drop(columns=["std"]).round(3).to_string())
    print()
    for text in cap_effect(df, split):
        print(text + "\n")
    if {"metakd", "kd_single"} <= set(args.methods):
        print(format_comparison(analysis.compare_methods(df, "metakd", "kd_single", split, by=["student"])))
    print(f"\n{analysis.describe_collapsed(df) or 'no collapsed students'}")
    print(f"{trained} teachers trained here; total {wall / 60:.1f} min wall on {os.cpu_count()} CPU cores")


if __name__ == "__main__":
    main()
