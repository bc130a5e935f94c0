"""Progress of long jobs: a live bar on a terminal, one plain line per event otherwise.

When stdout is not a terminal (``steppo train ... > log.txt``, a CI log, a job scheduler) a bar
redraws nothing useful, so every iteration prints one unwrapped line to stdout::

    iteration 12/60 | reward 0.41 | train success 0.41 | eval 0.620 | 7.1 s/it | elapsed 1:25 | left ~5:41

The Python API gets the same lines with ``Trainer.train(progress=IterationLines(total))``, or any
callable ``progress(iteration, total, metrics)``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def clock(seconds: float) -> str:
    """'1:05:09', '5:41'."""
    s = int(round(max(seconds, 0)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def describe_metrics(metrics: dict[str, Any]) -> str:
    parts = [f"reward {metrics.get('train/reward_mean', 0):.2f}", f"train success {metrics.get('train/success', 0):.2f}"]
    if isinstance(metrics.get("eval/success"), float):
        parts.append(f"eval {metrics['eval/success']:.3f}")
    if isinstance(metrics.get("eval_sampled/success"), float):
        parts.append(f"eval sampled {metrics['eval_sampled/success']:.3f}")
    return " | ".join(parts)


class IterationLines:
    """``progress(iteration, total, metrics)`` that prints one line per iteration to `stream`
    (default stdout), with the time per iteration, elapsed and an estimate of what is left."""

    def __init__(self, total: int, start: int = 0, stream: TextIO | None = None, label: str = "iteration"):
        self.total, self.start, self.label = total, start, label
        self.stream = stream
        self.t0 = time.perf_counter()

    def __call__(self, it: int, total: int, metrics: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - self.t0
        done = max(it - self.start, 1)
        per = elapsed / done
        line = (f"{self.label} {it}/{total} | {describe_metrics(metrics)} | {per:.1f} s/it | elapsed {clock(elapsed)}"
                f" | left ~{clock(per * max(total - it, 0))}")
        print(line, file=self.stream or sys.stdout, flush=True)


def interactive(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default stdout) is a terminal a live bar can redraw."""
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())
