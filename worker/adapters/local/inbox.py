"""The local inbox: a folder of message files that `retrain inject` writes and `retrain serve` consumes.

A file is written under a temporary name and renamed, so the consumer never reads half a
message. Consumed files are deleted (the ledger's inbox remembers their ids); files that fail
validation move to `rejected/` beside a `.reason` file.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared.errors import InvalidMessage
from shared.files import atomic_write_text, open_regular
from shared.messages import ID_PATTERN, MAX_MESSAGE_BYTES
from shared.redact import printable


class LocalInbox:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def put(self, message_id: str, body: dict[str, Any]) -> Path:
        """Write a message; the same id with the same body is a no-op, with another body an error."""
        if not re.fullmatch(ID_PATTERN, message_id):
            # The id becomes a file name: never a path (the message schema refuses it too).
            raise InvalidMessage("schema", f"message id {printable(message_id)[:80]!r} does not match {ID_PATTERN}")
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.root / f"{message_id}.json"
        data = json.dumps(body, sort_keys=True)
        if target.exists():
            if target.read_text(encoding="utf-8") == data:
                return target
            raise InvalidMessage("conflict", f"a different message with id {message_id!r} is already waiting in the inbox")
        atomic_write_text(target, data)  # a temporary of its own: two writers of one id never share one
        return target

    def pending(self) -> Iterator[Path]:
        """Message files, oldest first. Only regular files: a FIFO or a symlink here is moved to rejected/."""
        if not self.root.is_dir():
            return
        found = []
        for path in self.root.glob("*.json"):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                self.reject(path, "not a regular file (a symlink, FIFO or device); never read")
                continue
            found.append((st.st_mtime_ns, path.name, path))
        yield from (path for _, _, path in sorted(found))

    def read(self, path: Path) -> bytes:
        """The file's bytes (at most one message's worth: a larger file is refused by the parser)."""
        with open_regular(path) as fh:
            return fh.read(MAX_MESSAGE_BYTES + 1)

    def done(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def reject(self, path: Path, reason: str) -> None:
        rejected = self.root / "rejected"
        rejected.mkdir(parents=True, exist_ok=True)
        os.replace(path, rejected / path.name)
        (rejected / f"{path.name}.reason").write_text(reason + "\n", encoding="utf-8")
