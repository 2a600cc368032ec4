"""Teacher and student models: a BERT-like encoder + classifier + domain head (spec section 2).

The encoder comes from a Hugging Face checkpoint (hub id or local path, any BERT-like model
that exposes hidden states and attentions) or from a size preset / explicit sizes with random
initialisation. Checkpoints are saved as ``model.safetensors`` + ``model.json`` and loaded
without network access and without pickle.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig
from transformers.utils import logging as hf_logging

from .config import ConfigError, ModelConfig
from .losses import layer_map


@dataclass
class Output:
    logits: torch.Tensor  # [N, C]
    domain_logits: torch.Tensor  # [N, K]
    domain_repr: torch.Tensor  # r(x), [N, H]
    features: torch.Tensor  # mean_pool(H_last), [N, H]
    hidden_states: tuple | None = None  # (embeddings, layer 1..L), each [N, S, H]; None where not kept
    # layer 1..L, each [N, heads, S, S]: probabilities, or pre-softmax scores (forward's ``attention``); None where
    # not kept
    attentions: tuple | None = None
    domain_pre_tanh: torch.Tensor | None = None  # W_r (mean_pool(H_last) + e[d]) + b_r, r(x) before its tanh, [N, H]
    pooled: torch.Tensor | None = None  # z(x), what the classifier reads (before its dropout): features or CLS, [N, H]


def mean_pool(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over non-padding positions: [N,S,H], [N,S] -> [N,H]."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def encoder_config(spec: ModelConfig, vocab_size: int, max_length: int):
    """The Hugging Face config of an encoder (loaded for checkpoints, built for presets)."""
    if spec.checkpoint:
        try:
            cfg = AutoConfig.from_pretrained(spec.checkpoint)
        except OSError as e:
            raise ConfigError(f"checkpoint {spec.checkpoint!r}: cannot load its config ({e})") from None
        return cfg
    layers, hidden, heads, intermediate = spec.sizes()
    return BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=max(512, max_length),
    )


def build_encoder(spec: ModelConfig, vocab_size: int, max_length: int) -> nn.Module:
    """An encoder with the library's default attention (SDPA where the model supports it, else eager);
    forwards that return attention maps switch to eager for themselves (:func:`attention_maps`)."""
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per teacher/student floods sweep logs
    if spec.checkpoint:
        return AutoModel.from_pretrained(spec.checkpoint)
    return AutoModel.from_config(encoder_config(spec, vocab_size, max_length))


def _attention_prob_dropouts(encoder: nn.Module) -> list[nn.Dropout]:
    """The dropouts applied to attention probabilities: ``dropout`` of each ``*SelfAttention``
    module (BERT, RoBERTa, ELECTRA, DistilBERT, MPNet)."""
    return [m.dropout for m in encoder.modules()
            if type(m).__name__.endswith("SelfAttention") and isinstance(getattr(m, "dropout", None), nn.Dropout)]


@contextmanager
def attention_maps(encoder: nn.Module):
    """Within: eager attention, which returns the maps (SDPA computes none), and no dropout on
    the attention probabilities, so the maps are the softmax probabilities the spec's L_attn compares."""
    cfg = encoder.config
    drops = _attention_prob_dropouts(encoder)
    configured = getattr(cfg, "attention_probs_dropout_prob", None) or getattr(cfg, "attention_dropout", 0.0) or 0.0
    if configured > 0 and not drops and encoder.training:
        raise ConfigError(f"{type(encoder).__name__}: cannot find the dropout on its attention probabilities "
                          f"(a '*SelfAttention' module's 'dropout'); L_attn needs maps without it")
    impl, ps = cfg._attn_implementation, [d.p for d in drops]
    try:
        if impl != "eager":
            cfg._attn_implementation = "eager"
        for d in drops:  # no dropout rather than pre-dropout maps: HF's attention kernels return only post-dropout maps
            d.p = 0.0
        yield
    finally:
        if cfg._attn_implementation != impl:
            cfg._attn_implementation = impl
        for d, p in zip(drops, ps):
            d.p = p


ATTENTION_MODES = ("probs", "scores")
_QK_NAMES = (("query", "key"), ("q", "k"), ("q_lin", "k_lin"))  # BERT/RoBERTa/ELECTRA, MPNet, DistilBERT


def _query_key(layer: nn.Module, model: str) -> tuple[nn.Linear, nn.Linear, nn.Module]:
    """(query projection, key projection, self-attention module) of one transformer layer."""
    for m in layer.modules():
        if type(m).__name__.endswith("SelfAttention"):
            for q, k in _QK_NAMES:
                if isinstance(getattr(m, q, None), nn.Linear) and isinstance(getattr(m, k, None), nn.Linear):
                    return getattr(m, q), getattr(m, k), m
    raise ConfigError(f"distill.attention: scores: cannot find the query/key projections of {model}'s "
                      f"self-attention; use distill.attention: probs")


@contextmanager
def attention_scores(encoder: nn.Module, layers):
    """Within: forward hooks record the query and key projections of ``layers`` (1..L). Yields
    ``scores()`` -> {layer: [N, heads, S, S]}, to call after the forward:

        A_g = Q_g K_g^T / sqrt(d_head)  (+ B for MPNet),

    the pre-softmax attention logits without the padding mask term (the caller masks padded pairs).
    B is MPNet's relative position bias [heads, S, S], shared by all layers and added to the logits
    inside its attention, so it is part of what the softmax normalises and is included (its
    ``relative_attention_bias`` embedding is hooked too). Other position schemes that act on the
    logits are refused rather than silently left out.
    """
    cfg = encoder.config
    model = type(encoder).__name__
    if getattr(cfg, "position_embedding_type", "absolute") not in ("absolute", None):
        raise ConfigError(f"distill.attention: scores: {model} uses position_embedding_type "
                          f"{cfg.position_embedding_type!r}, whose logit terms are not reproduced; use probs")
    blocks, heads = _layers(encoder), cfg.num_attention_heads
    seen: dict = {}
    handles, scale = [], {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = output
        return hook

    for g in sorted(set(layers)):
        q, k, attn = _query_key(blocks[g - 1], model)
        handles += [q.register_forward_hook(record((g, "q"))), k.register_forward_hook(record((g, "k")))]
        scale[g] = (q.out_features // heads) ** -0.5
    bias = getattr(getattr(encoder, "encoder", None), "relative_attention_bias", None)
    if isinstance(bias, nn.Embedding):
        handles.append(bias.register_forward_hook(record("bias")))

    def scores() -> dict[int, torch.Tensor]:
        out = {}
        for g in scale:
            n, s, _ = seen[(g, "q")].shape
            q = seen[(g, "q")].view(n, s, heads, -1).transpose(1, 2)
            k = seen[(g, "k")].view(n, s, heads, -1).transpose(1, 2)
            out[g] = torch.matmul(q, k.transpose(-1, -2)) * scale[g]
            if "bias" in seen:  # [S, S, heads] (bucketed relative positions) -> [1, heads, S, S]
                out[g] = out[g] + seen["bias"].permute(2, 0, 1).unsqueeze(0)
        return out

    try:
        yield scores
    finally:
        for h in handles:
            h.remove()


@contextmanager
def maps_of_layers(encoder: nn.Module, keep):
    """Within: the self-attention of every layer outside ``keep`` (1..L) hands no attention map on,
    so a forward with ``output_attentions`` holds the [N, heads, S, S] maps of the kept layers only,
    not of all L (a teacher pass that feeds L_attn keeps its mapped layers'). The maps are still
    computed (eager attention), and freed with the layer."""
    def drop(module, inputs, output):
        if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
            return (output[0], None, *output[2:])
        return None

    handles = []
    for i, block in enumerate(_layers(encoder), start=1):
        if i not in keep:
            for m in block.modules():
                if type(m).__name__.endswith("SelfAttention"):
                    # before the library's own output-capturing hooks, which then see no map
                    handles.append(m.register_forward_hook(drop, prepend=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _maps_by_layer(maps: tuple, keep, num_layers: int) -> tuple:
    """Layer 1..L -> its map (None outside ``keep``), from what the encoder returned under
    :func:`maps_of_layers`: all L maps, the L with None for the dropped ones, or the kept ones alone."""
    got = [a for a in maps if a is not None]
    if len(got) == num_layers:
        by_layer = dict(enumerate(got, start=1))
    elif len(got) == len(set(keep)):
        by_layer = dict(zip(sorted(set(keep)), got))
    else:
        raise RuntimeError(f"the encoder returned {len(got)} attention maps for {len(set(keep))} kept of "
                           f"{num_layers} layers")
    return tuple(by_layer[i] if i in keep else None for i in range(1, num_layers + 1))


def _selects_hidden_states(encoder: nn.Module) -> bool:
    """Whether ``output_hidden_states`` may list indices (transformers 5 models with output capturing)."""
    return "hidden_states" in (getattr(type(encoder), "_can_record_outputs", None) or {})


class EncoderClassifier(nn.Module):
    """Encoder + classifier on the pooled output + domain head.

    r(x) = tanh(W_r (mean_pool(H_last) + e[d]) + b_r),  g(x) = W_g r(x) + b_g.
    ``multitask=True`` gives one classifier per domain (the kd_mtl teacher); the logits of
    an example come from its own domain's head.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, num_domains: int, multitask: bool = False,
                 pooling: str = "cls"):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        hidden = encoder.config.hidden_size
        self.num_labels, self.num_domains, self.multitask = num_labels, num_domains, multitask
        self.dropout = nn.Dropout(getattr(encoder.config, "hidden_dropout_prob", 0.1))
        self.classifier = nn.Linear(hidden, num_labels * (num_domains if multitask else 1))
        self.domain_embedding = nn.Embedding(num_domains, hidden)
        self.domain_proj = nn.Linear(hidden, hidden)  # W_r
        self.domain_head = nn.Linear(hidden, num_domains)  # W_g

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.encoder.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, domains, token_type_ids=None, output_states=False, layers=None,
                attention="probs", **_) -> Output:
        """``output_states``: also return hidden states and attention maps (eager attention, no dropout
        on the attention probabilities, see :func:`attention_maps`); ``layers`` (1..L, None: all) are
        the layers whose states are kept, plus the embedding output. ``attention``: the maps are the
        softmax probabilities (probs) or the pre-softmax scores (scores, :func:`attention_scores`),
        set to 0 on every (query, key) pair with a padded position. Otherwise the default attention
        (SDPA) runs and no intermediate state is kept."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        hidden = attentions = None
        if output_states:
            if attention not in ATTENTION_MODES:
                raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
            keep = set(range(1, self.num_layers + 1) if layers is None else layers)
            wanted = sorted({0} | keep) if _selects_hidden_states(self.encoder) else True
            probs = attention == "probs"
            with ExitStack() as stack:
                stack.enter_context(attention_maps(self.encoder))
                scores = None if probs else stack.enter_context(attention_scores(self.encoder, keep))
                if probs:
                    stack.enter_context(maps_of_layers(self.encoder, keep))
                out = self.encoder(**inputs, output_hidden_states=wanted, output_attentions=probs, return_dict=True)
                if probs:
                    attentions = _maps_by_layer(out.attentions, keep, self.num_layers)
                else:
                    valid = attention_mask.bool()
                    padded = ~(valid[:, None, :, None] & valid[:, None, None, :])  # [N, 1, S, S]
                    got = scores()
                    attentions = tuple(got[i].masked_fill(padded, 0.0) if i in keep else None
                                       for i in range(1, self.num_layers + 1))
            hidden = tuple(h if i == 0 or i in keep else None for i, h in enumerate(out.hidden_states))
        else:
            out = self.encoder(**inputs, return_dict=True)
        last = out.last_hidden_state
        features = mean_pool(last, attention_mask)
        if self.pooling == "mean":
            pooled = features
        else:
            pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else last[:, 0]
        logits = self.classifier(self.dropout(pooled))
        if self.multitask:
            # the row index on the domains' device: a CPU arange beside CUDA domains costs a host sync
            rows = torch.arange(len(domains), device=domains.device)
            logits = logits.view(-1, self.num_domains, self.num_labels)[rows, domains]
        pre_tanh = self.domain_proj(features + self.domain_embedding(domains))
        domain_repr = torch.tanh(pre_tanh)
        return Output(
            logits=logits, domain_logits=self.domain_head(domain_repr), domain_repr=domain_repr, features=features,
            hidden_states=hidden, attentions=attentions, domain_pre_tanh=pre_tanh, pooled=pooled,
        )

    def num_parameters(self) -> int:
        """Parameters needed at inference: encoder + classifier (not the training-only heads)."""
        return sum(p.numel() for p in self.encoder.parameters()) + sum(p.numel() for p in self.classifier.parameters())


class Student(EncoderClassifier):
    """A student: its own encoder/heads plus the learned projections W_h, W_d to the teacher's size."""

    def __init__(self, encoder, num_labels, num_domains, teacher_hidden: int, pooling: str = "cls"):
        super().__init__(encoder, num_labels, num_domains, pooling=pooling)
        h = self.hidden_size
        self.teacher_hidden = teacher_hidden
        self.hidden_proj = nn.Identity() if h == teacher_hidden else nn.Linear(h, teacher_hidden)  # W_h
        self.repr_proj = nn.Identity() if h == teacher_hidden else nn.Linear(h, teacher_hidden)  # W_d


def build_teacher(spec: ModelConfig, vocab_size: int, max_length: int, num_labels: int, num_domains: int,
                  multitask: bool = False) -> EncoderClassifier:
    return EncoderClassifier(build_encoder(spec, vocab_size, max_length), num_labels, num_domains, multitask,
                             spec.pooling)


def build_student(spec: ModelConfig, teacher: EncoderClassifier, vocab_size: int, max_length: int,
                  layer_map_mode: str = "exact") -> Student:
    """A student for ``teacher``; with init_from_teacher, its layers copy teacher layers g(j)."""
    if spec.init_from_teacher and spec.checkpoint is None:
        cfg = encoder_config(spec, vocab_size, max_length)
        t_cfg = teacher.encoder.config
        mismatch = {k: (getattr(cfg, k), getattr(t_cfg, k)) for k in ("hidden_size", "intermediate_size", "num_attention_heads")
                    if getattr(cfg, k) != getattr(t_cfg, k)}
        if mismatch:
            raise ConfigError(f"student.init_from_teacher: student and teacher differ in {mismatch} (student, teacher); "
                              f"copying layers needs the same widths")
        cfg = t_cfg.__class__.from_dict({**t_cfg.to_dict(), "num_hidden_layers": cfg.num_hidden_layers})
        encoder = AutoModel.from_config(cfg)
        copy_layers_from_teacher(encoder, teacher.encoder, layer_map_mode)
    else:
        encoder = build_encoder(spec, vocab_size, max_length)
    layer_map(encoder.config.num_hidden_layers, teacher.num_layers, layer_map_mode)  # refuse before training
    return Student(encoder, teacher.num_labels, teacher.num_domains, teacher.hidden_size, spec.pooling)


def _layers(encoder: nn.Module) -> nn.ModuleList:
    for path in ("encoder.layer", "transformer.layer", "layers"):
        obj = encoder
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise ConfigError(f"init_from_teacher: cannot find the transformer layers of {type(encoder).__name__}")


def copy_layers_from_teacher(student_encoder: nn.Module, teacher_encoder: nn.Module, mode: str = "exact") -> None:
    """Copy teacher layer g(j) into student layer j and every weight outside the layers (embeddings,
    pooler, MPNet's shared relative position bias) as is (TinyBERT/DistilBERT practice)."""
    s_layers, t_layers = _layers(student_encoder), _layers(teacher_encoder)
    for j, g in enumerate(layer_map(len(s_layers), len(t_layers), mode)):
        s_layers[j].load_state_dict(t_layers[g - 1].state_dict())
    prefix = next(name for name, m in teacher_encoder.named_modules() if m is t_layers) + "."
    student_state = student_encoder.state_dict()
    shared = {k: v for k, v in teacher_encoder.state_dict().items() if not k.startswith(prefix) and k in student_state}
    missing = sorted(k for k in student_state if not k.startswith(prefix) and k not in shared)
    if missing:
        raise ConfigError(f"init_from_teacher: the teacher has no weights for student parameter(s) {missing[:5]}")
    student_encoder.load_state_dict(shared, strict=False)


# ----------------------------------------------------------------------------- save / load


def save_model(model: EncoderClassifier, directory: str | os.PathLike, extra: dict | None = None) -> None:
    """``model.safetensors`` (weights) + ``model.json`` (architecture), loadable offline."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(d / "model.safetensors"))
    meta = {
        "kind": "student" if isinstance(model, Student) else "teacher",
        "encoder_config": model.encoder.config.to_dict(),
        "num_labels": model.num_labels, "num_domains": model.num_domains, "multitask": model.multitask,
        "pooling": model.pooling,
        "teacher_hidden": getattr(model, "teacher_hidden", None), **(extra or {}),
    }
    (d / "model.json").write_text(json.dumps(meta, indent=1, default=str))


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> EncoderClassifier:
    d = Path(directory)
    if not (d / "model.json").is_file():
        raise FileNotFoundError(f"{d}: no model.json (not a metakd checkpoint)")
    meta = json.loads((d / "model.json").read_text())
    enc_cfg = dict(meta["encoder_config"])
    cfg = AutoConfig.for_model(enc_cfg.pop("model_type"), **enc_cfg)
    encoder = AutoModel.from_config(cfg)
    if meta["kind"] == "student":
        model = Student(encoder, meta["num_labels"], meta["num_domains"], meta["teacher_hidden"], meta["pooling"])
    else:
        model = EncoderClassifier(encoder, meta["num_labels"], meta["num_domains"], meta["multitask"], meta["pooling"])
    model.load_state_dict(load_file(str(d / "model.safetensors")))
    return model.to(device)


# ----------------------------------------------------------------------------- inference latency


@dataclass
class Latency:
    """Milliseconds per example of an inference forward, per batch size, and how they were measured."""

    ms_per_example: dict[int, float]  # the median timed pass / batch size
    repeats: dict[int, int]  # timed passes per batch size
    warmup: int  # untimed passes before them, per batch size


@torch.no_grad()
def measure_latency(model: EncoderClassifier, batch: dict, batch_sizes=(1, 32), autocast=nullcontext,
                    warmup: int = 5, min_repeats: int = 5, min_seconds: float = 0.25,
                    max_repeats: int = 200) -> Latency:
    """Milliseconds per example of a forward pass in eval mode, on the model's device, for each batch size.

    Every pass runs within ``autocast()`` (the precision the model trains and is evaluated in).
    After ``warmup`` untimed passes (kernels chosen, memory pools filled), passes are timed one by
    one until at least ``min_repeats`` passes and ``min_seconds`` have gone (at most ``max_repeats``);
    the figure is the median pass, which a burst of other work on a shared device moves least.
    ``batch`` holds at least max(batch_sizes) examples... or fewer, then they are repeated.
    """
    model.eval()
    device = next(model.parameters()).device

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    n = len(batch["input_ids"])
    ms, repeats = {}, {}
    for bs in batch_sizes:
        idx = torch.arange(bs) % n
        inputs = {k: batch[k][idx].to(device) for k in ("input_ids", "attention_mask", "token_type_ids", "domains")}
        with autocast():
            for _ in range(warmup):
                model(**inputs)
            sync()
            times, began = [], time.perf_counter()
            while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - began < min_seconds):
                start = time.perf_counter()
                model(**inputs)
                sync()
                times.append(time.perf_counter() - start)
        ms[bs] = statistics.median(times) * 1000 / bs
        repeats[bs] = len(times)
    return Latency(ms, repeats, warmup)
