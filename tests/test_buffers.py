"""Tests of BufferPool: alignment, memory sharing with JAX and lifetime-based reuse."""

import gc
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persia_jax.embedding import memory
from persia_jax.embedding.buffers import BufferPool


def _pointer(array: np.ndarray) -> int:
  return array.ctypes.data


def test_acquire_is_aligned_with_shape_and_dtype():
  pool = BufferPool()
  buffer = pool.acquire((3, 7), np.float16)
  assert buffer.shape == (3, 7)
  assert buffer.dtype == np.float16
  assert memory.is_aligned(buffer)
  assert buffer.flags.c_contiguous
  assert buffer.flags.writeable


def test_device_put_sharing_detection_matches_behaviour():
  # Records whether this jax version shares aligned host memory on the CPU
  # backend, and checks that a write to the buffer shows through exactly when
  # the pointers are equal.
  buffer = memory.aligned_zeros((256, 16), np.float32)
  array = jax.device_put(buffer)
  shares = array.unsafe_buffer_pointer() == _pointer(buffer)
  buffer[0, 0] = 42.0
  seen = float(np.array(array[0, 0]))
  assert (seen == 42.0) == shares
  print(f"jax {jax.__version__}: device_put shares aligned memory: {shares}")


def test_device_put_shares_aligned_memory_on_cpu():
  # buffers.py states that jax 0.10.2 shares aligned memory. The pool is safe
  # either way, but a JAX upgrade that starts copying makes this fail so that
  # the statement gets updated.
  buffer = memory.aligned_zeros((256, 16), np.float32)
  array = jax.device_put(buffer, jax.devices("cpu")[0])
  assert array.unsafe_buffer_pointer() == _pointer(buffer)


def test_pool_skips_memory_of_live_jax_array():
  pool = BufferPool()
  buffer = pool.acquire((256, 16), np.float32)
  buffer.fill(1.0)
  first = _pointer(buffer)
  array = jax.device_put(buffer)
  del buffer
  gc.collect()
  second = pool.acquire((256, 16), np.float32)
  assert _pointer(second) != array.unsafe_buffer_pointer()
  np.testing.assert_array_equal(np.asarray(array), 1.0)
  del second

  del array
  gc.collect()
  # The first buffer is free again; the pool may return either free buffer.
  third = pool.acquire((256, 16), np.float32)
  fourth = pool.acquire((256, 16), np.float32)
  assert first in {_pointer(third), _pointer(fourth)}


def test_pool_keeps_buffer_during_dispatched_computation():
  pool = BufferPool()
  buffer = pool.acquire((512, 512), np.float32)
  buffer.fill(1.0)
  array = jax.device_put(buffer)
  del buffer

  @jax.jit
  def slow(value):
    def body(_, carry):
      return jnp.tanh(carry @ carry * 1e-3)
    return jax.lax.fori_loop(0, 400, body, value)

  slow(array).block_until_ready()  # Compile first.
  result = slow(array)
  # jaxlib defers dropping its reference to the numpy array until its next
  # call or a garbage collection, so gc.collect() forces that.
  del array
  gc.collect()
  in_use_while_running = pool.stats()["in_use"]
  if result.is_ready():
    pytest.skip("The computation finished before the check; nothing was tested.")
  result.block_until_ready()
  gc.collect()
  assert in_use_while_running == 1
  assert pool.stats()["in_use"] == 0


def test_pool_reuses_buffer_after_release():
  pool = BufferPool()
  buffer = pool.acquire((100, 8), np.float32)
  first = _pointer(buffer)
  del buffer
  again = pool.acquire((100, 8), np.float32)
  assert _pointer(again) == first
  assert pool.stats()["reused"] == 1


def test_pool_keeps_buffer_while_view_alive():
  pool = BufferPool()
  buffer = pool.acquire((100, 8), np.float32)
  first = _pointer(buffer)
  view = buffer[10:20].reshape(-1)
  del buffer
  other = pool.acquire((100, 8), np.float32)
  assert _pointer(other) != first
  assert np.shares_memory(view, view)  # The view is still usable.
  del view
  assert _pointer(pool.acquire((100, 8), np.float32)) == first


def test_pool_reuses_across_similar_sizes():
  pool = BufferPool()
  buffer = pool.acquire((1000, 16), np.float32)  # 64000 bytes -> 64 KiB class.
  first = _pointer(buffer)
  del buffer
  smaller = pool.acquire((1010, 16), np.float32)
  assert _pointer(smaller) == first


def test_pool_drops_buffers_beyond_max_free_bytes():
  pool = BufferPool(max_free_bytes=8192)
  buffers = [pool.acquire(4096, np.uint8) for _ in range(3)]
  del buffers
  stats = pool.stats()
  assert stats["returned"] == 3
  assert stats["dropped"] == 1
  assert stats["free_bytes"] == 8192


def test_pool_in_use_count():
  pool = BufferPool()
  kept = [pool.acquire(10, np.float32) for _ in range(4)]
  del kept[:2]
  assert pool.stats()["in_use"] == 2


def test_pool_threads_get_disjoint_buffers():
  pool = BufferPool()
  live = set()
  lock = threading.Lock()
  collisions = []

  def work():
    for _ in range(300):
      buffer = pool.acquire((64, 16), np.float32)
      pointer = _pointer(buffer)
      with lock:
        if pointer in live:
          collisions.append(pointer)
        live.add(pointer)
      buffer.fill(1.0)
      with lock:
        live.discard(pointer)
      del buffer

  threads = [threading.Thread(target=work) for _ in range(4)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not collisions
