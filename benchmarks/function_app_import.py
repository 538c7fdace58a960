"""How long the Functions host takes to import the app (cold start and indexing import every module).

Runs `import function_app` in fresh interpreters and prints the median and worst time, and the
heavy packages it pulled in (it must pull in none). Target: under 300 ms on this machine.

    python benchmarks/function_app_import.py [--runs 10]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = (
    "import sys, time; t = time.perf_counter(); import function_app; ms = (time.perf_counter() - t) * 1000; "
    "print(ms, ','.join(m for m in ('torch', 'torchvision', 'azureml', 'azure.ai.ml', 'mlflow', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules) or '-')"
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args()
    times, heavy = [], set()
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        times.append(float(out[0]))
        heavy.update(x for x in out[1].split(",") if x != "-")
    print(
        f"import function_app: median {statistics.median(times):.0f} ms, worst {max(times):.0f} ms over {args.runs} fresh interpreters; heavy packages: {sorted(heavy) or 'none'}"
    )


if __name__ == "__main__":
    main()
