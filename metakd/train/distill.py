"""The Distiller: the loss steps of distilling one student from its frozen teacher (spec section 3),
shared by dense students (:mod:`metakd.train.student`) and pruned ones (:mod:`metakd.train.pruned`)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..config import ExperimentConfig
from ..losses import (attention_mse, domain_expertise_weights, hidden_mse, layer_map, pred_divergence,
                      soft_cross_entropy, tkd_loss, weighted_mean)
from .runtime import unwrap
from .teacher_cache import TeacherOutputs, TeacherStates, free_device_memory


class Distiller:
    """The loss steps of distillation: L_KD = (1/N) sum_i lambda_i (L_embd + L_hidn + L_attn + L_pred + gamma2 L_TKD).

    The teacher's side of each batch comes from ``outputs`` (logits, r_T) and ``states`` (hidden
    states, attention maps) when they are given (:mod:`metakd.train.teacher_cache`), else from a
    teacher forward. Loss inputs are cast to fp32 whatever precision the forward ran in.

    The released code's forms (``distill``): ``attention: scores`` fits pre-softmax scores in L_attn
    (the default; ``probs``: probabilities); ``pred_weighting: none`` adds mean_i L_pred,i instead of
    weighting it by lambda_i; ``tkd: pre_tanh_shared`` adds gamma2 mean(lambda) mean_i L_TKD,i on the
    pre-tanh r(x), the student's mapped by W_h.
    """

    def __init__(self, teacher, student, cfg: ExperimentConfig, meta: bool, scores: torch.Tensor | None,
                 outputs: TeacherOutputs | None = None, states: TeacherStates | None = None, log=print):
        d = cfg.distill
        self.teacher, self.meta, self.scores, self.log = teacher, meta, scores, log
        self.outputs, self.states = outputs, states
        self.gamma2 = d.gamma2 if meta else 0.0
        self.temperature, self.pred_loss = d.temperature, d.pred_loss
        self.attention, self.pred_weighting, self.tkd = d.attention, d.pred_weighting, d.tkd
        if states is not None and states.attention_mode != self.attention:
            raise ValueError(f"the cached teacher states hold attention {states.attention_mode}, but "
                             f"distill.attention is {self.attention}")
        self.layers = layer_map(unwrap(student).num_layers, teacher.num_layers, d.layer_map)

    def _targets(self, batch, states: bool) -> SimpleNamespace:
        """The teacher's side of ``batch`` (:meth:`_teacher_side`). When the device runs out of memory
        while the cache is in use, the cache is dropped (said once) and the teacher runs from then on;
        without a cache an out-of-memory error is the training step's own, and fails the job."""
        try:
            return self._teacher_side(batch, states)
        except torch.cuda.OutOfMemoryError as e:
            if self.outputs is None and self.states is None:
                raise
            message = str(e).splitlines()[0]
        self.outputs = self.states = None
        free_device_memory()
        self.log(f"teacher cache: out of memory while using it ({message}): dropped, the teacher runs on every "
                 f"batch from now on")
        return self._teacher_side(batch, states)

    def _teacher_side(self, batch, states: bool) -> SimpleNamespace:
        """logits, domain_repr (r_T, or its pre-tanh value with ``tkd: pre_tanh_shared``) and (with
        ``states``) hidden_states / attentions of the teacher for ``batch``."""
        t_out = None
        pre_tanh = self.tkd == "pre_tanh_shared"
        if self.outputs is None or (states and self.states is None):
            with torch.no_grad():
                t_out = self.teacher(**batch, output_states=states, layers=self.layers, attention=self.attention)
        if self.outputs is not None:
            logits, domain_repr = self.outputs.lookup(batch["index"])
            if pre_tanh:
                domain_repr = self.outputs.domain_pre_tanh[batch["index"]]
        else:
            logits, domain_repr = t_out.logits, t_out.domain_pre_tanh if pre_tanh else t_out.domain_repr
        hidden = attentions = None
        if states:
            if self.states is not None:
                hidden, attentions = self.states.lookup(batch["index"], batch["input_ids"].shape[1])
            else:
                hidden, attentions = t_out.hidden_states, t_out.attentions
        return SimpleNamespace(logits=logits.float(), domain_repr=domain_repr.float(), hidden_states=hidden,
                               attentions=attentions)

    def _weights(self, t, batch) -> torch.Tensor:
        if not self.meta:
            return torch.ones_like(batch["labels"], dtype=torch.float32)
        if self.scores.device != t.logits.device:
            self.scores = self.scores.to(t.logits.device)  # once, not every step
        return domain_expertise_weights(t.logits, batch["labels"], self.scores[batch["index"]])

    def _layers(self, model, s_out, t, mask) -> torch.Tensor:
        """L_embd + L_hidn + L_attn per example, [N]."""
        proj = unwrap(model).hidden_proj
        per = hidden_mse(proj(s_out.hidden_states[0]).float(), t.hidden_states[0].float(), mask)  # L_embd
        for j, g in enumerate(self.layers, start=1):
            per = per + hidden_mse(proj(s_out.hidden_states[j]).float(), t.hidden_states[g].float(), mask)  # L_hidn
            per = per + attention_mse(s_out.attentions[j - 1].float(), t.attentions[g - 1].float(), mask)  # L_attn
        return per

    def _tkd(self, model, s_out, t) -> torch.Tensor:
        """L_TKD per example, [N]: MSE(r_S W_d, r_T), or (pre_tanh_shared) of the pre-tanh values through W_h."""
        student = unwrap(model)
        if self.tkd == "pre_tanh_shared":
            return tkd_loss(student.hidden_proj(s_out.domain_pre_tanh).float(), t.domain_repr)
        return tkd_loss(student.repr_proj(s_out.domain_repr).float(), t.domain_repr)

    def _loss(self, model, s_out, t, batch, intermediate: bool, pred: bool) -> torch.Tensor:
        """(1/N) sum_i lambda_i (L_layers,i + gamma2 L_TKD,i + L_pred,i), each term where asked for, except
        pred_weighting none: + (1/N) sum_i L_pred,i; tkd pre_tanh_shared: + gamma2 mean(lambda) (1/N) sum_i L_TKD,i."""
        w = self._weights(t, batch)
        weighted, plain = torch.zeros_like(w), w.new_zeros(())
        if intermediate:
            weighted = weighted + self._layers(model, s_out, t, batch["attention_mask"])
            if self.gamma2:
                tkd = self._tkd(model, s_out, t)
                if self.tkd == "pre_tanh_shared":
                    plain = plain + self.gamma2 * w.mean() * tkd.mean()
                else:
                    weighted = weighted + self.gamma2 * tkd
        if pred:
            if self.pred_weighting == "none":
                plain = plain + self._pred(s_out, t).mean()
            else:
                weighted = weighted + self._pred(s_out, t)
        return weighted_mean(weighted, w) + plain

    def _pred(self, s_out, t) -> torch.Tensor:
        if self.pred_loss == "kl":  # the spec's soft cross-entropy: same gradient as KL(P||Q)
            return soft_cross_entropy(s_out.logits.float(), t.logits, self.temperature)
        return pred_divergence(s_out.logits.float(), t.logits, self.pred_loss, self.temperature)

    def stage1(self, model, batch):
        t = self._targets(batch, True)
        s_out = model(**batch, output_states=True, attention=self.attention)
        return self._loss(model, s_out, t, batch, intermediate=True, pred=False)

    def stage2(self, model, batch):
        t = self._targets(batch, False)
        return self._loss(model, model(**batch), t, batch, intermediate=False, pred=True)

    def joint(self, model, batch):
        t = self._targets(batch, True)
        s_out = model(**batch, output_states=True, attention=self.attention)
        return self._loss(model, s_out, t, batch, intermediate=True, pred=True)
