"""Splitting, shuffling, batching and prefetching of a source's rows.

Order of the rows a process sees in one epoch:
  1. Files in sorted order; for split "train" with shuffling, permuted by
     `default_rng([seed, epoch])`.
  2. Within each file, the rows of the split (`[lo, hi)` data rows) in file
     order, and of those only rows with `(row + file_index) % process_count ==
     process_index`, so the processes together see every row exactly once.
  3. The rows are cut into windows: a window is whole blocks, at least
     `shuffle_buffer` rows. With shuffling, the rows of window `w` are
     permuted by `default_rng([seed, epoch, w, 1])`.
  4. Windows are concatenated and cut into batches; a batch may span windows
     and, when `num_epochs` > 1, epochs.

Because windows start at block boundaries and blocks are a function of the
starting cursor, a position is (epoch, window, the cursor where the window
starts, rows of the window already emitted). `state_dict` returns it after the
last batch the trainer received, and resuming re-reads that window and skips
the emitted rows, so the remaining batches are identical.
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue
import threading
from typing import Any, Iterator

from absl import logging
import numpy as np

from persia_jax.data.batch import Batch
from persia_jax.data.chunk import Chunk, concat_chunks
from persia_jax.data.schema import Schema

STATE_VERSION = 1


class _End:
  """Queue marker of the end of the stream."""


class _Failure:
  """Queue marker that carries an exception from the producer thread."""

  def __init__(self, error: BaseException):
    self.error = error


class Stream:
  """The deterministic row order of one split for one process (no threads of its own).

  Args:
    source: a `TextSource`, `ParquetSource`, `LibsvmSource` or
      `SyntheticSource`.
    ranges: per file of the source, (lo, hi, cursor of row lo or None).
    split: "train" or "test".
    batch_size: rows per batch.
    seed: shuffling seed.
    shuffle: whether to shuffle files and windows.
    shuffle_buffer: minimum rows per window.
    num_epochs: epochs to run, or None for no end.
    drop_remainder: whether to drop a last batch with fewer than
      `batch_size` rows.
    process_index, process_count: data-parallel position of this process.
    num_parse_threads: threads that parse blocks.
    parse_ahead: blocks parsed ahead of use.
  """

  def __init__(self, source: Any, ranges: list[tuple[int, int, dict | None]], *,
               split: str, batch_size: int, seed: int, shuffle: bool,
               shuffle_buffer: int, num_epochs: int | None, drop_remainder: bool,
               process_index: int, process_count: int, num_parse_threads: int,
               parse_ahead: int):
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if not 0 <= process_index < process_count:
      raise ValueError(
          f"process_index must be in [0, process_count), got {process_index} and"
          f" {process_count}.")
    self.source = source
    self.schema: Schema = source.schema
    self.ranges = ranges
    self.split = split
    self.batch_size = batch_size
    self.seed = seed
    self.shuffle = shuffle
    self.window_rows = max(int(shuffle_buffer), 1) if shuffle else 1
    self.num_epochs = num_epochs
    self.drop_remainder = drop_remainder
    self.process_index = process_index
    self.process_count = process_count
    self.num_parse_threads = max(int(num_parse_threads), 1)
    self.parse_ahead = max(int(parse_ahead), 1)
    self.report = {"rows_read": 0, "rows_emitted": 0, "rows_skipped": {}, "batches": 0}
    # The producer thread updates `report` while the trainer may read it.
    self.report_lock = threading.Lock()

  def initial_state(self) -> dict[str, Any]:
    return {"version": STATE_VERSION, "split": self.split, "seed": self.seed,
            "process_index": self.process_index, "process_count": self.process_count,
            "epoch": 0, "file_cursor": 0, "cursor": None, "window": 0, "emitted": 0,
            "finished": False}

  def check_state(self, state: dict[str, Any]) -> None:
    """Raises ValueError if `state` was saved by a differently configured stream."""
    for key in ("version", "split", "seed", "process_index", "process_count"):
      expected = STATE_VERSION if key == "version" else getattr(self, key)
      if state.get(key) != expected:
        raise ValueError(
            f"Iterator state has {key}={state.get(key)!r} but this input pipeline has"
            f" {key}={expected!r}; restore it into a pipeline built with the same"
            " split, seed and process layout.")

  def file_order(self, epoch: int) -> list[int]:
    order = [i for i, (lo, hi, _) in enumerate(self.ranges) if hi > lo or hi < 0]
    if self.shuffle and len(order) > 1:
      order = [order[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(order))]
    return order

  # --------------------------------------------------------------------------
  # Blocks of one epoch, parsed on a thread pool in order.
  # --------------------------------------------------------------------------
  def _blocks(self, order: list[int], file_cursor: int, cursor: dict | None
              ) -> Iterator[tuple[int, dict | None, Any]]:
    """Yields (file cursor after block, cursor after block, Block) in order."""
    for k in range(file_cursor, len(order)):
      file_index = order[k]
      lo, hi, lo_cursor = self.ranges[file_index]
      if k == file_cursor and cursor is not None:
        start = cursor
      elif lo_cursor is not None:
        start = lo_cursor
      else:
        start = self.source.start_cursor(file_index)
      for block in self.source.blocks(file_index, start):
        if 0 <= hi <= block.first_row:
          break
        if hi >= 0 and block.end["row"] >= hi:
          yield k + 1, None, self.source.truncate(block, hi - block.first_row)
          break
        yield k, dict(block.end), block

  def _parsed(self, pool: concurrent.futures.Executor, order: list[int], file_cursor: int,
              cursor: dict | None) -> Iterator[tuple[int, dict | None, Chunk]]:
    """Yields (file cursor after, cursor after, filtered Chunk) for each block."""
    pending = collections.deque()
    blocks = self._blocks(order, file_cursor, cursor)
    exhausted = False
    while True:
      while not exhausted and len(pending) < self.parse_ahead:
        item = next(blocks, None)
        if item is None:
          exhausted = True
          break
        next_file, next_cursor, block = item
        pending.append((next_file, next_cursor, pool.submit(self.source.parse, block)))
      if not pending:
        return
      next_file, next_cursor, future = pending.popleft()
      parsed = future.result()
      with self.report_lock:
        self.report["rows_read"] += parsed.rows_read
        skipped = self.report["rows_skipped"]
        for reason, count in parsed.skipped.items():
          skipped[reason] = skipped.get(reason, 0) + count
      yield next_file, next_cursor, self._filter(parsed)

  def _filter(self, parsed) -> Chunk:
    lo, hi, _ = self.ranges[parsed.file_index]
    rows = parsed.rows
    keep = rows >= lo
    if hi >= 0:
      keep &= rows < hi
    if self.process_count > 1 and not getattr(self.source, "handles_process_split", False):
      keep &= (rows + parsed.file_index) % self.process_count == self.process_index
    if keep.all():
      return parsed.chunk
    return parsed.chunk.take(np.flatnonzero(keep))

  # --------------------------------------------------------------------------
  # Windows and batches.
  # --------------------------------------------------------------------------
  def batches(self, state: dict[str, Any], stop: threading.Event | None = None
              ) -> Iterator[tuple[Batch, dict[str, Any]]]:
    """Yields (batch, state after the batch) from `state` to the end."""
    self.check_state(state)
    if state["finished"]:
      return
    pieces: list[Chunk] = []
    num_pending = 0
    epoch = state["epoch"]
    resume = state
    parsed = None
    with concurrent.futures.ThreadPoolExecutor(
        self.num_parse_threads, thread_name_prefix="persia_jax_data_parse") as pool:
      try:
        while self.num_epochs is None or epoch < self.num_epochs:
          order = self.file_order(epoch)
          if resume is not None:
            file_cursor, cursor = resume["file_cursor"], resume["cursor"]
            window, skip = resume["window"], resume["emitted"]
            resume = None
          else:
            file_cursor, cursor, window, skip = 0, None, 0, 0
          fresh_epoch = file_cursor == 0 and cursor is None and window == 0
          if parsed is not None:
            parsed.close()
          parsed = self._parsed(pool, order, file_cursor, cursor)
          rows_this_epoch = 0
          exhausted = False
          while not exhausted:
            window_start = (file_cursor, cursor)
            parts, size = [], 0
            while size < self.window_rows:
              item = next(parsed, None)
              if item is None:
                exhausted = True
                break
              file_cursor, cursor, chunk = item
              if chunk.size:
                parts.append(chunk)
                size += chunk.size
            if size == 0:
              break
            rows_this_epoch += size
            chunk = concat_chunks(parts)
            if self.shuffle:
              permutation = np.random.default_rng([self.seed, epoch, window, 1]).permutation(size)
              chunk = chunk.take(permutation)
            position = skip
            skip = 0
            while position < size:
              if stop is not None and stop.is_set():
                return
              take = min(self.batch_size - num_pending, size - position)
              pieces.append(chunk.slice(position, position + take))
              num_pending += take
              position += take
              if num_pending == self.batch_size:
                if position == size:
                  after = self._state(epoch, file_cursor, cursor, window + 1, 0)
                else:
                  after = self._state(epoch, *window_start, window, position)
                yield self._emit(pieces), after
                pieces, num_pending = [], 0
            window += 1
          if rows_this_epoch == 0 and fresh_epoch:
            raise ValueError(
                f"The {self.split!r} split has no rows for process {self.process_index} of"
                f" {self.process_count} in {self.source.files}. Check data.files,"
                " data.test_fraction and the number of processes.")
          epoch += 1
        if num_pending and not self.drop_remainder:
          yield self._emit(pieces), self._finished(epoch)
        elif num_pending:
          logging.info("Dropped a last partial batch of %d rows (drop_remainder=True).",
                       num_pending)
      finally:
        if parsed is not None:
          parsed.close()  # Closes the open file of the block reader.
        pool.shutdown(wait=True, cancel_futures=True)
        if self.report["rows_skipped"]:
          logging.warning("Input pipeline (%s split) skipped rows by reason: %s; rows read: %d.",
                          self.split, self.report["rows_skipped"], self.report["rows_read"])

  def _emit(self, pieces: list[Chunk]) -> Batch:
    chunk = concat_chunks(pieces)
    with self.report_lock:
      self.report["rows_emitted"] += chunk.size
      self.report["batches"] += 1
    return chunk.to_batch()

  def _state(self, epoch, file_cursor, cursor, window, emitted) -> dict[str, Any]:
    state = self.initial_state()
    state.update(epoch=epoch, file_cursor=file_cursor,
                 cursor=None if cursor is None else dict(cursor),
                 window=window, emitted=emitted)
    return state

  def _finished(self, epoch: int) -> dict[str, Any]:
    state = self._state(epoch, 0, None, 0, 0)
    state["finished"] = True
    return state


class BatchIterator:
  """Iterator over `Batch`es, prepared ahead by a background thread.

  A producer thread runs `Stream.batches` and puts each batch with the state
  after it into a bounded queue. An exception raised there is re-raised by
  `__next__` unchanged. `close()` (or leaving a `with` block) stops and joins
  every thread the iterator started; calling `next` after `close()` starts
  new threads at the position of `state_dict()`.

  Attributes:
    schema: the features of every batch.
  """

  def __init__(self, stream: Stream, *, prefetch: int = 4):
    self._stream = stream
    self.schema: Schema = stream.schema
    self._prefetch = max(int(prefetch), 1)
    self._state = stream.initial_state()
    self._thread: threading.Thread | None = None
    self._queue: queue.Queue | None = None
    self._stop = threading.Event()
    self._done = False

  @property
  def report(self) -> dict[str, Any]:
    """Rows read, emitted and skipped by reason (from the producer, which runs ahead)."""
    with self._stream.report_lock:
      report = dict(self._stream.report)
      report["rows_skipped"] = dict(report["rows_skipped"])
    return report

  def state_dict(self) -> dict[str, Any]:
    """Returns the JSON-serializable position after the last batch returned."""
    state = dict(self._state)
    if state["cursor"] is not None:
      state["cursor"] = dict(state["cursor"])
    return state

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Restarts the iterator at a position from `state_dict`."""
    self._stream.check_state(state)
    self.close()
    self._state = dict(state)
    self._done = False

  def _start(self) -> None:
    self._stop = threading.Event()
    self._queue = queue.Queue(maxsize=self._prefetch)
    self._thread = threading.Thread(
        target=self._produce, args=(dict(self._state), self._queue, self._stop),
        name="persia_jax_data_prefetch", daemon=True)
    self._thread.start()

  def _produce(self, state: dict[str, Any], out: queue.Queue, stop: threading.Event) -> None:
    def put(item) -> bool:
      while not stop.is_set():
        try:
          out.put(item, timeout=0.05)
          return True
        except queue.Full:
          continue
      return False

    try:
      for item in self._stream.batches(state, stop):
        if not put(item):
          return
      put(_End())
    except BaseException as error:  # pylint: disable=broad-except
      # Handed to the consumer, which re-raises it.
      put(_Failure(error))

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> Batch:
    if self._done:
      raise StopIteration
    if self._thread is None:
      self._start()
    thread, items = self._thread, self._queue
    while True:
      try:
        item = items.get(timeout=0.1)
        break
      except queue.Empty:
        # `close()` from another thread stops the producer without an end marker.
        if not thread.is_alive() and items.empty():
          raise RuntimeError("The input pipeline was closed while waiting for a batch.") from None
    if isinstance(item, _End):
      self._done = True
      self.close()
      raise StopIteration
    if isinstance(item, _Failure):
      self._done = True
      self.close()
      raise item.error
    batch, self._state = item
    return batch

  def close(self) -> None:
    """Stops the producer and parse threads and waits for them."""
    if self._thread is None:
      return
    self._stop.set()
    while self._thread.is_alive():
      try:
        while True:
          self._queue.get_nowait()
      except queue.Empty:
        pass
      self._thread.join(timeout=0.05)
    self._thread = None
    self._queue = None

  def __enter__(self) -> "BatchIterator":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass
