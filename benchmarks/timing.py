"""Wall-clock timing schedules shared by the benchmarks (no flags, so tests can import it)."""
from __future__ import annotations

import time
from typing import Any, Callable


def timed(fn: Callable[[], Any], pause: float = 0.0) -> float:
  """Seconds one call of fn takes, after `pause` seconds idle."""
  time.sleep(pause)
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def alternating(fns: dict[str, Callable[[], Any]], rounds: int, block: int = 1,
                pause: float = 0.0) -> dict[str, list[float]]:
  """Times each fn `rounds` times, `block` calls in a row per fn, the order reversed every turn, `pause` seconds
  idle before each call; returns seconds per fn."""
  names = list(fns)
  times: dict[str, list[float]] = {k: [] for k in names}
  for turn, start in enumerate(range(0, rounds, block)):
    for k in (names if turn % 2 == 0 else names[::-1]):
      times[k] += [timed(fns[k], pause) for _ in range(min(block, rounds - start))]
  return times
