"""The champion/challenger gate: a pure function of the run's metrics, the champion and the rules.

Like is compared with like: train.py evaluates its init checkpoint (the champion) on this run's
own validation set before training and records it as `baseline_val_acc`, so the challenger's
`best_val_acc` and the baseline come from the same images, the same preprocessing, the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GateRules:
    metric: str = "best_val_acc"
    baseline_metric: str = "baseline_val_acc"
    min_value: float = 0.6  # a model below this is never registered
    min_improvement: float = 0.0  # 0: strictly better than the champion; >0 a margin; <0 tolerate a small loss


@dataclass(frozen=True)
class Champion:
    version: int
    model_sha256: str


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str
    value: float | None
    baseline: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason, "value": self.value, "baseline": self.baseline}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def evaluate_gate(metrics: dict[str, Any], champion: Champion | None, rules: GateRules) -> GateResult:
    value = metrics.get(rules.metric)
    if not isinstance(value, int | float) or isinstance(value, bool):
        return GateResult(False, f"metrics.json has no numeric {rules.metric}", None, None)
    if not _finite(value):  # NaN passes every comparison it is in; infinity beats every champion
        return GateResult(False, f"{rules.metric} is {value}, not a finite number: the run diverged or its metrics are broken", None, None)
    value = float(value)
    if value < rules.min_value:
        return GateResult(False, f"{rules.metric} {value:.4f} is below the minimum {rules.min_value:.4f}", value, None)
    if champion is None:
        return GateResult(True, f"first model: {rules.metric} {value:.4f} meets the minimum {rules.min_value:.4f}", value, None)
    baseline = metrics.get(rules.baseline_metric)
    started_from = metrics.get("init_checkpoint_sha256")
    if started_from is not None and started_from != champion.model_sha256:
        # The champion changed while the run trained (a rollback or a promotion): its baseline is
        # another model's, and passing it on the minimum alone would undo the operator's choice.
        return GateResult(
            False,
            f"the champion is v{champion.version} but this run trained from another model (its init checkpoint "
            f"{str(started_from)[:12]} is not v{champion.version}): the champion changed while it ran, so there is no "
            "like-for-like comparison; retrain from the current champion (retrain inject --force)",
            value,
            None,
        )
    if baseline is None:
        why = "the class list changed" if started_from is not None else "the run started from scratch"
        return GateResult(
            True, f"no like-for-like baseline ({why}); {rules.metric} {value:.4f} meets the minimum {rules.min_value:.4f}", value, None
        )
    if not _finite(baseline):
        return GateResult(False, f"{rules.baseline_metric} is {str(baseline)[:40]}, not a finite number: no fair comparison", value, None)
    baseline = float(baseline)
    gain = value - baseline
    passed = gain > 0 if rules.min_improvement == 0 else gain >= rules.min_improvement
    verdict = "beats" if passed else "does not beat"
    need = "strictly better" if rules.min_improvement == 0 else f"needs {rules.min_improvement:+.4f}"
    # A perfect champion cannot be beaten strictly: say so, or every retrain is rejected without a hint.
    hint = (
        "; the champion is already perfect on this validation set, so nothing beats it strictly: accept ties with "
        "gate.min_improvement below 0, or validate on more images"
        if not passed and baseline >= 1.0 and rules.min_improvement >= 0
        else ""
    )
    return GateResult(
        passed,
        f"{rules.metric} {value:.4f} {verdict} champion v{champion.version} at {baseline:.4f} on the same validation set ({gain:+.4f}; {need}){hint}",
        value,
        baseline,
    )
