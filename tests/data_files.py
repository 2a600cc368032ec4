"""Small data files for the tests of metakd/data/ (imported by tests/test_data_*.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

AMAZON = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon_reviews"  # ../shared beside the repo
needs_amazon = pytest.mark.skipif(not (AMAZON / "books.jsonl").exists(), reason="Amazon reviews not present")


def make_rows(domains=("news", "sport"), n=20, label=lambda i: i % 2, **extra) -> list[dict]:
    """``n`` rows per domain, text "<domain> text <i>"; ``extra`` columns are functions of (domain, i)."""
    return [{"text": f"{d} text {i}", "label": label(i), "domain": d, **{k: f(d, i) for k, f in extra.items()}}
            for d in domains for i in range(n)]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
