"""The loop's evaluation: per-domain accuracy and loss, by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from metakd.train.loop import evaluate


class _Stub(torch.nn.Module):
    """Logits looked up from a table by input_ids[:, 0]."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def test_evaluate_per_domain_accuracy_and_loss_by_hand():
    table = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 3.0]])
    rows = [  # (table row, label, domain)
        (0, 0, 0), (1, 0, 0), (3, 1, 2),  # batch 1
        (1, 1, 0), (0, 1, 2), (3, 1, 2), (2, 0, 2),  # batch 2
    ]

    def batch(rs):
        return {"input_ids": torch.tensor([[r[0], 0] for r in rs]), "attention_mask": torch.ones(len(rs), 2),
                "labels": torch.tensor([r[1] for r in rs]), "domains": torch.tensor([r[2] for r in rs]),
                "extra": torch.zeros(len(rs))}

    loader = [batch(rows[:3]), batch(rows[3:])]
    model = _Stub(table).train()
    out = evaluate(model, loader, ["books", "dvd", "kitchen"], "cpu")
    assert model.training  # mode restored
    # books: rows 0 (argmax 0, y 0 ok), 1 (argmax 1, y 0 wrong), 1 (argmax 1, y 1 ok) -> 2/3
    # kitchen: 3 (y 1 ok), 0 (argmax 0, y 1 wrong), 3 (ok), 2 (tie -> argmax 0, y 0 ok) -> 3/4
    assert set(out["accuracy"]) == {"books", "kitchen"}
    assert out["accuracy"]["books"] == pytest.approx(2 / 3)
    assert out["accuracy"]["kitchen"] == pytest.approx(3 / 4)
    assert out["average"] == pytest.approx((2 / 3 + 3 / 4) / 2)

    def ce(row, y):
        z = table[row].tolist()
        return math.log(sum(math.exp(v) for v in z)) - z[y]

    books = (ce(0, 0) + ce(1, 0) + ce(1, 1)) / 3
    kitchen = (ce(3, 1) + ce(0, 1) + ce(3, 1) + ce(2, 0)) / 4
    assert out["loss"]["books"] == pytest.approx(books, rel=1e-5)
    assert out["loss"]["kitchen"] == pytest.approx(kitchen, rel=1e-5)
