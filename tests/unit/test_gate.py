"""The champion/challenger gate, one row per case."""

import pytest

from worker.gate import Champion, GateRules, evaluate_gate

pytestmark = pytest.mark.unit

CHAMP = Champion(version=3, model_sha256="c" * 64)
RULES = GateRules(min_value=0.6)


def m(best, baseline=None, init="c" * 64):
    return {"best_val_acc": best, "baseline_val_acc": baseline, "init_checkpoint_sha256": init}


CASES = [
    ("first model above the minimum", m(0.8, init=None), None, RULES, True, "first model"),
    ("first model below the minimum", m(0.55, init=None), None, RULES, False, "below the minimum"),
    ("better than the champion", m(0.9, 0.85), CHAMP, RULES, True, "beats champion v3 at 0.8500"),
    ("worse than the champion", m(0.8, 0.85), CHAMP, RULES, False, "does not beat"),
    ("a tie is not better", m(0.85, 0.85), CHAMP, RULES, False, "does not beat"),
    ("better but below the minimum", m(0.5, 0.4), CHAMP, RULES, False, "below the minimum"),
    ("a required margin not met", m(0.86, 0.85), CHAMP, GateRules(min_improvement=0.02), False, "needs +0.0200"),
    ("a required margin met", m(0.88, 0.85), CHAMP, GateRules(min_improvement=0.02), True, "beats"),
    ("a tolerated small loss", m(0.84, 0.85), CHAMP, GateRules(min_improvement=-0.02), True, "beats"),
    ("classes changed: no baseline", m(0.8, None), CHAMP, RULES, True, "the class list changed"),
    ("started from another model", m(0.8, 0.7, init="x" * 64), CHAMP, RULES, False, "the champion changed while it ran"),
    ("started from scratch", m(0.8, None, init=None), CHAMP, RULES, True, "the run started from scratch"),
    ("no metric at all", {"baseline_val_acc": 0.5}, CHAMP, RULES, False, "no numeric best_val_acc"),
    ("a boolean is not a metric", m(True), None, RULES, False, "no numeric"),
]


@pytest.mark.parametrize(("name", "metrics", "champion", "rules", "passed", "words"), CASES, ids=[c[0] for c in CASES])
def test_gate(name, metrics, champion, rules, passed, words):
    result = evaluate_gate(metrics, champion, rules)
    assert result.passed is passed
    assert words in result.reason


# --- exact results (each kills a mutant that survived `make mutate`) ----------------------------


@pytest.mark.parametrize("baseline", [float("nan"), float("inf"), "0.9"])
def test_a_baseline_that_is_not_a_finite_number_fails_the_gate(baseline):
    result = evaluate_gate(m(0.9, baseline), CHAMP, RULES)
    assert (result.passed, result.value, result.baseline) == (False, 0.9, None)
    assert result.reason.startswith("baseline_val_acc is ")
    assert result.reason.endswith("not a finite number: no fair comparison")


def test_the_minimum_and_the_margin_are_inclusive():
    assert evaluate_gate(m(0.6, init=None), None, RULES).passed is True
    margin = GateRules(min_improvement=0.25)
    assert evaluate_gate(m(0.75, 0.5), CHAMP, margin).passed is True  # exactly the margin (binary-exact values)
    assert evaluate_gate(m(0.5, 0.75), CHAMP, GateRules(min_value=0.1, min_improvement=-0.25)).passed is True


def test_results_carry_the_values_compared_and_read_exactly():
    first = evaluate_gate(m(0.8, init=None), None, RULES)
    assert (first.passed, first.value, first.baseline) == (True, 0.8, None)
    assert first.as_dict() == {
        "passed": True,
        "reason": "first model: best_val_acc 0.8000 meets the minimum 0.6000",
        "value": 0.8,
        "baseline": None,
    }
    low = evaluate_gate(m(0.5, init=None), None, RULES)
    assert (low.value, low.reason) == (0.5, "best_val_acc 0.5000 is below the minimum 0.6000")
    nan = evaluate_gate(m(float("nan")), CHAMP, RULES)
    assert (nan.passed, nan.value) == (False, None)
    better = evaluate_gate(m(0.9, 0.85), CHAMP, RULES)
    assert (better.value, better.baseline) == (0.9, 0.85)
    assert better.reason == "best_val_acc 0.9000 beats champion v3 at 0.8500 on the same validation set (+0.0500; strictly better)"
    one = GateRules(min_improvement=1.0)
    assert evaluate_gate(m(0.9, 0.85), CHAMP, one).reason.endswith("(+0.0500; needs +1.0000)")
    changed = evaluate_gate(m(0.8, None), CHAMP, RULES)
    assert changed.reason == "no like-for-like baseline (the class list changed); best_val_acc 0.8000 meets the minimum 0.6000"
    assert changed.value == 0.8
    elsewhere = evaluate_gate(m(0.8, None, init="x" * 64), CHAMP, RULES)
    assert (elsewhere.passed, elsewhere.value, elsewhere.baseline) == (False, 0.8, None)
    assert elsewhere.reason == (
        "the champion is v3 but this run trained from another model (its init checkpoint xxxxxxxxxxxx is not v3): the champion "
        "changed while it ran, so there is no like-for-like comparison; retrain from the current champion (retrain inject --force)"
    )
    scratch = evaluate_gate(m(0.8, None, init=None), CHAMP, RULES)
    assert scratch.reason == "no like-for-like baseline (the run started from scratch); best_val_acc 0.8000 meets the minimum 0.6000"


def test_a_broken_baseline_is_quoted_in_the_reason_cut_to_40_characters():
    assert evaluate_gate(m(0.9, float("nan")), CHAMP, RULES).reason == "baseline_val_acc is nan, not a finite number: no fair comparison"
    long = "x" * 60
    assert evaluate_gate(m(0.9, long), CHAMP, RULES).reason == f"baseline_val_acc is {'x' * 40}, not a finite number: no fair comparison"


def test_a_perfect_champion_gets_a_hint_instead_of_a_bare_not_strictly_better():
    stuck = evaluate_gate(m(1.0, 1.0), CHAMP, RULES)
    assert stuck.passed is False
    assert stuck.reason.endswith(
        "; the champion is already perfect on this validation set, so nothing beats it strictly: accept ties with "
        "gate.min_improvement below 0, or validate on more images"
    )
    assert "perfect" not in evaluate_gate(m(0.9, 0.95), CHAMP, RULES).reason
    assert evaluate_gate(m(1.0, 1.0), CHAMP, GateRules(min_improvement=-0.01)).passed is True
