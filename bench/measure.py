"""Timing for the benchmarks: one command's wall time and peak RSS, and
rescue against a reference run alternately, medians over the runs.

Imported by bench.py and bigdir.py (run as scripts: bench/ is on sys.path).
Who goes first swaps every run: the page cache's state (and a loaded shared
machine's scheduler) favours one position, so neither side always gets it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Sequence

MiB = 1 << 20


@dataclass
class Measure:
    seconds: float
    peak_rss: int                 # bytes, of the process started (the first of a pipeline)
    read: int | None = None       # bytes rescue read from the snapshot (--json), when asked
    cpu: float = 0.0              # user + system seconds of the process and its children: steadier
                                  # than wall time on a loaded shared machine (the kernel side's loop
                                  # device workers are not counted: a lower bound for it)


def timed(cmd: list[str], *, env=None, stdout=subprocess.DEVNULL, parse_json: bool = False,
          ok: tuple[int, ...] = (0, 1)) -> Measure:
    """Run `cmd`; wall time and peak RSS (wait4). Exit codes outside `ok` raise RuntimeError."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if parse_json else stdout, stderr=subprocess.PIPE, env=env)
    output = proc.stdout.read() if parse_json else b""
    errors = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code not in ok:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}): {errors.decode(errors='replace')[-400:]}")
    read = None
    if parse_json and output:
        try:
            read = json.loads(output).get("bytes_read_from_snapshot")
        except ValueError:
            pass
    return Measure(elapsed, usage.ru_maxrss * 1024, read, usage.ru_utime + usage.ru_stime)


Side = Callable[[], "Measure | None"]   # one timed run; None: this side cannot run here (needs root)


def alternate(sides: Sequence[Side], runs: int) -> list[list[Measure | None]]:
    """Each side `runs` times, interleaved run by run, the order reversed
    every other run; the measures per side, in run order."""
    results: list[list[Measure | None]] = [[] for _ in sides]
    order = list(range(len(sides)))
    for i in range(runs):
        for k in (order if i % 2 == 0 else order[::-1]):
            results[k].append(sides[k]())
    return results


def median(measures: Sequence[Measure | None]) -> Measure | None:
    """Median wall time, highest peak RSS, the last run's bytes read; None
    when any run could not be made."""
    if not measures or any(m is None for m in measures):
        return None
    return Measure(statistics.median(m.seconds for m in measures), max(m.peak_rss for m in measures),
                   measures[-1].read, statistics.median(m.cpu for m in measures))


def versus(ours: Side, ref: Side | None, runs: int) -> tuple[Measure, Measure | None]:
    """rescue and the reference alternately: (ours, reference) medians."""
    if ref is None:
        got = alternate([ours], runs)
        return median(got[0]), None   # type: ignore[return-value]
    a, b = alternate([ours, ref], runs)
    return median(a), median(b)   # type: ignore[return-value]


def ratio(ours: Measure | None, ref: Measure | None) -> float | None:
    return round(ours.seconds / ref.seconds, 2) if ours and ref and ref.seconds else None


def load() -> str:
    """The load average now (1, 5, 15 min): the machine may be shared."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"
