"""The layout shows the architecture: the core's files, the layer contracts, the docs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_every_core_module_is_under_the_contract_that_forbids_adapter_imports():
    core = next(c for c in _contracts() if c["name"].startswith("the core imports no adapter"))
    modules = {f"worker.{p.stem}" for p in (ROOT / "worker").glob("*.py") if p.stem not in ("__init__", "__main__")}
    # A new core module must be added to the contract (or belong in adapters/ or app/).
    assert modules == set(core["source_modules"])
    assert {"worker.adapters", "worker.app"} <= set(core["forbidden_modules"])


def test_no_core_file_is_named_for_a_fake_or_an_adapter():
    names = [p.name for p in (ROOT / "worker").glob("*.py")]
    offenders = [n for n in names if re.search(r"fake|azure|local|sqlite|table|servicebus|blob|torchrun|jsonl", n)]
    assert offenders == []


def test_the_fakes_live_with_the_tests():
    assert sorted(p.name for p in (ROOT / "tests" / "fakes").glob("*.py")) == [
        "__init__.py",
        "adapters.py",
        "azureml.py",
        "backend.py",
        "commit_faults.py",
        "harness.py",
        "memory_store.py",
        "servicebus.py",
    ]
    # the test folders hold tests (and the programs the crash and concurrency tests start), no fakes
    expected = {"unit": [], "integration": ["crash_client.py", "ledger_client.py"], "e2e": []}
    for folder, programs in expected.items():
        others = sorted(p.name for p in (ROOT / "tests" / folder).glob("*.py") if not p.name.startswith(("test_", "conftest", "__init__")))
        assert others == programs, folder


def test_the_readme_is_short_and_links_every_document():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 12_500
    linked = set(re.findall(r"\]\((docs/[^)#]+)\)", readme))
    assert {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} <= linked
    for target in re.findall(r"\]\(([^)#:]+)\)", readme):
        assert (ROOT / target).exists(), target


def test_links_between_documents_resolve():
    for doc in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links {target}"
