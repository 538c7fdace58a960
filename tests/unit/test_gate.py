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
    ("started from another model", m(0.8, 0.9, init="x" * 64), CHAMP, RULES, True, "did not start from the current champion"),
    ("no metric at all", {"baseline_val_acc": 0.5}, CHAMP, RULES, False, "no numeric best_val_acc"),
    ("a boolean is not a metric", m(True), None, RULES, False, "no numeric"),
]


@pytest.mark.parametrize(("name", "metrics", "champion", "rules", "passed", "words"), CASES, ids=[c[0] for c in CASES])
def test_gate(name, metrics, champion, rules, passed, words):
    result = evaluate_gate(metrics, champion, rules)
    assert result.passed is passed
    assert words in result.reason
