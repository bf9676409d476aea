"""Compiled (numba, `nogil`) kernels behind `EmbeddingStore`.

The shard kernels work on the arrays of one shard and are called with that
shard's lock held; the per-call kernels (deduplication, routing, copies) work
on a call's own arrays and need no lock. All of them release the GIL, so
threads that work on different shards or calls run in parallel.

Shard arrays (`A` allocated rows, `T` table slots, `S` optimizer slot width):
  rows:   float32 [A, dim], embedding rows.
  state:  float32 [A, S], optimizer state of each row.
  table:  uint64 [T, 2], open-addressing map from ID to row. Word 0 of a slot
          is the key; word 1 is the entry (stamp << 32) | row, or EMPTY.
          Occupancy lives in the entry, not in the key, so every uint64
          value (0 and 2**64 - 1 included) is a valid key. A lookup reads
          one table line (key, row and stamp together) and then the row.
          The stamp is the row's recency: the shard's clock value at its last
          training lookup (or insert). Stamps are unique, so the least
          recently used row has the smallest stamp. A touch is one store
          into the line the probe has already read.
  candidates: uint64 [K, 2], eviction candidates: key and stamp of the K
          entries with the smallest stamps when the buffer was filled, in
          stamp order (see `_next_victim`). Empty without a capacity.
  meta:   int64 [META_SIZE]: used rows, recency clock, admission-sketch
          increments since the last halving, next and end index into
          `candidates`, and the call clock of a fallback fill (-1 if none;
          see `_next_victim`).
  counters: int64 [NUM_COUNTERS], see the COUNTER_NAMES tuple.

The map uses linear probing with backward-shift deletion (no tombstones), and
the home slot of a key is `(fmix64(key) >> 32) * T >> 32`, so the table size
need not be a power of two. Routing across shards uses splitmix64 instead, so
the two hashes are independent. The clock is 32 bits: when a call would pass
MAX_STAMP, the stamps are renumbered by rank (`_renumber_stamps`), which keeps
their order.

Calls work once per distinct ID: `dedup_route` and `dedup_sum_route`
deduplicate a call's IDs in a small per-call hash table and group the
distinct IDs by shard, and the shard kernels then probe the shard table once
per distinct ID.

All uint64 arithmetic uses np.uint64 constants, because numba turns a mix of
uint64 and int64 operands into float64.
"""

from __future__ import annotations

import math

import numba
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
import numpy as np
from llvmlite import ir

from persia_jax.embedding import optimizers as opt

_U = np.uint64
GOLDEN_GAMMA = _U(0x9E3779B97F4A7C15)
_SPLITMIX_M1 = _U(0xBF58476D1CE4E5B9)
_SPLITMIX_M2 = _U(0x94D049BB133111EB)
_FMIX_M1 = _U(0xFF51AFD7ED558CCD)
_FMIX_M2 = _U(0xC4CEB9FE1A85EC53)
_S27, _S30, _S31, _S32, _S33 = _U(27), _U(30), _U(31), _U(32), _U(33)
_S11, _S40 = _U(11), _U(40)
_ONE = _U(1)
_TOP_BIT = _U(0x8000000000000000)

# Salts that separate the per-purpose hash streams derived from one store seed.
ADMISSION_SALT = 0xA5A5_0F0F_3C3C_9696
SKETCH_SALT = 0x5EED_C0DE_0BAD_F00D
DISTINCT_SALT = 0xD157_1AC7_1D5E_E000

META_SIZE = 6
META_USED, META_CLOCK, META_SKETCH_ADDS = 0, 1, 2
META_CANDIDATE_NEXT, META_CANDIDATE_END, META_CANDIDATE_FALLBACK = 3, 4, 5

# Table entries: word 1 of a slot is (stamp << 32) | row, or EMPTY.
EMPTY = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_ROW_MASK = np.uint64(0xFFFF_FFFF)
# Largest recency stamp; the stamp field of EMPTY (2**32 - 1) is never used.
MAX_STAMP = 2**32 - 2

COUNTER_NAMES = (
    "hits",                  # training lookups that found their row
    "misses",                # training lookups of an absent ID
    "inserts",               # rows created
    "evictions",             # rows dropped to make room (least recently used first)
    "rejected_admissions",   # training lookups of an absent ID that admission rejected
    "absent_gradients",      # gradient entries dropped because their ID has no row
    "nonfinite_gradients",   # rows whose summed gradient had NaN or inf; update skipped
    "updated_rows",          # row updates applied (once per unique ID per call)
    "eval_hits",             # train=False lookups that found their row
    "eval_misses",           # train=False lookups of an absent ID
)
NUM_COUNTERS = len(COUNTER_NAMES)
(C_HITS, C_MISSES, C_INSERTS, C_EVICTIONS, C_REJECTED, C_ABSENT_GRADS,
 C_NONFINITE, C_UPDATED, C_EVAL_HITS, C_EVAL_MISSES) = range(NUM_COUNTERS)

# HyperLogLog sketch of the distinct IDs seen by training lookups.
DISTINCT_REGISTER_BITS = 12
DISTINCT_REGISTERS = 1 << DISTINCT_REGISTER_BITS

# Table load factor limit: 16 bytes per slot / 0.75 = 21.3 index bytes per row.
MAX_LOAD = 0.75

_jit = numba.njit(nogil=True, cache=True)
# Small helpers called once per ID in the hot loops are inlined at the numba
# IR level, so the loop body is one function for LLVM to optimize.
_inline_jit = numba.njit(nogil=True, cache=True, inline="always")

# How many IDs ahead the lookup and update kernels prefetch. A lookup is a
# chain of two cache misses, the table line and then the row. `_resolve`
# prefetches the table line of the ID PREFETCH_DISTANCE positions ahead, so the
# misses of many IDs overlap. The lookups then prefetch the resolved row of the
# ID half as far ahead (training lookups also its table line, whose stamp they
# write), and the update pass the row and state PREFETCH_DISTANCE ahead. 16
# and 32 measured within noise of each other, 64 was slower (10 M x 16 table,
# 65,536 IDs). A single pipelined loop that overlaps the table and row misses
# measured no faster than the two passes.
PREFETCH_DISTANCE = 32


# ----------------------------------------------------------------------------
# Software prefetch.
# ----------------------------------------------------------------------------


def _prefetch_codegen(context, builder, signature, args):
  array_type = signature.args[0]
  array = context.make_array(array_type)(context, builder, args[0])
  indices = [context.cast(builder, value, index_type, types.intp)
             for value, index_type in zip(args[1:], signature.args[1:])]
  pointer = cgutils.get_item_pointer(context, builder, array_type, array, indices,
                                     wraparound=False)
  byte_pointer = ir.IntType(8).as_pointer()
  int32 = ir.IntType(32)
  function_type = ir.FunctionType(ir.VoidType(), [byte_pointer, int32, int32, int32])
  function = cgutils.get_or_insert_function(builder.module, function_type,
                                            "llvm.prefetch.p0i8")
  # Arguments: address, 0 = read, 3 = keep in all cache levels, 1 = data cache.
  builder.call(function, [builder.bitcast(pointer, byte_pointer), int32(0), int32(3),
                          int32(1)])
  return context.get_dummy_value()


@intrinsic
def prefetch2(typingctx, array, row, column):  # pylint: disable=unused-argument
  """Hints the CPU to load `array[row, column]` (2-D) into cache; never faults.

  LLVM's prefetch instruction does not trap on any address, so an index past
  the end is harmless, which lets the kernels skip bounds checks on hints.
  """
  return types.void(array, row, column), _prefetch_codegen



# ----------------------------------------------------------------------------
# Hashes.
# ----------------------------------------------------------------------------


@_jit
def splitmix64(x):
  """Returns the SplitMix64 output for state `x` (uint64 -> uint64)."""
  z = x + GOLDEN_GAMMA
  z = (z ^ (z >> _S30)) * _SPLITMIX_M1
  z = (z ^ (z >> _S27)) * _SPLITMIX_M2
  return z ^ (z >> _S31)


@_jit
def fmix64(x):
  """Returns MurmurHash3's 64-bit finalizer of `x` (uint64 -> uint64)."""
  x ^= x >> _S33
  x *= _FMIX_M1
  x ^= x >> _S33
  x *= _FMIX_M2
  return x ^ (x >> _S33)


@_jit
def _home(key, table_size):
  # Lemire's multiply-shift range reduction of the high 32 hash bits.
  return np.int64(((fmix64(key) >> _S32) * _U(table_size)) >> _S32)


def splitmix64_numpy(x: np.ndarray) -> np.ndarray:
  """Vectorized SplitMix64 of a uint64 array (wrapping arithmetic)."""
  with np.errstate(over="ignore"):
    z = x.astype(np.uint64) + GOLDEN_GAMMA
    z = (z ^ (z >> _S30)) * _SPLITMIX_M1
    z = (z ^ (z >> _S27)) * _SPLITMIX_M2
    return z ^ (z >> _S31)


def mix_seed(seed: int, salt: int = 0) -> np.uint64:
  """Derives the uint64 stream key for a store seed and a purpose salt."""
  value = (int(seed) ^ int(salt)) & 0xFFFF_FFFF_FFFF_FFFF
  return splitmix64_numpy(np.array([value], np.uint64))[0]


# ----------------------------------------------------------------------------
# Seeded initial values.
# ----------------------------------------------------------------------------


@_jit
def _init_row(seed_key, key, init_scale, out, i):
  # Column c gets the c-th output of a SplitMix64 stream started at
  # splitmix64(seed_key ^ key): a function of (seed, id, column) only.
  base = splitmix64(seed_key ^ key)
  for c in range(out.shape[1]):
    h = splitmix64(base + _U(c) * GOLDEN_GAMMA)
    unit = np.float64(h >> _S40) * (1.0 / 16777216.0)
    out[i, c] = (2.0 * unit - 1.0) * init_scale


@_jit
def initial_values(ids, seed_key, init_scale, out):
  """Writes the seeded initial row of each uint64 [n] `ids` into float32 [n, dim] `out`."""
  for i in range(ids.shape[0]):
    _init_row(seed_key, ids[i], init_scale, out, i)


# ----------------------------------------------------------------------------
# Hash map and recency stamps.
# ----------------------------------------------------------------------------


@_inline_jit
def _entry(stamp, row):
  """Packs a recency stamp (< 2**32 - 1) and a row slot (< 2**31) into an entry."""
  return (_U(stamp) << _S32) | _U(row)


@_inline_jit
def _entry_row(entry):
  return np.int64(entry & _ROW_MASK)


@_inline_jit
def _entry_stamp(entry):
  return np.int64(entry >> _S32)


@_inline_jit
def _find_from(table, key, slot):
  """Returns (slot, row) of `key` probing from `slot`: its slot and row, or the
  empty slot that ends its probe run and -1."""
  size = table.shape[0]
  while True:
    entry = table[slot, 1]
    if entry == EMPTY:
      return slot, -1
    if table[slot, 0] == key:
      return slot, _entry_row(entry)
    slot += 1
    if slot == size:
      slot = 0


@_jit
def _find(table, key):
  """Returns (slot, row): the key's slot and row, or the empty slot and -1."""
  return _find_from(table, key, _home(key, table.shape[0]))


@_jit
def _delete_slot(table, slot):
  # Backward-shift deletion: pull later entries of the probe run into the hole
  # unless their home slot lies cyclically in (hole, entry].
  size = table.shape[0]
  hole = slot
  j = slot
  while True:
    j += 1
    if j == size:
      j = 0
    entry = table[j, 1]
    if entry == EMPTY:
      break
    home = _home(table[j, 0], size)
    if hole <= j:
      stays = hole < home <= j
    else:
      stays = home > hole or home <= j
    if not stays:
      table[hole, 0] = table[j, 0]
      table[hole, 1] = entry
      hole = j
  table[hole, 1] = EMPTY


@_jit
def _insert_entry(table, key, stamp, row):
  """Enters absent `key` with its stamp and row; the table must have a free slot."""
  slot, _ = _find(table, key)
  table[slot, 0] = key
  table[slot, 1] = _entry(stamp, row)


@_jit
def rebuild_table(table, old_table):
  """Fills `table` (larger than the entries of `old_table`) with every entry of `old_table`."""
  table[:, 1] = EMPTY
  for slot in range(old_table.shape[0]):
    entry = old_table[slot, 1]
    if entry != EMPTY:
      target, _ = _find(table, old_table[slot, 0])
      table[target, 0] = old_table[slot, 0]
      table[target, 1] = entry


@_jit
def _occupied(table, used):
  """Returns int64 [used] slots of `table` that hold an entry, in slot order."""
  slots = np.empty(used, np.int64)
  found = 0
  for slot in range(table.shape[0]):
    if table[slot, 1] != EMPTY:
      slots[found] = slot
      found += 1
  return slots[:found]


@_jit
def _renumber_stamps(table, candidates, meta):
  """Replaces every stamp by its rank among the shard's stamps; keeps the order.

  Runs when the clock would pass MAX_STAMP: once per about 2**32 - rows
  clock steps, an O(rows log rows) sort. Empties the candidate buffer,
  whose stamps it changes.
  """
  slots = _occupied(table, meta[META_USED])
  stamps = np.empty(slots.shape[0], np.int64)
  for i in range(slots.shape[0]):
    stamps[i] = _entry_stamp(table[slots[i], 1])
  order = np.argsort(stamps)
  for rank in range(order.shape[0]):
    slot = slots[order[rank]]
    table[slot, 1] = _entry(rank, _entry_row(table[slot, 1]))
  meta[META_CLOCK] = order.shape[0]
  meta[META_CANDIDATE_NEXT] = meta[META_CANDIDATE_END]


@_jit
def reserve_clock(table, candidates, meta, steps):
  """Makes room for `steps` more clock values below MAX_STAMP; returns the clock."""
  if meta[META_CLOCK] + steps > MAX_STAMP:
    _renumber_stamps(table, candidates, meta)
  return meta[META_CLOCK]


@_jit
def _refill_candidates(table, candidates, meta, before):
  """Fills `candidates` with the keys and stamps of the K smallest stamps, in stamp order.

  Only entries with a stamp below `before` qualify, unless there are none.
  O(table) selection plus a sort of the K selected entries, once per K
  evictions.
  """
  occupied = _occupied(table, meta[META_USED])
  eligible = 0
  for i in range(occupied.shape[0]):
    if _entry_stamp(table[occupied[i], 1]) < before:
      occupied[eligible] = occupied[i]
      eligible += 1
  if eligible > 0:
    slots = occupied[:eligible]
    meta[META_CANDIDATE_FALLBACK] = -1
  else:
    # The buffer then mixes stamps of the current call, so it is valid only
    # within this call (see _next_victim).
    slots = _occupied(table, meta[META_USED])
    meta[META_CANDIDATE_FALLBACK] = before
  count = min(candidates.shape[0], slots.shape[0])
  stamps = np.empty(slots.shape[0], np.int64)
  for i in range(slots.shape[0]):
    stamps[i] = _entry_stamp(table[slots[i], 1])
  limit = np.partition(stamps, count - 1)[count - 1]
  selected = np.empty(count, np.int64)
  found = 0
  for i in range(slots.shape[0]):
    if stamps[i] <= limit and found < count:
      selected[found] = i
      found += 1
  order = np.argsort(stamps[selected])
  for rank in range(count):
    i = selected[order[rank]]
    candidates[rank, 0] = table[slots[i], 0]
    candidates[rank, 1] = _U(stamps[i])
  meta[META_CANDIDATE_NEXT] = 0
  meta[META_CANDIDATE_END] = count


@_jit
def _next_victim(table, candidates, meta, before):
  """Returns (slot, row) of the least recently used entry with a stamp below `before`.

  The caller passes the clock at the start of its call, so the victim is
  the least recently used row the call has not touched, exactly. The buffer
  contains the keys and stamps of the K smallest such stamps when it was
  filled, in stamp order. An entry whose stamp changed since (a touch) or
  that is gone is skipped. Stamps are unique, and every stamp given out
  after the fill is at least `before`. So every entry outside the buffer
  has a larger stamp than each untouched buffer entry, and the first
  untouched entry left in the buffer has the smallest stamp. When every
  entry has a stamp of `before` or more (the call touched the whole shard),
  the buffer takes the smallest stamps of all entries instead. Rows the call
  inserts later may then have smaller stamps than the buffer's, so the order
  among the call's own rows is approximate, and that buffer is dropped at
  the next call.
  """
  fallback = meta[META_CANDIDATE_FALLBACK]
  if fallback >= 0 and fallback != before:
    meta[META_CANDIDATE_NEXT] = meta[META_CANDIDATE_END]
  while True:
    if meta[META_CANDIDATE_NEXT] >= meta[META_CANDIDATE_END]:
      _refill_candidates(table, candidates, meta, before)
    i = meta[META_CANDIDATE_NEXT]
    meta[META_CANDIDATE_NEXT] = i + 1
    slot, row = _find(table, candidates[i, 0])
    if row >= 0 and _U(_entry_stamp(table[slot, 1])) == candidates[i, 1]:
      return slot, row


@_jit
def _claim_row(key, stamp, before, table, candidates, meta, capacity, counters):
  """Returns a row slot for absent `key`, evicting the LRU entry when full.

  The caller has checked that `key` is absent and that the arrays hold at
  least min(capacity, used + 1) rows. The victim is the least recently used
  entry with a stamp below `before` (see `_next_victim`). The key is entered
  with `stamp`, but the row's values are left for the caller to write.
  """
  used = meta[META_USED]
  if used < capacity:
    row = used
    meta[META_USED] = used + 1
  else:
    slot, row = _next_victim(table, candidates, meta, before)
    _delete_slot(table, slot)
    counters[C_EVICTIONS] += 1
  _insert_entry(table, key, stamp, row)
  return row


# ----------------------------------------------------------------------------
# Admission and distinct counting.
# ----------------------------------------------------------------------------


@_jit
def _passes_admission(key, admission_key, admission_threshold):
  return (splitmix64(admission_key ^ key) >> _S11) < admission_threshold


@_jit
def _sketch_count(sketch, meta, key, sketch_key, period):
  """Adds one occurrence of `key` and returns its estimated count (uint8-saturating).

  Count-min sketch of depth 2 with conservative update: only the smaller
  counter(s) grow, so between halvings the estimate never undercounts and
  overcounts only on collisions. Every `period` additions all counters are
  halved, so IDs that stopped appearing age out and the sketch never saturates.
  """
  mask = _U(sketch.shape[1] - 1)
  h = fmix64(key ^ sketch_key)
  i0 = np.int64(h & mask)
  i1 = np.int64((h >> _S32) & mask)
  c0 = sketch[0, i0]
  c1 = sketch[1, i1]
  low = min(c0, c1)
  if low < 255:
    low += 1
    if c0 < low:
      sketch[0, i0] = low
    if c1 < low:
      sketch[1, i1] = low
  meta[META_SKETCH_ADDS] += 1
  if meta[META_SKETCH_ADDS] >= period:
    meta[META_SKETCH_ADDS] = 0
    for d in range(sketch.shape[0]):
      for i in range(sketch.shape[1]):
        sketch[d, i] >>= 1
  return low


@_jit
def _distinct_add(registers, key, distinct_key):
  h = splitmix64(key ^ distinct_key)
  index = np.int64(h >> _U(64 - DISTINCT_REGISTER_BITS))
  rest = h << _U(DISTINCT_REGISTER_BITS)
  rank = 1
  while rank <= 64 - DISTINCT_REGISTER_BITS and (rest & _TOP_BIT) == _U(0):
    rank += 1
    rest <<= _ONE
  if registers[index] < rank:
    registers[index] = rank


def distinct_estimate(registers: np.ndarray) -> int:
  """Returns the HyperLogLog estimate of the distinct count for uint8 [m] registers."""
  m = registers.shape[0]
  alpha = 0.7213 / (1.0 + 1.079 / m)
  raw = alpha * m * m / float(np.sum(np.exp2(-registers.astype(np.float64))))
  zeros = int(np.count_nonzero(registers == 0))
  if raw <= 2.5 * m and zeros > 0:
    # Linear counting is accurate for small counts. It rounds to the exact count
    # for up to about 60 IDs unless two of them share a register.
    return int(round(m * math.log(m / zeros)))
  return int(round(raw))


# ----------------------------------------------------------------------------
# Lookup.
# ----------------------------------------------------------------------------


@_jit
def route(ids, num_shards):
  """Groups the positions of `ids` by shard with one stable counting sort.

  The shard of an ID is `splitmix64(id) % num_shards` (as `splitmix64_numpy`).
  Two O(n) passes, no comparison sort; positions of a shard stay in arrival
  order, which fixes the order of LRU touches and of duplicate gradient sums.

  Args:
    ids: uint64 [n].
    num_shards: int, >= 1.

  Returns:
    positions: int64 [n], indices into `ids` grouped by shard.
    bounds: int64 [num_shards + 1]; shard s owns positions[bounds[s]:bounds[s + 1]].
  """
  n = ids.shape[0]
  shard_of = np.empty(n, np.int32)
  bounds = np.zeros(num_shards + 1, np.int64)
  power_of_two = (num_shards & (num_shards - 1)) == 0
  mask = _U(num_shards - 1)
  modulus = _U(num_shards)
  for i in range(n):
    h = splitmix64(ids[i])
    # A mask equals the modulo for a power of two and avoids a 64-bit division.
    s = np.int64(h & mask) if power_of_two else np.int64(h % modulus)
    shard_of[i] = s
    bounds[s + 1] += 1
  for s in range(num_shards):
    bounds[s + 1] += bounds[s]
  cursor = bounds[:num_shards].copy()
  positions = np.empty(n, np.int64)
  for i in range(n):
    s = shard_of[i]
    positions[cursor[s]] = i
    cursor[s] += 1
  return positions, bounds


# Local (per-call) deduplication tables hash with Fibonacci multiply-shift:
# one multiply, the top bits. They hold at most n entries in 2n or more slots
# and stay in cache, so a cheaper hash than fmix64 suffices.
_FIBONACCI = GOLDEN_GAMMA


@_inline_jit
def local_table(n):
  """Returns (int32 slots filled with -1, mask, shift) for at most n entries."""
  bits = 4
  while (1 << bits) < 2 * n:
    bits += 1
  return np.full(1 << bits, -1, np.int32), (1 << bits) - 1, _U(64 - bits)


@_inline_jit
def local_find(slots, mask, shift, unique, key):
  """Returns (slot, index) of `key` in a per-call table of indices into `unique`.

  `index` is -1 when the key is absent, and `slot` is then the empty slot to
  put its index in.
  """
  slot = np.int64((key * _FIBONACCI) >> shift)
  while True:
    index = slots[slot]
    if index < 0 or unique[index] == key:
      return slot, index
    slot = (slot + 1) & mask


@_inline_jit
def _shard_index(key, num_shards, power_of_two):
  if num_shards == 1:
    return 0
  h = splitmix64(key)
  # A mask equals the modulo for a power of two and avoids a 64-bit division.
  if power_of_two:
    return np.int64(h & _U(num_shards - 1))
  return np.int64(h % _U(num_shards))


@_inline_jit
def _add_distinct(slots, slot, unique, u, key, bounds, num_shards, power_of_two):
  """Enters `key` as distinct ID `u` at its empty `slot`; returns and counts its shard."""
  slots[slot] = u
  unique[u] = key
  s = _shard_index(key, num_shards, power_of_two)
  bounds[s + 1] += 1
  return s


@_inline_jit
def _group_by_shard(shard_of, bounds, u):
  """Returns int64 [u] the place of each distinct ID when grouped by shard.

  On entry `bounds[s + 1]` is the count of shard s; on return it is the end
  of the shard's group. IDs keep their order within a shard.
  """
  for s in range(bounds.shape[0] - 1):
    bounds[s + 1] += bounds[s]
  cursor = bounds[:-1].copy()
  place = np.empty(u, np.int64)
  for v in range(u):
    s = shard_of[v]
    place[v] = cursor[s]
    cursor[s] += 1
  return place


@_jit
def dedup_route(ids, num_shards):
  """Deduplicates `ids` and groups the distinct IDs by shard.

  The shard kernels then work once per distinct ID, and `copy_duplicates`
  or `expand_rows` give every occurrence its row.

  Args:
    ids: uint64 [n].
    num_shards: int, >= 1; the shard of an ID is `splitmix64(id) % num_shards`.

  Returns:
    positions: int64 [u], the first occurrence of each distinct ID, grouped
      by shard and ascending within a shard.
    lasts: int64 [u], the last occurrence of the ID at the same index of
      `positions`.
    counts: int32 [u], the occurrences of that ID.
    bounds: int64 [num_shards + 1]; shard s owns [bounds[s], bounds[s + 1]).
    inverse: int32 [n], the index into `positions` of the ID of each `ids[i]`.
  """
  n = ids.shape[0]
  slots, mask, shift = local_table(n)
  unique = np.empty(n, np.uint64)
  # Per distinct ID (first occurrence, last occurrence, count, shard) in one
  # 16-byte record, so that a repeated ID touches one line besides its slot
  # and key. The scratch arrays of a call stay near 30 bytes per ID, because
  # the rows and table lines the shard kernels read next share the cache.
  record = np.empty((n, 4), np.int32)
  inverse = np.empty(n, np.int32)
  bounds = np.zeros(num_shards + 1, np.int64)
  power_of_two = (num_shards & (num_shards - 1)) == 0
  u = 0
  for i in range(n):
    key = ids[i]
    slot, index = local_find(slots, mask, shift, unique, key)
    if index < 0:
      record[u, 3] = _add_distinct(slots, slot, unique, u, key, bounds, num_shards,
                                   power_of_two)
      record[u, 0] = i
      record[u, 1] = i
      record[u, 2] = 1
      inverse[i] = u
      u += 1
    else:
      record[index, 1] = i
      record[index, 2] += 1
      inverse[i] = index
  place = _group_by_shard(record[:u, 3], bounds, u)
  positions = np.empty(u, np.int64)
  lasts = np.empty(u, np.int64)
  counts = np.empty(u, np.int32)
  for v in range(u):
    c = place[v]
    positions[c] = record[v, 0]
    lasts[c] = record[v, 1]
    counts[c] = record[v, 2]
  if num_shards > 1:
    for i in range(n):
      inverse[i] = place[inverse[i]]
  return positions, lasts, counts, bounds, inverse


@_jit
def copy_duplicates(out, positions, inverse):
  """Copies the row of each ID's first occurrence into its later occurrences.

  `out[positions[c]]` contains the row of distinct ID c (see `dedup_route`).
  """
  dim = out.shape[1]
  for i in range(out.shape[0]):
    first = positions[inverse[i]]
    if first != i:
      for c in range(dim):
        out[i, c] = out[first, c]


@_jit
def expand_rows(out, compact, inverse):
  """Writes `compact[inverse[i]]` into `out[i]` for every i."""
  dim = out.shape[1]
  for i in range(out.shape[0]):
    v = inverse[i]
    for c in range(dim):
      out[i, c] = compact[v, c]


@_jit
def dedup_sum_route(ids, grads, num_shards):
  """Sums the gradients of duplicate IDs and groups the distinct IDs by shard.

  Gradients are summed in arrival order, so the result does not depend on the
  shard count.

  Args:
    ids: uint64 [n].
    grads: float32 [n, dim].
    num_shards: int, >= 1.

  Returns:
    unique: uint64 [u], the distinct IDs in order of first occurrence.
    summed: float32 [u, dim], the summed gradient of each.
    positions: int64 [u], indices into `unique` grouped by shard.
    counts: int32 [u], the occurrences of `unique[positions[j]]`.
    bounds: int64 [num_shards + 1]; shard s owns [bounds[s], bounds[s + 1]).
  """
  n = ids.shape[0]
  dim = grads.shape[1]
  slots, mask, shift = local_table(n)
  unique = np.empty(n, np.uint64)
  summed = np.empty((n, dim), np.float32)
  count = np.empty(n, np.int32)
  shard_of = np.empty(n, np.int32)
  bounds = np.zeros(num_shards + 1, np.int64)
  power_of_two = (num_shards & (num_shards - 1)) == 0
  u = 0
  for i in range(n):
    key = ids[i]
    slot, index = local_find(slots, mask, shift, unique, key)
    if index < 0:
      shard_of[u] = _add_distinct(slots, slot, unique, u, key, bounds, num_shards,
                                  power_of_two)
      count[u] = 1
      for c in range(dim):
        summed[u, c] = grads[i, c]
      u += 1
    else:
      count[index] += 1
      for c in range(dim):
        summed[index, c] += grads[i, c]
  place = _group_by_shard(shard_of, bounds, u)
  positions = np.empty(u, np.int64)
  counts = np.empty(u, np.int32)
  for v in range(u):
    positions[place[v]] = v
    counts[place[v]] = count[v]
  return unique[:u], summed[:u], positions, counts, bounds


@_jit
def _homes(ids, positions, table_size):
  """Returns int64 [k] home slots of `ids[positions]`."""
  k = positions.shape[0]
  homes = np.empty(k, np.int64)
  for j in range(k):
    homes[j] = _home(ids[positions[j]], table_size)
  return homes


@_inline_jit
def _prefetch_rows(array, row):
  # One hint per 64-byte line of a float32 row.
  for c in range(0, array.shape[1], 16):
    prefetch2(array, row, c)


@_jit
def _resolve(ids, positions, table):
  """Returns int64 [k] slots and int32 [k] rows of `ids[positions]` (row -1: absent).

  The probes of different IDs are independent, so their cache misses overlap:
  the table line of the home slot of the ID `PREFETCH_DISTANCE` positions
  ahead is prefetched.
  """
  homes = _homes(ids, positions, table.shape[0])
  k = positions.shape[0]
  slots = np.empty(k, np.int64)
  found = np.empty(k, np.int32)
  for j in range(k):
    if j + PREFETCH_DISTANCE < k:
      prefetch2(table, homes[j + PREFETCH_DISTANCE], 0)
    slot, row = _find_from(table, ids[positions[j]], homes[j])
    slots[j] = slot
    found[j] = row
  return slots, found


@_jit
def lookup_train(ids, positions, lasts, counts, out, out_offset, rows, state, state_init,
                 table, candidates, meta, counters, capacity, track_recency, seed_key,
                 init_scale,
                 admission_key, admission_threshold, min_count, sketch, sketch_key,
                 sketch_period, distinct, distinct_key, distinct_on_hits):
  """Gathers rows for training, inserting admitted absent IDs.

  Works once per distinct ID of the call (see `dedup_route`); the caller
  then gives repeated occurrences their row (`copy_duplicates` or
  `expand_rows`). Counters
  count occurrences, as if every occurrence were looked up in arrival order:
  an ID that is present records `count` hits; an absent one records misses
  until an occurrence is admitted, and hits after that.

  Args:
    ids: uint64 [n] all IDs of the call.
    positions: int64 [k] first occurrences (indices into `ids`) of the
      distinct IDs routed to this shard, ascending.
    lasts: int64 [k] the last occurrence of each of those IDs.
    counts: int32 [k] the occurrences of each.
    out: float32 [n, dim] or [u, dim]; row `positions[j]` (or `out_offset +
      j`) receives the value of its ID.
    out_offset: -1 to write at the IDs' positions, or the index of this
      shard's first ID in a compact `out` with one row per distinct ID.
    capacity: maximum rows of this shard; arrays hold min(capacity, used + k).
    track_recency: whether hits refresh their stamp (stores with a capacity).
    admission_threshold: uint64; an ID is admitted with probability
      threshold / 2**53, decided by its hash.
    min_count: occurrences an absent ID needs (counted in `sketch`) before it
      gets a row; 1 disables the sketch.
    distinct_on_hits: whether IDs that hit are added to the `distinct`
      HyperLogLog registers too. Every ID that misses is added. The caller
      passes False when every stored row's ID is already in the registers
      (rows come only from misses or from an import with its registers),
      because adding such an ID again changes nothing.

  Two passes: the first copies and refreshes every ID that has a row, the
  second inserts the absent ones. So a call never evicts a row it reads.
  The stamp of a looked-up or inserted row is the shard clock at the start
  of the call plus the ID's last occurrence, and the clock then advances by
  n. So the rows of one call are ordered by last occurrence, and they are
  more recent than every row the call did not touch. Inserts evict the least
  recently used untouched row (`before` in `_claim_row`), and only a call
  with more distinct IDs than the shard's capacity evicts its own rows.
  """
  dim = rows.shape[1]
  n = ids.shape[0]
  # Resolve every ID first with overlapped read-only probes (see _resolve),
  # so the first pass has the slot and row of the ID ahead and prefetches
  # both. Nothing is inserted or deleted before the second pass, so every
  # resolved slot is still valid in the first.
  slots, found = _resolve(ids, positions, table)
  k = positions.shape[0]
  hits = 0
  misses = 0
  rejected = 0
  inserts = 0
  clock = reserve_clock(table, candidates, meta, n)
  meta[META_CLOCK] = clock + n
  absent = 0
  for j in range(k):
    if j + PREFETCH_DISTANCE // 2 < k:
      ahead = j + PREFETCH_DISTANCE // 2
      if found[ahead] >= 0:
        _prefetch_rows(rows, found[ahead])
        if track_recency:
          prefetch2(table, slots[ahead], 0)
    row = found[j]
    if row < 0:
      # Absent IDs move to the front of `found`, as indices, for pass two.
      found[absent] = j
      absent += 1
      continue
    key = ids[positions[j]]
    p = positions[j] if out_offset < 0 else out_offset + j
    if distinct_on_hits:
      _distinct_add(distinct, key, distinct_key)
    hits += counts[j]
    if track_recency:
      table[slots[j], 1] = _entry(clock + lasts[j], row)
    for c in range(dim):
      out[p, c] = rows[row, c]
  for a in range(absent):
    j = found[a]
    key = ids[positions[j]]
    p = positions[j] if out_offset < 0 else out_offset + j
    occurrences = counts[j]
    _distinct_add(distinct, key, distinct_key)
    # The occurrence that gets admitted (1-based); 0 when none is.
    admitted_at = 1 if _passes_admission(key, admission_key, admission_threshold) else 0
    if admitted_at and min_count > 1:
      admitted_at = 0
      for occurrence in range(1, occurrences + 1):
        if _sketch_count(sketch, meta, key, sketch_key, sketch_period) >= min_count:
          admitted_at = occurrence
          break
    if admitted_at == 0:
      misses += occurrences
      rejected += occurrences
      _init_row(seed_key, key, init_scale, out, p)
      continue
    misses += admitted_at
    rejected += admitted_at - 1
    hits += occurrences - admitted_at
    row = _claim_row(key, clock + lasts[j], clock, table, candidates, meta, capacity,
                     counters)
    _init_row(seed_key, key, init_scale, rows, row)
    for c in range(state_init.shape[0]):
      state[row, c] = state_init[c]
    inserts += 1
    for c in range(dim):
      out[p, c] = rows[row, c]
  counters[C_HITS] += hits
  counters[C_MISSES] += misses
  counters[C_REJECTED] += rejected
  counters[C_INSERTS] += inserts


@_jit
def count_insert_candidates(ids, positions, table, admission_key, admission_threshold):
  """Returns an upper bound on the rows a training lookup may insert.

  Counts the distinct IDs of `ids[positions]` that have no row and pass the
  admission probability (the minimum count is not checked).
  """
  _, found = _resolve(ids, positions, table)
  candidates = 0
  for j in range(positions.shape[0]):
    if found[j] < 0 and _passes_admission(ids[positions[j]], admission_key,
                                          admission_threshold):
      candidates += 1
  return candidates


@_jit
def lookup_eval(ids, positions, counts, out, out_offset, rows, table, counters, seed_key,
                init_scale, zeros_for_unknown):
  """Gathers rows read-only: absent IDs get their initial value or zeros.

  Arguments as in `lookup_train`; the counters count occurrences.
  """
  dim = rows.shape[1]
  _, found = _resolve(ids, positions, table)
  k = positions.shape[0]
  hits = 0
  misses = 0
  for j in range(k):
    # The rows are known (nothing is inserted), so the row of the ID ahead is
    # prefetched exactly.
    if j + PREFETCH_DISTANCE // 2 < k:
      ahead = found[j + PREFETCH_DISTANCE // 2]
      if ahead >= 0:
        _prefetch_rows(rows, ahead)
    p = positions[j] if out_offset < 0 else out_offset + j
    row = found[j]
    if row >= 0:
      hits += counts[j]
      for c in range(dim):
        out[p, c] = rows[row, c]
    else:
      misses += counts[j]
      if zeros_for_unknown:
        for c in range(dim):
          out[p, c] = 0.0
      else:
        _init_row(seed_key, ids[positions[j]], init_scale, out, p)
  counters[C_EVAL_HITS] += hits
  counters[C_EVAL_MISSES] += misses


# ----------------------------------------------------------------------------
# Optimizer updates.
# ----------------------------------------------------------------------------


# Flags for the float32 optimizer math. "contract" lets LLVM fuse a multiply
# and an add into one FMA and "nsz" lets it ignore the sign of zero; both
# change results by at most float32 rounding. Approximate reciprocals and
# square roots ("arcp", "afn") and "nnan"/"ninf" are left out: the first would
# cost accuracy, the others would let LLVM delete the non-finite check.
# error_model="numpy" makes a float division by zero give inf or NaN as in
# numpy instead of raising, which removes the zero test (a branch) from every
# division; without it LLVM does not vectorize the loops.
_MATH_FLAGS = {"nsz", "contract"}
_update_jit = numba.njit(nogil=True, cache=True, inline="always", fastmath=_MATH_FLAGS,
                         error_model="numpy")

_F32_ZERO = np.float32(0.0)
_F32_ONE = np.float32(1.0)
_EXPONENT_MASK = np.int32(0x7F800000)


@_update_jit
def _is_finite_row(bits, u):
  """Returns whether float32 row `u` (viewed as int32 `bits`) has no NaN or inf.

  A float is NaN or inf exactly when its exponent bits are all ones, the
  largest value the mask can give. An integer max reduction has no branch, so
  LLVM vectorizes it, where a float test with an early exit stays scalar.
  """
  top = np.int32(0)
  for c in range(bits.shape[1]):
    top = max(top, bits[u, c] & _EXPONENT_MASK)
  return top != _EXPONENT_MASK


@_update_jit
def _update_row(code, rows, state, r, summed, u, hp):
  """Applies one optimizer step to `rows[r]`, `state[r]` with gradient `summed[u]`.

  The math is float32, as rows and state are stored (FBGEMM's fused
  optimizers do the same), and every loop over the row runs over contiguous
  columns without branches, so LLVM vectorizes it (8 float32 lanes with AVX).
  Per-row scalars that lose precision in float32 (Adam's bias corrections
  1 - beta^t) are computed in float64 once per row. Indexes the 2-D arrays
  directly instead of slicing rows, because every slice costs a
  reference-count update in numba.
  """
  dim = rows.shape[1]
  lr = np.float32(hp[opt.HP_LR])
  if code == opt.SGD:
    decay = np.float32(hp[opt.HP_WEIGHT_DECAY])
    for c in range(dim):
      w = rows[r, c]
      rows[r, c] = w - lr * (summed[u, c] + decay * w)
  elif code == opt.ADAGRAD:
    eps = np.float32(hp[opt.HP_EPSILON])
    for c in range(dim):
      g = summed[u, c]
      acc = state[r, c] + g * g
      state[r, c] = acc
      rows[r, c] = rows[r, c] - lr * g / (np.sqrt(acc) + eps)
  elif code == opt.ROWWISE_ADAGRAD:
    eps = np.float32(hp[opt.HP_EPSILON])
    # The squared norm is summed in float64: a float reduction vectorizes only
    # if reassociated, and 16-64 scalar adds per row are cheap.
    total = 0.0
    for c in range(dim):
      g = np.float64(summed[u, c])
      total += g * g
    acc = np.float32(state[r, 0] + total / dim)
    state[r, 0] = acc
    scale = lr / (np.sqrt(acc) + eps)
    for c in range(dim):
      rows[r, c] = rows[r, c] - scale * summed[u, c]
  elif code == opt.ADAM:
    beta1 = hp[opt.HP_BETA1]
    beta2 = hp[opt.HP_BETA2]
    step = np.float64(state[r, 2 * dim]) + 1.0
    state[r, 2 * dim] = step
    # lr * (m / c1) / (sqrt(v / c2) + eps) = step_size * m / (sqrt(v) + eps * sqrt(c2))
    # with step_size = lr * sqrt(c2) / c1: two per-row float64 scalars.
    root_c2 = math.sqrt(1.0 - beta2**step)
    step_size = np.float32(hp[opt.HP_LR] * root_c2 / (1.0 - beta1**step))
    eps_hat = np.float32(hp[opt.HP_EPSILON] * root_c2)
    b1 = np.float32(beta1)
    b2 = np.float32(beta2)
    one_minus_b1 = np.float32(1.0 - beta1)
    one_minus_b2 = np.float32(1.0 - beta2)
    for c in range(dim):
      g = summed[u, c]
      m = b1 * state[r, c] + one_minus_b1 * g
      v = b2 * state[r, dim + c] + one_minus_b2 * (g * g)
      state[r, c] = m
      state[r, dim + c] = v
      rows[r, c] = rows[r, c] - step_size * m / (np.sqrt(v) + eps_hat)
  else:  # FTRL-Proximal.
    l1 = np.float32(hp[opt.HP_L1])
    l2 = np.float32(hp[opt.HP_L2])
    beta = np.float32(hp[opt.HP_FTRL_BETA])
    power = -hp[opt.HP_LR_POWER]
    inv_lr = np.float32(1.0 / hp[opt.HP_LR])
    if power == 0.5:
      for c in range(dim):
        g = summed[u, c]
        n_old = state[r, dim + c]
        n_new = n_old + g * g
        root_old = np.sqrt(n_old)
        root_new = np.sqrt(n_new)
        # sqrt(n') - sqrt(n) = g^2 / (sqrt(n') + sqrt(n)) without the float32
        # cancellation of the difference; 0 when both are 0.
        denom = root_new + root_old
        sigma = (g * g) / max(denom, np.float32(1e-30)) * inv_lr
        z = state[r, c] + g - sigma * rows[r, c]
        state[r, c] = z
        state[r, dim + c] = n_new
        # -(z - sign(z) l1) = -sign(z) max(|z| - l1, 0), and 0 when |z| <= l1.
        shrunk = max(abs(z) - l1, _F32_ZERO)
        rows[r, c] = -np.copysign(shrunk, z) / ((beta + root_new) * inv_lr + l2)
    else:
      p32 = np.float32(power)
      for c in range(dim):
        g = summed[u, c]
        n_old = state[r, dim + c]
        n_new = n_old + g * g
        root_new = n_new**p32
        sigma = (root_new - n_old**p32) * inv_lr
        z = state[r, c] + g - sigma * rows[r, c]
        state[r, c] = z
        state[r, dim + c] = n_new
        shrunk = max(abs(z) - l1, _F32_ZERO)
        rows[r, c] = -np.copysign(shrunk, z) / ((beta + root_new) * inv_lr + l2)
  bound = np.float32(hp[opt.HP_WEIGHT_BOUND])
  if bound > 0.0:
    for c in range(dim):
      rows[r, c] = min(max(rows[r, c], -bound), bound)


@numba.njit(nogil=True, cache=True, fastmath=_MATH_FLAGS, error_model="numpy")
def apply_gradients(ids, positions, counts, grads, rows, state, table, counters, code, hp):
  """Applies one optimizer step to the row of each distinct ID.

  Args:
    ids: uint64 [u] distinct IDs (see `dedup_sum_route`).
    positions: int64 [k] indices into `ids` and `grads` routed to this shard.
    counts: int32 [k] occurrences of each ID in the call, for the counter of
      gradients dropped because the ID has no row.
    grads: float32 [u, dim] summed gradient of each ID.
    code, hp: optimizer code and float64 hyperparameters (see optimizers.py).
  """
  k = positions.shape[0]
  # Probes first (their misses overlap), then each row, whose row and state
  # are known by then and prefetched PREFETCH_DISTANCE IDs ahead.
  _, found = _resolve(ids, positions, table)
  grad_bits = grads.view(np.int32)
  absent = 0
  nonfinite = 0
  updated = 0
  for j in range(k):
    ahead = j + PREFETCH_DISTANCE
    if ahead < k and found[ahead] >= 0:
      _prefetch_rows(rows, found[ahead])
      _prefetch_rows(state, found[ahead])
    row = found[j]
    if row < 0:
      absent += counts[j]
      continue
    u = positions[j]
    if not _is_finite_row(grad_bits, u):
      nonfinite += 1
      continue
    _update_row(code, rows, state, row, grads, u, hp)
    updated += 1
  counters[C_ABSENT_GRADS] += absent
  counters[C_NONFINITE] += nonfinite
  counters[C_UPDATED] += updated


# ----------------------------------------------------------------------------
# Checkpoint support.
# ----------------------------------------------------------------------------


@_jit
def lru_order(table, meta):
  """Returns uint64 [used] keys and int64 [used] row slots, least recently used first.

  Without recency tracking (no capacity) stamps give the insertion order.
  """
  slots = _occupied(table, meta[META_USED])
  stamps = np.empty(slots.shape[0], np.int64)
  for i in range(slots.shape[0]):
    stamps[i] = _entry_stamp(table[slots[i], 1])
  order = np.argsort(stamps)
  keys = np.empty(slots.shape[0], np.uint64)
  rows = np.empty(slots.shape[0], np.int64)
  for rank in range(order.shape[0]):
    slot = slots[order[rank]]
    keys[rank] = table[slot, 0]
    rows[rank] = _entry_row(table[slot, 1])
  return keys, rows


@_jit
def insert_rows(new_keys, new_rows, new_state, rows, state, table, candidates, meta,
                capacity, counters):
  """Inserts rows in the given order (least recent first), overwriting present IDs.

  The last inserted row becomes the most recently used. When more rows arrive
  than `capacity`, the earliest ones are evicted, which keeps the most recent.
  """
  clock = reserve_clock(table, candidates, meta, new_keys.shape[0])
  for i in range(new_keys.shape[0]):
    key = new_keys[i]
    slot, row = _find(table, key)
    if row >= 0:
      table[slot, 1] = _entry(clock, row)
    else:
      # Stamps grow with every row here, so every entry may be a victim.
      row = _claim_row(key, clock, MAX_STAMP + 1, table, candidates, meta, capacity,
                       counters)
    clock += 1
    meta[META_CLOCK] = clock
    rows[row, :] = new_rows[i, :]
    state[row, :] = new_state[i, :]
