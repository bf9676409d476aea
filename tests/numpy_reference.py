"""Plain numpy references for the embedding store, written for clarity, not speed.

`initial_values` recomputes the seeded initial rows with Python integers,
`DenseReference` applies the sparse optimizers to a dense float64 table with
whole-array numpy operations, and `LruReference` is an exact LRU cache of
keys. Tests compare the store against them.
"""

from __future__ import annotations

import collections

import numpy as np

_MASK = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


def splitmix64(x: int) -> int:
  """SplitMix64 output for state `x`, on Python integers."""
  z = (x + _GAMMA) & _MASK
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
  return z ^ (z >> 31)


def initial_values(ids, seed: int, init_scale: float, dim: int) -> np.ndarray:
  """Returns float32 [n, dim] initial rows: column c of ID i is uniform(-s, s).

  The value comes from the c-th SplitMix64 output of a stream that starts at
  splitmix64(splitmix64(seed) ^ id). Its top 24 bits give u in [0, 1), and the
  value is (2u - 1) * init_scale.
  """
  seed_key = splitmix64(int(seed) & _MASK)
  out = np.empty((len(ids), dim), np.float32)
  for i, key in enumerate(ids):
    base = splitmix64(seed_key ^ int(key))
    for c in range(dim):
      h = splitmix64((base + c * _GAMMA) & _MASK)
      unit = (h >> 40) / float(1 << 24)
      out[i, c] = (2.0 * unit - 1.0) * init_scale
  return out


class DenseReference:
  """A dense [num_rows, dim] table trained by one sparse optimizer, in float64.

  Row `i` of the table stands for the i-th ID of the test's vocabulary; tests
  translate IDs to row indices themselves.
  """

  def __init__(self, initial_table: np.ndarray, optimizer: dict):
    self.w = np.array(initial_table, np.float64)
    self.opt = dict(optimizer)
    num_rows, dim = self.w.shape
    name = self.opt["name"]
    init_acc = self.opt.get("initial_accumulator", 0.1)
    if name == "adagrad":
      self.acc = np.full((num_rows, dim), init_acc)
    elif name == "rowwise_adagrad":
      self.acc = np.full((num_rows, 1), init_acc)
    elif name == "adam":
      self.m = np.zeros((num_rows, dim))
      self.v = np.zeros((num_rows, dim))
      self.t = np.zeros((num_rows, 1))
    elif name == "ftrl":
      self.z = np.zeros((num_rows, dim))
      self.n = np.zeros((num_rows, dim))

  def step(self, rows: np.ndarray, grads: np.ndarray) -> None:
    """Sums `grads` [k, dim] per row index in `rows` [k], then updates those rows.

    Rows whose summed gradient has NaN or inf are left unchanged.
    """
    summed = np.zeros_like(self.w)
    np.add.at(summed, rows, np.asarray(grads, np.float64))
    touched = np.unique(rows)
    touched = touched[np.all(np.isfinite(summed[touched]), axis=1)]
    g = summed[touched]
    w = self.w[touched]
    o = self.opt
    lr = o.get("learning_rate", 0.01)
    eps = o.get("epsilon", 1e-8)
    name = o["name"]
    if name == "sgd":
      w = w - lr * (g + o.get("weight_decay", 0.0) * w)
    elif name == "adagrad":
      self.acc[touched] += g * g
      w = w - lr * g / (np.sqrt(self.acc[touched]) + eps)
    elif name == "rowwise_adagrad":
      self.acc[touched] += np.mean(g * g, axis=1, keepdims=True)
      w = w - lr * g / (np.sqrt(self.acc[touched]) + eps)
    elif name == "adam":
      b1, b2 = o.get("beta1", 0.9), o.get("beta2", 0.999)
      self.t[touched] += 1
      t = self.t[touched]
      self.m[touched] = b1 * self.m[touched] + (1 - b1) * g
      self.v[touched] = b2 * self.v[touched] + (1 - b2) * g * g
      m_hat = self.m[touched] / (1 - b1**t)
      v_hat = self.v[touched] / (1 - b2**t)
      w = w - lr * m_hat / (np.sqrt(v_hat) + eps)
    elif name == "ftrl":
      l1, l2 = o.get("ftrl_l1", 0.0), o.get("ftrl_l2", 0.0)
      beta = o.get("ftrl_beta", 1.0)
      power = -o.get("learning_rate_power", -0.5)
      n_old = self.n[touched]
      n_new = n_old + g * g
      sigma = (n_new**power - n_old**power) / lr
      z = self.z[touched] + g - sigma * w
      self.z[touched] = z
      self.n[touched] = n_new
      w = np.where(np.abs(z) <= l1, 0.0,
                   -(z - np.sign(z) * l1) / ((beta + n_new**power) / lr + l2))
    else:
      raise ValueError(f"Unknown optimizer {name!r}.")
    bound = o.get("weight_bound", 0.0)
    if bound > 0:
      w = np.clip(w, -bound, bound)
    self.w[touched] = w


class LruReference:
  """An exact LRU cache of keys on an OrderedDict, with the store's call semantics.

  One `lookup` call first refreshes the keys it finds, then inserts the
  absent ones in order of first occurrence, each evicting the least recently
  used key that the call does not contain. Afterwards the call's keys are the
  most recent, ordered by their last occurrence.
  """

  def __init__(self, capacity: int):
    self.capacity = capacity
    self.evictions = 0
    self._keys = collections.OrderedDict()

  def lookup(self, keys) -> None:
    """Applies one training lookup of `keys` (any order, repeats allowed)."""
    keys = np.asarray(keys).tolist()
    last = {key: i for i, key in enumerate(keys)}
    for key in dict.fromkeys(keys):
      if key in self._keys:
        continue
      if len(self._keys) == self.capacity:
        untouched = [k for k in self._keys if k not in last]
        if untouched:
          victim = untouched[0]
        else:  # The call has more distinct keys than the capacity.
          victim = min(self._keys, key=last.__getitem__)
        del self._keys[victim]
        self.evictions += 1
      self._keys[key] = True
    for key in sorted((k for k in self._keys if k in last), key=last.__getitem__):
      self._keys.move_to_end(key)

  def keys(self) -> list[int]:
    """Returns the stored keys, least recently used first."""
    return list(self._keys)
