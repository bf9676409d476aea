"""Synthetic click data from a hidden model with a known best AUC.

Each sample has `num_dense` standard-normal dense features, `num_categorical`
one-hot features and `num_multi_value` multi-hot features. IDs are drawn from
a bounded power law (Zipf-like with exponent s over ranks 0 .. vocab_size-1):
with u ~ U(0, 1) and V = vocab_size,

  x = (1 + u * ((V + 1)^(1 - s) - 1))^(1 / (1 - s))   (x = (V + 1)^u if s = 1)
  rank = floor(x) - 1,

so rank 0 is the most frequent; the feature ID is `hash_ints(name, rank)`, as
the readers would hash the text of the rank. A multi-hot feature has a length
uniform in [1, max_length].

Hidden model. Every ID has a scalar bias b(id) and a latent vector v(id) of
`latent_dim` entries, each a deterministic function of the ID (a SplitMix64
hash turned into an approximately standard normal value by summing four
uniforms), so billions of IDs need no stored table. With p_f the mean of
v over the IDs of feature f in a sample, F features and P = F (F - 1) / 2:

  logit = label_bias
          + bias_scale * sum_f mean_{id in f} b(id) / sqrt(F)
          + interaction_scale * sum_{f < g} <p_f, p_g> / sqrt(P * latent_dim)
          + dense_scale * <w, x> / sqrt(num_dense),   w = hidden normal weights
  label ~ Bernoulli(sigmoid(logit)).

The logit is the Bayes-optimal score, so its AUC on a large sample
(`auc_ceiling`) is the best AUC any model can reach on this data. Data are a
function of `synthetic.data_seed` and the block index only, so 100 M samples
need no disk and any block can be regenerated for an exact resume.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numba
import numpy as np

from persia_jax.data import hashing
from persia_jax.data.chunk import Chunk
from persia_jax.data.schema import DenseColumn, LabelColumn, Schema, SparseColumn
from persia_jax.data.sources import Block, ParsedBlock

_STREAMS = {"train": 0, "test": 1, "ceiling": 2}
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_BIAS_SALT = np.uint64(0xD1B54A32D192ED03)


@numba.njit(nogil=True, cache=True, inline="always")
def _mix(z):
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


@numba.njit(nogil=True, cache=True, inline="always")
def _normal(key):
  """Approximately N(0, 1): the centred sum of four 16-bit uniforms of one hash."""
  z = _mix(key)
  total = 0.0
  for _ in range(4):
    total += float(z & np.uint64(0xFFFF)) / 65536.0
    z = z >> np.uint64(16)
  return (total - 2.0) * math.sqrt(3.0)


@numba.njit(nogil=True, cache=True)
def _pool_kernel(ids, lengths, latent_dim):
  """Returns (mean bias [n], mean latent [n, latent_dim]) of each sample's IDs."""
  n = lengths.shape[0]
  bias = np.zeros(n, np.float64)
  latent = np.zeros((n, latent_dim), np.float64)
  j = 0
  for i in range(n):
    count = lengths[i]
    for _ in range(count):
      key = ids[j]
      bias[i] += _normal(key ^ _BIAS_SALT)
      for d in range(latent_dim):
        latent[i, d] += _normal(key + np.uint64(d + 1) * _GOLDEN)
      j += 1
    if count > 0:
      bias[i] /= count
      for d in range(latent_dim):
        latent[i, d] /= count
  return bias, latent


def zipf_ranks(u: np.ndarray, vocab_size: int, exponent: float) -> np.ndarray:
  """Maps float64 [n] uniforms in [0, 1) to int64 ranks in [0, vocab_size) (see module doc)."""
  v = float(vocab_size) + 1.0
  if abs(exponent - 1.0) < 1e-9:
    x = np.power(v, u)
  else:
    a = 1.0 - exponent
    x = np.power(1.0 + u * (v ** a - 1.0), 1.0 / a)
  return np.clip(np.floor(x).astype(np.int64) - 1, 0, vocab_size - 1)


def _per_feature(value: Any, count: int, what: str) -> list:
  if isinstance(value, (list, tuple)):
    if len(value) != count:
      raise ValueError(f"synthetic.{what} has {len(value)} entries for {count} features.")
    return list(value)
  return [value] * count


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """ROC AUC by ranks (ties get their mean rank)."""
  labels = np.asarray(labels) > 0.5
  order = np.argsort(scores, kind="stable")
  sorted_scores = np.asarray(scores)[order]
  ranks = np.empty(len(scores), np.float64)
  # Mean rank of each run of equal scores.
  boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
  starts = np.concatenate([[0], boundaries])
  ends = np.concatenate([boundaries, [len(scores)]])
  mean_ranks = (starts + ends + 1) / 2.0
  ranks[order] = np.repeat(mean_ranks, ends - starts)
  positives = int(labels.sum())
  negatives = len(labels) - positives
  if positives == 0 or negatives == 0:
    return float("nan")
  return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


class SyntheticSource:
  """Synthetic samples generated block by block; the `source` interface of `Stream`.

  Args:
    data_config: a `synthetic_config()` ConfigDict; its `synthetic` entry sets
      the sizes, skews and hidden-model scales.
  """

  location = "row"
  header = False
  handles_process_split = True

  def __init__(self, data_config: Any):
    spec = data_config.synthetic
    self.spec = spec
    self.data_seed = int(spec.get("data_seed", 0))
    self.block_rows = int(data_config.block_size)
    self.num_samples = {"train": spec.num_samples, "test": spec.num_test_samples,
                        "ceiling": spec.ceiling_samples}
    self.num_dense = int(spec.num_dense)
    self.latent_dim = int(spec.latent_dim)
    dense_names = list(spec.get("dense_names") or
                       [f"dense_{i}" for i in range(self.num_dense)])
    categorical_names = list(spec.get("categorical_names") or
                             [f"cat_{i}" for i in range(spec.num_categorical)])
    multi_names = [f"multi_{i}" for i in range(spec.num_multi_value)]
    self.categorical_names = categorical_names
    self.multi_names = multi_names
    self.vocab_sizes = _per_feature(spec.vocab_size, len(categorical_names), "vocab_size")
    self.exponents = _per_feature(spec.zipf_exponent, len(categorical_names), "zipf_exponent")
    sparse = [SparseColumn(name=n, kind="categorical", column=n, table=n, pooling="none")
              for n in categorical_names]
    sparse += [SparseColumn(name=n, kind="multi_value", column=n, delimiter="^", table=n,
                            pooling="mean") for n in multi_names]
    self.schema = Schema(
        label=LabelColumn("label"),
        dense=tuple(DenseColumn(n, n, "identity") for n in dense_names),
        sparse=tuple(sparse))
    rng = np.random.default_rng([self.data_seed, 0xDE45E])
    self.dense_weights = rng.standard_normal(self.num_dense)
    self.files = ["<synthetic train>"]
    self.stream = "train"
    self.process_index, self.process_count = 0, 1
    self._ceiling = None

  # --------------------------------------------------------------------------
  # Generation.
  # --------------------------------------------------------------------------
  def generate(self, stream: str, block: int, num_rows: int | None = None
               ) -> tuple[Chunk, np.ndarray, dict[str, np.ndarray]]:
    """Generates one block of samples.

    Args:
      stream: "train", "test" or "ceiling"; each has its own samples.
      block: block index; rows block * block_size onwards.
      num_rows: rows to generate (default block_size).

    Returns:
      (chunk, hidden logits float64 [n], feature name to int64 ranks of the
      categorical features).
    """
    n = self.block_rows if num_rows is None else int(num_rows)
    rng = np.random.default_rng([self.data_seed, _STREAMS[stream], block])
    spec = self.spec
    dense = rng.standard_normal((n, self.num_dense), dtype=np.float32)
    sparse, ranks = {}, {}
    biases, latents = [], []
    for name, vocab, exponent in zip(self.categorical_names, self.vocab_sizes, self.exponents):
      rank = zipf_ranks(rng.random(n), int(vocab), float(exponent))
      ids = hashing.hash_ints(name, rank)
      lengths = np.ones(n, np.int32)
      sparse[name] = (ids, lengths)
      ranks[name] = rank
    for name in self.multi_names:
      lengths = rng.integers(1, int(spec.max_length) + 1, size=n).astype(np.int32)
      rank = zipf_ranks(rng.random(int(lengths.sum())), int(spec.multi_value_vocab_size),
                        float(self.exponents[0]))
      sparse[name] = (hashing.hash_ints(name, rank), lengths)
    for ids, lengths in sparse.values():
      bias, latent = _pool_kernel(ids, lengths, self.latent_dim)
      biases.append(bias)
      latents.append(latent)
    num_features = len(sparse)
    logits = np.full(n, float(spec.label_bias))
    if num_features:
      logits += float(spec.bias_scale) * np.sum(biases, axis=0) / math.sqrt(num_features)
    if num_features > 1:
      stacked = np.stack(latents)  # [F, n, k]
      total = stacked.sum(axis=0)
      pairwise = 0.5 * ((total ** 2).sum(-1) - (stacked ** 2).sum(-1).sum(0))
      num_pairs = num_features * (num_features - 1) / 2
      logits += float(spec.interaction_scale) * pairwise / math.sqrt(num_pairs * self.latent_dim)
    if self.num_dense:
      logits += float(spec.dense_scale) * (dense @ self.dense_weights) / math.sqrt(self.num_dense)
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    return Chunk(labels, dense, sparse), logits, ranks

  def auc_ceiling(self) -> float:
    """Returns the hidden model's AUC on `ceiling_samples` samples of their own stream."""
    if self._ceiling is None:
      total = int(self.num_samples["ceiling"])
      labels, logits = [], []
      for block in range(-(-total // self.block_rows)):
        rows = min(self.block_rows, total - block * self.block_rows)
        chunk, block_logits, _ = self.generate("ceiling", block, rows)
        labels.append(chunk.labels)
        logits.append(block_logits)
      self._ceiling = auc(np.concatenate(labels), np.concatenate(logits))
    return self._ceiling

  # --------------------------------------------------------------------------
  # The source interface of `Stream`.
  # --------------------------------------------------------------------------
  def for_split(self, split: str, process_index: int, process_count: int) -> "SyntheticSource":
    self.stream = split
    self.files = [f"<synthetic {split}>"]
    self.process_index, self.process_count = process_index, process_count
    return self

  def split_ranges(self, split: str) -> list[tuple[int, int, None]]:
    total = self.num_samples[split]
    if total is not None and int(total) <= 0:
      raise ValueError(f"synthetic.num_{'test_' if split == 'test' else ''}samples is"
                       f" {total}; the {split!r} split needs a positive number.")
    return [(0, -1 if total is None else int(total), None)]

  def start_cursor(self, file_index: int) -> dict[str, int]:
    del file_index
    return self._cursor(self.process_index)

  def _cursor(self, block: int) -> dict[str, int]:
    return {"offset": block, "line": block * self.block_rows + 1, "row": block * self.block_rows}

  def blocks(self, file_index: int, cursor: dict[str, int]) -> Iterator[Block]:
    """Yields this process's blocks (block % process_count == process_index)."""
    total = self.num_samples[self.stream]
    block = cursor["offset"]
    while total is None or block * self.block_rows < int(total):
      first = block * self.block_rows
      rows = self.block_rows if total is None else min(self.block_rows, int(total) - first)
      following = block + self.process_count
      end = self._cursor(following)
      if total is not None and following * self.block_rows >= int(total):
        end = {"offset": following, "line": int(total) + 1, "row": int(total)}
      yield Block(file_index, (block, rows), first + 1, first, end)
      block = following

  def truncate(self, block: Block, num_rows: int) -> Block:
    del num_rows  # Blocks already end at num_samples.
    return block

  def parse(self, block: Block) -> ParsedBlock:
    index, rows = block.payload
    chunk, _, _ = self.generate(self.stream, index, rows)
    return ParsedBlock(chunk, block.first_row + np.arange(rows, dtype=np.int64),
                       block.file_index, block.end, rows, {})


# ----------------------------------------------------------------------------
# Criteo-format files for benchmarks.
# ----------------------------------------------------------------------------
@numba.njit(nogil=True, cache=True)
def _format_criteo_kernel(labels, integers, int_missing, categories, cat_missing):
  n = labels.shape[0]
  out = np.empty(n * (2 + integers.shape[1] * 21 + categories.shape[1] * 9 + 1), np.uint8)
  digits = np.empty(20, np.uint8)
  k = 0
  for i in range(n):
    out[k] = 48 + labels[i]
    k += 1
    for j in range(integers.shape[1]):
      out[k] = 9
      k += 1
      if int_missing[i, j]:
        continue
      v = integers[i, j]
      if v < 0:
        out[k] = 45
        k += 1
        v = -v
      count = 0
      while True:
        digits[count] = 48 + v % 10
        v //= 10
        count += 1
        if v == 0:
          break
      for d in range(count - 1, -1, -1):
        out[k] = digits[d]
        k += 1
    for j in range(categories.shape[1]):
      out[k] = 9
      k += 1
      if cat_missing[i, j]:
        continue
      v = categories[i, j]
      for shift in range(28, -4, -4):
        nibble = (v >> shift) & 15
        out[k] = 48 + nibble if nibble < 10 else 87 + nibble
        k += 1
    out[k] = 10
    k += 1
  return out[:k]


def write_criteo_file(path: str, num_rows: int, *, data_seed: int = 0,
                      block_rows: int = 65536, missing_rate: float = 0.05) -> None:
  """Writes `num_rows` synthetic rows in the Criteo `train.txt` layout.

  Labels come from the hidden model of `synthetic_config()` with 13 dense and
  26 categorical features; integers are sign(x) * floor(expm1(2 |x|)) of the
  dense values, categories the low 32 bits of their feature ID as 8 hex
  digits, and each field is empty with probability `missing_rate`.
  """
  from persia_jax.data.configs import (CRITEO_CATEGORICAL_COLUMNS,  # pylint: disable=g-import-not-at-top
                                       CRITEO_INTEGER_COLUMNS, synthetic_config)
  config = synthetic_config(block_size=block_rows)
  config.synthetic.update(dict(num_dense=13, num_categorical=26, data_seed=data_seed,
                               dense_names=list(CRITEO_INTEGER_COLUMNS),
                               categorical_names=list(CRITEO_CATEGORICAL_COLUMNS)))
  source = SyntheticSource(config)
  with open(path, "wb") as f:
    for block in range(-(-num_rows // block_rows)):
      rows = min(block_rows, num_rows - block * block_rows)
      chunk, _, _ = source.generate("train", block, rows)
      rng = np.random.default_rng([data_seed, 7, block])
      x = chunk.dense.astype(np.float64)
      integers = (np.sign(x) * np.floor(np.expm1(2.0 * np.abs(x)))).astype(np.int64)
      categories = np.stack([chunk.sparse[n][0] & np.uint64(0xFFFFFFFF)
                             for n in CRITEO_CATEGORICAL_COLUMNS], axis=1).astype(np.int64)
      int_missing = rng.random(integers.shape) < missing_rate
      cat_missing = rng.random(categories.shape) < missing_rate
      f.write(_format_criteo_kernel(chunk.labels.astype(np.int64), integers, int_missing,
                                    categories, cat_missing).tobytes())
