"""Compiled (numba, `nogil`) kernels behind `EmbeddingStore`.

Every kernel works on the arrays of one shard and is called with that shard's
lock held. The kernels release the GIL, so threads that work on different
shards run in parallel.

Shard arrays (`A` allocated rows, `T` table slots, `S` optimizer slot width):
  keys:   uint64 [A], the ID stored in each row slot. Slots [0, used) are used.
  rows:   float32 [A, dim], embedding rows.
  state:  float32 [A, S], optimizer state of each row.
  stamps: int64 [A], the recency of each row: the shard's clock value at the
          row's last training lookup (or insert). Clock values are unique and
          increasing, so the least recently used row is the one with the
          smallest stamp. A touch is one store, where a doubly linked list
          would also rewrite two random neighbour rows (two more cache misses).
          A shard without a capacity limit never evicts, so it tracks no
          recency and its stamps array is empty ([0]), which saves 8 bytes
          per row.
  candidates: int32 [K], eviction candidates: the rows that had the K
          smallest stamps when the buffer was filled, in stamp order (see
          `_next_victim`). Empty when recency is not tracked.
  table:  int32 [T], open-addressing map from hash slot to entry, -1 for an
          empty slot. The low b = bit_length(T) bits of an entry are the row
          slot; the 31 - b bits above are a tag, the low bits of fmix64(key).
          A probe reads the key of a slot (a random cache line) only when the
          tag matches. A shard of 2.5 M rows has 9 tag bits. Occupancy lives here, not in the keys, so every
          uint64 value (0 and 2**64 - 1 included) is a valid key.
  meta:   int64 [META_SIZE]: used rows, recency clock, admission-sketch
          increments since the last halving, next and end index into
          `candidates`, largest stamp in the candidate buffer when filled.
  counters: int64 [NUM_COUNTERS], see the COUNTER_NAMES tuple.

The map uses linear probing with backward-shift deletion (no tombstones), and
the home slot of a key is `(fmix64(key) >> 32) * T >> 32`, so the table size
need not be a power of two. Routing across shards uses splitmix64 instead, so
the two hashes are independent.

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
META_CANDIDATE_NEXT, META_CANDIDATE_END, META_CANDIDATE_LIMIT = 3, 4, 5

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

# Table load factor limit: 4 bytes per slot / 0.75 = 5.3 index bytes per row.
MAX_LOAD = 0.75

_jit = numba.njit(nogil=True, cache=True)
# Small helpers called once per ID in the hot loops are inlined at the numba
# IR level, so the loop body is one function for LLVM to optimize.
_inline_jit = numba.njit(nogil=True, cache=True, inline="always")

# How many IDs ahead the lookup and update kernels prefetch. A probe is a chain
# of cache misses: the table slot, then the keys of the slots it passes, then
# the row. `_resolve_rows` prefetches the table slot PREFETCH_DISTANCE IDs
# ahead and the keys of the first slots of the probe run half as far ahead, so
# the misses of many IDs overlap. The lookups then prefetch the resolved row
# (and stamp) of the ID half as far ahead, the update pass the row and state
# of the unique row PREFETCH_DISTANCE ahead. 16 and 32 measured within noise
# of each other for the probes, 64 was slower (10 M x 16 table, 65,536 IDs);
# for the resolved rows 16, 32 and 64 IDs ahead were within noise.
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
def prefetch(typingctx, array, index):  # pylint: disable=unused-argument
  """Hints the CPU to load `array[index]` (1-D) into cache; never faults.

  LLVM's prefetch instruction does not trap on any address, so an index past
  the end is harmless, which lets the kernels skip bounds checks on hints.
  """
  return types.void(array, index), _prefetch_codegen


@intrinsic
def prefetch2(typingctx, array, row, column):  # pylint: disable=unused-argument
  """Hints the CPU to load `array[row, column]` (2-D) into cache; never faults."""
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
def _row_bits(table_size):
  """Returns the low bits of a table entry that hold the row slot.

  Row slots are below the table size, so bit_length(table_size) bits hold
  any of them; the remaining bits up to the sign bit hold the tag.
  """
  bits = 1
  while bits < 31 and (1 << bits) <= table_size:
    bits += 1
  return bits


@_inline_jit
def _tag(key, bits):
  """Returns the tag bits of `key`'s table entry (low fmix64 bits, shifted).

  The home slot comes from the high 32 bits of the same hash, so tag and
  home are independent.
  """
  return np.int64(fmix64(key) & _U((1 << (31 - bits)) - 1)) << bits


@_jit
def _find(table, keys, key):
  """Returns (slot, row): the key's slot and row, or the empty slot and -1."""
  bits = _row_bits(table.shape[0])
  return _find_from(table, keys, key, _home(key, table.shape[0]), _tag(key, bits), bits)


@_jit
def _delete_slot(table, keys, slot):
  # Backward-shift deletion: pull later entries of the probe run into the hole
  # unless their home slot lies cyclically in (hole, entry].
  size = table.shape[0]
  row_mask = (1 << _row_bits(size)) - 1
  hole = slot
  j = slot
  while True:
    j += 1
    if j == size:
      j = 0
    entry = table[j]
    if entry < 0:
      break
    home = _home(keys[entry & row_mask], size)
    if hole <= j:
      stays = hole < home <= j
    else:
      stays = home > hole or home <= j
    if not stays:
      table[hole] = entry
      hole = j
  table[hole] = -1


@_jit
def _touch(row, stamps, meta):
  """Marks `row` as the most recently used (no-op without recency tracking)."""
  if stamps.shape[0] > 0:
    clock = meta[META_CLOCK]
    stamps[row] = clock
    meta[META_CLOCK] = clock + 1


@_jit
def _refill_candidates(stamps, candidates, meta):
  """Fills `candidates` with the rows of the smallest stamps, in stamp order.

  O(used) selection plus a sort of the K selected rows, once per K evictions.
  """
  used = meta[META_USED]
  count = min(candidates.shape[0], used)
  limit = np.partition(stamps[:used], count - 1)[count - 1]
  selected = np.empty(count, np.int32)
  selected_stamps = np.empty(count, np.int64)
  found = 0
  for row in range(used):
    if stamps[row] <= limit:
      selected[found] = row
      selected_stamps[found] = stamps[row]
      found += 1
  order = np.argsort(selected_stamps)
  for i in range(count):
    candidates[i] = selected[order[i]]
  meta[META_CANDIDATE_NEXT] = 0
  meta[META_CANDIDATE_END] = count
  meta[META_CANDIDATE_LIMIT] = limit


@_jit
def _next_victim(stamps, candidates, meta):
  """Returns the least recently used row, exactly.

  The buffer holds the rows whose stamps were the K smallest when it was
  filled, in stamp order. A row touched since then has a stamp above the
  buffer's limit and is skipped; a row that was not touched keeps its stamp,
  and every row outside the buffer had (and, since touches only raise stamps,
  still has) a larger one. So the first untouched row left in the buffer has
  the smallest stamp of the shard.
  """
  while True:
    if meta[META_CANDIDATE_NEXT] >= meta[META_CANDIDATE_END]:
      _refill_candidates(stamps, candidates, meta)
    row = candidates[meta[META_CANDIDATE_NEXT]]
    meta[META_CANDIDATE_NEXT] += 1
    if stamps[row] <= meta[META_CANDIDATE_LIMIT]:
      return row


@_jit
def _claim_row(key, keys, table, stamps, candidates, meta, capacity, counters):
  """Returns a row slot for absent `key`, evicting the LRU row when full.

  The caller has checked that `key` is absent and that the arrays hold at
  least min(capacity, used + 1) rows. The row is stamped as most recent and
  entered into the table, but its values are left for the caller to write.
  """
  used = meta[META_USED]
  if used < capacity:
    row = used
    meta[META_USED] = used + 1
  else:
    row = _next_victim(stamps, candidates, meta)
    slot, _ = _find(table, keys, keys[row])
    _delete_slot(table, keys, slot)
    counters[C_EVICTIONS] += 1
  keys[row] = key
  slot, _ = _find(table, keys, key)
  table[slot] = _tag(key, _row_bits(table.shape[0])) | row
  _touch(row, stamps, meta)
  return row


@_jit
def rebuild_table(table, keys, used):
  """Refills `table` (any size > used) with row slots [0, used)."""
  table[:] = -1
  bits = _row_bits(table.shape[0])
  for row in range(used):
    slot, _ = _find(table, keys, keys[row])
    table[slot] = _tag(keys[row], bits) | row


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


@_inline_jit
def _find_from(table, keys, key, slot, tag, bits):
  """Like `_find`, from the precomputed home `slot` and `tag` of `key`.

  Only a slot whose tag matches reads its row's key, a random cache line.
  With b tag bits, another key's slot matches with probability 2**-b.
  """
  size = table.shape[0]
  row_mask = (1 << bits) - 1
  while True:
    entry = table[slot]
    if entry < 0:
      return slot, -1
    if (entry & ~row_mask) == tag and keys[entry & row_mask] == key:
      return slot, entry & row_mask
    slot += 1
    if slot == size:
      slot = 0


@_jit
def _homes(ids, positions, table_size):
  """Returns int64 [k] home slots and int64 [k] tags of `ids[positions]`."""
  k = positions.shape[0]
  bits = _row_bits(table_size)
  homes = np.empty(k, np.int64)
  tags = np.empty(k, np.int64)
  tag_mask = _U((1 << (31 - bits)) - 1)
  for j in range(k):
    # One hash for both, as `_home` and `_tag` compute them.
    h = fmix64(ids[positions[j]])
    homes[j] = np.int64(((h >> _S32) * _U(table_size)) >> _S32)
    tags[j] = np.int64(h & tag_mask) << bits
  return homes, tags


@_inline_jit
def _prefetch_rows(array, row):
  # One hint per 64-byte line of a float32 row.
  for c in range(0, array.shape[1], 16):
    prefetch2(array, row, c)


# Slots of a probe run whose keys the lookup and update kernels prefetch. At
# the 75% load limit about 63% of the rows sit in their home slot, 15% one
# slot later and 7% two slots later (10 M rows in 4 shards, measured).
_PROBE_PREFETCH_SLOTS = 3


@_inline_jit
def _prefetch_probe_keys(table, keys, bits, home):
  # Prefetches the keys of the first slots of the probe run from `home`,
  # stopping at an empty slot, where the probe would stop too. It does not
  # skip the slots whose tag differs, although the probe reads no key there:
  # that test adds a data-dependent branch, and it measured slower (lookups
  # and updates of a 1 M x 64 table), while at 10 M x 16 both ran alike.
  size = table.shape[0]
  row_mask = (1 << bits) - 1
  slot = home
  for _ in range(_PROBE_PREFETCH_SLOTS):
    entry = table[slot]
    if entry < 0:
      return
    prefetch(keys, entry & row_mask)
    slot += 1
    if slot == size:
      slot = 0


@_jit
def _resolve_rows(ids, positions, keys, table):
  """Returns int32 [k] row slots of `ids[positions]`, -1 for an absent ID.

  The probes of different IDs are independent, so their cache misses overlap:
  the table slot of the ID `PREFETCH_DISTANCE` positions ahead is prefetched,
  and the keys of the first slots of the probe run of the ID half as far
  ahead, whose table line is cached by then. Prefetching only the key of the
  home slot would leave every probe that moves on with a key miss it waits
  for.
  """
  homes, tags = _homes(ids, positions, table.shape[0])
  bits = _row_bits(table.shape[0])
  k = positions.shape[0]
  found = np.empty(k, np.int32)
  for j in range(k):
    if j + PREFETCH_DISTANCE < k:
      prefetch(table, homes[j + PREFETCH_DISTANCE])
    if j + PREFETCH_DISTANCE // 2 < k:
      half = j + PREFETCH_DISTANCE // 2
      _prefetch_probe_keys(table, keys, bits, homes[half])
    _, row = _find_from(table, keys, ids[positions[j]], homes[j], tags[j], bits)
    found[j] = row
  return found


@_jit
def lookup_train(ids, positions, out, keys, rows, state, state_init, stamps,
                 candidates, table, meta, counters, capacity, seed_key, init_scale, admission_key,
                 admission_threshold, min_count, sketch, sketch_key, sketch_period,
                 distinct, distinct_key, distinct_on_hits):
  """Gathers rows for training, inserting admitted absent IDs.

  Args:
    ids: uint64 [n] all IDs of the call; only `ids[positions]` belong here.
    positions: int64 [k] indices into `ids` routed to this shard.
    out: float32 [n, dim]; row `p` receives the value for `ids[p]`.
    capacity: maximum rows of this shard; arrays hold min(capacity, used + k).
    admission_threshold: uint64; an ID is admitted with probability
      threshold / 2**53, decided by its hash.
    min_count: occurrences an absent ID needs (counted in `sketch`) before it
      gets a row; 1 disables the sketch.
    distinct_on_hits: whether IDs that hit are added to the `distinct`
      HyperLogLog registers too. Every ID that misses is added. The caller
      passes False when every stored row's ID is already in the registers
      (rows come only from misses or from an import with its registers),
      because adding such an ID again changes nothing.
  """
  dim = rows.shape[1]
  # Resolve every ID first with overlapped read-only probes (see
  # _resolve_rows); the loop below then knows the row of the ID ahead and
  # prefetches exactly that row and stamp. A row resolved there is still this
  # ID's row unless an insert earlier in this loop evicted it and gave the
  # slot to another key, so the loop checks the key, and probes again when it
  # differs or when the ID was absent (an earlier occurrence may have
  # inserted it).
  found = _resolve_rows(ids, positions, keys, table)
  k = positions.shape[0]
  track = stamps.shape[0] > 0
  hits = 0
  # The recency clock lives in a local between misses, because a store to
  # `meta` per hit would have to be reloaded for the next one.
  clock = meta[META_CLOCK]
  for j in range(k):
    if j + PREFETCH_DISTANCE // 2 < k:
      ahead = found[j + PREFETCH_DISTANCE // 2]
      if ahead >= 0:
        _prefetch_rows(rows, ahead)
        if track:
          prefetch(stamps, ahead)
    p = positions[j]
    key = ids[p]
    if distinct_on_hits:
      _distinct_add(distinct, key, distinct_key)
    row = found[j]
    if row < 0 or keys[row] != key:
      _, row = _find(table, keys, key)
    if row >= 0:
      hits += 1
      if track:
        stamps[row] = clock
        clock += 1
      for c in range(dim):
        out[p, c] = rows[row, c]
      continue
    if not distinct_on_hits:
      _distinct_add(distinct, key, distinct_key)
    counters[C_MISSES] += 1
    admitted = _passes_admission(key, admission_key, admission_threshold)
    if admitted and min_count > 1:
      admitted = _sketch_count(sketch, meta, key, sketch_key, sketch_period) >= min_count
    if not admitted:
      counters[C_REJECTED] += 1
      _init_row(seed_key, key, init_scale, out, p)
      continue
    meta[META_CLOCK] = clock
    row = _claim_row(key, keys, table, stamps, candidates, meta, capacity, counters)
    clock = meta[META_CLOCK]
    _init_row(seed_key, key, init_scale, rows, row)
    for c in range(state_init.shape[0]):
      state[row, c] = state_init[c]
    counters[C_INSERTS] += 1
    for c in range(dim):
      out[p, c] = rows[row, c]
  counters[C_HITS] += hits
  meta[META_CLOCK] = clock


@_jit
def count_insert_candidates(ids, positions, keys, table, admission_key,
                            admission_threshold):
  """Returns an upper bound on the rows a training lookup may insert.

  Counts the occurrences of `ids[positions]` that have no row and pass the
  admission probability (the minimum count is not checked).
  """
  found = _resolve_rows(ids, positions, keys, table)
  candidates = 0
  for j in range(positions.shape[0]):
    if found[j] < 0 and _passes_admission(ids[positions[j]], admission_key,
                                          admission_threshold):
      candidates += 1
  return candidates


@_jit
def lookup_eval(ids, positions, out, keys, rows, table, counters, seed_key,
                init_scale, zeros_for_unknown):
  """Gathers rows read-only: absent IDs get their initial value or zeros."""
  dim = rows.shape[1]
  found = _resolve_rows(ids, positions, keys, table)
  k = positions.shape[0]
  hits = 0
  for j in range(k):
    # The rows are known (nothing is inserted), so the row of the ID ahead is
    # prefetched exactly.
    if j + PREFETCH_DISTANCE // 2 < k:
      ahead = found[j + PREFETCH_DISTANCE // 2]
      if ahead >= 0:
        _prefetch_rows(rows, ahead)
    p = positions[j]
    row = found[j]
    if row >= 0:
      hits += 1
      for c in range(dim):
        out[p, c] = rows[row, c]
    else:
      counters[C_EVAL_MISSES] += 1
      if zeros_for_unknown:
        for c in range(dim):
          out[p, c] = 0.0
      else:
        _init_row(seed_key, ids[p], init_scale, out, p)
  counters[C_EVAL_HITS] += hits


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
def apply_gradients(ids, positions, grads, keys, rows, state, table, counters, code, hp):
  """Sums the gradients of duplicate IDs in arrival order, then updates each row once.

  Args:
    ids: uint64 [n] all IDs of the call; only `ids[positions]` belong here.
    positions: int64 [k] indices into `ids` and `grads` routed to this shard.
    grads: float32 [n, dim].
    code, hp: optimizer code and float64 hyperparameters (see optimizers.py).
  """
  k = positions.shape[0]
  dim = rows.shape[1]
  # Probes first (their misses overlap), then sums duplicates, then updates
  # each unique row, whose row and state are known exactly by then.
  found = _resolve_rows(ids, positions, keys, table)
  # Small local hash map from row slot to its index in `summed`: one int64
  # entry (row << 32 | index) per hash slot, -1 when empty, so a probe reads
  # one value. It is at most half full and takes 16 bytes per ID, so it stays
  # in cache. The hash is Fibonacci multiply-shift (one multiply, top bits):
  # row slots are small distinct integers, which it spreads evenly, and it is
  # shorter than fmix64 on this per-ID path.
  local_bits = 1
  while (1 << local_bits) < 2 * k:
    local_bits += 1
  local_mask = (1 << local_bits) - 1
  local_shift = _U(64 - local_bits)
  local = np.full(1 << local_bits, -1, np.int64)
  unique_rows = np.empty(k, np.int32)
  summed = np.empty((k, dim), np.float32)
  num_unique = 0
  absent = 0
  for j in range(k):
    # Rows and state are not prefetched here: the update pass below
    # prefetches them itself, and lines fetched here tend to leave L2 before
    # that pass (the summing streams about 1 MiB of gradients per shard at
    # dim 16); measured as fast or faster without (10 M x 16 table).
    row = found[j]
    if row < 0:
      absent += 1
      continue
    p = positions[j]
    slot = np.int64((_U(row) * GOLDEN_GAMMA) >> local_shift)
    entry = local[slot]
    while entry >= 0 and (entry >> 32) != row:
      slot = (slot + 1) & local_mask
      entry = local[slot]
    if entry < 0:
      local[slot] = (np.int64(row) << 32) | num_unique
      unique_rows[num_unique] = row
      for c in range(dim):
        summed[num_unique, c] = grads[p, c]
      num_unique += 1
    else:
      u = entry & 0xFFFFFFFF
      for c in range(dim):
        summed[u, c] += grads[p, c]
  counters[C_ABSENT_GRADS] += absent
  summed_bits = summed.view(np.int32)
  updated = 0
  for u in range(num_unique):
    ahead = u + PREFETCH_DISTANCE
    if ahead < num_unique:
      _prefetch_rows(rows, unique_rows[ahead])
      _prefetch_rows(state, unique_rows[ahead])
    if not _is_finite_row(summed_bits, u):
      counters[C_NONFINITE] += 1
      continue
    row = unique_rows[u]
    _update_row(code, rows, state, row, summed, u, hp)
    updated += 1
  counters[C_UPDATED] += updated


# ----------------------------------------------------------------------------
# Checkpoint support.
# ----------------------------------------------------------------------------


@_jit
def lru_order(stamps, meta):
  """Returns int64 [used] row slots from least to most recently used.

  Without recency tracking (empty `stamps`) this is the insertion order.
  """
  used = meta[META_USED]
  if stamps.shape[0] == 0:
    return np.arange(used)
  return np.argsort(stamps[:used])


@_jit
def insert_rows(new_keys, new_rows, new_state, keys, rows, state, stamps, candidates,
                table, meta, capacity, counters):
  """Inserts rows in the given order (least recent first), overwriting present IDs.

  The last inserted row becomes the most recently used. When more rows arrive
  than `capacity`, the earliest ones are evicted, which keeps the most recent.
  """
  for i in range(new_keys.shape[0]):
    key = new_keys[i]
    _, row = _find(table, keys, key)
    if row >= 0:
      _touch(row, stamps, meta)
    else:
      row = _claim_row(key, keys, table, stamps, candidates, meta, capacity, counters)
    rows[row, :] = new_rows[i, :]
    state[row, :] = new_state[i, :]
