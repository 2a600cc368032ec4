"""The table of methods: what each method trains and what its student reads. Every other module
asks this table; adding a method is a row here plus its tests.

method            teacher kind     teacher trained on       student distils with
metakd            meta             all K domains            lambda_i (domain expertise), L_TKD (gamma2)
metakd_no_target  meta_no_target   the K-1 other domains    same
kd_single         single           the target domain only   unweighted layer-wise KD
kd_mix            mix              all K domains            unweighted layer-wise KD
kd_mtl            mtl              all K domains, a head    unweighted layer-wise KD
                                   per domain
student_ft        (none)           -                        fine-tuning only, no teacher

Teacher kinds (:data:`TEACHER_KINDS`): the meta kinds weight each example's cross-entropy by its
prototype score t_i and add gamma1 L_TDA (spec section 2); the others train with plain CE.
Imports nothing from the package: config, the loops, the jobs and the reports all read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TeacherKind:
    name: str
    trains_on: str  # "all" domains, the "target" domain only, or the "others" (all but the target)
    meta: bool  # prototype-weighted CE + gamma1 L_TDA, and prototype scores saved for its students
    multitask: bool = False  # one classifier head per domain

    @property
    def per_domain(self) -> bool:
        """One teacher per target domain (else one shared by every domain's student)."""
        return self.trains_on != "all"

    def domain_ids(self, target: str | None, domains: list[str]) -> list[int]:
        """Indices of the domains this teacher trains on."""
        if self.trains_on == "target":
            return [domains.index(target)]
        if self.trains_on == "others":
            return [i for i, d in enumerate(domains) if d != target]
        return list(range(len(domains)))


TEACHER_KINDS = {k.name: k for k in (
    TeacherKind("meta", "all", meta=True),
    TeacherKind("meta_no_target", "others", meta=True),
    TeacherKind("single", "target", meta=False),
    TeacherKind("mix", "all", meta=False),
    TeacherKind("mtl", "all", meta=False, multitask=True),
)}

# ``distill`` settings that only distillation reads: a fine-tuned student's key leaves them out.
DISTILL_FIELDS = ("gamma2", "schedule", "stage1_epochs", "stage1_lr", "stage2_epochs", "stage2_lr", "temperature",
                  "pred_loss", "teacher_cache", "teacher_cache_gb", "attention", "stage1_schedule", "pred_weighting",
                  "tkd")
# ``distill`` settings that only the domain-expertise methods read (lambda_i, L_TKD): a baseline
# student's key leaves them out, so a gamma2 sweep shares every baseline student. pred_weighting
# reweights by lambda_i, which is 1 for a baseline; tkd is the form of L_TKD, which a baseline lacks.
DOMAIN_EXPERTISE_FIELDS = ("gamma2", "pred_weighting", "tkd")


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # how tables and plots name it (the paper's row)
    teacher: str | None  # a key of TEACHER_KINDS; None: fine-tuned without a teacher
    domain_expertise: bool = False  # lambda_i from the teacher's prototype scores, and gamma2 L_TKD
    min_domains: int = 1

    @property
    def distills(self) -> bool:
        return self.teacher is not None

    @property
    def teacher_kind(self) -> TeacherKind | None:
        return TEACHER_KINDS[self.teacher] if self.teacher else None

    def student_distill(self, distill: dict, kind: "StudentKind | None" = None) -> dict:
        """The ``distill`` settings this method's student (of ``kind``; default dense) reads (what its key hashes)."""
        drop = DISTILL_FIELDS if not self.distills else () if self.domain_expertise else DOMAIN_EXPERTISE_FIELDS
        drop = (*drop, *(kind.ignores if kind is not None else ()))
        return {k: v for k, v in distill.items() if k not in drop}


# In table order: the baselines first, Meta-KD last (the paper's main tables).
_ROWS = (
    Method("student_ft", "fine-tuned student", None),
    Method("kd_single", "KD from a single-domain teacher", "single"),
    Method("kd_mix", "KD from a mixed-domain teacher", "mix"),
    Method("kd_mtl", "KD from a multi-task teacher", "mtl"),
    Method("metakd_no_target", "Meta-KD, target domain unseen", "meta_no_target", domain_expertise=True,
           min_domains=2),
    Method("metakd", "Meta-KD", "meta", domain_expertise=True),
)
METHODS: dict[str, Method] = {m.name: m for m in _ROWS}
METHOD_NAMES = tuple(METHODS)


def method(name: str) -> Method:
    """The row of ``name``; a KeyError names the allowed methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a method; allowed: {', '.join(METHOD_NAMES)}") from None


@dataclass(frozen=True)
class StudentKind:
    """What a student is. ``ignores``: the ``distill`` settings it never reads, left out of its key."""
    name: str
    label: str
    ignores: tuple[str, ...] = ()


# A pruned student (student.prune, the cap-pruning spec) trains one joint stage with its own epochs,
# learning rate and weight decay; with base_loss cap it distils logits at its own temperature instead
# of the method's L_KD, so it reads none of the L_KD settings either.
_PRUNED_IGNORES = ("schedule", "stage1_epochs", "stage1_lr", "stage2_epochs", "stage2_lr", "stage1_schedule",
                   "epochs", "lr", "weight_decay")
_CAP_LOSS_IGNORES = (*_PRUNED_IGNORES, "gamma2", "temperature", "pred_loss", "attention", "pred_weighting", "tkd",
                     "layer_map", "teacher_cache_gb")
STUDENT_KINDS: dict[str, StudentKind] = {k.name: k for k in (
    StudentKind("dense", "a smaller encoder, distilled (or fine-tuned)"),
    StudentKind("pruned", "the teacher's architecture pruned (CAP), trained with the method's own L_KD",
                _PRUNED_IGNORES),
    StudentKind("pruned_cap", "the teacher's architecture pruned (CAP), trained with CAP's released CE + logit KD",
                _CAP_LOSS_IGNORES),
)}
