"""Embedding store: the host-side parameter server of persia_jax.

An `EmbeddingStore` stores the rows of one embedding table keyed by uint64 IDs,
trains them with a sparse optimizer and implements `EmbeddingStoreAPI`
(api.py). Every uint64 value is a valid ID, 0 and 2**64 - 1 included.

Routing and deduplication. An ID lives in shard `splitmix64(id) % num_shards`.
A call first deduplicates its IDs in a small per-call hash table and groups
the distinct IDs by shard (`kernels.dedup_route`, one compiled O(n) pass plus
one pass over the distinct IDs; `kernels.dedup_sum_route` also sums the
gradients of repeated IDs, in arrival order). Then it runs one compiled kernel
per shard while holding that shard's `threading.Lock`; the kernel probes the
shard's table once per distinct ID. When most IDs of a lookup repeat and
their rows fit in 2 MiB, the kernels write one compact row per distinct ID
and a last pass expands them into the output in order. Otherwise they write the output in place, and only
the repeats are copied. The kernels (kernels.py) are
numba `nogil` functions, so calls from several threads run in parallel on
different shards. A call takes its shards in the order their locks come free
(it skips a shard another call holds and comes back to it), so concurrent
calls do not queue behind each other shard by shard. With `num_threads > 1`
the shards of one call also run in a pool.

Map. Each shard maps IDs to row slots with an open-addressing table of 16-byte
slots: the key, and an entry that packs the row slot and the row's recency
stamp (32 bits each). Linear probing, backward-shift deletion (no
tombstones), home slot from the high bits of MurmurHash3's fmix64 finalizer,
which is independent of the routing hash. A slot is free when its entry is
EMPTY, so occupancy never depends on the key. The table is kept at most 75%
full. NOTE: neither this hash nor the per-call deduplication hash is keyed,
so IDs crafted to collide (for example fmix64 preimages of one slot) make
probes linear in their number. Hash IDs from untrusted clients with a keyed
hash before they reach the store.

Memory. Per shard, rows (float32 [A, dim]), optimizer state (float32 [A,
slot_width]) and the table (uint64 [T, 2]) are 64-byte aligned arrays from
`memory.aligned_empty`. Rows and state grow by reallocation, by at least 1.25x
(so at most 20% of a growing shard's slots are unused), up to the shard
capacity, so a full shard allocates exactly `capacity` rows. The index adds 16
/ 0.75 = 21.3 bytes (table) + 0.5 bytes (eviction candidates: key and stamp
for 1/32 of the capacity) per row to the 4 * (dim + slot_width) bytes of row
and state, plus 4 KiB per shard of distinct-ID registers;
`bytes_per_row()` reports the measured total. That meets 1.25x of row and
state for rows of 88 bytes or more (dim >= 22 with SGD, dim >= 11 with
Adagrad). Below that the key (8 bytes), row slot and stamp (4 each) alone
reach a quarter of a 64-byte row before any free table slot, so exact LRU
over 64-bit IDs cannot fit 1.25x there.

Speed. A lookup of an ID reads two random cache lines: the table line that
contains its key, row slot and stamp, and the row. A training lookup's stamp
store goes to the table line it has already read. An update also reads and
writes the row's optimizer state. The row slot comes from the table, so
the two misses form a chain. Every shard kernel therefore first resolves the
rows of all its IDs (`kernels._resolve`), prefetching the table line of the ID
`kernels.PREFETCH_DISTANCE` positions ahead, so the misses of many IDs
overlap. A lookup's second loop copies the rows and prefetches the now known
row (and table line) of the ID half as far ahead. An update then applies the
optimizer to each row in float32 vectorized code (see Optimizers),
prefetching the row and state of the ID `PREFETCH_DISTANCE` ahead, so its
cost is the memory traffic of the probes, rows and state, not the
arithmetic. Deduplication first means that IDs repeated in a call (about 70%
of a Zipf batch) cost a per-call hash probe and a row copy, not a shard
probe. Work that is not configured stays off the per-ID path: no stamp
stores without a capacity, no count-min sketch unless `admission_min_count >
1`, no insert-candidate pass once a shard's arrays are at its capacity, and
the distinct-ID hash only on misses (see Counters).

Initial values. Column c of a new row is `(2u - 1) * init_scale`, where u in
[0, 1) is the top 24 bits of the c-th output of a SplitMix64 stream started at
`splitmix64(seed) ^ id`. It depends only on (seed, id, column), never on shard
count, capacity or arrival order; `initial_values(ids)` returns it.

Eviction. The `capacity` rows of a store are split evenly over the shards (the
first `capacity % num_shards` shards get one more), and a shard that is full
evicts its least recently used row. A training lookup first reads and
refreshes the IDs that have rows, then inserts the absent ones, so a call
never evicts a row it reads (one lookup per occurrence in arrival order
would evict a row that an earlier insert of the same call found least
recently used). Each looked-up or inserted row is stamped with the shard
clock plus the position of the ID's last occurrence in the call, and then the
clock advances by n. So the call's rows are the most recent, ordered by last
occurrence. Recency is exact: an insert evicts the row with the
smallest stamp among the rows the call does not touch. It comes from a buffer
of the entries with the smallest stamps, refilled by an O(table) selection
once per min(capacity / 32, 2**19) evictions, so about 32 entry reads per
eviction; kernels._next_victim explains why this is exact. Only a call with
more distinct IDs than a shard's capacity evicts rows it touched, and the
order among those is approximate. Training lookups refresh recency;
gradient updates and `train=False` lookups do not. Because routing is random,
shards fill unevenly, so a store may start evicting slightly before it
contains `capacity` rows.

Admission. A training lookup of an absent ID first checks admission: the ID
passes with probability `admission_probability`, decided by a hash of (seed,
id), so the same ID gets the same answer on every call. If it passes and
`admission_min_count > 1`, the occurrence is added to a per-shard count-min
sketch (depth 2, 4 uint8 counters per row of shard capacity, conservative
update, all counters halved every width / 4 additions) and the row is created
once the estimate reaches the minimum. Between halvings the sketch only overestimates (on hash collisions),
so an ID may be admitted early. The halving forgets IDs that stopped
appearing, and an ID whose occurrences straddle a halving may need more.
A rejected lookup returns the ID's initial value and inserts nothing. A
`train=False` lookup of an absent ID returns its initial value
(`unknown_id="initial"`) or zeros (`unknown_id="zeros"`) and changes nothing.

Optimizers. `apply_gradients` sums the gradients of duplicate IDs in arrival
order and updates each row once. Gradients of IDs without a row are dropped
and counted; a row whose summed gradient has a NaN or inf keeps its value and
is counted. For a row w with summed gradient g (element-wise; lr =
learning_rate, eps = epsilon, state starts at 0 unless stated):

  sgd:              w -= lr * (g + weight_decay * w)   (L2 penalty on the
                    gradient; for plain SGD the same as decoupled decay of
                    lr * weight_decay per step, applied to updated rows only)
  adagrad:          a += g^2 (a starts at initial_accumulator);
                    w -= lr * g / (sqrt(a) + eps)
  rowwise_adagrad:  a += mean(g^2) with one a per row, starting at
                    initial_accumulator;  w -= lr * g / (sqrt(a) + eps)
  adam:             t += 1 (per row);  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
                    w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
  ftrl:             FTRL-Proximal (McMahan et al., KDD 2013) with per-weight z and
                    n, and p = -learning_rate_power (0.5 by default):
                    n' = n + g^2;  z += g - (n'^p - n^p) / lr * w;  n = n';
                    w = 0 if |z| <= l1, else
                    w = -(z - sign(z) l1) / ((ftrl_beta + n^p) / lr + l2)

With `weight_bound > 0` every weight of an updated row is then clipped to
[-weight_bound, weight_bound]. The per-element math is float32, the dtype of
rows and state (as in FBGEMM's fused optimizers), written so that LLVM
vectorizes it over the row: no branch inside the loop over columns (the
FTRL threshold is a max, the non-finite test an integer max over the
exponent bits), numpy division semantics instead of a zero test per
division, and only the FMA-contraction and sign-of-zero fastmath flags.
Per-row scalars that float32 would round badly stay float64: Adam's bias
corrections 1 - b^t and row-wise Adagrad's mean of g^2. FTRL with p = 0.5
computes n'^p - n^p as g^2 / (sqrt(n') + sqrt(n)), which avoids the float32
cancellation of the difference. Adam's step count t is a float32 state
value, exact up to 2**24 updates of a row. The results match a float64 numpy
reference to rtol 1e-5, atol 1e-6 (tests/test_sparse_optimizers.py).

Counters. `stats()` returns hits, misses, inserts, evictions,
rejected_admissions, absent_gradients, nonfinite_gradients, updated_rows,
eval_hits, eval_misses, rows, capacity and distinct_ids_seen. Lookup and
gradient counters count occurrences: an absent ID twice in one training lookup
records a miss (which inserts the row) and then a hit. `nonfinite_gradients`
and `updated_rows` count unique rows. `distinct_ids_seen` is a HyperLogLog
estimate (4096 registers per shard, merged by maximum; 1.6% standard error;
exact for a few dozen IDs unless two share a register) of the distinct IDs of
training lookups, because an exact count would need memory for every ID ever
seen. Every ID that misses is added, and a stored row's ID was added when it
missed (or came with the registers of a checkpoint), so hits are skipped:
adding an ID twice changes nothing. After `import_rows` without registers,
hits are added again for that store.

Checkpoints. `save(path)` writes, per shard, the keys, rows and optimizer state
(least recently used first) as TensorStore zarr arrays, plus the distinct-ID
registers and a JSON manifest with `state_spec()` and the counters. The commit
is atomic: data goes to a temporary directory that is fsynced and renamed, and
the manifest is replaced last with `os.replace`. `load(path, num_shards=k)`
re-shards. Not restored: the admission sketch (IDs waiting for
`admission_min_count` start counting again) and, when the shard count
changes, the exact LRU order across old shards (approximated by relative
rank). checkpoint.py documents the layout in full.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import threading
from typing import Any, Callable

import numpy as np

from persia_jax.embedding import kernels
from persia_jax.embedding import memory
from persia_jax.embedding.optimizers import OptimizerSpec

_MAX_SHARD_CAPACITY = 2**31 - 2  # Row slots are int32 and -1 marks "none".
# Per-call kernels index a call's IDs with int32, and the 32-bit recency clock
# must hold one call's positions above the renumbered stamps.
_MAX_CALL_IDS = 2**30
# Lookups with fewer distinct IDs than this fraction of all IDs gather into a
# compact buffer and expand it (see `EmbeddingStore.lookup`). The buffer may
# take at most _COMPACT_MAX_BYTES, so that it stays in a core's cache (2 MiB
# of L2 on the 2-core benchmark VM). With 0.31 distinct IDs (a Zipf(1.1) batch of
# 65,536) that measured about 10% faster than writing in place and copying the
# repeats at dim 16 (1.3 MB buffer). It was 5-10% slower at dim 64 (5 MB) and
# with no repeats.
_COMPACT_FRACTION = 0.75
_COMPACT_MAX_BYTES = 2 << 20
_MIN_ALLOCATION = 64
# Growth factor of the shard arrays: each reallocation copies the used rows, so
# 1.25 costs about four copies per row in total and wastes at most 20% of slots.
_GROWTH = 1.25
_UNKNOWN_ID_MODES = ("initial", "zeros")
_UINT64_MASK = 2**64 - 1


def as_ids(ids: Any, name: str = "ids") -> np.ndarray:
  """Converts `ids` to a C-contiguous uint64 [n] array.

  Unsigned integer arrays are widened; signed integer arrays are accepted when
  no value is negative. A list or tuple of Python integers is converted
  exactly, also when it is empty or has values of 2**63 or more (which numpy
  would turn into float64).

  Raises:
    TypeError: if the dtype is not an integer type.
    ValueError: if the array is not 1-D, has more than 2**30 entries or
      contains a negative value.
  """
  if isinstance(ids, (list, tuple)) and all(
      isinstance(value, (int, np.integer)) and not isinstance(value, bool)
      for value in ids):
    values = [int(value) for value in ids]
    for index, value in enumerate(values):
      if not 0 <= value <= _UINT64_MASK:
        hint = ("map negative IDs to uint64 first" if value < 0 else
                "hash larger IDs into 64 bits first")
        raise ValueError(
            f"{name} must be in [0, 2**64 - 1], got {value} at index {index}; {hint}.")
    array = np.array(values, np.uint64)
  else:
    array = np.asarray(ids)
  if array.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {array.shape}; flatten it first.")
  if array.shape[0] > _MAX_CALL_IDS:
    raise ValueError(
        f"{name} has {array.shape[0]} entries; one call takes at most {_MAX_CALL_IDS}"
        " (int32 positions), so split it into several calls.")
  if array.dtype == np.uint64:
    return np.ascontiguousarray(array)
  if array.dtype.kind == "u":
    return array.astype(np.uint64)
  if array.dtype.kind == "i":
    if array.size and array.min() < 0:
      index = int(np.argmin(array))
      raise ValueError(
          f"{name} must be non-negative, got {array[index]} at index {index}; pass"
          " uint64 IDs to use the full 64-bit range.")
    return array.astype(np.uint64)
  raise TypeError(
      f"{name} must be an integer array (uint64 preferred), got dtype {array.dtype}.")


def _nonempty(starts: list[int]) -> list[int]:
  """Returns the indices s of the non-empty ranges [starts[s], starts[s + 1])."""
  return [s for s in range(len(starts) - 1) if starts[s + 1] > starts[s]]


class _Shard:
  """The arrays, counters and lock of one shard; see kernels.py for the layout."""

  def __init__(self, dim: int, slot_width: int, capacity: int, sketch_width: int,
               track_recency: bool):
    self.lock = threading.Lock()
    self.dim = dim
    self.slot_width = slot_width
    self.capacity = capacity
    self.track_recency = track_recency
    self.meta = np.zeros(kernels.META_SIZE, np.int64)
    self.meta[kernels.META_CANDIDATE_FALLBACK] = -1
    # Eviction candidates (see kernels._next_victim), a key and a stamp each.
    # An O(table) selection refills them once per len(candidates) evictions.
    # With 1/32 of the capacity (at most 512 K entries, 8 MiB) that costs
    # about 32 entry reads per eviction, for 0.5 bytes per row.
    self.candidates = memory.aligned_empty(
        (min(max(16, capacity // 32), 1 << 19) if track_recency else 0, 2), np.uint64)
    self.counters = np.zeros(kernels.NUM_COUNTERS, np.int64)
    self.distinct = np.zeros(kernels.DISTINCT_REGISTERS, np.uint8)
    self.sketch = np.zeros((2, sketch_width), np.uint8)
    # Whether the ID of every stored row is in `distinct`. Training lookups
    # add every ID that misses, so this is true unless rows were imported
    # without registers. While it is true, hits skip the distinct-ID hash.
    self.distinct_covers_rows = True
    self._allocate(0)

  @property
  def used(self) -> int:
    return int(self.meta[kernels.META_USED])

  @property
  def allocated(self) -> int:
    return self.rows.shape[0]

  def _allocate(self, rows: int) -> None:
    used = self.used
    values = memory.aligned_empty((rows, self.dim), np.float32)
    state = memory.aligned_empty((rows, self.slot_width), np.float32)
    # At least one free slot ends every probe; the load stays <= MAX_LOAD.
    table_size = max(rows + 1, math.ceil(rows / kernels.MAX_LOAD))
    table = memory.aligned_empty((table_size, 2), np.uint64)
    table[:, 1] = kernels.EMPTY
    if used:
      values[:used] = self.rows[:used]
      state[:used] = self.state[:used]
      kernels.rebuild_table(table, self.table)
    self.rows, self.state, self.table = values, state, table
    # An evicting shard at its capacity never grows again.
    self.full_size = self.track_recency and rows == self.capacity

  def reserve(self, extra: int) -> None:
    """Grows the arrays so `extra` more rows fit (up to the capacity).

    Raises:
      RuntimeError: if a shard without capacity limit would exceed the int32
        row-slot range, because it cannot evict.
    """
    if not self.track_recency and self.used + extra > self.capacity:
      raise RuntimeError(
          f"An embedding shard without capacity would exceed {self.capacity} rows"
          f" ({self.used} stored, up to {extra} new); use more shards or set a capacity.")
    needed = min(self.capacity, self.used + extra)
    if needed <= self.allocated:
      return
    grown = max(needed, int(_GROWTH * self.allocated), _MIN_ALLOCATION)
    self._allocate(min(self.capacity, grown))

  def nbytes(self) -> int:
    arrays = (self.rows, self.state, self.table, self.candidates, self.meta, self.counters,
              self.distinct, self.sketch)
    return sum(a.nbytes for a in arrays)


class EmbeddingStore:
  """A sharded, thread-safe embedding table with a sparse optimizer.

  Attributes:
    dim: embedding width (float32 values per row).
    num_shards: number of independently locked shards.
    capacity: maximum rows over all shards, or None for no limit.
    optimizer: the `OptimizerSpec` applied by `apply_gradients`.
    name: table name, used in messages and checkpoints.
  """

  def __init__(self, dim: int, *, num_shards: int = 4, capacity: int | None = None,
               optimizer: OptimizerSpec | dict[str, Any] | None = None,
               init_scale: float = 0.01, seed: int = 0,
               admission_probability: float = 1.0, admission_min_count: int = 1,
               unknown_id: str = "initial", name: str = "embedding",
               num_threads: int = 1):
    """Creates an empty store.

    Args:
      dim: embedding width, >= 1.
      num_shards: shards (locks and hash maps), >= 1.
      capacity: maximum rows over all shards, >= num_shards, or None for up to
        2**31 - 2 rows per shard.
      optimizer: an `OptimizerSpec`, a dict of its fields, or None for the
        default Adagrad.
      init_scale: new rows are uniform in [-init_scale, init_scale).
      seed: seeds initial values and admission; any integer (taken mod 2**64).
      admission_probability: probability in [0, 1] that an absent ID may get a
        row; decided per ID by a hash, so repeatable.
      admission_min_count: occurrences in training lookups (1 to 255) an absent
        ID needs before it gets a row.
      unknown_id: what `train=False` lookups return for absent IDs: "initial"
        (the seeded initial value) or "zeros".
      name: table name used in messages and checkpoints.
      num_threads: threads that work on the shards of one call in parallel;
        1 runs every shard in the calling thread. Calls from several threads
        run in parallel on different shards either way.
    """
    if int(dim) < 1:
      raise ValueError(f"dim must be >= 1, got {dim}.")
    if int(num_shards) < 1:
      raise ValueError(f"num_shards must be >= 1, got {num_shards}.")
    if capacity is not None and not num_shards <= int(capacity) <= (
        _MAX_SHARD_CAPACITY * num_shards):
      raise ValueError(
          f"capacity must be between num_shards={num_shards} and"
          f" {_MAX_SHARD_CAPACITY * num_shards} rows (or None), got {capacity}; every"
          " shard needs at least one row, so use at most as many shards as rows of"
          " capacity.")
    if not (math.isfinite(init_scale) and init_scale >= 0):
      raise ValueError(f"init_scale must be finite and >= 0, got {init_scale}.")
    if not 0.0 <= admission_probability <= 1.0:
      raise ValueError(
          f"admission_probability must be in [0, 1], got {admission_probability}.")
    if not 1 <= int(admission_min_count) <= 255:
      raise ValueError(
          f"admission_min_count must be in [1, 255] (uint8 sketch counters), got"
          f" {admission_min_count}.")
    if int(num_threads) < 1:
      raise ValueError(f"num_threads must be >= 1, got {num_threads}.")
    if unknown_id not in _UNKNOWN_ID_MODES:
      raise ValueError(f"unknown_id must be one of {_UNKNOWN_ID_MODES}, got {unknown_id!r}.")

    self.dim = int(dim)
    self.num_shards = int(num_shards)
    self.capacity = None if capacity is None else int(capacity)
    self.optimizer = OptimizerSpec.coerce(optimizer)
    self.init_scale = float(init_scale)
    self.seed = int(seed) & _UINT64_MASK
    self.admission_probability = float(admission_probability)
    self.admission_min_count = int(admission_min_count)
    self.unknown_id = unknown_id
    self.name = str(name)

    self._slot_width = self.optimizer.slot_width(self.dim)
    self._state_init = self.optimizer.initial_state(self.dim)
    self._code = self.optimizer.code
    self._hyperparameters = self.optimizer.hyperparameters()
    self._seed_key = kernels.mix_seed(self.seed)
    self._admission_key = kernels.mix_seed(self.seed, kernels.ADMISSION_SALT)
    self._sketch_key = kernels.mix_seed(self.seed, kernels.SKETCH_SALT)
    self._distinct_key = kernels.mix_seed(self.seed, kernels.DISTINCT_SALT)
    # An ID is admitted when the top 53 bits of its hash are below this.
    self._admission_threshold = np.uint64(round(self.admission_probability * 2.0**53))
    self._shard_capacities = self._split_capacity()
    self._sketch_width = self._choose_sketch_width()
    # Halving after width / 4 additions keeps the mean load of a counter at or
    # below 0.25, so a new ID finds both of its counters already non-zero (and
    # is admitted one occurrence early at min_count 2) with probability about
    # (1 - exp(-0.25))**2 = 5%.
    self._sketch_period = max(1, self._sketch_width // 4)
    self._shards = [self._new_shard(s) for s in range(self.num_shards)]
    self.num_threads = int(num_threads)
    self._executor = None
    if self.num_threads > 1:
      self._executor = concurrent.futures.ThreadPoolExecutor(
          max_workers=self.num_threads - 1, thread_name_prefix=f"{self.name}-shards")

  def close(self) -> None:
    """Stops the shard thread pool (if any); later calls run in the calling thread."""
    if self._executor is not None:
      self._executor.shutdown(wait=True)
      self._executor = None

  # --------------------------------------------------------------------------
  # Construction helpers.
  # --------------------------------------------------------------------------

  def _split_capacity(self) -> list[int]:
    if self.capacity is None:
      return [_MAX_SHARD_CAPACITY] * self.num_shards
    base, extra = divmod(self.capacity, self.num_shards)
    return [base + (1 if s < extra else 0) for s in range(self.num_shards)]

  def _choose_sketch_width(self) -> int:
    if self.admission_min_count <= 1:
      return 1  # The sketch is never read.
    # Four counters per row of shard capacity, so the halving resets an absent
    # ID's count after about one shard capacity of absent-ID occurrences.
    # Bounded to 4 KiB..4 MiB per sketch row, 8 bytes per stored row when full.
    target = 4 * min(self._shard_capacities[0], 1 << 20)
    width = 1 << max(12, (target - 1).bit_length())
    return min(width, 1 << 22)

  def _new_shard(self, index: int) -> _Shard:
    return _Shard(self.dim, self._slot_width, self._shard_capacities[index],
                  self._sketch_width, track_recency=self.capacity is not None)

  # --------------------------------------------------------------------------
  # Routing.
  # --------------------------------------------------------------------------

  def shard_of(self, ids: np.ndarray) -> np.ndarray:
    """Returns the int64 [n] shard index of each uint64 [n] ID."""
    ids = as_ids(ids)
    return (kernels.splitmix64_numpy(ids) % np.uint64(self.num_shards)).astype(np.int64)

  def _for_each_shard(self, routes: list[int], work: Callable[[_Shard, int], None]) -> None:
    """Runs `work(shard, index)` for every shard index in `routes`, holding its lock.

    In the calling thread, shards are taken in the order their locks come
    free: a shard whose lock another call holds is skipped and revisited, and
    only when every remaining shard is busy does the thread wait (on the first
    one). So two threads that work on different batches rarely wait for each
    other, instead of queueing behind one another shard by shard. With
    `num_threads > 1` the shards after the first go to the thread pool and the
    first runs in the calling thread. All tasks finish before this returns (so
    no kernel writes an output buffer afterwards), then the first error, if
    any, is raised in the caller. At most one shard lock is held at a time.
    """
    if self._executor is None or len(routes) <= 1:
      self._run_when_free(routes, work)
      return
    futures = [self._executor.submit(self._run_when_free, [route], work)
               for route in routes[1:]]
    try:
      self._run_when_free(routes[:1], work)
    finally:
      concurrent.futures.wait(futures)
    for future in futures:
      future.result()

  def _run_when_free(self, routes: list[int], work: Callable[[_Shard, int], None]) -> None:
    pending = list(routes)
    while pending:
      chosen = None
      for index, s in enumerate(pending):
        if self._shards[s].lock.acquire(blocking=False):
          chosen = index
          break
      if chosen is None:
        chosen = 0
        self._shards[pending[0]].lock.acquire()
      s = pending.pop(chosen)
      shard = self._shards[s]
      try:
        work(shard, s)
      finally:
        shard.lock.release()

  def _route(self, ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Returns (shard, int64 positions into ids) for every shard with IDs."""
    if self.num_shards == 1:
      return [(0, np.arange(ids.shape[0], dtype=np.int64))] if ids.shape[0] else []
    # One O(n) counting sort. Positions keep arrival order within a shard,
    # which fixes the LRU order of imported rows.
    positions, bounds = kernels.route(ids, self.num_shards)
    return [(s, positions[bounds[s]:bounds[s + 1]]) for s in range(self.num_shards)
            if bounds[s + 1] > bounds[s]]

  # --------------------------------------------------------------------------
  # Lookup and update.
  # --------------------------------------------------------------------------

  def _check_out(self, out: np.ndarray, n: int) -> np.ndarray:
    if not isinstance(out, np.ndarray):
      raise TypeError(f"out must be a numpy array, got {type(out).__name__}.")
    if out.dtype != np.float32 or out.shape != (n, self.dim):
      raise ValueError(
          f"out must be float32 [{n}, {self.dim}] for {n} ids, got {out.dtype}"
          f" {list(out.shape)}.")
    if not out.flags.c_contiguous or not out.flags.writeable:
      raise ValueError(
          "out must be a writeable C-contiguous array; allocate it with"
          " memory.aligned_empty((n, dim), np.float32).")
    return out

  def lookup(self, ids: np.ndarray, *, train: bool = True,
             out: np.ndarray | None = None) -> np.ndarray:
    """Gathers the rows of `ids`.

    Each distinct ID is resolved once; its repeats get a copy of its row.

    Args:
      ids: uint64 [n] (or non-negative integer) IDs, n < 2**31; duplicates
        each get a row.
      train: True inserts admitted absent IDs and refreshes recency; False is
        read-only and returns initial values or zeros for absent IDs.
      out: optional float32 [n, dim] C-contiguous buffer to write into.

    Returns:
      float32 [n, dim] rows, `out` itself when given (64-byte aligned otherwise).
    """
    ids = as_ids(ids)
    n = ids.shape[0]
    if out is None:
      out = memory.aligned_empty((n, self.dim), np.float32)
    else:
      out = self._check_out(out, n)
    positions, lasts, counts, bounds, inverse = kernels.dedup_route(ids, self.num_shards)
    starts = bounds.tolist()
    num_unique = positions.shape[0]
    # With many repeats the shard kernels write one compact row per distinct
    # ID, which stays in cache, and one pass expands it into `out` in order.
    # With few repeats, or rows too many to stay in cache, they write `out`
    # in place and only the repeats are copied.
    compact = None
    if (num_unique < _COMPACT_FRACTION * n
        and 4 * num_unique * self.dim <= _COMPACT_MAX_BYTES):
      compact = memory.aligned_empty((num_unique, self.dim), np.float32)
    target = out if compact is None else compact

    def gather(shard: _Shard, s: int) -> None:
      # Called with the shard's lock held (see _for_each_shard).
      lo, hi = starts[s], starts[s + 1]
      shard_positions = positions[lo:hi]
      offset = -1 if compact is None else lo
      if train:
        # A shard that evicts and whose arrays are already at its capacity
        # can neither grow nor overflow, so it skips the counting pass, which
        # would probe every ID a second time.
        if not shard.full_size:
          extra = hi - lo
          if shard.used + extra > shard.allocated:
            # Grow only for the IDs that may be inserted, not for the hits.
            extra = kernels.count_insert_candidates(
                ids, shard_positions, shard.table, self._admission_key,
                self._admission_threshold)
          shard.reserve(extra)
        kernels.lookup_train(
            ids, shard_positions, lasts[lo:hi], counts[lo:hi], target, offset, shard.rows,
            shard.state, self._state_init, shard.table, shard.candidates, shard.meta,
            shard.counters, shard.capacity, shard.track_recency, self._seed_key,
            self.init_scale, self._admission_key, self._admission_threshold,
            self.admission_min_count, shard.sketch, self._sketch_key,
            self._sketch_period, shard.distinct, self._distinct_key,
            not shard.distinct_covers_rows)
      else:
        kernels.lookup_eval(
            ids, shard_positions, counts[lo:hi], target, offset, shard.rows, shard.table,
            shard.counters, self._seed_key, self.init_scale,
            self.unknown_id == "zeros")

    self._for_each_shard(_nonempty(starts), gather)
    if compact is not None:
      kernels.expand_rows(out, compact, inverse)
    elif num_unique < n:
      kernels.copy_duplicates(out, positions, inverse)
    return out

  def apply_gradients(self, ids: np.ndarray, grads: np.ndarray) -> None:
    """Sums `grads` over duplicate `ids` and applies the optimizer once per row.

    Args:
      ids: uint64 [n] IDs.
      grads: float [n, dim] gradients (converted to float32). Entries for IDs
        without a row are dropped and counted as `absent_gradients`. A row
        whose summed gradient is not finite is skipped and counted as
        `nonfinite_gradients`.
    """
    ids = as_ids(ids)
    grads = np.asarray(grads)
    if grads.ndim != 2:
      raise ValueError(
          f"grads must be 2-D [n, dim={self.dim}], got shape {grads.shape}.")
    if grads.shape[1] != self.dim:
      raise ValueError(
          f"grads must have dim={self.dim} columns for table {self.name!r}, got"
          f" shape {grads.shape}.")
    if grads.shape[0] != ids.shape[0]:
      raise ValueError(
          f"ids and grads must have the same length, got ids {ids.shape} and"
          f" grads {grads.shape}.")
    if grads.dtype.kind != "f":
      raise TypeError(f"grads must be a floating-point array, got dtype {grads.dtype}.")
    grads = np.ascontiguousarray(grads, dtype=np.float32)

    unique, summed, positions, counts, bounds = kernels.dedup_sum_route(
        ids, grads, self.num_shards)
    starts = bounds.tolist()

    def update(shard: _Shard, s: int) -> None:
      # Called with the shard's lock held (see _for_each_shard).
      lo, hi = starts[s], starts[s + 1]
      kernels.apply_gradients(
          unique, positions[lo:hi], counts[lo:hi], summed, shard.rows, shard.state,
          shard.table, shard.counters, self._code, self._hyperparameters)

    self._for_each_shard(_nonempty(starts), update)

  def initial_values(self, ids: np.ndarray) -> np.ndarray:
    """Returns the float32 [n, dim] rows that `ids` get when first inserted."""
    ids = as_ids(ids)
    out = memory.aligned_empty((ids.shape[0], self.dim), np.float32)
    kernels.initial_values(ids, self._seed_key, self.init_scale, out)
    return out

  # --------------------------------------------------------------------------
  # Introspection.
  # --------------------------------------------------------------------------

  @contextlib.contextmanager
  def _all_locks(self):
    # Every other method takes at most one shard lock at a time (see gather and
    # update), so taking all of them in index order cannot deadlock.
    with contextlib.ExitStack() as stack:
      for shard in self._shards:
        stack.enter_context(shard.lock)
      yield

  def stats(self) -> dict[str, int | None]:
    """Returns the counters summed over shards (see the module docstring).

    "capacity" is None for a store without a capacity.
    """
    with self._all_locks():
      counters = np.sum([shard.counters for shard in self._shards], axis=0)
      registers = np.max([shard.distinct for shard in self._shards], axis=0)
      rows = sum(shard.used for shard in self._shards)
    result = {name: int(value) for name, value in zip(kernels.COUNTER_NAMES, counters)}
    result["rows"] = rows
    result["capacity"] = self.capacity
    result["distinct_ids_seen"] = kernels.distinct_estimate(registers)
    return result

  def __len__(self) -> int:
    return sum(shard.used for shard in self._shards)

  def theoretical_bytes_per_row(self) -> int:
    """Returns the bytes of one row plus its optimizer state, without any index."""
    return 4 * (self.dim + self._slot_width)

  def bytes_per_row(self) -> float:
    """Returns all allocated bytes (rows, state, keys, stamps, table, sketches) per stored row.

    Compare with `theoretical_bytes_per_row()`; NaN for an empty store.
    """
    with self._all_locks():
      total = sum(shard.nbytes() for shard in self._shards)
      rows = sum(shard.used for shard in self._shards)
    return total / rows if rows else float("nan")

  def memory_report(self) -> dict[str, float]:
    """Returns measured and theoretical bytes per row and their ratio."""
    measured = self.bytes_per_row()
    theoretical = self.theoretical_bytes_per_row()
    return {"bytes_per_row": measured, "row_and_state_bytes": float(theoretical),
            "overhead_ratio": measured / theoretical, "rows": float(len(self))}

  def state_spec(self) -> dict[str, Any]:
    """Returns the JSON-serializable configuration stored in checkpoints."""
    return {
        "name": self.name,
        "dim": self.dim,
        "num_shards": self.num_shards,
        "capacity": self.capacity,
        "optimizer": self.optimizer.to_dict(),
        "slot_width": self._slot_width,
        "init_scale": self.init_scale,
        "seed": self.seed,
        "admission_probability": self.admission_probability,
        "admission_min_count": self.admission_min_count,
        "unknown_id": self.unknown_id,
    }

  @classmethod
  def from_state_spec(cls, spec: dict[str, Any], *, num_shards: int | None = None,
                      num_threads: int = 1) -> "EmbeddingStore":
    """Creates an empty store configured by `spec` (optionally re-sharded)."""
    return cls(
        spec["dim"], num_shards=spec["num_shards"] if num_shards is None else num_shards,
        capacity=spec["capacity"], optimizer=spec["optimizer"],
        init_scale=spec["init_scale"], seed=spec["seed"],
        admission_probability=spec["admission_probability"],
        admission_min_count=spec["admission_min_count"],
        unknown_id=spec["unknown_id"], name=spec["name"], num_threads=num_threads)

  # --------------------------------------------------------------------------
  # Checkpoints.
  # --------------------------------------------------------------------------

  def save(self, path: str) -> None:
    """Writes all rows, optimizer state and counters to `path` atomically."""
    from persia_jax.embedding import checkpoint  # pylint: disable=g-import-not-at-top
    checkpoint.save(self, path)

  def restore(self, path: str) -> None:
    """Replaces the contents with the checkpoint at `path`.

    Raises:
      ValueError: if the checkpoint's dim or optimizer differs from this store's.
    """
    from persia_jax.embedding import checkpoint  # pylint: disable=g-import-not-at-top
    checkpoint.restore(self, path)

  @classmethod
  def load(cls, path: str, *, num_shards: int | None = None,
           num_threads: int = 1) -> "EmbeddingStore":
    """Creates a store from the checkpoint at `path`, re-sharded to `num_shards`.

    `num_shards=None` keeps the saved shard count.
    """
    from persia_jax.embedding import checkpoint  # pylint: disable=g-import-not-at-top
    return checkpoint.load(cls, path, num_shards=num_shards, num_threads=num_threads)

  def export_shards(self) -> list[dict[str, np.ndarray]]:
    """Copies every shard's keys, rows and state, least recently used first.

    All shard locks are held while copying, so the snapshot is consistent
    across shards.

    Returns:
      One dict per shard with uint64 [r] "keys", float32 [r, dim] "rows" and
      float32 [r, slot_width] "state".
    """
    exported = []
    with self._all_locks():
      for shard in self._shards:
        keys, order = kernels.lru_order(shard.table, shard.meta)
        exported.append({"keys": keys, "rows": shard.rows[order],
                          "state": shard.state[order]})
    return exported

  def export_counters(self) -> tuple[dict[str, int], np.ndarray]:
    """Returns the summed counters and the uint8 distinct-ID registers (union)."""
    with self._all_locks():
      counters = np.sum([shard.counters for shard in self._shards], axis=0)
      registers = np.max([shard.distinct for shard in self._shards], axis=0)
    return ({name: int(value) for name, value in zip(kernels.COUNTER_NAMES, counters)},
            registers)

  def import_rows(self, keys: np.ndarray, rows: np.ndarray, state: np.ndarray,
                  counters: dict[str, int] | None = None,
                  distinct_registers: np.ndarray | None = None) -> None:
    """Replaces the contents with the given rows, inserted in the given order.

    Args:
      keys: uint64 [r] IDs, least recently used first, no duplicates.
      rows: float32 [r, dim].
      state: float32 [r, slot_width].
      counters: counter values to restore (kept in shard 0), or None for zeros.
      distinct_registers: uint8 [4096] distinct-ID registers, or None.
    """
    keys = as_ids(keys, "keys")
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    state = np.ascontiguousarray(state, dtype=np.float32)
    r = keys.shape[0]
    distinct, first, counts = np.unique(keys, return_index=True, return_counts=True)
    if distinct.shape[0] < r:
      repeated = int(np.argmax(counts > 1))
      raise ValueError(
          f"import_rows got key {distinct[repeated]} more than once (first at index"
          f" {first[repeated]}); pass each key once.")
    if rows.shape != (r, self.dim) or state.shape != (r, self._slot_width):
      raise ValueError(
          f"import_rows expects rows [{r}, {self.dim}] and state [{r},"
          f" {self._slot_width}] for {r} keys, got {rows.shape} and {state.shape}.")
    with self._all_locks():
      fresh = [self._new_shard(s) for s in range(self.num_shards)]
      for s, positions in self._route(keys):
        shard = fresh[s]
        shard.reserve(positions.shape[0])
        kernels.insert_rows(keys[positions], rows[positions], state[positions],
                            shard.rows, shard.state, shard.table, shard.candidates,
                            shard.meta, shard.capacity, shard.counters)
      # Rows dropped here because the capacity is smaller count as evictions,
      # so that inserts - evictions == rows stays true after a restore.
      dropped = sum(int(shard.counters[kernels.C_EVICTIONS]) for shard in fresh)
      for shard in fresh:
        shard.counters[:] = 0
      if counters is not None:
        for index, counter_name in enumerate(kernels.COUNTER_NAMES):
          fresh[0].counters[index] = int(counters.get(counter_name, 0))
      fresh[0].counters[kernels.C_EVICTIONS] += dropped
      if distinct_registers is not None:
        fresh[0].distinct[:] = distinct_registers
      else:
        for shard in fresh:
          shard.distinct_covers_rows = shard.used == 0
      # Swap array contents into the existing shard objects so their locks,
      # which other threads may be waiting on, stay the same.
      for old, new in zip(self._shards, fresh):
        new.lock = old.lock
        old.__dict__.update(new.__dict__)
