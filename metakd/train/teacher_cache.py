"""The frozen teacher, computed once (``distill.teacher_cache``).

Outputs: when a teacher is published, ``outputs.safetensors`` beside its weights holds, for every
training example of the prepared data (row = the example's ``index``), its logits f_T(x), its
domain representation r_T(x), r_T's pre-tanh value (``distill.tkd: pre_tanh_shared``),
p_gold = softmax(f_T(x))[y] and z_T(x), what its classifier reads (``pooled``: a pruned student's
FiC bank, :func:`stored_pooled`). Stage 2, the lambda_i weights and the L_TKD target read these rows
instead of running the teacher, in every student trial that shares the teacher.

States: stage 1 / joint also need the teacher's hidden states at layers 0 and g(j) and its
attention maps at layers g(j) (probabilities, or with ``distill.attention: scores`` the pre-softmax
scores: 0 on padded pairs and far inside fp16's range, but not in [0, 1], so fp16's relative
rounding (2^-11) applies to values of size ~1-10; the README states the measured effect). They
are computed once per student job for the target domain and kept on the device in fp16 when they
fit ``distill.teacher_cache_gb``; otherwise the teacher runs on every batch. Rows are stored at the
split's full length; a batch cut to its longest sequence takes the first ``S`` positions (padding
positions are masked out of every loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..config import ExperimentConfig
from .sharded import sharded_forward

OUTPUTS_FILE = "outputs.safetensors"


# ----------------------------------------------------------------------------- outputs (per teacher)


def compute_outputs(model, split, runtime, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """logits [M, C], domain_repr [M, H], domain_pre_tanh [M, H], p_gold [M], pooled [M, H] (fp32, CPU)
    with row = ``split.index`` (M = max index + 1)."""
    def rows(out, batch):
        logits = out.logits.float()
        p_gold = logits.softmax(-1).gather(1, batch["labels"][:, None]).squeeze(1)
        return {"logits": logits, "domain_repr": out.domain_repr.float(),
                "domain_pre_tanh": out.domain_pre_tanh.float(), "p_gold": p_gold, "pooled": out.pooled.float()}

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
        self.domain_pre_tanh = outputs["domain_pre_tanh"].to(device)
        self.p_gold = outputs["p_gold"].to(device)

    def lookup(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits[index], self.domain_repr[index]

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {k: t for k, t in vars(self).items() if isinstance(t, torch.Tensor)}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors().values())

    def to(self, device) -> "TeacherOutputs":
        return TeacherOutputs(self._tensors(), device)

    @classmethod
    def load(cls, directory: str, data_key: str, device) -> "TeacherOutputs | None":
        """The outputs stored with a teacher, or None when there are none (a teacher published
        before they existed) or they belong to other prepared data."""
        # only what distillation reads (not z_T, a pruned student's FiC bank: stored_pooled); None also for
        # outputs written before the pre-tanh r_T was stored
        stored = _read_outputs(directory, data_key, ("logits", "domain_repr", "domain_pre_tanh", "p_gold"))
        return None if stored is None else cls(stored, device)


def stored_pooled(directory: str | None, data_key: str) -> torch.Tensor | None:
    """z_T(x) of every training example (row = ``index``, [M, H] fp32 on the CPU) stored with the teacher
    in ``directory``; None when there is none (no teacher, a teacher published before ``pooled`` was
    stored, or outputs of other prepared data)."""
    stored = _read_outputs(directory, data_key, ("pooled",)) if directory is not None else None
    return None if stored is None else stored["pooled"]


def _read_outputs(directory: str, data_key: str, names: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
    """The tensors ``names`` of the outputs stored in ``directory``; None when there are none, they
    belong to other prepared data, or one of ``names`` is missing (written by an older version)."""
    from safetensors import safe_open

    try:
        with safe_open(f"{directory}/{OUTPUTS_FILE}", "pt") as f:
            if (f.metadata() or {}).get("data_key") != data_key or not set(names) <= set(f.keys()):
                return None
            return {name: f.get_tensor(name) for name in names}
    except (FileNotFoundError, OSError):
        return None


# ----------------------------------------------------------------------------- states (per student job)


def states_bytes(n: int, seq: int, hidden: int, teacher_heads: int, student_heads: int, layers: list[int]) -> int:
    """fp16 bytes of hidden states (layers 0 and g(j)) and attention maps (layers g(j)) of ``n`` examples;
    with different head counts L_attn compares head-averaged maps, so one averaged map per layer is kept."""
    g = len(set(layers))
    heads = teacher_heads if teacher_heads == student_heads else 1
    return 2 * n * ((1 + g) * seq * hidden + g * heads * seq * seq)


class TeacherStates:
    """hidden [N, 1+G, S, H] and attention [N, G, heads, S, S] (fp16, on the device) of a split;
    ``lookup(index, length)`` gives the Output-shaped tuples of a batch, cut to ``length``.
    ``attention_mode``: what the maps are (probs | scores, ``distill.attention``)."""

    def __init__(self, hidden: torch.Tensor, attention: torch.Tensor, index: torch.Tensor, layers: list[int],
                 num_layers: int, attention_mode: str = "probs"):
        self.hidden, self.attention, self.layers, self.num_layers = hidden, attention, sorted(set(layers)), num_layers
        self.attention_mode = attention_mode
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
                precision: str = "fp32", attention: str = "probs") -> "TeacherStates":
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
                              forward_kwargs={"output_states": True, "layers": keep, "attention": attention})
        return cls(res["hidden"], res["attention"], split.index, keep, teacher.num_layers, attention)


# ----------------------------------------------------------------------------- the budget (per worker)


@dataclass(frozen=True)
class MemoryReport:
    """A CUDA device's memory as this process sees it, in bytes."""

    total: int  # the device's memory
    free: int  # held by no process (cudaMemGetInfo)
    reserved: int  # held by this process's caching allocator
    allocated: int  # in this process's live tensors (<= reserved)

    @classmethod
    def of(cls, device) -> "MemoryReport":
        free, total = torch.cuda.mem_get_info(device)
        return cls(total, free, torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device))


CUDA_CONTEXT_BYTES = 512 * 2**20  # a process's CUDA context: on the device, in no torch counter
CACHE_FRACTION = 0.5  # of what a worker can still use; the rest is the training step's (activations, AdamW)


def cache_budget(cap_bytes: float, memory: MemoryReport | None = None, gpu_share: float = 1.0,
                 fraction: float = CACHE_FRACTION, context_bytes: int = CUDA_CONTEXT_BYTES) -> int:
    """Bytes the teacher cache (outputs and stage-1 states) of one worker may take on its device.

    On a CPU (no ``memory``): ``cap_bytes`` (``distill.teacher_cache_gb``). On a GPU, also at most
    ``fraction`` of what this worker can still use:

        min(gpu_share * total - allocated - context,  free + (reserved - allocated))

    The first term is what is left of its share of the device (``gpu_share`` = 0.25 when four
    workers share a GPU, ``student_gpus_per_worker``) after its own tensors and CUDA context, so
    workers on one GPU do not each plan on the whole of it. The second is what it can get now:
    memory no process holds, plus what its own allocator reserved and freed (reusable here,
    though ``mem_get_info`` counts it as used).
    """
    if memory is None:
        return int(max(0.0, cap_bytes))
    share_left = gpu_share * memory.total - memory.allocated - context_bytes
    obtainable = memory.free + (memory.reserved - memory.allocated)
    return int(max(0.0, min(cap_bytes, fraction * min(share_left, obtainable))))


def free_device_memory() -> None:
    """Give what a failed allocation left behind back: drop unreachable tensors, then the CUDA
    allocator's free blocks (so the next, smaller allocations, and other processes, can have them)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- what a student job uses


def teacher_caches(teacher, teacher_dir: str | None, prepared, split, cfg: ExperimentConfig, runtime,
                   layers: list[int], student_heads: int, needs_states: bool):
    """(TeacherOutputs | None, TeacherStates | None) for a student job on ``split``; (None, None) with
    ``distill.teacher_cache: off``. Outputs come from the teacher's stored file, or are computed
    here once for ``split`` when it has none. Outputs, then states, are kept on the device while they
    fit :func:`cache_budget` (``runtime.gpu_share`` of the GPU); what does not fit, or runs out of
    device memory while it is built (one worker: DDP ranks must agree, so there it fails the job), is
    recomputed by a teacher forward on every batch, and the log says so once."""
    d = cfg.distill
    if d.teacher_cache == "off":
        return None, None
    memory = MemoryReport.of(runtime.device) if runtime.device.type == "cuda" else None
    budget = cache_budget(d.teacher_cache_gb * 2**30, memory, getattr(runtime, "gpu_share", 1.0))
    share = f" ({runtime.gpu_share:g} of the GPU)" if memory is not None and getattr(runtime, "gpu_share", 1.0) < 1 \
        else ""
    runtime.log(f"teacher cache: budget {budget / 2**30:.2f} GiB on {runtime.device}{share}")

    def on_device(build, what: str, size: int):
        """build() when ``size`` fits what is left of the budget (rank 0 decides for all), else None."""
        nonlocal budget
        if not runtime.agree(size <= budget):
            runtime.log(f"teacher cache: {what} {size / 2**30:.2f} GiB over the budget "
                        f"({budget / 2**30:.2f} GiB left): the teacher runs on every batch")
            return None
        try:
            value = build()
        except torch.cuda.OutOfMemoryError as e:
            if runtime.world_size > 1:
                raise
            message = str(e).splitlines()[0]
        else:
            budget -= size
            return value
        free_device_memory()
        runtime.log(f"teacher cache: out of memory while putting the {what} on {runtime.device} ({message}): "
                    f"the teacher runs on every batch")
        return None

    stored = TeacherOutputs.load(teacher_dir, prepared.key, "cpu") if teacher_dir else None
    if not runtime.agree(stored is not None):  # computing them is a collective: every rank or none
        stored = TeacherOutputs(compute_outputs(teacher, split, runtime, cfg.precision), "cpu")
        runtime.log(f"teacher cache: no stored outputs in {teacher_dir}; computed them for {len(split)} examples")
    outputs = on_device(lambda: stored.to(runtime.device), "outputs", stored.nbytes)
    states = None
    if needs_states:
        cfg_t = teacher.encoder.config
        size = states_bytes(len(split), split.input_ids.shape[1], cfg_t.hidden_size, cfg_t.num_attention_heads,
                            student_heads, layers)

        def compute_states():
            return TeacherStates.compute(teacher, split, layers, student_heads, runtime, cfg.precision, d.attention)

        states = on_device(compute_states, "stage-1 states", size)
        if states is not None:
            runtime.log(f"teacher cache: stage-1 states {size / 2**30:.2f} GiB kept on {runtime.device}")
    return outputs, states
