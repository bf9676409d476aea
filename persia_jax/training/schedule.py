"""When embedding gradients reach the store: the sync, replay and hybrid schedules.

Every training mode runs the same three named steps per batch t:

  lookup(t)  the embedding worker gathers and pools rows for batch t,
  dense(t)   the jitted dense step returns dense updates and d(loss)/d(embedding),
  push(t)    the worker turns pooled gradients into per-ID gradients and the
             store applies them with its sparse optimizer.

A schedule only decides when push(t) runs relative to later lookups. The
staleness of batch s is the number of earlier batches whose gradients the store
has not applied when lookup(s) starts; every schedule records it.

  SyncSchedule       push(t) runs inline before lookup(t + 1): staleness 0.
  ReplaySchedule     push(t) runs inline exactly before lookup(t + tau + 1), so a
                     run is bit-reproducible and its staleness is min(t, tau).
  ThreadedSchedule   push(t) runs on a background thread pool; lookup(s) waits
                     only while more than tau earlier batches are unapplied. This
                     is PERSIA's hybrid algorithm; staleness depends on timing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from typing import Callable, Mapping

import numpy as np
from absl import logging

# Per table: unique uint64 IDs and float32 [num_unique, dim] summed gradients.
TableGrads = Mapping[str, tuple[np.ndarray, np.ndarray]]
GradsFn = Callable[[], TableGrads]
ApplyFn = Callable[[TableGrads], None]


class EmbeddingSchedule:
  """Base class: orders pushes of embedding gradients against lookups.

  Attributes:
    applied: number of batches whose gradients the store has applied, counting
      from `start_step`.
    staleness: the staleness recorded for each lookup since the last
      `pop_staleness()`.
    wait_seconds: total time lookups spent waiting for the bound.
  """

  name = "base"

  def __init__(self, apply_fn: ApplyFn, *, start_step: int = 0):
    self._apply_fn = apply_fn
    self.start_step = start_step
    self.applied = 0
    self.staleness: list[int] = []
    self.wait_seconds = 0.0
    self.push_seconds = 0.0

  def before_lookup(self, step: int) -> int:
    """Blocks until batch `step` may be looked up; returns and records its staleness."""
    staleness = self._wait_for_bound(step)
    self.staleness.append(staleness)
    return staleness

  def _wait_for_bound(self, step: int) -> int:
    raise NotImplementedError

  def submit(self, step: int, grads_fn: GradsFn) -> None:
    """Hands over the gradients of batch `step`; `grads_fn()` computes them."""
    raise NotImplementedError

  def flush(self) -> None:
    """Applies every pending push and waits for it."""

  def pending(self) -> list[tuple[int, TableGrads]]:
    """Pushes computed but not applied, in step order (replay only)."""
    return []

  def restore_pending(self, pending: list[tuple[int, TableGrads]]) -> None:
    if pending:
      raise ValueError(f"The {self.name} schedule keeps no pending gradients.")

  def close(self) -> None:
    self.flush()

  def pop_staleness(self) -> list[int]:
    values, self.staleness = self.staleness, []
    return values

  def _apply(self, grads: TableGrads) -> None:
    start = time.perf_counter()
    self._apply_fn(grads)
    self.push_seconds += time.perf_counter() - start


class SyncSchedule(EmbeddingSchedule):
  """Applies each batch's embedding gradients before the next lookup."""

  name = "sync"

  def _wait_for_bound(self, step: int) -> int:
    return step - self.start_step - self.applied

  def submit(self, step: int, grads_fn: GradsFn) -> None:
    self._apply(grads_fn())
    self.applied += 1


class ReplaySchedule(EmbeddingSchedule):
  """Applies the gradients of batch t exactly before the lookup of batch t + tau + 1.

  Pushes run on the calling thread in step order, so a run with a given tau
  does not depend on thread timing; tau = 0 equals `SyncSchedule`.
  """

  name = "replay"

  def __init__(self, apply_fn: ApplyFn, *, staleness: int, start_step: int = 0):
    super().__init__(apply_fn, start_step=start_step)
    if staleness < 0:
      raise ValueError(f"embedding_staleness must be >= 0, got {staleness}.")
    self.tau = staleness
    # Entries hold a thunk until the gradients are needed, so the training
    # thread does not wait for the dense step's output at submit time.
    self._queue: collections.deque[tuple[int, GradsFn | TableGrads]] = collections.deque()

  def _apply_oldest(self) -> None:
    _, grads = self._queue.popleft()
    self._apply(grads() if callable(grads) else grads)
    self.applied += 1

  def _wait_for_bound(self, step: int) -> int:
    while self._queue and self._queue[0][0] <= step - self.tau - 1:
      self._apply_oldest()
    return step - self.start_step - self.applied

  def submit(self, step: int, grads_fn: GradsFn) -> None:
    self._queue.append((step, grads_fn))

  def flush(self) -> None:
    while self._queue:
      self._apply_oldest()

  def pending(self) -> list[tuple[int, TableGrads]]:
    self._queue = collections.deque(
        (step, grads() if callable(grads) else grads) for step, grads in self._queue)
    return list(self._queue)

  def restore_pending(self, pending: list[tuple[int, TableGrads]]) -> None:
    self._queue = collections.deque(sorted(pending, key=lambda item: item[0]))
    # Restored pushes belong to batches before start_step, so they count as
    # unapplied earlier batches for the staleness of the next lookups.
    self.applied = -len(self._queue)


class ThreadedSchedule(EmbeddingSchedule):
  """PERSIA's hybrid schedule: pushes run on a thread pool, bounded by tau.

  An exception raised while computing or applying a push is re-raised on the
  training thread at the next `before_lookup`, `submit` or `flush`.
  """

  name = "threaded"

  def __init__(self, apply_fn: ApplyFn, *, staleness: int, num_threads: int = 2,
               start_step: int = 0):
    super().__init__(apply_fn, start_step=start_step)
    if staleness < 0:
      raise ValueError(f"embedding_staleness must be >= 0, got {staleness}.")
    if num_threads < 1:
      raise ValueError(f"num_update_threads must be >= 1, got {num_threads}.")
    self.tau = staleness
    self._executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=num_threads, thread_name_prefix="embedding-push")
    self._condition = threading.Condition()
    self._in_flight: set[concurrent.futures.Future] = set()
    self._error: BaseException | None = None
    self._push_lock = threading.Lock()

  def _raise_if_failed(self) -> None:
    if self._error is not None:
      error, self._error = self._error, None
      raise RuntimeError(f"An embedding gradient push failed: {error!r}") from error

  def _run_push(self, grads_fn: GradsFn) -> None:
    try:
      grads = grads_fn()
      start = time.perf_counter()
      self._apply_fn(grads)
      elapsed = time.perf_counter() - start
    except BaseException as error:  # pylint: disable=broad-except
      logging.exception("Embedding gradient push failed.")
      with self._condition:
        self._error = error
        self._condition.notify_all()
      return
    with self._condition:
      self.push_seconds += elapsed
      self.applied += 1
      self._condition.notify_all()

  def _wait_for_bound(self, step: int) -> int:
    start = time.perf_counter()
    with self._condition:
      while True:
        self._raise_if_failed()
        unapplied = step - self.start_step - self.applied
        if unapplied <= self.tau:
          break
        self._condition.wait()
    self.wait_seconds += time.perf_counter() - start
    return unapplied

  def submit(self, step: int, grads_fn: GradsFn) -> None:
    with self._condition:
      self._raise_if_failed()
    future = self._executor.submit(self._run_push, grads_fn)
    self._in_flight.add(future)
    future.add_done_callback(self._in_flight.discard)

  def flush(self) -> None:
    concurrent.futures.wait(list(self._in_flight))
    with self._condition:
      self._raise_if_failed()

  def close(self) -> None:
    try:
      self.flush()
    finally:
      self._executor.shutdown(wait=True)


def make_schedule(mode: str, apply_fn: ApplyFn, *, staleness: int, num_threads: int,
                  deterministic: bool, start_step: int = 0) -> EmbeddingSchedule:
  """Builds the embedding schedule of a training mode.

  Args:
    mode: "sync", "hybrid" or "async" (hybrid and async schedule embeddings alike).
    apply_fn: applies per-table gradients to the stores.
    staleness: tau, the maximum number of unapplied earlier batches at a lookup.
    num_threads: update threads of the threaded schedule.
    deterministic: replay staleness exactly instead of using threads.
    start_step: the first step of this run (after a resume).
  """
  if mode == "sync":
    return SyncSchedule(apply_fn, start_step=start_step)
  if mode not in ("hybrid", "async"):
    raise ValueError(f"Unknown config.mode={mode!r}; expected sync, hybrid or async.")
  if deterministic:
    return ReplaySchedule(apply_fn, staleness=staleness, start_step=start_step)
  return ThreadedSchedule(apply_fn, staleness=staleness, num_threads=num_threads,
                          start_step=start_step)

