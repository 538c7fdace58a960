"""The local inbox: a folder of message files that `retrain inject` writes and `retrain serve` consumes.

A file is written under a temporary name and renamed, so the consumer never reads half a
message. Consumed files are deleted (the ledger's inbox remembers their ids); files that fail
validation move to `rejected/` beside a `.reason` file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from shared.errors import InvalidMessage


class LocalInbox:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def put(self, message_id: str, body: dict) -> Path:
        """Write a message; the same id with the same body is a no-op, with another body an error."""
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.root / f"{message_id}.json"
        data = json.dumps(body, sort_keys=True)
        if target.exists():
            if target.read_text(encoding="utf-8") == data:
                return target
            raise InvalidMessage("conflict", f"a different message with id {message_id!r} is already waiting in the inbox")
        tmp = self.root / f".{message_id}.{os.getpid()}.tmp"
        tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, target)
        return target

    def pending(self) -> Iterator[Path]:
        if self.root.is_dir():
            yield from sorted(self.root.glob("*.json"), key=lambda p: (p.stat().st_mtime_ns, p.name))

    def done(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def reject(self, path: Path, reason: str) -> None:
        rejected = self.root / "rejected"
        rejected.mkdir(parents=True, exist_ok=True)
        os.replace(path, rejected / path.name)
        (rejected / f"{path.name}.reason").write_text(reason + "\n", encoding="utf-8")
