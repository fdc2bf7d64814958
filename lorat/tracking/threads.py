"""How many CPU threads a tracking loop uses, chosen from measured step times while it runs.

With as many compute threads as cores, every parallel region of a step waits for its slowest
thread; when another process takes a core, that thread is preempted and the whole step waits for
it (on 2 cores, bundled model: 37 FPS quiet, 11 FPS beside one busy process, where one thread
still gives 30). No fixed number is right for both, and the load changes while a video runs, so
the thread count is measured, not guessed: :class:`ThreadTuner` times the steps, tries the other
candidate counts for a few steps now and then, and keeps the fastest. It starts on every core when
other programs left the cores idle while the model loaded (``/proc/stat`` against this process's
own CPU time), else on one thread (which never collapses; the first probe then comes after 512
steps). Probes that confirm the choice come less and less often (after 16 steps at first, at most
every 512; at once 512 when the other count lost by far), so a steady machine pays almost nothing;
a change of choice, or steps turning 1.5x slower than when the count was chosen, brings the probes
back.

This is the default of every command (``--threads N`` fixes the count). It moves no box: the
models' outputs are the same on any thread count (the matrix products split their rows, not their
sums, between threads; the one oneDNN convolution that did not, the stem's 1x1, runs as a matrix
product), which ``tests/test_threads.py`` checks. torch's intra-op threads are tuned; the ONNX
Runtime backend follows them with one session per count (:class:`lorat.checkpoint.onnx.OnnxModel`).
"""

from __future__ import annotations

import os
import statistics
import threading
import time

__all__ = ["ThreadTuner", "TUNER", "thread_candidates", "idle_cores", "cores_left_idle"]


def _cpu_sample() -> tuple[int, int, float, float] | None:
    """(idle ticks, all ticks) of all cores from ``/proc/stat``, this process's CPU seconds, the time."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(values) < 5:
        return None
    return values[3] + values[4], sum(values), time.process_time(), time.monotonic()


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cores_left_idle(since: tuple[int, int, float, float] | None, min_window: float = 0.05) -> float | None:
    """How many cores other programs left idle since the ``since`` sample (of :func:`_cpu_sample`):
    this process's usable cores minus the cores others kept busy on average (its own CPU time does not
    count as busy). None where ``/proc/stat`` cannot be read or less than ``min_window`` seconds passed."""
    now = _cpu_sample()
    if since is None or now is None or now[3] - since[3] < min_window:
        return None
    wall = now[3] - since[3]
    total = max(now[1] - since[1], 1)
    busy = total - (now[0] - since[0])
    rate = total / (os.cpu_count() or 1) / wall  # ticks per second of one core
    others = max(busy - (now[2] - since[2]) * rate, 0) / rate / wall  # cores kept busy by other programs
    return max(_usable_cores() - others, 0.0)


def idle_cores(window: float = 0.1) -> float | None:
    """How many cores other programs leave idle over the next ``window`` seconds (Linux ``/proc/stat``;
    this process sleeps meanwhile), or None where that cannot be read."""
    since = _cpu_sample()
    time.sleep(window)
    return cores_left_idle(since, min_window=0.0)


def thread_candidates(cores: int | None = None) -> list[int]:
    """The thread counts worth trying on ``cores`` usable cores: 1, half, all (1 and 2 on two cores)."""
    if cores is None:
        cores = _usable_cores()
    return sorted({1, max(1, cores // 2), max(1, cores)})


class ThreadTuner:
    """Chooses torch's CPU thread count from the measured duration of each tracking step.

    Call :meth:`record` after every step with its duration; the tuner changes ``torch.set_num_threads``
    between steps. Inactive until :meth:`enable` (the loader enables it when no thread count is given).

    A probe of another count runs ``trial`` steps: the first (the pool waking up) is not counted, and
    the probe stops at the first counted step slower than ``1 / margin`` of the current count's
    median step, so a bad count costs two steps. A count replaces the current one only when its
    median is faster by the factor ``margin``.

    Args:
        candidates: thread counts to choose from (default :func:`thread_candidates`).
        trial: steps per probe of one count.
        first, last: steps between probes, at first and at most (doubling while the choice holds).
        margin: how much faster (median step time ratio) a count must be to be chosen.
    """

    def __init__(self, candidates: list[int] | None = None, trial: int = 4, first: int = 16, last: int = 512,
                 margin: float = 0.95):
        self.candidates = candidates
        self.trial, self.first, self.last, self.margin = trial, first, last, margin
        self.active = False
        self._since: tuple[int, int, float, float] | None = None
        self._lock = threading.Lock()  # the app's worker threads may share the process's tuner
        self._reset()

    def _reset(self) -> None:
        self.current: int | None = None
        self.interval = self.first
        self._until_probe = self.first
        self._queue: list[int] = []  # counts still to probe in this round
        self._steady: list[float] = []  # the current count's recent step times
        self._probe: list[float] = []  # the probed count's step times (the first one not counted)
        self._results: dict[int, float] = {}  # this round's medians of the probed counts
        self._set: int | None = None  # what this tuner last gave torch
        self._decided: float | None = None  # the median step time when the current count was last chosen

    def enable(self, measure: bool = True) -> None:
        """Tune from the next step on. ``measure``: the first step's count depends on how many cores
        other programs leave idle from now until then (no waiting: the model loads meanwhile);
        without it, start on one thread."""
        self.active = True
        self._reset()
        self._since = _cpu_sample() if measure else None

    def disable(self) -> None:
        self.active = False

    def record(self, seconds: float) -> None:
        """Account one step of ``seconds``; maybe switch the thread count for the next one."""
        if not self.active:
            return
        with self._lock:
            self._record(seconds)

    def _record(self, seconds: float) -> None:
        import torch

        if self._set is not None and torch.get_num_threads() != self._set:  # someone else chose: leave it to them
            self.active = False
            return
        if self.current is None:
            self._start(torch.get_num_threads())
        if self._queue:
            self._probe_step(seconds)
        else:
            self._steady_step(seconds)

    def _start(self, threads: int) -> None:
        # Start on all threads where the cores stood idle just before (measured at enable), else on
        # one thread, which never collapses under load; the probes correct either guess.
        self.candidates = sorted(set(self.candidates or thread_candidates()))
        idle = cores_left_idle(self._since)
        if idle is None and self._since is not None:
            idle = idle_cores()  # the load was too quick to tell: look for 0.1 s
        quiet = idle is not None and idle >= self.candidates[-1] - 0.5
        self.current = self.candidates[-1] if quiet else self.candidates[0]
        if idle is not None and not quiet:
            # other programs hold cores now: more threads would wait for them; look again much later
            self.interval = self._until_probe = self.last
        if threads != self.current:
            self._switch(self.current)

    def _reference(self) -> float:
        return statistics.median(self._steady)

    def _steady_step(self, seconds: float) -> None:
        self._steady = (self._steady + [seconds])[-8:]
        self._until_probe -= 1
        if self._decided is not None and len(self._steady) >= 4 and self._reference() > 1.5 * self._decided:
            self._until_probe = 0  # the steps got much slower (another process started): look again now
        if self._until_probe <= 0 and len(self.candidates) > 1 and len(self._steady) >= 2:
            self._queue = [c for c in self.candidates if c != self.current]
            self._results = {}
            self._switch(self._queue[0])

    def _probe_step(self, seconds: float) -> None:
        self._probe.append(seconds)
        counted = self._probe[1:]
        slower = bool(counted) and counted[-1] * self.margin > self._reference()
        if not slower and len(self._probe) < self.trial:
            return
        if not slower:
            self._results[self._queue[0]] = statistics.median(counted)
        self._probe = []
        self._queue.pop(0)
        if self._queue:
            self._switch(self._queue[0])
            return
        self._decide()

    def _decide(self) -> None:
        best = min(self._results, key=self._results.get, default=None)
        reference = self._reference()
        if best is not None and self._results[best] < self.margin * reference:
            self.current, self.interval, self._steady = best, self.first, []
            self._decided = self._results[best]
        else:
            # a count that lost clearly (a stopped probe, or twice as slow) is not worth trying again soon
            clearly = len(self._results) < len(self.candidates) - 1 or \
                min(self._results.values(), default=0.0) > 2 * reference
            self.interval = self.last if clearly else min(self.interval * 2, self.last)
            self._decided = reference
        self._until_probe = self.interval
        self._switch(self.current)

    def _switch(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self._set = threads


TUNER = ThreadTuner()
"""The process's tuner: torch's thread count is one setting for the whole process."""
