"""The Meta-KD method as pure PyTorch functions (spec sections 1-4).

Everything here is batch-first and stateless: prototype scores, domain-expertise weights,
the meta-teacher loss (weighted CE + transferable domain-adversarial loss), and the
per-example distillation losses. "Per example" means a tensor of shape [N]; the training
loops combine per-example losses with `weighted_mean`.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = [
    "prototype_scores",
    "domain_expertise_weights",
    "tda_loss",
    "meta_teacher_loss",
    "soft_cross_entropy",
    "pred_divergence",
    "hidden_mse",
    "attention_mse",
    "tkd_loss",
    "layer_map",
    "weighted_mean",
]

PROTOTYPE_MODES = ("class", "domain")
TDA_TARGETS = ("uniform", "shuffled")
TDA_WEIGHTINGS = ("none", "instance")
PRED_DIVERGENCES = ("kl", "rkl", "js", "tvd")
LAYER_MAP_MODES = ("exact", "round")


# --------------------------------------------------------------------------- helpers


def _shape_error(name: str, expected: str, tensor: torch.Tensor) -> ValueError:
    return ValueError(f"{name}: expected shape {expected}, got {tuple(tensor.shape)}")


def _check_ndim(name: str, tensor: torch.Tensor, ndim: int, expected: str) -> None:
    if tensor.dim() != ndim:
        raise _shape_error(name, expected, tensor)


def _check_vector(name: str, tensor: torch.Tensor, n: int) -> None:
    """`tensor` must have shape [n]."""
    if tensor.dim() != 1 or tensor.shape[0] != n:
        raise _shape_error(name, f"[N] with N={n}", tensor)


def _check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    # softmax/log-sums in fp16/bf16 lose the small probabilities the divergences depend on.
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


# ------------------------------------------------------------ 1. prototype scores


@torch.no_grad()
def prototype_scores(
    features: torch.Tensor,
    labels: torch.Tensor,
    domains: torch.Tensor,
    alpha: float = 0.5,
    by: str = "class",
) -> torch.Tensor:
    """Prototype score t_i of every example (spec section 1). Returns [N].

    features [N, D] are the frozen encoder's mean-pooled embeddings E(x_i); prototypes are
    means over *all* examples passed in, grouped by the unique label/domain values present
    (ids need not be contiguous).

    by="class" (paper, default): p[k, m] = mean of E over examples with d=k, y=m and
        t_i = alpha * cos(E_i, p[d_i, y_i])
              + (1 - alpha) / (K' - 1) * sum_{k != d_i, k has class y_i} cos(E_i, p[k, y_i]),
        K' = number of domains that have class y_i; t_i = cos(E_i, p[d_i, y_i]) if K' = 1.
    by="domain" (released code): p[k] = mean of E over examples with d=k and
        t_i = 0.5 * cos(E_i, p[d_i]) + 0.5 * cos(E_i, mean_{k != d_i} p[k]),
        or cos(E_i, p[d_i]) with a single domain. `alpha` is not used in this mode (the
        released code fixes both weights at 0.5); it is still validated.

    No gradient: scores are computed once from a frozen encoder.
    """
    if by not in PROTOTYPE_MODES:
        raise ValueError(f"by must be one of {PROTOTYPE_MODES}, got {by!r}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _check_ndim("features", features, 2, "[N, D]")
    n = features.shape[0]
    if n == 0:
        raise ValueError("features: need at least one example, got N=0")
    _check_vector("labels", labels, n)
    _check_vector("domains", domains, n)
    if labels.is_floating_point() or domains.is_floating_point():
        raise ValueError("labels and domains must be integer tensors")

    feats = _at_least_f32(features)
    # Normalising once turns every cosine into a dot product with a normalised prototype.
    unit = F.normalize(feats, dim=-1)
    dom_ids, dom_idx = torch.unique(domains, return_inverse=True)
    n_dom = dom_ids.numel()

    if by == "domain":
        sums = feats.new_zeros(n_dom, feats.shape[1]).index_add_(0, dom_idx, feats)
        counts = torch.bincount(dom_idx, minlength=n_dom).to(feats.dtype)
        protos = sums / counts[:, None]
        own = (unit * F.normalize(protos, dim=-1)[dom_idx]).sum(-1)
        if n_dom == 1:
            return own
        others = (protos.sum(0, keepdim=True) - protos) / (n_dom - 1)
        return 0.5 * own + 0.5 * (unit * F.normalize(others, dim=-1)[dom_idx]).sum(-1)

    cls_ids, cls_idx = torch.unique(labels, return_inverse=True)
    n_cls = cls_ids.numel()
    cell = dom_idx * n_cls + cls_idx  # flat (domain, class) index
    sums = feats.new_zeros(n_dom * n_cls, feats.shape[1]).index_add_(0, cell, feats)
    counts = torch.bincount(cell, minlength=n_dom * n_cls)
    protos = sums / counts.clamp_min(1).to(feats.dtype)[:, None]
    # Cosine to every prototype is [N, K*C]; materialising [N, K, D] instead would not fit
    # for MNLI-sized N.
    cos = (unit @ F.normalize(protos, dim=-1).T).view(n, n_dom, n_cls)
    cos_same_class = cos.gather(2, cls_idx.view(n, 1, 1).expand(n, n_dom, 1)).squeeze(2)
    has_class = (counts.view(n_dom, n_cls) > 0).T[cls_idx]  # [N, K]: domain k has class y_i
    own = cos_same_class.gather(1, dom_idx[:, None]).squeeze(1)
    k_prime = has_class.sum(1)
    other_sum = (cos_same_class * has_class).sum(1) - own
    mixed = alpha * own + (1.0 - alpha) * other_sum / (k_prime - 1).clamp_min(1)
    return torch.where(k_prime > 1, mixed, own)


# ---------------------------------------------------- 2. meta-teacher and its loss


@torch.no_grad()
def domain_expertise_weights(
    teacher_logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    """lambda_i = (1 + t_i) / (1 + exp((1 - p_i)^2)), p_i = softmax(teacher_logits)[i, y_i].

    teacher_logits [N, C], labels [N], scores (t_i) [N] -> [N]. Computed without gradient:
    the weights rescale the student's losses and must not be trained through.
    """
    _check_ndim("teacher_logits", teacher_logits, 2, "[N, C]")
    n = teacher_logits.shape[0]
    _check_vector("labels", labels, n)
    _check_vector("scores", scores, n)
    probs = _at_least_f32(teacher_logits).softmax(-1)
    p_gold = probs.gather(1, labels.long()[:, None]).squeeze(1)
    return (1.0 + scores.to(p_gold.dtype)) / (1.0 + torch.exp((1.0 - p_gold) ** 2))


def tda_loss(
    domain_logits: torch.Tensor,
    domains: torch.Tensor,
    target: str = "uniform",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Transferable domain-adversarial loss L_TDA (spec section 2), mean over the batch.

    domain_logits [N, K], domains [N] -> scalar.
    target="uniform" (default): (1/N) sum_i CE(g(x_i), uniform over K)
                               = -(1/N) sum_i (1/K) sum_k log_softmax(g(x_i))_k.
    target="shuffled" (released code): (1/N) sum_i CE(g(x_i), domains[perm[i]]) with
        perm = torch.randperm(N, generator=generator) (drawn on the generator's device).
    There is no gradient reversal: gradients flow into whatever produced domain_logits.
    """
    return _tda_per_example(domain_logits, domains, target, generator).mean()


def _tda_per_example(domain_logits, domains, target, generator) -> torch.Tensor:
    """CE(g(x_i), target_i) of every example, [N] (the terms :func:`tda_loss` averages)."""
    if target not in TDA_TARGETS:
        raise ValueError(f"target must be one of {TDA_TARGETS}, got {target!r}")
    _check_ndim("domain_logits", domain_logits, 2, "[N, K]")
    n = domain_logits.shape[0]
    _check_vector("domains", domains, n)
    log_q = F.log_softmax(_at_least_f32(domain_logits), dim=-1)
    if target == "uniform":
        return -log_q.mean(-1)
    # A CPU generator cannot draw on another device, so draw where the generator lives.
    device = generator.device if generator is not None else domains.device
    perm = torch.randperm(n, generator=generator, device=device).to(domains.device)
    return F.nll_loss(log_q, domains[perm].long(), reduction="none")


def meta_teacher_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    domain_logits: torch.Tensor | None,
    domains: torch.Tensor | None,
    gamma1: float,
    tda_target: str = "uniform",
    generator: torch.Generator | None = None,
    tda_weighting: str = "none",
) -> torch.Tensor:
    """L_MT = (1/N) sum_i t_i * CE(f(x_i), y_i) + gamma1 * L_TDA (spec section 2). Scalar.

    logits [N, C], labels [N], scores (t_i; all ones for the no-weighting ablation) [N],
    domain_logits [N, K], domains [N]. With gamma1 == 0 the TDA term is skipped entirely
    (no randperm is drawn, and domain_logits/domains may be None).
    tda_weighting="instance" (released code) scales the domain term by t_i as well:
        L_MT = (1/N) sum_i t_i * (CE(f(x_i), y_i) + gamma1 * CE(g(x_i), target_i)),
    target_i as in :func:`tda_loss` (the same permutation is drawn); equal to "none" when every t_i = 1.
    """
    if tda_weighting not in TDA_WEIGHTINGS:
        raise ValueError(f"tda_weighting must be one of {TDA_WEIGHTINGS}, got {tda_weighting!r}")
    _check_ndim("logits", logits, 2, "[N, C]")
    n = logits.shape[0]
    _check_vector("labels", labels, n)
    _check_vector("scores", scores, n)
    if gamma1 < 0:
        raise ValueError(f"gamma1 must be >= 0, got {gamma1}")
    ce = F.cross_entropy(_at_least_f32(logits), labels.long(), reduction="none")
    t = scores.to(ce.dtype)
    if gamma1 == 0:
        return weighted_mean(ce, t)
    if domain_logits is None or domains is None:
        raise ValueError("domain_logits and domains are required when gamma1 > 0")
    if domain_logits.dim() != 2 or domain_logits.shape[0] != n:
        raise _shape_error("domain_logits", f"[N, K] with N={n}", domain_logits)
    tda = _tda_per_example(domain_logits, domains, tda_target, generator)
    if tda_weighting == "instance":
        return weighted_mean(ce + gamma1 * tda, t)
    return weighted_mean(ce, t) + gamma1 * tda.mean()


# ------------------------------------------------ 3-4. per-example distillation losses


def _check_logit_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    _check_ndim("student_logits", student_logits, 2, "[N, C]")
    _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """L_pred,i = -sum_c softmax(z_T / T)_c * log softmax(z_S / T)_c. [N, C] x2 -> [N].

    No T^2 factor (spec section 3). The teacher is not detached here; the caller runs the
    frozen teacher under no_grad.
    """
    _check_logit_pair(student_logits, teacher_logits)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    p = F.softmax(_at_least_f32(teacher_logits) / temperature, dim=-1)
    log_q = F.log_softmax(_at_least_f32(student_logits) / temperature, dim=-1)
    return -(p * log_q).sum(-1)


def pred_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "kl",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Divergence between P = softmax(z_T/T) and Q = softmax(z_S/T), per example [N].

    kind="kl":  KL(P||Q) = sum P (log P - log Q)  (soft CE minus teacher entropy)
    kind="rkl": KL(Q||P) = sum Q (log Q - log P)
    kind="js":  0.5 KL(P||M) + 0.5 KL(Q||M), M = (P + Q)/2  (in [0, ln 2])
    kind="tvd": 0.5 sum |P - Q|  (in [0, 1])
    Logits are assumed finite; logs come from log_softmax for stability.
    """
    if kind not in PRED_DIVERGENCES:
        raise ValueError(f"kind must be one of {PRED_DIVERGENCES}, got {kind!r}")
    _check_logit_pair(student_logits, teacher_logits)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p = F.log_softmax(_at_least_f32(teacher_logits) / temperature, dim=-1)
    log_q = F.log_softmax(_at_least_f32(student_logits) / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if kind == "kl":
        return (p * (log_p - log_q)).sum(-1)
    if kind == "rkl":
        return (q * (log_q - log_p)).sum(-1)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    # log M via logsumexp keeps M's small entries exact instead of log((p+q)/2).
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    return 0.5 * (p * (log_p - log_m)).sum(-1) + 0.5 * (q * (log_q - log_m)).sum(-1)


def hidden_mse(
    student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Per-example MSE over non-padding tokens (L_embd, one layer of L_hidn). -> [N].

    student [N, S, H] (already projected by W_h), teacher [N, S, H], attention_mask [N, S]
    (1 = token, 0 = padding):
        L_i = sum_{s valid} sum_h (student - teacher)^2 / (n_valid_i * H).
    An example with no valid token gets 0.
    """
    _check_ndim("student", student, 3, "[N, S, H]")
    _check_same_shape("student", student, "teacher", teacher)
    if attention_mask.shape != student.shape[:2]:
        raise _shape_error("attention_mask", f"[N, S] = {tuple(student.shape[:2])}", attention_mask)
    diff = _at_least_f32(student) - _at_least_f32(teacher)
    mask = attention_mask.to(diff.dtype)
    per_token = diff.pow(2).sum(-1)  # [N, S]
    denom = (mask.sum(1) * student.shape[2]).clamp_min(1.0)
    return (per_token * mask).sum(1) / denom


def attention_mse(
    student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Per-example MSE between attention maps over valid (query, key) pairs. -> [N].

    student [N, Hs, S, S], teacher [N, Ht, S, S] (attention probabilities, or pre-softmax
    scores QK^T/sqrt(d) with ``distill.attention: scores``), attention_mask [N, S]. A pair
    (q, k) is valid when both positions are non-padding:
        L_i = sum_{h, (q,k) valid} (A_S - A_T)^2 / (H * n_valid_pairs_i).
    If Hs != Ht, each side is first averaged over its heads (H = 1 above), since there is
    no head-to-head correspondence. An example with no valid pair gets 0. Invalid pairs are
    excluded, not multiplied by 0, so whatever they hold (a -inf mask term) cannot leak in.
    """
    _check_ndim("student", student, 4, "[N, Hs, S, S]")
    _check_ndim("teacher", teacher, 4, "[N, Ht, S, S]")
    n, _, s, s2 = student.shape
    if s != s2 or teacher.shape[0] != n or teacher.shape[2:] != student.shape[2:]:
        raise ValueError(
            "student and teacher attention must be [N, H, S, S] with equal N and S, "
            f"got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if attention_mask.shape != (n, s):
        raise _shape_error("attention_mask", f"[N, S] = {(n, s)}", attention_mask)
    a_s, a_t = _at_least_f32(student), _at_least_f32(teacher)
    if a_s.shape[1] != a_t.shape[1]:
        a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
    valid = attention_mask.bool()
    pairs = valid[:, :, None] & valid[:, None, :]  # [N, S, S]
    sq = torch.where(pairs[:, None], a_s - a_t, 0.0).pow(2).sum(1)  # summed over heads: [N, S, S]
    denom = (pairs.sum((1, 2)).to(a_s.dtype) * a_s.shape[1]).clamp_min(1.0)
    return sq.sum((1, 2)) / denom


def tkd_loss(student_repr: torch.Tensor, teacher_repr: torch.Tensor) -> torch.Tensor:
    """L_TKD,i = mean_d (r_S(x_i) W_d - r_T(x_i))_d^2. [N, D] x2 (student already mapped by W_d) -> [N].

    ``distill.tkd: pre_tanh_shared`` (released code) passes the pre-tanh representations, the
    student's mapped by W_h; the caller then weights the batch by mean(lambda), not by lambda_i.
    """
    _check_ndim("student_repr", student_repr, 2, "[N, D]")
    _check_same_shape("student_repr", student_repr, "teacher_repr", teacher_repr)
    return (_at_least_f32(student_repr) - _at_least_f32(teacher_repr)).pow(2).mean(-1)


# ------------------------------------------------------------------ combination


def layer_map(student_layers: int, teacher_layers: int, mode: str = "exact") -> list[int]:
    """1-based teacher layer g(j) for each student layer j = 1..S (spec section 3).

    mode="exact": g(j) = j * L / S; L must be a multiple of S (so S <= L), else ValueError.
    mode="round": g(j) = round(j * L / S) (Python's round, half to even), clamped to [1, L].
    The embedding output (layer 0) always maps to 0 and is not part of the list.
    """
    if mode not in LAYER_MAP_MODES:
        raise ValueError(f"layer_map mode must be one of {LAYER_MAP_MODES}, got {mode!r}")
    for name, value in (("student_layers", student_layers), ("teacher_layers", teacher_layers)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    s, l = int(student_layers), int(teacher_layers)
    if mode == "exact":
        if s > l:
            raise ValueError(
                f"student has {s} layers but teacher only {l}: cannot map exactly "
                "(set layer_map: round to allow it)"
            )
        if l % s != 0:
            raise ValueError(
                f"teacher layers ({l}) must be a multiple of student layers ({s}) for "
                "layer_map: exact; use a compatible student or set layer_map: round"
            )
        return [j * l // s for j in range(1, s + 1)]
    return [min(max(round(j * l / s), 1), l) for j in range(1, s + 1)]


def weighted_mean(per_example: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(1/N) sum_i w_i * l_i: per_example [N], weights [N] -> scalar.

    Divides by N, not by sum(w): the spec's L_KD and L_MT are (1/N) sum_i lambda_i L_i, so
    the weights change the loss scale as well as the balance between examples.
    """
    _check_ndim("per_example", per_example, 1, "[N]")
    _check_vector("weights", weights, per_example.shape[0])
    return (weights * per_example).mean()


# ------------------------------------------------ CAP: contrastive pruning (cap-pruning spec)

CAP_NORMALIZATIONS = ("released", "anchor_mean")
__all__.append("cap_contrastive_loss")


def cap_contrastive_loss(
    anchors: torch.Tensor,
    rows: torch.Tensor,
    labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    temperature: float = 0.1,
    w_unsup: float = 0.1,
    w_sup: float = 10.0,
    extra_negatives: int = 4096,
    normalize: str = "released",
    extra_rows: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One CAP contrastive module (PrC, SnC or FiC; cap-pruning spec §1.3): L_m = w_u L^u_m + w_s L^s_m. Scalar.

    anchors [B, H]: the trained model's representations z_i (L2-normalised here); rows [B]: each
    example's row in the bank; labels [B]; bank [N, R, H]: the module's memory, R vectors per
    example (PrC, FiC: R = 1; SnC: one per snapshot), bank_labels [N].

    Candidates C: sg(z_k) for every batch member k; bank[rows_k, r] for every k and r; bank[e, r]
    for e in E, a uniform draw without replacement of |E| = min(floor(Q / R), N) rows
    (Q = ``extra_negatives``; ``extra_rows`` gives E instead). Bank vectors are L2-normalised too.

        s_ic = <z_i, c> / tau,     l_ic = s_ic - log sum_{c' != sg(z_i)} exp(s_ic')

    (the anchor's own copy sg(z_i) is left out of the softmax and of every positive set).
    P^u_i: the candidates with row rows_i (its R bank vectors, plus repeats drawn into E);
    P^s_i: the candidates with label y_i.

        released:    L = -[sum_i (1/|P_i|) sum_{c in P_i} l_ic] / sum_i |P_i|      (the authors' code)
        anchor_mean: L = -(1/B) sum_i (1/|P_i|) sum_{c in P_i} l_ic                (multi-positive InfoNCE)

    so released = anchor_mean / mean_i |P_i|; the released weights w_u, w_s (0.1, 10) assume it.
    No gradient reaches the bank or the detached copies: z_i is trained only as the anchor.
    """
    if normalize not in CAP_NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {CAP_NORMALIZATIONS}, got {normalize!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if extra_negatives < 0:
        raise ValueError(f"extra_negatives must be >= 0, got {extra_negatives}")
    _check_ndim("anchors", anchors, 2, "[B, H]")
    _check_ndim("bank", bank, 3, "[N, R, H]")
    b, (n, r, h) = anchors.shape[0], bank.shape
    if anchors.shape[1] != h:
        raise ValueError(f"anchors [B, H] and bank [N, R, H] need the same H, got {anchors.shape[1]} and {h}")
    _check_vector("rows", rows, b)
    _check_vector("labels", labels, b)
    _check_vector("bank_labels", bank_labels, n)
    z = F.normalize(_at_least_f32(anchors), dim=-1)
    rows, labels = rows.to(bank.device).long(), labels.to(bank.device).long()
    if extra_rows is None:
        # a CPU generator cannot draw on another device, so draw where the generator lives
        device = generator.device if generator is not None else bank.device
        extra_rows = torch.randperm(n, generator=generator, device=device)[:min(extra_negatives // r, n)]
    extra_rows = extra_rows.to(bank.device).long()
    banked = torch.cat([bank[rows].reshape(b * r, h), bank[extra_rows].reshape(-1, h)])
    cand = torch.cat([z.detach(), F.normalize(_at_least_f32(banked.detach()), dim=-1).to(z.device)])
    cand_rows = torch.cat([rows, rows.repeat_interleave(r), extra_rows.repeat_interleave(r)]).to(z.device)
    cand_labels = torch.cat([labels, labels.repeat_interleave(r),
                             bank_labels.to(bank.device).long()[extra_rows].repeat_interleave(r)]).to(z.device)
    scores = z @ cand.T / temperature  # [B, C]
    is_self = torch.zeros_like(scores, dtype=torch.bool)
    is_self[:, :b] = torch.eye(b, dtype=torch.bool, device=z.device)
    log_prob = scores - torch.logsumexp(scores.masked_fill(is_self, float("-inf")), dim=1, keepdim=True)

    def term(positive: torch.Tensor) -> torch.Tensor:
        positive = positive & ~is_self
        count = positive.sum(1)
        per_anchor = torch.where(positive, log_prob, 0.0).sum(1) / count.clamp_min(1)
        denom = count.sum().clamp_min(1) if normalize == "released" else b
        return -per_anchor.sum() / denom

    loss = z.new_zeros(())
    if w_unsup:
        loss = loss + w_unsup * term(rows.to(z.device)[:, None] == cand_rows[None, :])
    if w_sup:
        loss = loss + w_sup * term(labels.to(z.device)[:, None] == cand_labels[None, :])
    return loss
