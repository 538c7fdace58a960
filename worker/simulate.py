"""`retrain simulate`: replay a model's history through the real policy with a virtual clock.

The history is image arrivals (when each version was first seen), forced requests, pauses and
resumes, the runs that were recorded (when planned, how long, how they ended), and when the record
ends (the ledger's now when it was read): the replay stops there, as the worker had, and a run not
finished by then is reported in flight, not as trained. The simulator keeps the few numbers
the policy reads (pending images per class and their oldest/newest arrival, the data per class and
split, the head: follow-up, last finish, failures and back-off, the run in flight, open forced
requests, the GPU-hours of the last 24 h), builds the same `Snapshot` the worker builds and calls
the same `decide`. It evaluates when the worker would: at every arrival and request, at every
tick, and when a run ends; between them it jumps straight to the next of those, or to the tick
after the time the policy said waiting ends (`wake_at`), so a quiet year costs nothing.

Run durations come from a `DurationModel`: the recorded runs in order (a replay of the live
configuration), a per-image cost fitted to them (other configurations), or a fixed time. Recorded
outcomes (failed, canceled) apply in the recorded mode only; in the others every run succeeds.
"""

from __future__ import annotations

import bisect
import collections
import datetime as dt
import io
import json
import math
import os
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import events as ev
from shared.files import NotRegularFileError, open_regular
from shared.manifest_hash import stable_split
from shared.messages import label_of, load_checked_document  # the inbound-JSON checks: depth, numbers, NaN, lone surrogates
from shared.redact import printable
from worker.config import ModelConfig
from worker.policy import DAY, Snapshot, decide, gpu_usage, note_failure, note_success, weighed_request
from worker.store import DataStats, ModelHead, PendingStats, RequestRow, RunRow

FIXED_DEFAULT_MINUTES = 30.0


@dataclass(frozen=True)
class Arrival:
    at: dt.datetime
    path: str
    etag: str = ""


@dataclass(frozen=True)
class Request:
    at: dt.datetime
    request_id: str
    requested_by: str = ""
    override_budget: bool = False


@dataclass(frozen=True)
class Control:
    """An operator's pause or resume: while paused no run starts and forced requests are refused."""

    at: dt.datetime
    action: str  # pause | resume


@dataclass(frozen=True)
class RecordedRun:
    planned_at: dt.datetime
    finished_at: dt.datetime | None
    images: int
    outcome: str  # succeeded | registered | rejected | failed | canceled | ...

    @property
    def seconds(self) -> float | None:
        return (self.finished_at - self.planned_at).total_seconds() if self.finished_at else None


@dataclass
class History:
    arrivals: list[Arrival] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    runs: list[RecordedRun] = field(default_factory=list)
    controls: list[Control] = field(default_factory=list)
    observed_until: dt.datetime | None = None  # when the record ends; None: at its last event

    @property
    def start(self) -> dt.datetime | None:
        times = [a.at for a in self.arrivals[:1]] + [r.at for r in self.requests[:1]]
        return min(times) if times else None

    @property
    def end(self) -> dt.datetime | None:
        times = (
            [a.at for a in self.arrivals[-1:]] + [r.at for r in self.requests[-1:]] + [c.at for c in self.controls[-1:]]
            + [r.finished_at for r in self.runs if r.finished_at]
        )  # fmt: skip
        return max(times) if times else None


class DurationModel:
    """How long a simulated run takes (and, replaying, how it ends)."""

    def __init__(self, kind: str, recorded: list[RecordedRun] | None = None, minutes: float | None = None):
        self.kind, self.recorded = kind, recorded or []
        self.fixed = (minutes or FIXED_DEFAULT_MINUTES) * 60
        self.base, self.per_image = self._fit(self.recorded)

    @staticmethod
    def _fit(runs: list[RecordedRun]) -> tuple[float, float]:
        points = [(r.images, r.seconds) for r in runs if r.seconds is not None and r.outcome not in ("failed", "canceled")]
        if len(points) < 2 or len({x for x, _ in points}) < 2:
            mean = statistics.fmean(s for _, s in points) if points else FIXED_DEFAULT_MINUTES * 60
            return mean, 0.0
        xs, ys = zip(*points, strict=True)
        slope, intercept = statistics.linear_regression(xs, ys)
        return max(intercept, 0.0), max(slope, 0.0)

    def describe(self) -> str:
        if self.kind == "recorded":
            return f"the {len(self.recorded)} recorded runs in order, then {self.base:.0f} s + {self.per_image:.3f} s/image"
        if self.kind == "fitted":
            return f"fitted to {len(self.recorded)} recorded runs: {self.base:.0f} s + {self.per_image:.3f} s per image"
        return f"fixed: {self.fixed / 60:g} minutes"

    def run(self, index: int, images: int) -> tuple[float | None, str]:
        """(seconds, outcome) of the index-th simulated run (0-based) with `images` images; replaying,
        (None, "in flight") for a recorded run that had not finished when the record ends."""
        if self.kind == "recorded" and index < len(self.recorded) and self.recorded[index].finished_at is None:
            return None, "in flight"
        if self.kind == "recorded" and index < len(self.recorded) and self.recorded[index].seconds is not None:
            recorded = self.recorded[index]
            outcome = recorded.outcome if recorded.outcome in ("failed", "canceled") else "succeeded"
            return float(recorded.seconds or 0.0), outcome
        if self.kind == "fixed":
            return self.fixed, "succeeded"
        return self.estimate(images), "succeeded"

    def estimate(self, images: int) -> float:
        return self.fixed if self.kind == "fixed" else self.base + self.per_image * images


@dataclass
class SimRun:
    index: int
    planned_at: dt.datetime
    reason: str
    watermark: int  # arrivals with seq <= it are in the run
    base: int  # the trained watermark when planned: images above it are new to it
    images: int
    new_images: int
    paths: list[str]
    ends_at: dt.datetime
    outcome: str
    request_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"planned_at": self.planned_at.isoformat(), "reason": self.reason, "images": self.images, "new_images": self.new_images,
                "minutes": round((self.ends_at - self.planned_at).total_seconds() / 60, 1), "outcome": self.outcome,
                "request_ids": self.request_ids}  # fmt: skip


@dataclass
class Result:
    label: str
    runs: list[SimRun]
    gpu_hours: float
    staleness_s: list[float]
    untrained: int
    duration_model: str
    ended_at: dt.datetime | None = None  # the end of the record, when it has one

    def summary(self) -> dict[str, Any]:
        s = sorted(self.staleness_s)
        flying = sum(1 for r in self.runs if r.outcome == "in flight")
        warnings = []
        if not s:
            warnings.append("no image reached a trained model in this replay: staleness is undefined"
                            + (f" ({self.untrained} images never trained)" if self.untrained else ""))  # fmt: skip
        if flying:
            warnings.append(f"{flying} run still in flight when the record ends: its images count as never trained")

        def pct(q: float) -> float | None:
            return round(s[min(len(s) - 1, math.ceil(q * len(s)) - 1)] / 3600, 2) if s else None

        return {
            "config": self.label,
            "runs": len(self.runs),
            "gpu_hours": round(self.gpu_hours, 2),
            "images_per_run": round(statistics.fmean(r.images for r in self.runs), 1) if self.runs else 0,
            "staleness_hours": {"median": pct(0.5), "p95": pct(0.95), "max": round(s[-1] / 3600, 2) if s else None},
            "images_never_trained": self.untrained,
            "in_flight_at_end": flying,
            "ended_at": self.ended_at.isoformat() if self.ended_at else None,
            "durations": self.duration_model,
            "warnings": warnings,
        }


class _Images:
    """Arrivals in seq order with what the policy reads about them, updated incrementally."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.times: list[dt.datetime] = []
        self.labels: list[str] = []
        self.paths: list[str] = []
        self.latest: list[bool] = []
        self.by_path: dict[str, int] = {}
        self.train: dict[str, int] = {}
        self.val = 0
        self.floor = 0  # arrivals with seq <= floor are not pending (trained, or in the run in flight)
        self.pending: dict[str, int] = {}
        self.oldest = 0  # index of the oldest pending latest arrival (scan pointer)
        self.latest_count = 0
        self.superseded: list[int] = []  # seqs no longer latest, sorted

    def latest_upto(self, seq: int) -> int:
        """How many arrivals with seq <= `seq` are still their path's latest version."""
        return seq - bisect.bisect_right(self.superseded, seq)

    def add(self, arrival: Arrival) -> None:
        seq = len(self.times) + 1
        label = label_of(arrival.path)
        previous = self.by_path.get(arrival.path)
        if previous is not None:
            self.latest[previous - 1] = False
            bisect.insort(self.superseded, previous)
            self.latest_count -= 1
            self._count(previous, -1)
        self.latest_count += 1
        self.times.append(arrival.at)
        self.labels.append(label)
        self.paths.append(arrival.path)
        self.latest.append(True)
        self.by_path[arrival.path] = seq
        self._count(seq, +1)

    def _count(self, seq: int, sign: int) -> None:
        label = self.labels[seq - 1]
        if stable_split(self.paths[seq - 1], self.cfg.val_fraction) == "val":
            self.val += sign
        else:
            self.train[label] = self.train.get(label, 0) + sign
            if self.train[label] == 0:
                del self.train[label]
        if seq > self.floor:
            self.pending[label] = self.pending.get(label, 0) + sign
            if self.pending[label] == 0:
                del self.pending[label]

    def move_floor(self, floor: int) -> None:
        if floor == self.floor:
            return
        lo, hi, sign = (self.floor, floor, -1) if floor > self.floor else (floor, self.floor, +1)
        for seq in range(lo + 1, hi + 1):
            if self.latest[seq - 1]:
                label = self.labels[seq - 1]
                self.pending[label] = self.pending.get(label, 0) + sign
                if self.pending[label] == 0:
                    del self.pending[label]
        self.floor = floor
        self.oldest = min(self.oldest, floor) if sign > 0 else max(self.oldest, floor)

    def stats(self) -> PendingStats:
        count = sum(self.pending.values())
        if count == 0:
            return PendingStats()
        while self.oldest < len(self.times) and (self.oldest < self.floor or not self.latest[self.oldest]):
            self.oldest += 1
        newest = len(self.times) - 1
        while newest >= self.floor and not self.latest[newest]:
            newest -= 1
        return PendingStats(count, dict(self.pending), self.times[self.oldest], self.times[newest])

    def data(self) -> DataStats:
        return DataStats(train_per_class=dict(self.train), val_count=self.val)

    def in_range(self, base: int, upto: int, new_only: bool) -> list[str]:
        lo = base if new_only else 0
        return sorted(self.paths[i] for i in range(lo, upto) if self.latest[i])


def simulate(history: History, cfg: ModelConfig, *, tick_seconds: float = 60.0, durations: DurationModel, gpus_per_run: int = 1,
             label: str = "live", until: dt.datetime | None = None, keep_paths: bool = False,
             every_arrival: bool = False) -> Result:  # fmt: skip
    """Replay `history` through `decide` under `cfg`, up to `until` (else the record's end; a history
    without one runs until a tick after its last event and its last run's end). `every_arrival`
    evaluates every arrival even when the policy can only wait (the tests check that skipping those
    changes nothing)."""
    if history.start is None:
        return Result(label, [], 0.0, [], 0, durations.describe(), until or history.observed_until)
    replay = Replay(history, cfg, tick_seconds, durations, gpus_per_run, keep_paths, every_arrival, until)
    replay.run()
    return replay.result(label)


class Replay:
    """One configuration's replay: the state the policy reads, moved by the history's events, the
    worker's ticks and the simulated runs' ends, on a virtual clock."""

    def __init__(self, history: History, cfg: ModelConfig, tick_seconds: float, durations: DurationModel, gpus_per_run: int,
                 keep_paths: bool, every_arrival: bool, until: dt.datetime | None) -> None:  # fmt: skip
        assert history.start is not None
        self.history, self.cfg, self.durations, self.gpus_per_run = history, cfg, durations, gpus_per_run
        self.keep_paths, self.every_arrival = keep_paths, every_arrival
        self.start = history.start
        self.cutoff = until or history.observed_until
        self.end = self.cutoff or history.end or self.start
        self.tick = dt.timedelta(seconds=tick_seconds)
        self.images = _Images(cfg)
        self.head = ModelHead(model="simulated")
        # Open forced requests in arrival order, and those of them that override the GPU budget: the
        # snapshot reads the first of each in O(1) (a scan of every open request per evaluation made
        # 100k requests take minutes).
        self.open_requests: collections.deque[Request] = collections.deque()
        self.overrides: collections.deque[Request] = collections.deque()
        self.runs: list[SimRun] = []
        self.flying: SimRun | None = None
        self.trained_at: list[tuple[int, dt.datetime]] = []  # (watermark, when) of each successful run
        self.events = sorted([(a.at, 0, i) for i, a in enumerate(history.arrivals)] + [(r.at, 1, i) for i, r in enumerate(history.requests)]
                             + [(c.at, 2, i) for i, c in enumerate(history.controls)])  # fmt: skip
        self.position = 0
        self.now = self.start
        self.wake: dt.datetime | None = None

    # -- what the policy reads ---------------------------------------------------------------------

    def snapshot(self, at: dt.datetime) -> Snapshot:
        in_flight = None
        if self.flying is not None:
            f = self.flying
            in_flight = RunRow(run_id=f"sim-{f.index + 1:04d}", model="simulated", seq=f.index + 1, state="running", manifest_sha256="",
                               image_count=f.images, new_image_count=f.new_images, classes=[], created_at=f.planned_at,
                               watermark=f.watermark)  # fmt: skip
        force = weighed_request(self.overrides[0] if self.overrides else None, self.open_requests[0] if self.open_requests else None)
        request = None
        if force is not None:
            request = RequestRow(request_id=force.request_id, model="simulated", force=True, created_at=force.at,
                                 requested_by=force.requested_by, override_budget=force.override_budget)  # fmt: skip
        hours, frees = 0.0, None
        if self.cfg.max_gpu_hours_per_day is not None:
            intervals = [(r.planned_at, r.ends_at if r.ends_at <= at else None) for r in self.runs if r.ends_at > at - DAY]
            hours, frees = gpu_usage(intervals, at, self.gpus_per_run, self.cfg.max_gpu_hours_per_day)
        return Snapshot(self.images.stats(), self.images.data(), self.head, in_flight, request, hours, frees)

    # -- the worker's steps ------------------------------------------------------------------------

    def evaluate(self, at: dt.datetime) -> dt.datetime | None:
        """Decide, and carry the decision out as the worker does; returns when waiting ends."""
        decision = decide(self.snapshot(at), at, self.cfg)
        if decision.outcome == "coalesce":
            self.head.followup_wanted = True
        elif decision.outcome == "drop" and self.open_requests:
            self.open_requests.clear()
            self.overrides.clear()
        elif decision.outcome == "submit":
            self.plan(at, decision.reason)
        return decision.wake_at

    def consume_requests(self) -> list[Request]:
        """The requests a run carries out: in queue mode up to the first forced one, else all."""
        forced = self.open_requests[0] if self.open_requests else None
        if self.cfg.in_flight == "queue" and forced is not None:
            if self.overrides and self.overrides[0] is forced:
                self.overrides.popleft()
            return [self.open_requests.popleft()]
        consumed = list(self.open_requests)
        self.open_requests.clear()
        self.overrides.clear()
        return consumed

    def plan(self, at: dt.datetime, reason: str) -> None:
        consumed = self.consume_requests()
        images, head = self.images, self.head
        watermark, base = len(images.times), head.trained_watermark
        new = images.latest_count - images.latest_upto(base)
        count = new if self.cfg.training_data == "new" else images.latest_count
        paths = images.in_range(base, watermark, self.cfg.training_data == "new") if self.keep_paths else []
        seconds, outcome = self.durations.run(len(self.runs), count)
        if seconds is None:  # recorded as still running when the record ends: so it is here
            ends_at = (
                max(at, self.end) + self.tick if self.cutoff is not None else at + dt.timedelta(seconds=self.durations.estimate(count))
            )
            outcome = "in flight" if self.cutoff is not None else "succeeded"
        else:
            ends_at = at + dt.timedelta(seconds=seconds)
        self.flying = SimRun(len(self.runs), at, reason, watermark, base, count, new, paths, ends_at, outcome,
                             [r.request_id for r in consumed])  # fmt: skip
        self.runs.append(self.flying)
        head.followup_wanted = False
        images.move_floor(max(head.trained_watermark, watermark))

    def finish(self, run: SimRun) -> None:
        self.flying = None
        if run.outcome == "succeeded":
            note_success(self.head, run.watermark, run.ends_at)
            self.trained_at.append((run.watermark, run.ends_at))
        else:
            note_failure(self.head, self.cfg, run.ends_at, counted=run.outcome != "canceled")
        self.images.move_floor(self.head.trained_watermark)

    def certainly_waits(self, at: dt.datetime) -> bool:
        """True when `decide` can only say wait, idle or coalesce-again here: an arrival then changes
        nothing the policy acts on, and evaluating it can be skipped (a big saving on busy histories)."""
        cfg, head = self.cfg, self.head
        if self.open_requests or cfg.max_gpu_hours_per_day is not None:
            return False
        if head.paused is not None:
            return True
        if self.flying is not None:
            return head.followup_wanted or cfg.in_flight == "drop"
        if head.followup_wanted:
            return False
        pending_count = sum(self.images.pending.values())
        if head.last_run_finished_at is not None and at < head.last_run_finished_at + dt.timedelta(seconds=cfg.cooldown) and pending_count:
            return True
        if pending_count >= cfg.min_new_images:
            return False
        oldest = self.images.stats().oldest_at
        return cfg.max_wait is None or oldest is None or (at - oldest).total_seconds() < cfg.max_wait

    def earliest_wake(self, at: dt.datetime, current: dt.datetime | None) -> dt.datetime | None:
        """No later than any time a skipped evaluation could have named: evaluating early is harmless,
        late is not (the max wait of the first new image, the cooldown's or the back-off's end)."""
        times = [current] if current is not None and current > at else []
        oldest = self.images.stats().oldest_at
        if self.cfg.max_wait is not None and oldest is not None:
            times.append(oldest + dt.timedelta(seconds=self.cfg.max_wait))
        if self.head.last_run_finished_at is not None:
            times.append(self.head.last_run_finished_at + dt.timedelta(seconds=self.cfg.cooldown))
        if self.head.backoff_until is not None:
            times.append(self.head.backoff_until)
        future = [x for x in times if x > at]
        return min(future) if future else None

    # -- the clock ---------------------------------------------------------------------------------

    def next_tick(self, after: dt.datetime) -> dt.datetime:
        steps = math.floor((after - self.start) / self.tick) + 1
        return self.start + steps * self.tick

    def next_moment(self) -> dt.datetime | None:
        """The next time something happens: an event, a run's end, the policy's wake-up (on a tick),
        the last look after a history without a recorded end; None when the record is over."""
        candidates = [self.end + self.tick] if self.cutoff is None and self.now < self.end + self.tick else []
        if self.position < len(self.events):
            candidates.append(self.events[self.position][0])
        if self.flying is not None:
            candidates.append(self.flying.ends_at)
        if self.wake is not None:
            candidates.append(self.wake if (self.wake - self.start) % self.tick == dt.timedelta(0) else self.next_tick(self.wake))
        if not candidates or (self.cutoff is not None and min(candidates) > self.cutoff):
            return None  # the record ends here: what is in flight stays in flight
        return min(candidates)

    def apply_event(self) -> None:
        """The next event of the history: an arrival, a forced request, a pause or a resume."""
        _, kind, index = self.events[self.position]
        self.position += 1
        if kind == 0:
            self.images.add(self.history.arrivals[index])
            if not self.every_arrival and self.certainly_waits(self.now):
                self.wake = self.earliest_wake(self.now, self.wake)
                return
        elif kind == 2:
            control = self.history.controls[index]
            if control.action == "pause":
                self.head.paused = {"by": "an operator", "at": self.now.isoformat()}
                return  # a pause starts nothing; the worker evaluates again on resume
            self.head.paused = None
        else:
            request = self.history.requests[index]
            self.open_requests.append(request)
            if request.override_budget:
                self.overrides.append(request)
        self.wake = self.evaluate(self.now)

    def run(self) -> None:
        while (moment := self.next_moment()) is not None:
            self.now = max(self.now, moment)
            if self.flying is not None and self.flying.ends_at <= self.now:
                self.finish(self.flying)
                self.wake = self.evaluate(self.now)  # after a run the worker evaluates at once
                continue
            if self.position < len(self.events) and self.events[self.position][0] <= self.now:
                self.apply_event()
                continue
            self.wake = self.evaluate(self.now)  # a tick
            if self.wake is not None and self.wake <= self.now:
                self.wake = self.now + self.tick
            if self.cutoff is None and self.now > self.end and self.flying is None:
                break
        if self.flying is not None and self.cutoff is not None and self.flying.ends_at > self.cutoff:
            self.flying.outcome = "in flight"  # the record ends with it running: not trained, its GPUs counted to the end
            self.flying.ends_at = self.cutoff

    # -- the figures -------------------------------------------------------------------------------

    def result(self, label: str) -> Result:
        gpu_hours = sum((r.ends_at - r.planned_at).total_seconds() for r in self.runs) * self.gpus_per_run / 3600
        watermarks = [w for w, _ in self.trained_at]
        staleness, untrained = [], 0
        for seq, arrived in enumerate(self.images.times, start=1):
            first = bisect.bisect_left(watermarks, seq)  # watermarks only grow, so the first run that covers seq
            if first < len(self.trained_at):
                staleness.append((self.trained_at[first][1] - arrived).total_seconds())
            else:
                untrained += 1
        return Result(label, self.runs, gpu_hours, staleness, untrained, self.durations.describe(), self.cutoff)


# -- histories ------------------------------------------------------------------------------------


# Bounds of a history file: it may come from anywhere (--events), so nothing in it is trusted.
MAX_HISTORY_BYTES = 1 << 30  # 1 GiB: about 10 million arrivals
MAX_LINE_BYTES = 64 * 1024
MAX_TEXT = 4096  # characters of a path, an id or a name
EARLIEST, LATEST = dt.datetime(1970, 1, 1, tzinfo=dt.UTC), dt.datetime(2200, 1, 1, tzinfo=dt.UTC)
MAX_IMAGES = 10**9


def _time(value: Any) -> dt.datetime:
    if not isinstance(value, str):
        raise ValueError(f"a time is an ISO 8601 string, not {type(value).__name__}")
    at = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    at = at if at.tzinfo else at.replace(tzinfo=dt.UTC)
    if not EARLIEST <= at < LATEST:  # far-off years overflow the replay's date arithmetic
        raise ValueError(f"{value[:40]!r} is outside 1970-2199")
    return at


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is a string, not {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise ValueError(f"{what} is longer than {MAX_TEXT} characters")
    return value


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_IMAGES:
        raise ValueError(f"images is a whole number from 0 to {MAX_IMAGES}, not {str(value)[:40]}")
    return value


def read_history(lines: Iterable[str]) -> History:
    """The JSON-lines format: one object per line, `type` arrival | request | run (see docs/simulate.md)."""
    history = History()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            if len(line) > MAX_LINE_BYTES:
                raise ValueError(f"longer than {MAX_LINE_BYTES} bytes")
            item = load_checked_document(line)
            kind = item.get("type")
            if kind == "arrival":
                history.arrivals.append(
                    Arrival(_time(item.get("at")), _text(item.get("path"), "path"), _text(item.get("etag", ""), "etag"))
                )
            elif kind == "request":
                history.requests.append(Request(_time(item.get("at")), _text(item.get("id", f"req-{number}"), "id"),
                                                _text(item.get("requested_by", ""), "requested_by"),
                                                item.get("override_budget", False) is True))  # fmt: skip
            elif kind in ("pause", "resume"):
                history.controls.append(Control(_time(item.get("at")), kind))
            elif kind == "end":
                history.observed_until = _time(item.get("at"))
            elif kind == "run":
                finished = item.get("finished_at")
                history.runs.append(RecordedRun(_time(item.get("planned_at")), _time(finished) if finished is not None else None,
                                                _count(item.get("images", 0)), _text(item.get("outcome", "succeeded"), "outcome")))  # fmt: skip
            else:
                raise ValueError(f"unknown type {printable(kind, limit=40)!r}")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"line {number}: {printable(exc, limit=300)}") from None
    history.arrivals.sort(key=lambda a: a.at)
    history.requests.sort(key=lambda r: r.at)
    history.runs.sort(key=lambda r: r.planned_at)
    history.controls.sort(key=lambda c: c.at)
    return history


def history_lines(history: History) -> Iterator[str]:
    for a in history.arrivals:
        yield json.dumps({"type": "arrival", "at": a.at.isoformat(), "path": a.path, "etag": a.etag})
    for r in history.requests:
        yield json.dumps({"type": "request", "at": r.at.isoformat(), "id": r.request_id, "requested_by": r.requested_by,
                          "override_budget": r.override_budget})  # fmt: skip
    for run in history.runs:
        yield json.dumps({"type": "run", "planned_at": run.planned_at.isoformat(), "finished_at": run.finished_at.isoformat() if run.finished_at else None,
                          "images": run.images, "outcome": run.outcome})  # fmt: skip
    for c in history.controls:
        yield json.dumps({"type": c.action, "at": c.at.isoformat()})
    if history.observed_until is not None:
        yield json.dumps({"type": "end", "at": history.observed_until.isoformat()})


def ledger_history(store: Any, model: str) -> History:
    """The model's recorded history from the ledger: every image version's arrival, the forced
    requests, the runs (planned at, finished at, images, how they ended), the pauses and resumes
    (their events are kept when the outbox is pruned), and the record's end: the worker's last
    recorded decision or the last event, whichever is later. A decision is recorded whenever the
    verdict changes, so the worker started no run after it; replaying further would start runs
    the worker never had the chance to (it may have been stopped)."""
    history = History()
    with store.read() as tx:
        history.arrivals = [Arrival(i.first_seen_at, i.path, i.etag) for i in tx.image_arrivals(model) if i.first_seen_at]
        runs = sorted(tx.runs(model), key=lambda r: r.seq)
        requests = tx.all_requests(model)
        last_decision = next((d.at for d in tx.decisions(model, 1)), None)
    history.requests = [Request(r.created_at, r.request_id, r.requested_by, r.override_budget) for r in requests if r.force]
    history.runs = [RecordedRun(r.created_at, r.finished_at, r.image_count, _outcome(r.outcome or r.state)) for r in runs]
    actions = {ev.MODEL_PAUSED: "pause", ev.MODEL_RESUMED: "resume"}
    history.controls = [Control(e.created_at, actions[e.type]) for e in store.all_events()
                        if e.type in actions and (e.payload.get("data") or {}).get("model") == model]  # fmt: skip
    history.controls.sort(key=lambda c: c.at)
    ends = [t for t in (last_decision, history.end) if t is not None]
    history.observed_until = max(ends) if ends else None
    return history


def _outcome(value: str) -> str:
    return value if value in ("failed", "canceled") else "succeeded"


def load_history(path: Path) -> History:
    """A history file: a regular file (a FIFO or /dev/zero would block or never end), at most
    MAX_HISTORY_BYTES, each line at most MAX_LINE_BYTES, read without holding more than a line."""
    try:
        raw = open_regular(path)
    except NotRegularFileError:
        raise ValueError("not a regular file") from None
    with io.TextIOWrapper(raw, encoding="utf-8", errors="strict") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_HISTORY_BYTES:
            raise ValueError(f"{size} bytes; a history holds at most {MAX_HISTORY_BYTES}")
        try:
            return read_history(iter(lambda: fh.readline(MAX_LINE_BYTES + 1), ""))
        except UnicodeDecodeError as exc:
            raise ValueError(f"not UTF-8 text: {exc}") from None
