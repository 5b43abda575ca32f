"""The recorder: decides which samples enter the journal, by each tag's recording policy.

- ``on_change``: a value that moved more than the tag's ``deadband`` from the last *recorded*
  value (not the last seen one, so a slow drift is recorded once it adds up), any change of a
  non-numeric value, and a heartbeat every ``interval`` seconds;
- ``periodic``: the latest value every ``interval`` seconds;
- ``never``: nothing;
- and, whatever the mode, every change of quality.

``offer()`` takes samples as they arrive; ``tick()`` (called about once a second) emits the
periodic records and heartbeats from the latest values, so a tag whose device reports only
changes still has its value on the record at the stated interval.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from agent.config import Recording
from drivers.base import Sample
from drivers.clock import Clock


@dataclass(slots=True)
class _Track:
    policy: Recording
    recorded: Sample | None = None
    recorded_at: float = float("-inf")  # clock.monotonic() of the last record
    latest: Sample | None = None


def _moved(a: Sample, b: Sample, deadband: float) -> bool:
    va, vb = a.value, b.value
    if (
        isinstance(va, bool)
        or isinstance(vb, bool)
        or not (isinstance(va, int | float) and isinstance(vb, int | float))
    ):
        return va != vb
    return abs(va - vb) > deadband


class Recorder:
    """Filters samples by policy and hands the chosen ones to ``sink`` (the journal)."""

    def __init__(
        self,
        policies: dict[str, Recording],
        sink: Callable[[Sequence[Sample]], None],
        clock: Clock,
    ) -> None:
        self._tracks = {tag: _Track(p) for tag, p in policies.items() if p.mode != "never"}
        self._sink = sink
        self._clock = clock
        self.offered = 0
        self.recorded = 0

    def _take(self, track: _Track, sample: Sample, now: float, out: list[Sample]) -> None:
        track.recorded, track.recorded_at = sample, now
        out.append(sample)

    def offer(self, samples: Iterable[Sample]) -> int:
        """Record those of ``samples`` the policies call for; returns how many were recorded."""
        now = self._clock.monotonic()
        out: list[Sample] = []
        for s in samples:
            self.offered += 1
            track = self._tracks.get(s.tag)
            if track is None:
                continue
            track.latest = s
            last = track.recorded
            policy = track.policy
            due = (
                last is None
                or last.quality != s.quality  # a change of quality is always recorded
                or (policy.mode == "on_change" and _moved(last, s, policy.deadband))
                or now - track.recorded_at >= policy.interval
            )
            if due:
                self._take(track, s, now, out)
        if out:
            self._sink(out)
            self.recorded += len(out)
        return len(out)

    def tick(self) -> int:
        """Record periodic values and heartbeats that are due; returns how many."""
        now = self._clock.monotonic()
        stamp = self._clock.now()
        out: list[Sample] = []
        for track in self._tracks.values():
            if track.latest is not None and now - track.recorded_at >= track.policy.interval:
                # the same reading, restated now: its source time says when it was taken
                self._take(track, track.latest._replace(agent_time=stamp), now, out)
        if out:
            self._sink(out)
            self.recorded += len(out)
        return len(out)
