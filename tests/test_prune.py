"""Pruners (cap-pruning spec §5 items 2-3): kept counts, the cubic schedule, head/neuron gates and
their importance, the physical copy, sparsity accounting, memory banks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from metakd.config import ConfigError, ModelConfig
from metakd.models import _layers, build_teacher
from metakd.pruning.accounting import layer_parameters, structured_summary, unstructured_summary
from metakd.pruning.banks import MemoryBank
from metakd.pruning.importance import first_order_importance, heads_to_prune, neurons_to_prune
from metakd.pruning.masks import MATRICES, HeadFFNGates, MaskedLinear, UnstructuredMasks, kept_count
from metakd.pruning.physical import physical_copy
from metakd.pruning.schedule import cubic_keep, pruned_counts, soft_lambda, structured_targets

pytestmark = pytest.mark.usefixtures("single_thread_torch")

# tiny-teacher: 4 layers, hidden 64, 4 heads of 16, FFN 128
LAYERS, HIDDEN, HEADS, FFN = 4, 64, 4, 128


def tiny(seed=0):
    torch.manual_seed(seed)
    return build_teacher(ModelConfig(preset="tiny-teacher"), vocab_size=100, max_length=16, num_labels=3,
                         num_domains=2).eval()


def batch(n=5, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[1, 7:] = 0  # padding must not matter to the comparisons
    return {"input_ids": torch.randint(1, 100, (n, seq), generator=g), "attention_mask": mask,
            "token_type_ids": torch.zeros(n, seq, dtype=torch.long), "domains": torch.tensor([0, 1, 0, 1, 0][:n]),
            "labels": torch.tensor([0, 1, 2, 0, 1][:n])}


# ---------------------------------------------------------------- schedule


def test_cubic_schedule_golden_values():
    # T = 100 steps, a = 20 dense, b = 30 final: the cubic runs over t in (20, 70]
    k = [cubic_keep(t, 100, 20, 30, 1.0, 0.1) for t in (0, 20, 21, 45, 69, 70, 71, 100)]
    np.testing.assert_allclose(k, [1.0, 1.0, 0.1 + 0.9 * 0.98 ** 3, 0.1 + 0.9 * 0.125, 0.1 + 0.9 * 0.02 ** 3,
                                   0.1, 0.1, 0.1], rtol=0, atol=1e-15)
    assert k[3] == pytest.approx(0.2125)
    # soft movement: the threshold rises from 0 to 0.1, and lambda with it
    assert cubic_keep(45, 100, 20, 30, 0.0, 0.1) == pytest.approx(0.0875)
    assert soft_lambda(0.0875, 0.1, 190.0) == pytest.approx(166.25)
    # QQP as released: 10 epochs of 11,000 steps, warm-up 11,000, a = 2, b = 3: dense for 20 %, final for 30 %
    t_total, u = 110_000, 11_000
    assert cubic_keep(2 * u, t_total, 2 * u, 3 * u, 1.0, 0.03) == 1.0
    assert cubic_keep(2 * u + 1, t_total, 2 * u, 3 * u, 1.0, 0.03) < 1.0
    assert cubic_keep(t_total - 3 * u + 1, t_total, 2 * u, 3 * u, 1.0, 0.03) == 0.03


def test_structured_steps_and_counts():
    assert structured_targets(0.5, 0.1) == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert structured_targets(0.9, 0.3) == [0.3, 0.6, 0.9]
    with pytest.raises(ValueError, match="whole number of steps"):
        structured_targets(0.55, 0.1)
    assert pruned_counts(16, [0.1, 0.2, 0.3, 0.5]) == [1, 3, 4, 8]
    assert pruned_counts(144, [0.1, 0.7]) == [14, 100]  # 0.7 * 144 = 100.8: floor, not 101


# ---------------------------------------------------------------- unstructured masks


@pytest.mark.parametrize("criterion", ["movement", "magnitude"])
def test_topk_keeps_exact_counts_per_matrix(criterion):
    model = tiny()
    masks = UnstructuredMasks(model.encoder, criterion)
    assert len(masks.linears) == LAYERS * 6
    for m in masks.score_parameters():
        nn.init.normal_(m)
    for keep, counts in ((0.1, {HIDDEN * HIDDEN: 409, HIDDEN * FFN: 819}), (0.5, {4096: 2048, 8192: 4096}),
                         (1.0 - 0.9, {4096: 409, 8192: 819})):
        masks.set_keep(keep)
        for name, mask in masks.masks().items():
            assert int(mask.sum()) == counts[mask.numel()], (name, keep)
    if criterion == "magnitude":  # the kept weights are the largest |W| of their matrix
        linear = masks.linears["2.intermediate.dense"]
        mask, w = masks.masks()["2.intermediate.dense"], linear.weight.detach().abs()
        assert float(w[mask].min()) >= float(w[~mask].max())


def test_soft_movement_threshold_and_minimum():
    linear = MaskedLinear(nn.Linear(100, 10), "soft_movement")
    with torch.no_grad():
        linear.scores.copy_(torch.linspace(-3, 3, 1000).view(10, 100))
    linear.keep = 0.5  # sigmoid(S) > 0.5 <=> S > 0: the upper half
    assert int(linear.mask().sum()) == 500
    linear.keep = 0.999  # nothing passes: the top int(0.005 * 1000) + 1 = 6 are kept
    mask = linear.mask()
    assert int(mask.sum()) == 6 and bool(mask.flatten()[-6:].all())


def test_movement_gradient_is_straight_through():
    torch.manual_seed(0)
    linear = MaskedLinear(nn.Linear(5, 3), "movement")
    with torch.no_grad():
        linear.scores.copy_(torch.randn(3, 5))
    linear.keep = 0.4  # 6 of 15 kept
    x, r = torch.randn(4, 5), torch.randn(4, 3)
    (linear(x) * r).sum().backward()
    w, m = linear.weight.detach().numpy(), linear.mask().detach().numpy()
    d_effective = r.numpy().T @ x.numpy()  # dL/dW' for W' = W ⊙ M
    assert int(m.sum()) == 6
    np.testing.assert_allclose(linear.scores.grad.numpy(), w * d_effective, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(linear.weight.grad.numpy(), m * d_effective, rtol=1e-5, atol=1e-6)


def test_masks_act_in_the_forward_and_bake_into_the_weights():
    model, b = tiny(), batch()
    dense = model(**b).logits
    masks = UnstructuredMasks(model.encoder, "magnitude")
    assert torch.allclose(model(**b).logits, dense)  # kappa = 1: nothing pruned yet
    masks.set_keep(0.3)
    masked = model(**b).logits
    assert not torch.allclose(masked, dense, atol=1e-3)
    kept = masks.remove()
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))  # plain again
    torch.testing.assert_close(model(**b).logits, masked, atol=1e-6, rtol=0)
    q = _layers(model.encoder)[0].attention.self.query.weight
    assert int((q != 0).sum()) == int(kept["0.attention.self.query"].sum()) == kept_count(0.3, 4096)


def test_encoder_remaining_against_an_independent_count():
    model = tiny()
    masks = UnstructuredMasks(model.encoder, "magnitude")
    masks.set_keep(0.1)
    baked = masks.remove()
    summary = unstructured_summary(model, baked)
    layers = _layers(model.encoder)
    # every bias and LayerNorm parameter, and the nonzero entries of the six matrices (random init: no exact 0)
    total = sum(p.numel() for p in layers.parameters())
    matrices = {id(getattr_path(layer, path).weight) for layer in layers for path in MATRICES}
    kept = sum(int((p != 0).sum()) if id(p) in matrices else p.numel() for p in layers.parameters())
    assert summary["encoder_remaining"] == pytest.approx(kept / total, abs=0)
    per_layer = 4 * 409 + 2 * 819
    assert kept == total - LAYERS * (4 * 4096 + 2 * 8192) + LAYERS * per_layer
    removed = total - kept
    assert summary["student_nonzero_params"] == model.num_parameters() - removed
    assert summary["prune_achieved"] == pytest.approx(1 - per_layer / (4 * 4096 + 2 * 8192))


def getattr_path(obj, path):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def test_non_bert_encoder_is_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(ConfigError, match="student.prune"):
        UnstructuredMasks(Odd(), "movement")


# ---------------------------------------------------------------- heads and neurons


def test_head_selection_counts_and_one_head_per_layer():
    imp = torch.tensor([[0.1, 0.2, 0.9, 0.3],
                        [0.05, 0.06, 0.07, 0.08],
                        [0.5, 0.6, 0.7, 0.8],
                        [0.01, 0.9, 0.02, 0.03]])
    mask = torch.ones(4, 4)
    # 16 heads, 50 % -> 8 off; layer 1's best head (0.08) is protected although it ranks low
    after = heads_to_prune(imp, pruned_counts(16, [0.5])[0], mask)
    assert int((after == 0).sum()) == 8
    assert bool((after.sum(1) >= 1).all()) and after[1, 3] == 1
    off = {(l, h) for l, h in (after == 0).nonzero().tolist()}
    assert off == {(1, 0), (1, 1), (1, 2), (3, 0), (3, 2), (3, 3), (0, 0), (0, 1)}
    # a second step only adds: 12 off in all, never the protected head of a layer
    later = heads_to_prune(imp, 12, after)
    assert int((later == 0).sum()) == 12 and bool((later.sum(1) >= 1).all()) and bool((later <= after).all())
    with pytest.raises(ValueError, match="min_heads_per_layer"):
        heads_to_prune(imp, 13, later)


def test_neuron_selection_ranks_across_layers():
    imp = torch.tensor([[0.4, 0.1, 0.3], [0.2, 0.5, 0.05]])
    after = neurons_to_prune(imp, 3, torch.ones(2, 3))
    assert after.tolist() == [[1, 0, 1], [0, 1, 0]]
    assert neurons_to_prune(imp, 4, after).tolist() == [[1, 0, 0], [0, 1, 0]]


def test_first_order_importance_is_the_gate_gradient():
    model, b = tiny().double(), batch()  # float64: a central difference resolves the small gradients
    gates = HeadFFNGates(model.encoder)
    gates.heads, gates.neurons = gates.heads.double(), gates.neurons.double()

    def loss_fn(m, bb):
        return m(**bb).logits.square().sum()

    heads, neurons = first_order_importance(model, gates, loss_fn, [b], normalize_by_layer=False)
    # central difference on one head gate and one neuron gate
    for table, which, (l, i) in ((gates.heads, heads, (2, 1)), (gates.neurons, neurons, (1, 17))):
        eps, vals = 1e-2, []
        for sign in (1, -1):
            table[l, i] = 1 + sign * eps
            with torch.no_grad():
                vals.append(float(loss_fn(model, b)))
        table[l, i] = 1.0
        assert float(which[l, i]) == pytest.approx(abs(vals[0] - vals[1]) / (2 * eps), rel=1e-3)
        assert float(which[l, i]) > 0
    normed, _ = first_order_importance(model, gates, loss_fn, [b, b])
    np.testing.assert_allclose(normed.norm(dim=1).numpy(), np.ones(LAYERS), rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_physical_copy_logits_equal_the_gated_model():
    model, b = tiny(), batch()
    gates = HeadFFNGates(model.encoder)
    gates.heads.copy_(torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1], [0, 1, 1, 0]]))
    gates.neurons[:, ::3] = 0
    gates.neurons[2, :100] = 0
    gated = model(**b).logits
    small = physical_copy(model, gates).eval()
    torch.testing.assert_close(small(**b).logits, gated, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(**b).logits, gated, atol=0, rtol=0)  # the original keeps its gates
    layers = _layers(small.encoder)
    assert [l.attention.self.query.out_features // 16 for l in layers] == [2, 1, 4, 2]
    kept_neurons = [int(gates.neurons[i].sum()) for i in range(LAYERS)]
    assert [l.intermediate.dense.out_features for l in layers] == kept_neurons
    assert [l.output.dense.in_features for l in layers] == kept_neurons
    summary = structured_summary(model, small, gates.heads, gates.neurons)
    # independent count: a head takes Q, K, V rows (weights + biases) and attention-output columns;
    # a neuron its FFN-in row and bias and its FFN-out column
    heads_off, neurons_off = 16 - 9, int((gates.neurons == 0).sum())
    removed = heads_off * (3 * (HIDDEN * 16 + 16) + 16 * HIDDEN) + neurons_off * (HIDDEN + 1 + HIDDEN)
    dense = layer_parameters(model.encoder)
    assert summary["encoder_remaining"] == pytest.approx((dense - removed) / dense, abs=0)
    assert summary["student_nonzero_params"] == model.num_parameters() - removed
    assert summary["heads_kept"] == 9 and summary["ffn_kept"] == sum(kept_neurons)
    # baked: a plain model holding zeros, no hooks, the same logits
    gates.bake(model.encoder)
    gates.remove()
    torch.testing.assert_close(model(**b).logits, gated, atol=1e-5, rtol=0)
    # the six matrices (random init; HF initialises biases to 0): nonzero entries = the smaller copy's entries
    nonzero = sum(int((getattr_path(l, path).weight != 0).sum()) for l in _layers(model.encoder) for path in MATRICES)
    assert nonzero == sum(getattr_path(l, path).weight.numel() for l in layers for path in MATRICES)


# ---------------------------------------------------------------- banks


def test_memory_bank_rows_snapshots_and_unknown_examples():
    index = torch.tensor([7, 3, 9])
    bank = MemoryBank(index, torch.tensor([1, 0, 1]), torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]))
    assert bank.snapshots == 1
    np.testing.assert_allclose(bank.vectors[:, 0].numpy(), [[0.6, 0.8], [1, 0], [0, 1]])
    assert bank.rows(torch.tensor([9, 7])).tolist() == [2, 0]
    two = bank.with_snapshot(torch.tensor([[0.0, 5.0], [2.0, 0.0], [1.0, 1.0]]))
    assert two.snapshots == 2 and bank.snapshots == 1
    np.testing.assert_allclose(two.vectors[2, 1].numpy(), [1 / math.sqrt(2)] * 2, rtol=1e-6)
    with pytest.raises(KeyError):
        bank.rows(torch.tensor([4]))
    with pytest.raises(KeyError):
        bank.rows(torch.tensor([12]))
