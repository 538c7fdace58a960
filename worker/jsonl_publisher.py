"""The local publisher: CloudEvents appended to a JSON lines file (and logged), once per event id.

The relay may publish an event again after a crash between publishing and marking it
published; this sink remembers the ids it has written, so the file holds each event once.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worker.ports import Publisher

log = logging.getLogger("retrain.events")


class JsonlPublisher(Publisher):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._seen: set[str] | None = None

    def _load_seen(self) -> set[str]:
        if self._seen is None:
            self._seen = set()
            if self.path.exists():
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    try:
                        self._seen.add(json.loads(line)["id"])
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last line from a crash mid-write is not an event
        return self._seen

    def publish(self, events: list[Mapping[str, Any]]) -> None:
        seen = self._load_seen()
        fresh = [e for e in events if e["id"] not in seen]
        if not fresh:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            for event in fresh:
                fh.write(json.dumps(event, sort_keys=True, separators=(",", ":")) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        for event in fresh:
            seen.add(event["id"])
            log.info("event %s %s %s", event["type"], event["subject"], event["id"])
