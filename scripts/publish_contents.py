"""What `func azure functionapp publish` would upload from this folder, after .funcignore.

    python scripts/publish_contents.py [ROOT] [--list]

Exits 1 (and says what) if the upload would hold tests, node_modules, local state, secrets or
caches, or would miss a file the app needs. The Functions Core Tools apply .funcignore with
gitignore rules; pathspec applies the same rules here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pathspec

NEEDED = (
    "function_app.py",
    "host.json",
    "requirements.txt",
    "functions/runtime.py",
    "worker/bus.py",
    "shared/messages.py",
    "training/train.py",
)
FORBIDDEN = ("tests/", "node_modules/", ".retrain/", "retrain-demo/", "mutants/", ".git/", ".venv/", "local.settings.json", "images/",
             "__pycache__/", "mlruns/")  # fmt: skip


def uploaded(root: Path) -> list[str]:
    """Every file a publish would send, relative to `root`, POSIX separators."""
    ignore = pathspec.PathSpec.from_lines("gitwildmatch", (root / ".funcignore").read_text().splitlines())
    files = []
    for folder, dirs, names in os.walk(root):
        rel_folder = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel_folder == "." else rel_folder + "/"
        dirs[:] = [d for d in dirs if not ignore.match_file(prefix + d + "/")]
        files += [prefix + n for n in names if not ignore.match_file(prefix + n)]
    return sorted(files)


def problems(files: list[str]) -> list[str]:
    found = []
    for pattern in FORBIDDEN:
        hits = [f for f in files if (f"/{f}").find(f"/{pattern}") >= 0 or f == pattern]
        if hits:
            found.append(f"would upload {pattern}: {', '.join(hits[:3])}")
    found += [f"would not upload {needed}" for needed in NEEDED if needed not in files]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--list", action="store_true", help="print every file that would be uploaded")
    args = parser.parse_args()
    files = uploaded(Path(args.root))
    if args.list:
        print("\n".join(files))
    size = sum((Path(args.root) / f).stat().st_size for f in files)
    print(f"{len(files)} files, {size / 1e6:.1f} MB would be uploaded")
    issues = problems(files)
    for issue in issues:
        print(f"error: {issue}", file=sys.stderr)
    return 1 if issues else 0


if __name__ == "__main__":
    sys.exit(main())
