"""When to prune how much (cap-pruning spec §1.6)."""

from __future__ import annotations

import math


def cubic_keep(step: int, total_steps: int, dense_steps: int, final_steps: int, initial: float,
               final: float) -> float:
    """kappa_t of unstructured pruning (the released ``schedule_threshold``), with a = ``dense_steps``
    and b = ``final_steps`` already in steps (a·u and b·u of the spec):

        kappa_t = initial                                             t <= a
                = final                                               t >  T - b
                = final + (initial - final) (1 - (t - a) / (T - a - b))^3   otherwise.

    kappa is the kept fraction for topK and magnitude (1 -> 1 - sparsity) and the sigmoid
    threshold for soft movement (0 -> soft_final_threshold).
    """
    if total_steps < 1 or dense_steps < 0 or final_steps < 0:
        raise ValueError(f"need total_steps >= 1 and dense/final steps >= 0, got {total_steps}, {dense_steps}, "
                         f"{final_steps}")
    if step <= dense_steps:
        return float(initial)
    if step > total_steps - final_steps:
        return float(final)
    span = total_steps - dense_steps - final_steps
    return float(final + (initial - final) * (1.0 - (step - dense_steps) / span) ** 3)


def soft_lambda(keep: float, final_keep: float, final_lambda: float) -> float:
    """lambda_t = lambda_final · kappa_t / kappa_final: the soft-movement regulariser's weight."""
    return final_lambda * keep / final_keep


def structured_targets(sparsity: float, step: float) -> list[float]:
    """The cumulative sparsities of structured pruning: step, 2·step, ..., sparsity (CAP-f: 10 %
    steps). ValueError when ``sparsity`` is not a whole number of steps."""
    n = round(sparsity / step)
    if n < 1 or not math.isclose(n * step, sparsity, abs_tol=1e-9):
        raise ValueError(f"sparsity {sparsity} is not a whole number of steps of {step}")
    return [round((i + 1) * step, 12) for i in range(n)]


def pruned_counts(total: int, targets: list[float]) -> list[int]:
    """How many of ``total`` units are off after each step: floor(p · total) for each cumulative
    target p (the released ``determine_pruning_sequence``, cumulative rather than per step)."""
    return [int(math.floor(p * total + 1e-9)) for p in targets]
