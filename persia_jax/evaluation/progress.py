"""Periodic training progress lines: step, throughput, ETA and chosen scalars."""

from __future__ import annotations

import time
from typing import Callable, Mapping, Optional

from absl import logging


def format_duration(seconds: float) -> str:
  """Formats seconds as e.g. "2h03m", "4m05s" or "12s"."""
  if seconds != seconds or seconds == float("inf"):  # NaN or infinite
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


class ProgressLogger:
  """Logs progress every N steps and/or every T seconds, with rates over the last interval.

  Call `update(step, loss=...)` once per step. When an interval has elapsed it
  logs one line such as

    step 1200/10000 (12.0%) | 45.2 steps/s | 1.85e+05 samples/s | ETA 3m15s | loss=0.4512

  and returns the rates so the trainer can write them with a metric writer.
  Rates cover the steps since the previous report (or since construction),
  so slow first steps such as compilation stop counting after one interval.

  Args:
    total_steps: the step the run ends at, for the percentage and ETA.
    batch_size: samples per step (global batch), for samples/s.
    every_steps: report when this many steps passed since the last report.
    every_secs: report when this many seconds passed since the last report.
      At least one of every_steps and every_secs must be set; with both, the
      first one reached triggers the report.
    start_step: the step the run starts or resumes from.
    clock: seconds as a float; time.monotonic unless a test injects one.
  """

  def __init__(self, total_steps: int, batch_size: int, *, every_steps: Optional[int] = None,
               every_secs: Optional[float] = None, start_step: int = 0,
               clock: Callable[[], float] = time.monotonic):
    if every_steps is None and every_secs is None:
      raise ValueError("Set every_steps or every_secs so ProgressLogger knows when to report.")
    if every_steps is not None and every_steps <= 0:
      raise ValueError(f"every_steps must be positive, got {every_steps}.")
    if every_secs is not None and every_secs <= 0:
      raise ValueError(f"every_secs must be positive, got {every_secs}.")
    self.total_steps = int(total_steps)
    self.batch_size = int(batch_size)
    self.every_steps = every_steps
    self.every_secs = every_secs
    self._clock = clock
    self._last_step = int(start_step)
    self._last_time = clock()

  def _due(self, step: int, now: float) -> bool:
    if self.every_steps is not None and step - self._last_step >= self.every_steps:
      return True
    if self.every_secs is not None and now - self._last_time >= self.every_secs:
      return True
    return step >= self.total_steps and step > self._last_step

  def update(self, step: int, **scalars: float) -> Optional[dict[str, float]]:
    """Records that `step` finished; logs and returns rates when a report is due.

    Args:
      step: the number of steps done so far.
      **scalars: extra values for the log line, e.g. loss=0.45.

    Returns:
      None between reports; at a report, {"steps_per_sec", "samples_per_sec",
      "eta_secs"} over the interval since the previous report.
    """
    now = self._clock()
    if not self._due(step, now):
      return None
    elapsed = now - self._last_time
    steps = step - self._last_step
    steps_per_sec = steps / elapsed if elapsed > 0 else float("nan")
    remaining = max(self.total_steps - step, 0)
    if remaining == 0:
      eta = 0.0
    elif steps_per_sec > 0:
      eta = remaining / steps_per_sec
    else:
      eta = float("nan")
    rates = {
        "steps_per_sec": steps_per_sec,
        "samples_per_sec": steps_per_sec * self.batch_size,
        "eta_secs": eta,
    }
    self._log(step, rates, scalars)
    self._last_step = step
    self._last_time = now
    return rates

  def _log(self, step: int, rates: Mapping[str, float], scalars: Mapping[str, float]) -> None:
    percent = 100.0 * step / self.total_steps if self.total_steps > 0 else float("nan")
    parts = [
        f"step {step}/{self.total_steps} ({percent:.1f}%)",
        f"{rates['steps_per_sec']:.3g} steps/s",
        f"{rates['samples_per_sec']:.3g} samples/s",
        f"ETA {format_duration(rates['eta_secs'])}",
    ]
    parts += [f"{key}={float(value):.4g}" for key, value in scalars.items()]
    logging.info(" | ".join(parts))
