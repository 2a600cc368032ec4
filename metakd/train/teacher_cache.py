"""The frozen teacher, computed once (``distill.teacher_cache``).

Outputs: when a teacher is published, ``outputs.safetensors`` beside its weights holds, for every
training example of the prepared data (row = the example's ``index``), its logits f_T(x), its
domain representation r_T(x) and p_gold = softmax(f_T(x))[y]. Stage 2, the lambda_i weights
and the L_TKD target read these rows instead of running the teacher, in every student trial
that shares the teacher.

States: stage 1 / joint also need the teacher's hidden states at layers 0 and g(j) and its
attention maps at layers g(j). They are computed once per student job for the target domain
and kept on the device in fp16 when they fit ``distill.teacher_cache_gb``; otherwise the teacher
runs on every batch. Rows are stored at the split's full length; a batch cut to its longest
sequence takes the first ``S`` positions (padding positions are masked out of every loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..config import ExperimentConfig
from .sharded import sharded_forward

OUTPUTS_FILE = "outputs.safetensors"


# ----------------------------------------------------------------------------- outputs (per teacher)


def compute_outputs(model, split, runtime, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """logits [M, C], domain_repr [M, H], p_gold [M] (fp32, CPU) with row = ``split.index`` (M = max index + 1)."""
    def rows(out, batch):
        logits = out.logits.float()
        p_gold = logits.softmax(-1).gather(1, batch["labels"][:, None]).squeeze(1)
        return {"logits": logits, "domain_repr": out.domain_repr.float(), "p_gold": p_gold}

    res = sharded_forward(model, split, rows, runtime, precision)
    size = int(split.index.max()) + 1 if len(split) else 0
    by_index = {}
    for name, value in res.items():
        by_index[name] = torch.zeros((size, *value.shape[1:]), dtype=value.dtype)
        by_index[name][split.index] = value
    return by_index


def save_outputs(outputs: dict[str, torch.Tensor], directory: str, data_key: str) -> None:
    save_file({k: v.contiguous() for k, v in outputs.items()}, f"{directory}/{OUTPUTS_FILE}",
              metadata={"data_key": data_key})


class TeacherOutputs:
    """The stored outputs on the device; ``lookup(index)`` -> (logits, domain_repr) of a batch."""

    def __init__(self, outputs: dict[str, torch.Tensor], device):
        self.logits = outputs["logits"].to(device)
        self.domain_repr = outputs["domain_repr"].to(device)
        self.p_gold = outputs["p_gold"].to(device)

    def lookup(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits[index], self.domain_repr[index]

    @classmethod
    def load(cls, directory: str, data_key: str, device) -> "TeacherOutputs | None":
        """The outputs stored with a teacher, or None when there are none (a teacher published
        before they existed) or they belong to other prepared data."""
        path = f"{directory}/{OUTPUTS_FILE}"
        try:
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                if (f.metadata() or {}).get("data_key") != data_key:
                    return None
        except (FileNotFoundError, OSError):
            return None
        return cls(load_file(path), device)


# ----------------------------------------------------------------------------- states (per student job)


def states_bytes(n: int, seq: int, hidden: int, teacher_heads: int, student_heads: int, layers: list[int]) -> int:
    """fp16 bytes of hidden states (layers 0 and g(j)) and attention maps (layers g(j)) of ``n`` examples;
    with different head counts L_attn compares head-averaged maps, so one averaged map per layer is kept."""
    g = len(set(layers))
    heads = teacher_heads if teacher_heads == student_heads else 1
    return 2 * n * ((1 + g) * seq * hidden + g * heads * seq * seq)


class TeacherStates:
    """hidden [N, 1+G, S, H] and attention [N, G, heads, S, S] (fp16, on the device) of a split;
    ``lookup(index, length)`` gives the Output-shaped tuples of a batch, cut to ``length``."""

    def __init__(self, hidden: torch.Tensor, attention: torch.Tensor, index: torch.Tensor, layers: list[int],
                 num_layers: int):
        self.hidden, self.attention, self.layers, self.num_layers = hidden, attention, sorted(set(layers)), num_layers
        self.row = torch.full((int(index.max()) + 1,), -1, dtype=torch.long, device=hidden.device)
        self.row[index.to(hidden.device)] = torch.arange(len(index), device=hidden.device)

    def lookup(self, index: torch.Tensor, length: int) -> tuple[tuple, tuple]:
        rows = self.row[index]
        hidden = self.hidden[rows, :, :length]
        attention = self.attention[rows, :, :, :length, :length]
        hs: list = [None] * (self.num_layers + 1)
        att: list = [None] * self.num_layers
        hs[0] = hidden[:, 0]
        for pos, g in enumerate(self.layers):
            hs[g] = hidden[:, pos + 1]
            att[g - 1] = attention[:, pos]
        return tuple(hs), tuple(att)

    @classmethod
    def compute(cls, teacher, split, layers: list[int], student_heads: int, runtime,
                precision: str = "fp32") -> "TeacherStates":
        keep = sorted(set(layers))
        seq = split.input_ids.shape[1]
        average = teacher.encoder.config.num_attention_heads != student_heads

        def rows(out, batch):
            pad = seq - batch["input_ids"].shape[1]
            hidden = torch.stack([out.hidden_states[g] for g in [0, *keep]], 1).half()
            att = torch.stack([out.attentions[g - 1] for g in keep], 1)
            att = (att.mean(2, keepdim=True) if average else att).half()
            return {"hidden": F.pad(hidden, (0, 0, 0, pad)), "attention": F.pad(att, (0, pad, 0, pad))}

        res = sharded_forward(teacher, split, rows, runtime, precision, keep_on_device=True,
                              forward_kwargs={"output_states": True, "layers": keep})
        return cls(res["hidden"], res["attention"], split.index, keep, teacher.num_layers)


# ----------------------------------------------------------------------------- what a student job uses


def teacher_caches(teacher, teacher_dir: str | None, prepared, split, cfg: ExperimentConfig, runtime,
                   layers: list[int], student_heads: int, needs_states: bool):
    """(TeacherOutputs | None, TeacherStates | None) for a student job on ``split``; (None, None) with
    ``distill.teacher_cache: off``. Outputs come from the teacher's stored file, or are computed
    here once for ``split`` when it has none. States are kept when they fit the budget."""
    d = cfg.distill
    if d.teacher_cache == "off":
        return None, None
    outputs = TeacherOutputs.load(teacher_dir, prepared.key, runtime.device) if teacher_dir else None
    if not runtime.agree(outputs is not None):  # computing them is a collective: every rank or none
        outputs = TeacherOutputs(compute_outputs(teacher, split, runtime, cfg.precision), runtime.device)
        runtime.log(f"teacher cache: no stored outputs in {teacher_dir}; computed them for {len(split)} examples")
    states = None
    if needs_states:
        cfg_t = teacher.encoder.config
        size = states_bytes(len(split), split.input_ids.shape[1], cfg_t.hidden_size, cfg_t.num_attention_heads,
                            student_heads, layers)
        budget = d.teacher_cache_gb * 2**30
        if runtime.device.type == "cuda":
            budget = min(budget, 0.5 * torch.cuda.mem_get_info(runtime.device)[0])
        # rank 0 decides for all ranks: computing the states is a collective
        if runtime.agree(size <= budget):
            states = TeacherStates.compute(teacher, split, layers, student_heads, runtime, cfg.precision)
        where = f"kept on {runtime.device}" if states is not None else "over budget: recomputed every batch"
        runtime.log(f"teacher cache: stage-1 states {size / 2**30:.2f} GiB {where}")
    return outputs, states
