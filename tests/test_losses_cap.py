"""cap_contrastive_loss (cap-pruning spec §1.3) against a NumPy loop over anchors and candidates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metakd.losses import cap_contrastive_loss

DT = torch.float64


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def ref_cap(z, rows, labels, bank, bank_labels, extra, tau, w_u, w_s, normalize="released", frozen=None):
    """The spec's formula, one anchor and one candidate at a time. ``frozen``: the values of the
    detached copies sg(z_k) (default: z itself), so a finite difference can hold them fixed."""
    z = _unit(np.asarray(z, float))
    frozen = z if frozen is None else _unit(np.asarray(frozen, float))
    bank = _unit(np.asarray(bank, float))
    n, r, _ = bank.shape
    cands = []  # (vector, row, label, batch position of a detached copy or None)
    for k, (row, y) in enumerate(zip(rows, labels)):
        cands.append((frozen[k], row, y, k))
    for row, y in zip(rows, labels):
        cands += [(bank[row, j], row, y, None) for j in range(r)]
    for e in extra:
        cands += [(bank[e, j], e, bank_labels[e], None) for j in range(r)]
    total = 0.0
    for weight, same in ((w_u, 1), (w_s, 2)):
        per_anchor, counts = [], []
        for i in range(len(z)):
            others = [c for c in cands if c[3] != i]
            s = np.array([z[i] @ c[0] / tau for c in others])
            log_den = np.log(np.exp(s).sum())
            pos = [s[j] - log_den for j, c in enumerate(others) if c[same] == (rows[i], labels[i])[same - 1]]
            per_anchor.append(sum(pos) / max(len(pos), 1))
            counts.append(len(pos))
        denom = sum(counts) if normalize == "released" else len(z)
        total += weight * -sum(per_anchor) / denom
    return total


def _case(seed=0, b=3, n=6, r=2, h=4):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, h, generator=g, dtype=DT)
    bank = torch.randn(n, r, h, generator=g, dtype=DT)
    bank_labels = torch.tensor([0, 1, 1, 0, 1, 0][:n])
    rows = torch.tensor([0, 2, 3][:b])
    return z, rows, bank_labels[rows], bank, bank_labels


@pytest.mark.parametrize("normalize", ["released", "anchor_mean"])
def test_three_examples_match_numpy(normalize):
    z, rows, labels, bank, bank_labels = _case()
    extra = torch.tensor([5, 1, 2])  # row 2 is also in the batch: a repeat counts as a positive
    got = cap_contrastive_loss(z, rows, labels, bank, bank_labels, temperature=0.1, w_unsup=0.3, w_sup=3.0,
                               normalize=normalize, extra_rows=extra)
    want = ref_cap(z.numpy(), rows.tolist(), labels.tolist(), bank.numpy(), bank_labels.tolist(), extra.tolist(),
                   0.1, 0.3, 3.0, normalize)
    assert float(got) == pytest.approx(want, rel=1e-10)


def test_self_is_left_out_of_the_softmax():
    # one anchor, one bank vector and no extra negative: without its own copy, the softmax has one
    # candidate, which is the positive, so l = 0. With the copy it would be log(e^{s}/(e^{1/tau}+e^{s})) < 0.
    z = torch.tensor([[1.0, 0.0]], dtype=DT)
    bank = torch.tensor([[[0.0, 1.0]]], dtype=DT)
    loss = cap_contrastive_loss(z, torch.tensor([0]), torch.tensor([1]), bank, torch.tensor([1]), w_unsup=1.0,
                                w_sup=1.0, extra_rows=torch.tensor([], dtype=torch.long))
    assert float(loss) == 0.0


def test_no_gradient_reaches_the_bank_or_the_detached_copies():
    z, rows, labels, bank, bank_labels = _case(seed=1)
    z.requires_grad_(True)
    bank.requires_grad_(True)
    extra = torch.tensor([1, 4])
    args = dict(temperature=0.5, w_unsup=1.0, w_sup=2.0, extra_rows=extra)
    cap_contrastive_loss(z, rows, labels, bank, bank_labels, **args).backward()
    assert bank.grad is None
    # the gradient is that of the anchors alone: a finite difference that holds sg(z_k) and the bank fixed
    z0, eps = z.detach().numpy(), 1e-6
    numeric = np.zeros_like(z0)
    for i in np.ndindex(*z0.shape):
        plus, minus = z0.copy(), z0.copy()
        plus[i] += eps
        minus[i] -= eps
        f = [ref_cap(v, rows.tolist(), labels.tolist(), bank.detach().numpy(), bank_labels.tolist(), extra.tolist(),
                     0.5, 1.0, 2.0, frozen=z0) for v in (plus, minus)]
        numeric[i] = (f[0] - f[1]) / (2 * eps)
    np.testing.assert_allclose(z.grad.numpy(), numeric, rtol=1e-5, atol=1e-8)


def test_released_is_anchor_mean_over_the_mean_positive_count():
    z, rows, labels, bank, bank_labels = _case(seed=2)
    extra = torch.tensor([1, 4, 5])
    for w_u, w_s in ((1.0, 0.0), (0.0, 1.0)):
        released, mean = (float(cap_contrastive_loss(z, rows, labels, bank, bank_labels, w_unsup=w_u, w_sup=w_s,
                                                     normalize=m, extra_rows=extra))
                          for m in ("released", "anchor_mean"))
        # supervised positives of an anchor: its R bank vectors, the other batch members with its label (and
        # their bank vectors), the extras with its label; unsupervised: its own R bank vectors
        cand_labels = labels.tolist() + np.repeat(labels.tolist(), 2).tolist() + np.repeat(
            bank_labels[extra].tolist(), 2).tolist()
        counts = [2] * 3 if w_u else [cand_labels.count(y) - 1 for y in labels.tolist()]
        assert released == pytest.approx(mean / np.mean(counts), rel=1e-12)


def test_unsupervised_positives_are_the_r_bank_vectors():
    # E outside the batch rows: |P^u_i| = R, so anchor_mean / released = R
    z, rows, labels, bank, bank_labels = _case(seed=3, r=3)
    extra = torch.tensor([1, 4, 5])
    ratio = [float(cap_contrastive_loss(z, rows, labels, bank, bank_labels, w_unsup=1.0, w_sup=0.0, normalize=m,
                                        extra_rows=extra)) for m in ("anchor_mean", "released")]
    assert ratio[0] / ratio[1] == pytest.approx(3.0, rel=1e-12)


def test_extra_negatives_are_capped_at_the_bank_size():
    # Q = 4096 >> N = 6: every row is drawn once (no error, no repeat), so each batch row appears again in E
    # and |P^u_i| = 2R; with Q = 4 and R = 2, floor(Q/R) = 2 rows are drawn
    z, rows, labels, bank, bank_labels = _case(seed=4)
    g = torch.Generator().manual_seed(0)
    ratio = [float(cap_contrastive_loss(z, rows, labels, bank, bank_labels, w_unsup=1.0, w_sup=0.0, normalize=m,
                                        extra_negatives=4096, generator=torch.Generator().manual_seed(0)))
             for m in ("anchor_mean", "released")]
    assert ratio[0] / ratio[1] == pytest.approx(4.0, rel=1e-12)
    full = cap_contrastive_loss(z, rows, labels, bank, bank_labels, extra_rows=torch.arange(6))
    capped = cap_contrastive_loss(z, rows, labels, bank, bank_labels, extra_negatives=4096, generator=g)
    assert float(capped) == pytest.approx(float(full), rel=1e-12)  # the order of E does not matter
    drawn = torch.randperm(6, generator=torch.Generator().manual_seed(5))[:2]
    small = cap_contrastive_loss(z, rows, labels, bank, bank_labels, extra_negatives=4,
                                 generator=torch.Generator().manual_seed(5))
    assert float(small) == pytest.approx(float(cap_contrastive_loss(z, rows, labels, bank, bank_labels,
                                                                     extra_rows=drawn)), rel=1e-12)


def test_bad_inputs_name_the_argument():
    z, rows, labels, bank, bank_labels = _case()
    with pytest.raises(ValueError, match="normalize"):
        cap_contrastive_loss(z, rows, labels, bank, bank_labels, normalize="mean")
    with pytest.raises(ValueError, match="temperature"):
        cap_contrastive_loss(z, rows, labels, bank, bank_labels, temperature=0.0)
    with pytest.raises(ValueError, match="bank"):
        cap_contrastive_loss(z, rows, labels, bank[:, 0], bank_labels)
    with pytest.raises(ValueError, match="same H"):
        cap_contrastive_loss(z[:, :3], rows, labels, bank, bank_labels)
