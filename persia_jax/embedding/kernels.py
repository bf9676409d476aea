"""Compiled (numba, `nogil`) kernels behind `EmbeddingStore`.

Every kernel works on the arrays of one shard and is called with that shard's
lock held. The kernels release the GIL, so threads that work on different
shards run in parallel.

Shard arrays (`A` allocated rows, `T` table slots, `S` optimizer slot width):
  keys:   uint64 [A], the ID stored in each row slot. Slots [0, used) are used.
  rows:   float32 [A, dim], embedding rows.
  state:  float32 [A, S], optimizer state of each row.
  links:  int32 [A, 2], the LRU doubly linked list: column PREV points to the
          next more recent row, NEXT to the next less recent one (-1 ends the
          list), so both links of a row share a cache line. A shard without a
          capacity limit never evicts, so it tracks no recency and its links
          array is empty ([0, 2]), which saves 8 bytes per row.
  table:  int32 [T], open-addressing map from hash slot to row slot, -1 for an
          empty slot. Occupancy lives here, not in the keys, so every uint64
          value (0 and 2**64 - 1 included) is a valid key.
  meta:   int64 [META_SIZE]: used rows, LRU head (most recent), LRU tail
          (least recent), admission-sketch increments since the last halving.
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
import numpy as np

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

META_SIZE, META_USED, META_HEAD, META_TAIL, META_SKETCH_ADDS = 4, 0, 1, 2, 3
PREV, NEXT = 0, 1  # Columns of the LRU links array.

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
# Hash map and LRU list.
# ----------------------------------------------------------------------------


@_jit
def _find(table, keys, key):
  """Returns (slot, row): the key's slot and row, or the empty slot and -1."""
  size = table.shape[0]
  slot = _home(key, size)
  while True:
    row = table[slot]
    if row < 0:
      return slot, -1
    if keys[row] == key:
      return slot, row
    slot += 1
    if slot == size:
      slot = 0


@_jit
def _delete_slot(table, keys, slot):
  # Backward-shift deletion: pull later entries of the probe run into the hole
  # unless their home slot lies cyclically in (hole, entry].
  size = table.shape[0]
  hole = slot
  j = slot
  while True:
    j += 1
    if j == size:
      j = 0
    row = table[j]
    if row < 0:
      break
    home = _home(keys[row], size)
    if hole <= j:
      stays = hole < home <= j
    else:
      stays = home > hole or home <= j
    if not stays:
      table[hole] = row
      hole = j
  table[hole] = -1


@_jit
def _unlink(row, links, meta):
  p = links[row, PREV]
  n = links[row, NEXT]
  if p >= 0:
    links[p, NEXT] = n
  else:
    meta[META_HEAD] = n
  if n >= 0:
    links[n, PREV] = p
  else:
    meta[META_TAIL] = p


@_jit
def _push_front(row, links, meta):
  if links.shape[0] == 0:
    return  # Recency is not tracked.
  head = meta[META_HEAD]
  links[row, PREV] = -1
  links[row, NEXT] = head
  if head >= 0:
    links[head, PREV] = row
  else:
    meta[META_TAIL] = row
  meta[META_HEAD] = row


@_jit
def _touch(row, links, meta):
  if links.shape[0] > 0 and meta[META_HEAD] != row:
    _unlink(row, links, meta)
    _push_front(row, links, meta)


@_jit
def _claim_row(key, keys, table, links, meta, capacity, counters):
  """Returns a row slot for absent `key`, evicting the LRU row when full.

  The caller has checked that `key` is absent and that the arrays hold at
  least min(capacity, used + 1) rows. The row is linked as most recent and
  entered into the table, but its values are left for the caller to write.
  """
  used = meta[META_USED]
  if used < capacity:
    row = used
    meta[META_USED] = used + 1
  else:
    row = meta[META_TAIL]
    slot, _ = _find(table, keys, keys[row])
    _delete_slot(table, keys, slot)
    _unlink(row, links, meta)
    counters[C_EVICTIONS] += 1
  keys[row] = key
  slot, _ = _find(table, keys, key)
  table[slot] = row
  _push_front(row, links, meta)
  return row


@_jit
def rebuild_table(table, keys, used):
  """Refills `table` (any size > used) with row slots [0, used)."""
  table[:] = -1
  for row in range(used):
    slot, _ = _find(table, keys, keys[row])
    table[slot] = row


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
def lookup_train(ids, positions, out, keys, rows, state, state_init, links, table,
                 meta, counters, capacity, seed_key, init_scale, admission_key,
                 admission_threshold, min_count, sketch, sketch_key, sketch_period,
                 distinct, distinct_key):
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
  """
  dim = rows.shape[1]
  for j in range(positions.shape[0]):
    p = positions[j]
    key = ids[p]
    _distinct_add(distinct, key, distinct_key)
    _, row = _find(table, keys, key)
    if row >= 0:
      counters[C_HITS] += 1
      _touch(row, links, meta)
      for c in range(dim):
        out[p, c] = rows[row, c]
      continue
    counters[C_MISSES] += 1
    admitted = _passes_admission(key, admission_key, admission_threshold)
    if admitted and min_count > 1:
      admitted = _sketch_count(sketch, meta, key, sketch_key, sketch_period) >= min_count
    if not admitted:
      counters[C_REJECTED] += 1
      _init_row(seed_key, key, init_scale, out, p)
      continue
    row = _claim_row(key, keys, table, links, meta, capacity, counters)
    _init_row(seed_key, key, init_scale, rows, row)
    for c in range(state_init.shape[0]):
      state[row, c] = state_init[c]
    counters[C_INSERTS] += 1
    for c in range(dim):
      out[p, c] = rows[row, c]


@_jit
def count_insert_candidates(ids, positions, keys, table, admission_key,
                            admission_threshold):
  """Returns an upper bound on the rows a training lookup may insert.

  Counts the occurrences of `ids[positions]` that have no row and pass the
  admission probability (the minimum count is not checked).
  """
  candidates = 0
  for j in range(positions.shape[0]):
    key = ids[positions[j]]
    _, row = _find(table, keys, key)
    if row < 0 and _passes_admission(key, admission_key, admission_threshold):
      candidates += 1
  return candidates


@_jit
def lookup_eval(ids, positions, out, keys, rows, table, counters, seed_key,
                init_scale, zeros_for_unknown):
  """Gathers rows read-only: absent IDs get their initial value or zeros."""
  dim = rows.shape[1]
  for j in range(positions.shape[0]):
    p = positions[j]
    key = ids[p]
    _, row = _find(table, keys, key)
    if row >= 0:
      counters[C_EVAL_HITS] += 1
      for c in range(dim):
        out[p, c] = rows[row, c]
    else:
      counters[C_EVAL_MISSES] += 1
      if zeros_for_unknown:
        for c in range(dim):
          out[p, c] = 0.0
      else:
        _init_row(seed_key, key, init_scale, out, p)


# ----------------------------------------------------------------------------
# Optimizer updates.
# ----------------------------------------------------------------------------


@_jit
def _accumulator_power(n, power):
  # sqrt is exact and several times faster than pow for the default power 0.5.
  if power == 0.5:
    return math.sqrt(n)
  return n**power


@_jit
def _update_row(code, rows, state, r, summed, u, hp):
  """Applies one optimizer step to `rows[r]`, `state[r]` with gradient `summed[u]`.

  Indexes the 2-D arrays directly instead of slicing rows, because every slice
  costs a reference-count update in numba.
  """
  dim = rows.shape[1]
  lr = hp[opt.HP_LR]
  if code == opt.SGD:
    decay = hp[opt.HP_WEIGHT_DECAY]
    for c in range(dim):
      w = np.float64(rows[r, c])
      rows[r, c] = w - lr * (summed[u, c] + decay * w)
  elif code == opt.ADAGRAD:
    eps = hp[opt.HP_EPSILON]
    for c in range(dim):
      g = np.float64(summed[u, c])
      acc = state[r, c] + g * g
      state[r, c] = acc
      rows[r, c] = rows[r, c] - lr * g / (math.sqrt(acc) + eps)
  elif code == opt.ROWWISE_ADAGRAD:
    eps = hp[opt.HP_EPSILON]
    total = 0.0
    for c in range(dim):
      g = np.float64(summed[u, c])
      total += g * g
    acc = state[r, 0] + total / dim
    state[r, 0] = acc
    scale = lr / (math.sqrt(acc) + eps)
    for c in range(dim):
      rows[r, c] = rows[r, c] - scale * summed[u, c]
  elif code == opt.ADAM:
    beta1 = hp[opt.HP_BETA1]
    beta2 = hp[opt.HP_BETA2]
    eps = hp[opt.HP_EPSILON]
    step = np.float64(state[r, 2 * dim]) + 1.0
    state[r, 2 * dim] = step
    correction1 = 1.0 - beta1**step
    correction2 = 1.0 - beta2**step
    for c in range(dim):
      g = np.float64(summed[u, c])
      m = beta1 * state[r, c] + (1.0 - beta1) * g
      v = beta2 * state[r, dim + c] + (1.0 - beta2) * g * g
      state[r, c] = m
      state[r, dim + c] = v
      rows[r, c] = rows[r, c] - lr * (m / correction1) / (math.sqrt(v / correction2) + eps)
  else:  # FTRL-Proximal.
    l1 = hp[opt.HP_L1]
    l2 = hp[opt.HP_L2]
    beta = hp[opt.HP_FTRL_BETA]
    power = -hp[opt.HP_LR_POWER]
    for c in range(dim):
      g = np.float64(summed[u, c])
      n_old = np.float64(state[r, dim + c])
      n_new = n_old + g * g
      root_new = _accumulator_power(n_new, power)
      sigma = (root_new - _accumulator_power(n_old, power)) / lr
      z = state[r, c] + g - sigma * rows[r, c]
      state[r, c] = z
      state[r, dim + c] = n_new
      if abs(z) <= l1:
        rows[r, c] = 0.0
      else:
        rows[r, c] = -(z - math.copysign(l1, z)) / ((beta + root_new) / lr + l2)
  bound = hp[opt.HP_WEIGHT_BOUND]
  if bound > 0.0:
    for c in range(dim):
      rows[r, c] = min(max(rows[r, c], -bound), bound)


@_jit
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
  # Small local hash map from row slot to its index in `summed`.
  local_size = 1
  while local_size < 2 * k:
    local_size <<= 1
  local_rows = np.full(local_size, -1, np.int32)
  local_index = np.empty(local_size, np.int32)
  unique_rows = np.empty(k, np.int32)
  summed = np.empty((k, dim), np.float32)
  num_unique = 0
  for j in range(k):
    p = positions[j]
    _, row = _find(table, keys, ids[p])
    if row < 0:
      counters[C_ABSENT_GRADS] += 1
      continue
    slot = np.int64(fmix64(_U(row)) & _U(local_size - 1))
    while local_rows[slot] >= 0 and local_rows[slot] != row:
      slot = (slot + 1) & (local_size - 1)
    if local_rows[slot] < 0:
      local_rows[slot] = row
      local_index[slot] = num_unique
      unique_rows[num_unique] = row
      for c in range(dim):
        summed[num_unique, c] = grads[p, c]
      num_unique += 1
    else:
      u = local_index[slot]
      for c in range(dim):
        summed[u, c] += grads[p, c]
  for u in range(num_unique):
    finite = True
    for c in range(dim):
      if not np.isfinite(summed[u, c]):
        finite = False
        break
    if not finite:
      counters[C_NONFINITE] += 1
      continue
    row = unique_rows[u]
    _update_row(code, rows, state, row, summed, u, hp)
    counters[C_UPDATED] += 1


# ----------------------------------------------------------------------------
# Checkpoint support.
# ----------------------------------------------------------------------------


@_jit
def lru_order(links, meta):
  """Returns int64 [used] row slots from least to most recently used.

  Without recency tracking (empty `links`) this is the insertion order.
  """
  used = meta[META_USED]
  if links.shape[0] == 0:
    return np.arange(used)
  order = np.empty(used, np.int64)
  row = meta[META_TAIL]
  for i in range(used):
    order[i] = row
    row = links[row, PREV]
  return order


@_jit
def insert_rows(new_keys, new_rows, new_state, keys, rows, state, links, table, meta,
                capacity, counters):
  """Inserts rows in the given order (least recent first), overwriting present IDs.

  The last inserted row becomes the most recently used. When more rows arrive
  than `capacity`, the earliest ones are evicted, which keeps the most recent.
  """
  for i in range(new_keys.shape[0]):
    key = new_keys[i]
    _, row = _find(table, keys, key)
    if row >= 0:
      _touch(row, links, meta)
    else:
      row = _claim_row(key, keys, table, links, meta, capacity, counters)
    rows[row, :] = new_rows[i, :]
    state[row, :] = new_state[i, :]
