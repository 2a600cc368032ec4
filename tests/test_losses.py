"""Tests for metakd.losses against NumPy loops / hand-computed values (not the same torch ops)."""

import math

import numpy as np
import pytest
import torch

from metakd import losses as L

DT = torch.float64


def _np(x):
    return x.detach().cpu().numpy().astype(np.float64)


def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


# ------------------------------------------------------------------ reference loops


def ref_prototype_class(E, y, d, alpha):
    E, y, d = _np(E), y.tolist(), d.tolist()
    doms, classes = sorted(set(d)), sorted(set(y))
    proto = {}
    for k in doms:
        for m in classes:
            rows = [i for i in range(len(y)) if d[i] == k and y[i] == m]
            if rows:
                proto[(k, m)] = E[rows].mean(0)
    out = []
    for i in range(len(y)):
        own = _cos(E[i], proto[(d[i], y[i])])
        others = [_cos(E[i], proto[(k, y[i])]) for k in doms if k != d[i] and (k, y[i]) in proto]
        k_prime = len(others) + 1
        if k_prime == 1:
            out.append(own)
        else:
            out.append(alpha * own + (1 - alpha) / (k_prime - 1) * sum(others))
    return np.array(out)


def ref_prototype_domain(E, d):
    E, d = _np(E), d.tolist()
    doms = sorted(set(d))
    proto = {k: E[[i for i in range(len(d)) if d[i] == k]].mean(0) for k in doms}
    out = []
    for i in range(len(d)):
        own = _cos(E[i], proto[d[i]])
        if len(doms) == 1:
            out.append(own)
            continue
        other = np.mean([proto[k] for k in doms if k != d[i]], axis=0)
        out.append(0.5 * own + 0.5 * _cos(E[i], other))
    return np.array(out)


def ref_divergence(zs, zt, kind, T):
    out = []
    for s, t in zip(_np(zs), _np(zt)):
        P, Q = _softmax(t / T), _softmax(s / T)
        M = (P + Q) / 2
        if kind == "kl":
            v = sum(P[c] * math.log(P[c] / Q[c]) for c in range(len(P)))
        elif kind == "rkl":
            v = sum(Q[c] * math.log(Q[c] / P[c]) for c in range(len(P)))
        elif kind == "js":
            v = 0.5 * sum(P[c] * math.log(P[c] / M[c]) for c in range(len(P))) + 0.5 * sum(
                Q[c] * math.log(Q[c] / M[c]) for c in range(len(P))
            )
        else:
            v = 0.5 * sum(abs(P[c] - Q[c]) for c in range(len(P)))
        out.append(v)
    return np.array(out)


def ref_soft_ce(zs, zt, T):
    out = []
    for s, t in zip(_np(zs), _np(zt)):
        P, Q = _softmax(t / T), _softmax(s / T)
        out.append(-sum(P[c] * math.log(Q[c]) for c in range(len(P))))
    return np.array(out)


def ref_ce(z, y):
    return np.array([-math.log(_softmax(row)[c]) for row, c in zip(_np(z), y.tolist())])


# ------------------------------------------------------------------ prototype scores


def _proto_data(seed=0):
    """3 non-contiguous domains (0, 2, 5), classes 0..2 with gaps:
    class 0 in all domains (K'=3), class 1 in domains 0 and 5 (K'=2), class 2 only in
    domain 2 (K'=1)."""
    g = torch.Generator().manual_seed(seed)
    cells = [(0, 0)] * 3 + [(2, 0)] * 2 + [(5, 0)] * 4 + [(0, 1)] * 2 + [(5, 1)] * 3 + [(2, 2)] * 3
    d = torch.tensor([c[0] for c in cells])
    y = torch.tensor([c[1] for c in cells])
    E = torch.randn(len(cells), 6, generator=g, dtype=DT) + 0.5
    return E, y, d


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_prototype_class_matches_loop_with_missing_classes(alpha):
    E, y, d = _proto_data()
    got = L.prototype_scores(E, y, d, alpha=alpha, by="class")
    assert got.shape == (len(y),)
    np.testing.assert_allclose(_np(got), ref_prototype_class(E, y, d, alpha), rtol=1e-10, atol=1e-12)


def test_prototype_class_k_prime_one_ignores_alpha():
    E, y, d = _proto_data()
    only = (y == 2).numpy()  # class 2 exists in domain 2 only
    a = L.prototype_scores(E, y, d, alpha=0.0)
    b = L.prototype_scores(E, y, d, alpha=1.0)
    np.testing.assert_allclose(_np(a)[only], _np(b)[only], rtol=0, atol=1e-12)
    assert not np.allclose(_np(a)[~only], _np(b)[~only])


def test_prototype_class_hand_computed():
    # domain 0 class 0: [1,0],[0,1] -> p=[.5,.5]; domain 1 class 0: [1,0] -> p=[1,0].
    E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=DT)
    y = torch.tensor([0, 0, 0])
    d = torch.tensor([0, 0, 1])
    r = 1 / math.sqrt(2)
    expected = [0.5 * r + 0.5 * 1.0, 0.5 * r + 0.5 * 0.0, 0.5 * 1.0 + 0.5 * r]
    got = L.prototype_scores(E, y, d, alpha=0.5)
    np.testing.assert_allclose(_np(got), expected, atol=1e-12)


def test_prototype_class_single_domain_is_own_cosine():
    E, y, _ = _proto_data(1)
    d = torch.full_like(y, 4)
    got = L.prototype_scores(E, y, d, alpha=0.2)
    En = _np(E)
    exp = [_cos(En[i], En[(y == y[i]).numpy()].mean(0)) for i in range(len(y))]
    np.testing.assert_allclose(_np(got), exp, rtol=1e-10)


def test_prototype_domain_matches_loop_noncontiguous():
    E, y, d = _proto_data(2)
    got = L.prototype_scores(E, y, d, by="domain")
    np.testing.assert_allclose(_np(got), ref_prototype_domain(E, d), rtol=1e-10)
    d2 = torch.where(d == 5, torch.tensor(3), torch.where(d == 2, torch.tensor(0), d))  # ids {0, 3}
    got2 = L.prototype_scores(E, y, d2, by="domain")
    np.testing.assert_allclose(_np(got2), ref_prototype_domain(E, d2), rtol=1e-10)


def test_prototype_domain_single_domain_and_hand_value():
    E = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DT)
    one = L.prototype_scores(E, torch.tensor([0, 1]), torch.tensor([7, 7]), by="domain")
    np.testing.assert_allclose(_np(one), [1 / math.sqrt(2)] * 2, atol=1e-12)
    # two domains, one example each: own cos = 1, other-domain cos = 0 -> 0.5
    two = L.prototype_scores(E, torch.tensor([0, 1]), torch.tensor([0, 3]), by="domain")
    np.testing.assert_allclose(_np(two), [0.5, 0.5], atol=1e-12)


def test_prototype_scores_errors():
    E, y, d = _proto_data()
    with pytest.raises(ValueError, match="by"):
        L.prototype_scores(E, y, d, by="token")
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            L.prototype_scores(E, y, d, alpha=bad)
    with pytest.raises(ValueError, match="labels"):
        L.prototype_scores(E, y[:-1], d)
    with pytest.raises(ValueError, match="domains"):
        L.prototype_scores(E, y, d[:-1])
    with pytest.raises(ValueError, match="features"):
        L.prototype_scores(E[0], y, d)


# ------------------------------------------------------------------ weights


def test_domain_expertise_weights_hand_values_and_no_grad():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    scores = torch.tensor([0.2, -0.5])
    # p = 0.5 and 0.25
    expected = [1.2 / (1 + math.exp(0.25)), 0.5 / (1 + math.exp(0.75**2))]
    w = L.domain_expertise_weights(logits, labels, scores)
    np.testing.assert_allclose(_np(w), expected, rtol=1e-6)
    assert not w.requires_grad
    with pytest.raises(ValueError, match="scores"):
        L.domain_expertise_weights(logits, labels, scores[:1])


def test_weighted_mean_divides_by_n():
    got = L.weighted_mean(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.0, 2.0]))
    assert got.item() == pytest.approx((0.5 + 0 + 6) / 3)
    with pytest.raises(ValueError, match="weights"):
        L.weighted_mean(torch.ones(3), torch.ones(2))


# ------------------------------------------------------------------ TDA / meta-teacher


def test_tda_uniform_matches_loop():
    z = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=DT)
    exp = np.mean([-np.mean(np.log(_softmax(r))) for r in _np(z)])
    assert L.tda_loss(z, torch.tensor([0, 2])).item() == pytest.approx(exp, rel=1e-12)
    # constant logits: the prediction is already uniform -> CE = log K
    assert L.tda_loss(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long)).item() == pytest.approx(
        math.log(5)
    )


def test_tda_shuffled_reproduces_seeded_permutation():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 3, generator=g, dtype=DT)
    domains = torch.tensor([0, 0, 1, 1, 2, 2])
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(123)).tolist()
    assert perm != list(range(6))  # the check below would not see a missing shuffle otherwise
    zn = _np(z)
    exp = np.mean([-math.log(_softmax(zn[i])[domains[perm[i]].item()]) for i in range(6)])
    got = L.tda_loss(z, domains, target="shuffled", generator=torch.Generator().manual_seed(123))
    assert got.item() == pytest.approx(exp, rel=1e-12)
    unshuffled = np.mean([-math.log(_softmax(zn[i])[domains[i].item()]) for i in range(6)])
    assert not math.isclose(got.item(), unshuffled)


def test_tda_unknown_target():
    with pytest.raises(ValueError, match="target"):
        L.tda_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), target="reversed")


def _mt_batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 3, generator=g, dtype=DT, requires_grad=True)
    labels = torch.tensor([0, 2, 1, 1, 0])
    scores = torch.tensor([0.9, 0.1, 0.5, 1.0, 0.3], dtype=DT)
    dlog = torch.randn(5, 4, generator=g, dtype=DT, requires_grad=True)
    domains = torch.tensor([0, 1, 2, 3, 0])
    return logits, labels, scores, dlog, domains


def test_meta_teacher_gamma1_zero_is_weighted_ce():
    logits, labels, scores, dlog, domains = _mt_batch()
    exp = float(np.mean(_np(scores) * ref_ce(logits, labels)))
    got = L.meta_teacher_loss(logits, labels, scores, dlog, domains, gamma1=0.0)
    assert got.item() == pytest.approx(exp, rel=1e-12)
    got.backward()
    assert dlog.grad is None  # TDA skipped entirely
    assert L.meta_teacher_loss(logits, labels, scores, None, None, gamma1=0).item() == pytest.approx(exp)


def test_meta_teacher_with_tda_and_gradients():
    logits, labels, scores, dlog, domains = _mt_batch()
    wce = float(np.mean(_np(scores) * ref_ce(logits, labels)))
    tda = np.mean([-np.mean(np.log(_softmax(r))) for r in _np(dlog)])
    got = L.meta_teacher_loss(logits, labels, scores, dlog, domains, gamma1=0.5)
    assert got.item() == pytest.approx(wce + 0.5 * tda, rel=1e-12)
    got.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert dlog.grad is not None and dlog.grad.abs().sum() > 0
    # shuffled target goes through the same path
    got_s = L.meta_teacher_loss(
        logits, labels, scores, dlog, domains, 1.0, "shuffled", torch.Generator().manual_seed(1)
    )
    ref_s = wce + L.tda_loss(dlog, domains, "shuffled", torch.Generator().manual_seed(1)).item()
    assert got_s.item() == pytest.approx(ref_s, rel=1e-12)


def test_meta_teacher_errors():
    logits, labels, scores, dlog, domains = _mt_batch()
    with pytest.raises(ValueError, match="scores"):
        L.meta_teacher_loss(logits, labels, scores[:3], dlog, domains, 0.5)
    with pytest.raises(ValueError, match="domain_logits"):
        L.meta_teacher_loss(logits, labels, scores, dlog[:2], domains, 0.5)
    with pytest.raises(ValueError, match="domain_logits"):
        L.meta_teacher_loss(logits, labels, scores, None, None, 0.5)
    with pytest.raises(ValueError, match="target"):
        L.meta_teacher_loss(logits, labels, scores, dlog, domains, 0.5, tda_target="x")
    with pytest.raises(ValueError, match="tda_weighting"):
        L.meta_teacher_loss(logits, labels, scores, dlog, domains, 0.5, tda_weighting="batch")


def test_meta_teacher_instance_tda_weighting_by_hand():
    """tda_weighting instance (released code): mean_i t_i (CE_i + gamma1 CE(g_i, target_i))."""
    logits, labels, scores, dlog, domains = _mt_batch()
    t, ce, logq = _np(scores), ref_ce(logits, labels), np.log(np.stack([_softmax(r) for r in _np(dlog)]))
    got = L.meta_teacher_loss(logits, labels, scores, dlog, domains, 0.5, tda_weighting="instance")
    assert got.item() == pytest.approx(np.mean(t * (ce + 0.5 * -logq.mean(1))), rel=1e-12)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(1)).numpy()
    shuffled_ce = -logq[np.arange(5), domains.numpy()[perm]]
    got_s = L.meta_teacher_loss(logits, labels, scores, dlog, domains, 0.5, "shuffled",
                                torch.Generator().manual_seed(1), tda_weighting="instance")
    assert got_s.item() == pytest.approx(np.mean(t * (ce + 0.5 * shuffled_ce)), rel=1e-12)
    none_s = L.meta_teacher_loss(logits, labels, scores, dlog, domains, 0.5, "shuffled",
                                 torch.Generator().manual_seed(1))
    assert none_s.item() == pytest.approx(np.mean(t * ce) + 0.5 * np.mean(shuffled_ce), rel=1e-12)
    assert abs(got_s.item() - none_s.item()) > 1e-3  # the scores weight the domain term too
    # with every t_i = 1 the two forms are the same loss
    ones = torch.ones(5, dtype=DT)
    assert L.meta_teacher_loss(logits, labels, ones, dlog, domains, 0.5, tda_weighting="instance").item() == \
        pytest.approx(L.meta_teacher_loss(logits, labels, ones, dlog, domains, 0.5).item(), rel=1e-12)


# ------------------------------------------------------------------ prediction layer


def _logit_pair(seed=4, n=4, c=5):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, c, generator=g, dtype=DT) * 2,
        torch.randn(n, c, generator=g, dtype=DT) * 2,
    )


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_soft_cross_entropy_matches_loop(T):
    zs, zt = _logit_pair()
    got = L.soft_cross_entropy(zs, zt, temperature=T)
    assert got.shape == (4,)
    np.testing.assert_allclose(_np(got), ref_soft_ce(zs, zt, T), rtol=1e-10)


@pytest.mark.parametrize("kind", ["kl", "rkl", "js", "tvd"])
@pytest.mark.parametrize("T", [1.0, 3.0])
def test_pred_divergence_matches_loop(kind, T):
    zs, zt = _logit_pair(5)
    got = L.pred_divergence(zs, zt, kind=kind, temperature=T)
    np.testing.assert_allclose(_np(got), ref_divergence(zs, zt, kind, T), rtol=1e-9, atol=1e-12)
    same = L.pred_divergence(zt, zt, kind=kind, temperature=T)
    np.testing.assert_allclose(_np(same), 0.0, atol=1e-12)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kl_is_soft_ce_minus_teacher_entropy(T):
    zs, zt = _logit_pair(6)
    ent = np.array([-sum(p * math.log(p) for p in _softmax(r / T)) for r in _np(zt)])
    kl = L.pred_divergence(zs, zt, kind="kl", temperature=T)
    np.testing.assert_allclose(_np(kl), _np(L.soft_cross_entropy(zs, zt, T)) - ent, rtol=1e-10)


@pytest.mark.parametrize("kind", ["js", "tvd"])
def test_js_tvd_symmetric_and_bounded(kind):
    zs, zt = _logit_pair(7)
    a = L.pred_divergence(zs, zt, kind=kind)
    b = L.pred_divergence(zt, zs, kind=kind)
    np.testing.assert_allclose(_np(a), _np(b), rtol=1e-12)
    bound = math.log(2) if kind == "js" else 1.0
    # near-disjoint distributions approach the bound from below
    far_s = torch.tensor([[40.0, 0.0], [0.0, 40.0]], dtype=DT)
    far_t = torch.tensor([[0.0, 40.0], [40.0, 0.0]], dtype=DT)
    far = L.pred_divergence(far_s, far_t, kind=kind)
    assert torch.all(far <= bound + 1e-12) and torch.all(far > bound - 1e-6)
    assert torch.all(a >= 0) and torch.all(a <= bound)
    # kl is not symmetric: guards against the symmetric check being vacuous
    kl_ab, kl_ba = L.pred_divergence(zs, zt, "kl"), L.pred_divergence(zt, zs, "kl")
    assert not torch.allclose(kl_ab, kl_ba)


def test_pred_divergence_errors():
    zs, zt = _logit_pair()
    with pytest.raises(ValueError, match="kind"):
        L.pred_divergence(zs, zt, kind="hellinger")
    with pytest.raises(ValueError, match="same shape"):
        L.pred_divergence(zs, zt[:, :3])
    with pytest.raises(ValueError, match="same shape"):
        L.soft_cross_entropy(zs[:2], zt)


# ------------------------------------------------------------------ intermediate layers


def _mask():
    # lengths 4, 2, 3 of S = 4
    return torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])


def test_hidden_mse_with_padding():
    g = torch.Generator().manual_seed(8)
    s = torch.randn(3, 4, 5, generator=g, dtype=DT)
    t = torch.randn(3, 4, 5, generator=g, dtype=DT)
    m = _mask()
    exp = []
    for i in range(3):
        tot, cnt = 0.0, 0
        for j in range(4):
            if m[i, j]:
                cnt += 1
                for h in range(5):
                    tot += (s[i, j, h].item() - t[i, j, h].item()) ** 2
        exp.append(tot / (cnt * 5))
    got = L.hidden_mse(s, t, m)
    np.testing.assert_allclose(_np(got), exp, rtol=1e-10)
    # padding positions carry garbage and must not matter
    s2 = s.clone()
    s2[m == 0] = 1e3
    np.testing.assert_allclose(_np(L.hidden_mse(s2, t, m)), exp, rtol=1e-10)
    with pytest.raises(ValueError, match="attention_mask"):
        L.hidden_mse(s, t, m[:, :3])
    with pytest.raises(ValueError, match="same shape"):
        L.hidden_mse(s, t[:, :, :4], m)


def _ref_attention(a_s, a_t, m):
    a_s, a_t, m = _np(a_s), _np(a_t), m.numpy()
    if a_s.shape[1] != a_t.shape[1]:
        a_s, a_t = a_s.mean(1, keepdims=True), a_t.mean(1, keepdims=True)
    out = []
    for i in range(a_s.shape[0]):
        tot, cnt = 0.0, 0
        for h in range(a_s.shape[1]):
            for q in range(a_s.shape[2]):
                for k in range(a_s.shape[3]):
                    if m[i, q] and m[i, k]:
                        tot += (a_s[i, h, q, k] - a_t[i, h, q, k]) ** 2
                        cnt += 1
        out.append(tot / cnt)
    return np.array(out)


@pytest.mark.parametrize("hs,ht", [(3, 3), (2, 4)])
def test_attention_mse_with_padding_and_head_counts(hs, ht):
    g = torch.Generator().manual_seed(9)
    a_s = torch.rand(3, hs, 4, 4, generator=g, dtype=DT).softmax(-1)
    a_t = torch.rand(3, ht, 4, 4, generator=g, dtype=DT).softmax(-1)
    m = _mask()
    got = L.attention_mse(a_s, a_t, m)
    np.testing.assert_allclose(_np(got), _ref_attention(a_s, a_t, m), rtol=1e-10)
    a_s2 = a_s.clone()
    a_s2[1, :, 2:, :] = 5.0  # padded queries of example 1
    a_s2[1, :, :, 3] = 5.0  # a padded key of example 1
    np.testing.assert_allclose(_np(L.attention_mse(a_s2, a_t, m))[1], _np(got)[1], rtol=1e-12)


def test_attention_mse_head_average_hand_value():
    # student heads average to 0.5 everywhere; teacher single head 0 -> MSE = 0.25
    a_s = torch.stack([torch.ones(2, 2), torch.zeros(2, 2)])[None].double()
    a_t = torch.zeros(1, 1, 2, 2, dtype=DT)
    assert L.attention_mse(a_s, a_t, torch.ones(1, 2)).item() == pytest.approx(0.25)


def test_attention_mse_of_scores_ignores_whatever_padded_pairs_hold():
    # pre-softmax scores with HF's additive mask term: -inf / finfo.min on padded keys must not leak
    g = torch.Generator().manual_seed(2)
    a_s, a_t = torch.randn(2, 3, 4, 4, generator=g, dtype=DT) * 5, torch.randn(2, 3, 4, 4, generator=g, dtype=DT) * 5
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    masked_s, masked_t = a_s.clone(), a_t.clone()
    masked_s[0, :, :, 3], masked_t[0, :, :, 3] = -math.inf, torch.finfo(DT).min
    got = L.attention_mse(masked_s, masked_t, mask)
    exp0 = float(((a_s[0, :, :3, :3] - a_t[0, :, :3, :3]) ** 2).sum()) / (3 * 9)
    exp1 = float(((a_s[1] - a_t[1]) ** 2).sum()) / (3 * 16)
    assert got.tolist() == pytest.approx([exp0, exp1], rel=1e-12)


def test_attention_mse_shape_errors():
    a = torch.rand(2, 2, 3, 3)
    with pytest.raises(ValueError, match="attention"):
        L.attention_mse(a, torch.rand(2, 2, 4, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="attention_mask"):
        L.attention_mse(a, a, torch.ones(2, 4))
    with pytest.raises(ValueError, match="student"):
        L.attention_mse(a[0], a, torch.ones(2, 3))


def test_tkd_loss():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0, 0.0], [1.0, -1.0, 2.0]])
    np.testing.assert_allclose(_np(L.tkd_loss(s, t)), [13 / 3, 6 / 3], rtol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        L.tkd_loss(s, t[:, :2])


# ------------------------------------------------------------------ layer map


@pytest.mark.parametrize(
    "s,l,mode,expected",
    [
        (4, 12, "exact", [3, 6, 9, 12]),
        (3, 6, "exact", [2, 4, 6]),
        (6, 6, "exact", [1, 2, 3, 4, 5, 6]),
        (1, 12, "exact", [12]),
        (4, 6, "round", [2, 3, 4, 6]),  # 1.5, 3, 4.5, 6 with half-to-even rounding
        (4, 12, "round", [3, 6, 9, 12]),
        (4, 2, "round", [1, 1, 2, 2]),  # 0.5 -> 0 clamped to 1
    ],
)
def test_layer_map_values(s, l, mode, expected):
    assert L.layer_map(s, l, mode) == expected


def test_layer_map_errors():
    with pytest.raises(ValueError) as e:
        L.layer_map(5, 12)
    msg = str(e.value)
    assert "5" in msg and "12" in msg and "multiple" in msg and "round" in msg
    with pytest.raises(ValueError, match="cannot map exactly.*round"):
        L.layer_map(8, 4)
    with pytest.raises(ValueError, match="student_layers"):
        L.layer_map(0, 12)
    with pytest.raises(ValueError, match="teacher_layers"):
        L.layer_map(4, 0, "round")
    with pytest.raises(ValueError, match="mode"):
        L.layer_map(4, 12, "nearest")
