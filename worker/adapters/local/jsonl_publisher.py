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
from typing import Any, BinaryIO

from worker.adapters.local.file_lock import locked
from worker.ports import Publisher

log = logging.getLogger("retrain.events")


class JsonlPublisher(Publisher):
    """Safe for several processes on one state folder: each publish holds an flock on
    `<file>.lock`, reads the ids other processes appended since it last looked, and cuts a torn
    last line (a crash mid-write; its event was not marked published, so the relay sends it again)
    before appending, so no event is glued onto a fragment and none is written twice."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._seen: set[str] = set()
        self._offset = 0  # bytes of the file already read into _seen

    def _catch_up(self, fh: BinaryIO) -> None:
        size = fh.seek(0, os.SEEK_END)
        if size < self._offset:  # the file was replaced or truncated: read it again
            self._seen, self._offset = set(), 0
        fh.seek(self._offset)
        data = fh.read()
        complete = data[: data.rfind(b"\n") + 1]
        for line in complete.splitlines():
            try:
                self._seen.add(json.loads(line)["id"])
            except (ValueError, KeyError, TypeError):
                continue  # not an event (a line someone wrote by hand)
        self._offset += len(complete)
        if len(complete) < len(data):
            fh.truncate(self._offset)  # the torn tail of a crashed write

    def publish(self, events: list[Mapping[str, Any]]) -> None:
        if not events:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with locked(f"{self.path}.lock"), open(self.path, "a+b") as fh:
            self._catch_up(fh)
            fresh, ids = [], set()
            for event in events:
                if event["id"] not in self._seen and event["id"] not in ids:
                    fresh.append(event)
                    ids.add(event["id"])
            if not fresh:
                return
            data = b"".join(json.dumps(event, sort_keys=True, separators=(",", ":")).encode() + b"\n" for event in fresh)
            fh.seek(0, os.SEEK_END)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            self._offset += len(data)
            self._seen |= ids
        for event in fresh:
            log.info("event %s %s %s", event["type"], event["subject"], event["id"])
