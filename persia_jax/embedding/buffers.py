"""A pool of 64-byte-aligned host buffers that are safe to hand to JAX.

On JAX's CPU backend `jax.device_put` of a 64-byte-aligned numpy array may
share the array's memory instead of copying it (jax 0.10.2 shares it; see
`tests/test_buffers.py`). A buffer that backs a live JAX array must therefore
not be written again, or the JAX array changes under the computation that
reads it.

Design: reuse follows object lifetime, not explicit release calls.
`BufferPool.acquire` returns a numpy array whose `base` is a small lease
object that owns the aligned backing memory. Every view of the array keeps
the lease alive. JAX does too when it shares the memory, because it keeps a
reference to the array it was given for as long as its device buffer exists.
`tests/test_buffers.py` checks this with jax 0.10.2, also while a dispatched
computation still reads a deleted JAX array. When the last
reference goes, a weakref callback puts the backing memory back on the free
list. So a caller releases a buffer by dropping every reference to the array
and to the JAX arrays made from it, and nothing can release it early.

A buffer that only numpy code used comes back as soon as its last reference
is dropped. One that JAX shared comes back a little later: jaxlib 0.10.2
defers dropping its reference to the numpy array until its next call into
JAX or the next garbage collection (observed, not documented by JAX).
"""

from __future__ import annotations

import collections
import queue
import threading
import weakref

import numpy as np

from persia_jax.embedding import memory

# Smallest size class. Sizes are rounded up to a power of two so that the
# varying number of unique IDs per batch still finds a buffer to reuse.
_MIN_BYTES = 4096


class _Lease:
  """The `base` of an array handed out by `BufferPool.acquire`; owns the backing memory."""

  __slots__ = ("backing", "__array_interface__", "__weakref__")

  def __init__(self, backing: np.ndarray, nbytes: int):
    self.backing = backing
    # Bytes only, because the interface cannot describe extension dtypes such
    # as bfloat16; `acquire` views them as the requested dtype.
    self.__array_interface__ = {
        "shape": (nbytes,),
        "typestr": "|u1",
        "data": (backing.ctypes.data, False),
        "version": 3,
    }


def _size_class(nbytes: int) -> int:
  size = _MIN_BYTES
  while size < nbytes:
    size *= 2
  return size


class BufferPool:
  """Thread-safe pool of aligned host buffers, reused once nothing references them.

  Args:
    max_free_bytes: bytes of unused buffers kept for reuse; buffers returned
      beyond this are freed.
  """

  def __init__(self, max_free_bytes: int = 1 << 30):
    self.max_free_bytes = int(max_free_bytes)
    self._lock = threading.Lock()
    self._free: dict[int, list[np.ndarray]] = collections.defaultdict(list)
    self._free_bytes = 0
    # Weakref callbacks run whenever the garbage collector decides, possibly
    # inside `acquire` on the same thread, so they only put the backing on this
    # queue (`SimpleQueue.put` is reentrant) and `acquire` drains it.
    self._returned: queue.SimpleQueue = queue.SimpleQueue()
    self._leases: dict[int, weakref.ref] = {}
    self._next_key = 0
    self._counters = collections.Counter()

  def acquire(self, shape, dtype) -> np.ndarray:
    """Returns an uninitialised 64-byte-aligned C-contiguous array of `shape` and `dtype`.

    The memory is not handed out again while the array, any view of it or any
    JAX array that shares its memory is alive.
    """
    dtype = np.dtype(dtype)
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(
        int(s) for s in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = _size_class(nbytes)
    with self._lock:
      self._drain_returned()
      free = self._free[size]
      if free:
        backing = free.pop()
        self._free_bytes -= size
        self._counters["reused"] += 1
      else:
        backing = None
        self._counters["allocated"] += 1
        self._counters["allocated_bytes"] += size
    if backing is None:
      backing = memory.aligned_empty(size, np.uint8)
    lease = _Lease(backing, nbytes)
    returned = self._returned
    with self._lock:
      key = self._next_key
      self._next_key += 1

      def on_release(_, backing=backing, key=key):
        returned.put((key, backing))

      self._leases[key] = weakref.ref(lease, on_release)
    return np.asarray(lease).view(dtype).reshape(shape)

  def _drain_returned(self) -> None:
    """Moves returned backings to the free lists; the caller holds the lock."""
    while True:
      try:
        key, backing = self._returned.get_nowait()
      except queue.Empty:
        return
      self._leases.pop(key, None)
      size = backing.nbytes
      self._counters["returned"] += 1
      if self._free_bytes + size <= self.max_free_bytes:
        self._free[size].append(backing)
        self._free_bytes += size
      else:
        self._counters["dropped"] += 1

  def stats(self) -> dict[str, int]:
    """Counters: allocated, allocated_bytes, reused, returned, dropped, in_use, free_bytes."""
    with self._lock:
      self._drain_returned()
      stats = dict(self._counters)
      stats["in_use"] = len(self._leases)
      stats["free_bytes"] = self._free_bytes
    return stats
