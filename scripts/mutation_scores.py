"""The mutation score per module from mutmut's results (`mutants/**/*.meta`), after `make mutate`.

    python scripts/mutation_scores.py [--survivors]

mutmut records an exit code per mutant: 1 = the tests failed (killed), 0 = they passed (survived),
33 = no test covers the mutated function, 36 = timeout, other = an error. Prints a table (module,
mutants, killed, survived, not covered, score = killed / (mutants - not covered)).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMES = {1: "killed", 0: "survived", 33: "not covered", 36: "timeout"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survivors", action="store_true", help="list the surviving mutants too")
    args = parser.parse_args()
    metas = sorted((ROOT / "mutants").rglob("*.py.meta"))
    if not metas:
        raise SystemExit("no mutmut results: run `make mutate` first")
    print("| module | mutants | killed | survived | not covered | score |\n|---|---|---|---|---|---|")
    for meta in metas:
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        if not codes:
            continue
        counts = Counter(NAMES.get(code, "error") if code is not None else "not run" for code in codes.values())
        if counts["not run"] == len(codes):
            continue  # not part of this `mutmut run`
        tested = len(codes) - counts["not covered"] - counts["not run"]
        score = counts["killed"] / tested if tested else 0.0
        module = meta.relative_to(ROOT / "mutants").as_posix().removesuffix(".meta")
        print(f"| {module} | {len(codes)} | {counts['killed']} | {counts['survived']} | {counts['not covered']} | {score:.0%} |")
        if args.survivors:
            for key, code in sorted(codes.items()):
                if code == 0:
                    print(f"    survived: {key}")


if __name__ == "__main__":
    main()
