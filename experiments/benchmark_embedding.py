r"""Benchmark of the embedding store and worker against a plain-array reference.

Measures IDs per second of store lookups, pooled lookups through the
embedding worker, the worker's backward pass and every sparse optimizer's
update, each with 1 and 2 threads that work on different batches at the same
time. In the same run a compiled numba gather and scatter-add with
precomputed row indices over a plain float32 array give the reference of what
the hardware allows, and every result is reported as a ratio to it. The run
also measures ID deduplication (hash table vs sort), bytes per stored row
against row plus optimizer state, and the accuracy of float16 and bfloat16
wire compression.

Batches hold 65,536 IDs drawn Zipf(1.1) (truncated to the table size) or
uniformly; Zipf ranks are scattered over the ID space by a multiplicative
bijection, as hashed IDs are in practice.

Run (full, about 1.5-2 minutes on a 2-core x86_64 VM):

  .venv/bin/python experiments/benchmark_embedding.py

Smoke run on small tables:

  .venv/bin/python experiments/benchmark_embedding.py --quick

Writes `embedding_store.json` (or `embedding_store_quick.json`) to
`--output_dir` and replaces the "Embedding store" section of `--docs_path`.
`--render_from=PATH.json` rewrites that section from an earlier run's JSON.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import pathlib
import sys
import threading
import time
from collections.abc import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import numba
import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

# pylint: disable=g-import-not-at-top,wrong-import-position
from persia_jax import benchmarking  # noqa: E402
from persia_jax.data.batch import SparseInput  # noqa: E402
from persia_jax.embedding import memory  # noqa: E402
from persia_jax.embedding import pooling  # noqa: E402
from persia_jax.embedding.features import FeatureSpec  # noqa: E402
from persia_jax.embedding.store import EmbeddingStore  # noqa: E402
from persia_jax.embedding.worker import EmbeddingWorker  # noqa: E402
# pylint: enable=g-import-not-at-top,wrong-import-position

_QUICK = flags.DEFINE_bool("quick", False, "Shrink tables and batches for a smoke run.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", "benchmarks/results", "Directory for the JSON results.")
_RENDER_FROM = flags.DEFINE_string(
    "render_from", "",
    "Path of a JSON file written by an earlier run; if set, only rewrites the docs"
    " section from it without measuring.")
_DOCS_PATH = flags.DEFINE_string(
    "docs_path", "docs/benchmarks.md",
    "Markdown file whose 'Embedding store' section is replaced; empty to skip.")

OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam", "ftrl")
DISTRIBUTIONS = ("zipf", "uniform")
THREADS = (1, 2)
ZIPF_EXPONENT = 1.1
BAG_SIZE = 8
SECTION_TITLE = "Embedding store"

# Pass/fail thresholds reported in the docs.
TARGET_LOOKUP_VS_GATHER = 0.5
TARGET_ADAGRAD_VS_SCATTER = 0.3
TARGET_THREAD_SCALING = 1.5
TARGET_BYTES_PER_ROW = 1.25


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
  """Sizes of one benchmark run.

  Attributes:
    tables: (rows, dim) of each table.
    batch_size: IDs per batch.
    batches_per_thread: distinct batches each thread processes per repeat.
    repeats: timed repeats; the fastest is reported.
    num_shards: shards of every store.
  """

  tables: tuple[tuple[int, int], ...] = ((10_000_000, 16), (1_000_000, 64))
  batch_size: int = 65_536
  batches_per_thread: int = 4
  repeats: int = 5
  num_shards: int = 4


QUICK_CONFIG = BenchmarkConfig(tables=((20_000, 16), (5_000, 64)), batch_size=2048,
                               batches_per_thread=2, repeats=1)


# Reference kernels over a plain float32 [rows, dim] array. They are compiled
# without `cache=True`: after the test imports this file as a module, a script
# run that loads those cached kernels imports the module again and absl then
# rejects the second definition of the flags.


@numba.njit(nogil=True)
def reference_gather(table, rows, out):
  for i in range(rows.shape[0]):
    source = table[rows[i]]
    target = out[i]
    for d in range(table.shape[1]):
      target[d] = source[d]


@numba.njit(nogil=True)
def reference_scatter_add(table, rows, grads):
  # Two threads on one table race on shared rows; the timing is still the
  # memory-bound cost of the access pattern, which is all it is used for.
  for i in range(rows.shape[0]):
    target = table[rows[i]]
    source = grads[i]
    for d in range(table.shape[1]):
      target[d] += source[d]


# Inputs.


def draw_ids(rng: np.random.Generator, distribution: str, num_rows: int,
             size: int) -> np.ndarray:
  """Returns int64 [size] row indices in [0, num_rows), which are also the IDs."""
  if distribution == "uniform":
    return rng.integers(0, num_rows, size, dtype=np.int64)
  ranks = np.empty(0, np.int64)
  while ranks.shape[0] < size:
    draw = rng.zipf(ZIPF_EXPONENT, 2 * size)
    ranks = np.concatenate([ranks, draw[draw <= num_rows] - 1])
  ranks = ranks[:size]
  # rank -> rank * multiplier mod num_rows is a bijection when the multiplier
  # is coprime to num_rows; it spreads hot IDs over the table.
  multiplier = 2654435761
  while math.gcd(multiplier, num_rows) != 1:
    multiplier += 2
  return (ranks * multiplier) % num_rows


def make_batches(rng, distribution, num_rows, config, threads):
  """Returns per thread a list of int64 [batch_size] ID arrays, all distinct batches."""
  return [[draw_ids(rng, distribution, num_rows, config.batch_size)
           for _ in range(config.batches_per_thread)] for _ in range(threads)]


# Timing.


def measure_ids_per_second(step: Callable[[object], int],
                           work: Sequence[Sequence[object]], repeats: int) -> float:
  """Runs `step` over each thread's work items concurrently; returns IDs per second.

  Args:
    step: processes one work item and returns its number of IDs.
    work: one list of work items per thread.
    repeats: timed repeats after one untimed warm-up item; the fastest counts.
  """
  step(work[0][0])
  threads = len(work)
  best = float("inf")
  total_ids = 0
  for _ in range(repeats):
    counts = [0] * threads
    errors = []
    barrier = threading.Barrier(threads + 1)

    def run(index, barrier=barrier, counts=counts, errors=errors):
      try:
        barrier.wait()
        for item in work[index]:
          counts[index] += step(item)
      except Exception as error:  # pylint: disable=broad-except
        errors.append(error)  # Re-raised on the main thread below.

    if threads == 1:
      start = time.perf_counter()
      for item in work[0]:
        counts[0] += step(item)
      elapsed = time.perf_counter() - start
    else:
      workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
      for worker in workers:
        worker.start()
      barrier.wait()
      start = time.perf_counter()
      for worker in workers:
        worker.join()
      elapsed = time.perf_counter() - start
      if errors:
        raise errors[0]
    best = min(best, elapsed)
    total_ids = sum(counts)
  return total_ids / best


def by_threads(step, batches_by_threads, repeats) -> dict[str, float]:
  return {str(t): measure_ids_per_second(step, batches_by_threads[t], repeats)
          for t in THREADS}


def by_threads_paired(step, work_by_threads, reference_step, reference_by_threads,
                      repeats, rounds=2) -> tuple[dict[str, float], dict[str, float]]:
  """Measures `step` and its reference in alternating blocks; returns both rates per thread count.

  Each of `rounds` rounds times `repeats` passes of the step, then `repeats`
  passes of the reference, and each keeps its best pass over all rounds.
  Whole blocks matter because the first passes after the other side ran are
  slow: the reference gather measured three or four passes over the same
  batches to get back to its best. Passes that alternate one by one would
  time the reference with a cold cache. Blocks keep each side's best at its
  own steady state, while a slow phase of a shared machine still hits both.
  """
  rates, reference_rates = {}, {}
  for t in THREADS:
    work, reference_work = work_by_threads[t], reference_by_threads[t]
    best = best_reference = 0.0
    for _ in range(rounds):
      best = max(best, measure_ids_per_second(step, work, repeats))
      best_reference = max(best_reference, measure_ids_per_second(
          reference_step, reference_work, repeats))
    rates[str(t)], reference_rates[str(t)] = best, best_reference
  return rates, reference_rates


# One table.


def _new_store(rows, dim, optimizer, config):
  # Hash routing fills shards unevenly; the slack keeps every row of the
  # table resident so that timed lookups are hits, as in steady state.
  slack = config.num_shards * (8 * int(math.sqrt(rows)) + 64)
  return EmbeddingStore(dim, num_shards=config.num_shards, capacity=rows + slack,
                        optimizer={"name": optimizer, "learning_rate": 0.01},
                        seed=1, name=f"bench_{rows}x{dim}")


def _populate(store, rows, chunk=1 << 20):
  for start in range(0, rows, chunk):
    store.lookup(np.arange(start, min(start + chunk, rows), dtype=np.uint64), train=True)


def benchmark_table(rows: int, dim: int, config: BenchmarkConfig,
                    rng: np.random.Generator) -> dict:
  """Measures one (rows, dim) table; returns its JSON entry."""
  logging.info("Table %d x %d: drawing batches.", rows, dim)
  batches = {dist: {t: make_batches(rng, dist, rows, config, t) for t in THREADS}
             for dist in DISTRIBUTIONS}
  uint_batches = {dist: {t: [[b.astype(np.uint64) for b in thread] for thread in per]
                         for t, per in per_threads.items()}
                  for dist, per_threads in batches.items()}
  grads = rng.normal(0, 1e-3, (config.batch_size, dim)).astype(np.float32)
  result = {"rows": rows, "dim": dim}

  # Reference.
  reference_table = memory.aligned_empty((rows, dim), np.float32)
  reference_table[...] = rng.uniform(-0.01, 0.01, (rows, dim)).astype(np.float32)

  def gather_step(row_indices):
    out = memory.aligned_empty((row_indices.shape[0], dim), np.float32)
    reference_gather(reference_table, row_indices, out)
    return row_indices.shape[0]

  def scatter_step(row_indices):
    reference_scatter_add(reference_table, row_indices, grads)
    return row_indices.shape[0]

  result["reference_gather"] = {d: by_threads(gather_step, batches[d], config.repeats)
                                for d in DISTRIBUTIONS}
  result["reference_scatter_add"] = {
      d: by_threads(scatter_step, batches[d], config.repeats) for d in DISTRIBUTIONS}
  # Every store operation is timed in alternation with its reference (see
  # by_threads_paired); its ratios use these paired reference rates.
  paired = {}
  result["paired_reference"] = paired

  def measure(key, step, work, d, reference_step=gather_step):
    rates, paired.setdefault(key, {})[d] = by_threads_paired(
        step, work, reference_step, batches[d], config.repeats)
    return rates

  result["update"], result["bytes_per_row"] = {}, {}
  for optimizer in OPTIMIZERS:
    logging.info("Table %d x %d, %s: populating.", rows, dim, optimizer)
    store = _new_store(rows, dim, optimizer, config)
    _populate(store, rows)
    report = store.memory_report()
    result["bytes_per_row"][optimizer] = {
        "measured": report["bytes_per_row"],
        "row_and_state": report["row_and_state_bytes"],
        "ratio": report["overhead_ratio"],
        "rows": report["rows"],
    }

    if optimizer == "adagrad":
      # Lookup speed does not depend on the optimizer: rows and optimizer
      # state live in separate arrays. Measured once, on the Adagrad store.
      result.update(_benchmark_lookups(store, uint_batches, measure))

    def update_step(ids, store=store):
      store.apply_gradients(ids, grads)
      return ids.shape[0]

    result["update"][optimizer] = {
        d: measure(f"update_{optimizer}", update_step, uint_batches[d], d,
                   reference_step=scatter_step) for d in DISTRIBUTIONS}
    del store
    gc.collect()
  return result


def _bags(ids: np.ndarray) -> dict[str, SparseInput]:
  lengths = np.full(ids.shape[0] // BAG_SIZE, BAG_SIZE, np.int32)
  return {"bag": SparseInput(ids[:lengths.shape[0] * BAG_SIZE], lengths)}


def _benchmark_lookups(store, uint_batches, measure) -> dict:
  dim = store.dim
  out = {"lookup": {}, "lookup_eval": {}, "pooled_lookup": {},
         "pooled_lookup_float16": {}, "pooled_backward": {}, "pooled_train_step": {}}

  def lookup_step(ids, train=True):
    buffer = memory.aligned_empty((ids.shape[0], dim), np.float32)
    store.lookup(ids, train=train, out=buffer)
    return ids.shape[0]

  features = [FeatureSpec("bag", table="t", pooling="sum")]
  worker32 = EmbeddingWorker(features, {"t": store}, wire_dtype="float32")
  worker16 = EmbeddingWorker(features, {"t": store}, wire_dtype="float16")
  bag_batches = {d: {t: [[_bags(ids) for ids in thread] for thread in per]
                     for t, per in per_threads.items()}
                 for d, per_threads in uint_batches.items()}

  def pooled_step(bags, worker=worker32):
    worker.lookup(bags, train=True)
    return bags["bag"].ids.shape[0]

  backward_seconds = []

  def backward_step(bags):
    _, ctx = worker32.lookup(bags, train=True)
    upstream = {"bag": np.ones((bags["bag"].lengths.shape[0], dim), np.float32)}
    start = time.perf_counter()
    worker32.backward(ctx, upstream)
    backward_seconds.append(time.perf_counter() - start)
    return bags["bag"].ids.shape[0]

  def train_step(bags):
    # The worker's share of one training step: lookup, backward, apply.
    _, ctx = worker32.lookup(bags, train=True)
    upstream = {"bag": np.ones((bags["bag"].lengths.shape[0], dim), np.float32)}
    worker32.apply(worker32.backward(ctx, upstream))
    return bags["bag"].ids.shape[0]

  for d in DISTRIBUTIONS:
    out["lookup"][d] = measure("lookup", lookup_step, uint_batches[d], d)
    out["lookup_eval"][d] = measure(
        "lookup_eval", lambda ids: lookup_step(ids, train=False), uint_batches[d], d)
    out["pooled_lookup"][d] = measure("pooled_lookup", pooled_step, bag_batches[d], d)
    out["pooled_lookup_float16"][d] = measure(
        "pooled_lookup_float16", lambda bags: pooled_step(bags, worker16), bag_batches[d], d)
    out["pooled_train_step"][d] = measure("pooled_train_step", train_step, bag_batches[d], d)
    # Backward alone, single thread: total IDs over summed backward time.
    backward_seconds.clear()
    ids_done = sum(backward_step(bags) for bags in bag_batches[d][1][0])
    out["pooled_backward"][d] = {"1": ids_done / sum(backward_seconds)}
  out["unique_ratio"] = worker32.stats()["unique_ratio"]
  return out


# Dedup and wire accuracy.


def benchmark_dedup(rows: int, config: BenchmarkConfig, rng) -> dict:
  """Times hash-table and sort deduplication of one batch per distribution."""
  result = {}
  for dist in DISTRIBUTIONS:
    ids = draw_ids(rng, dist, rows, config.batch_size).astype(np.uint64)
    entry = {}
    for method, dedup in pooling.DEDUP_METHODS.items():
      unique, _ = dedup(ids)
      times = []
      for _ in range(20):
        start = time.perf_counter()
        dedup(ids)
        times.append(time.perf_counter() - start)
      entry[f"{method}_ms"] = 1e3 * float(np.median(times))
    entry["unique_ratio"] = unique.shape[0] / ids.shape[0]
    result[dist] = entry
  return result


def benchmark_wire_accuracy(config: BenchmarkConfig, rng) -> dict:
  """Compares float16 and bfloat16 pooled activations and gradients with float32."""
  dim = 16
  rows = 100_000
  store = EmbeddingStore(dim, num_shards=1, optimizer={"name": "sgd"}, seed=2)
  features = [FeatureSpec("bag", table="t", pooling="sum")]
  bags = _bags(draw_ids(rng, "zipf", rows, config.batch_size).astype(np.uint64))
  batch = bags["bag"].lengths.shape[0]
  upstream = rng.normal(0, 1, (batch, dim)).astype(np.float32)
  exact_worker = EmbeddingWorker(features, {"t": store})
  exact, ctx = exact_worker.lookup(bags, train=True)
  exact_grads = exact_worker.backward(ctx, {"bag": upstream})["t"][1]
  result = {"init_scale": store.init_scale, "bag_size": BAG_SIZE}
  for wire in ("float16", "bfloat16"):
    worker = EmbeddingWorker(features, {"t": store}, wire_dtype=wire)
    values, ctx = worker.lookup(bags, train=True)
    wire_grads = upstream.astype(values.values["bag"].dtype)
    table_grads = worker.backward(ctx, {"bag": wire_grads})["t"][1]
    value_error = np.abs(values.values["bag"].astype(np.float32) - exact.values["bag"])
    grad_error = np.abs(table_grads - exact_grads)
    result[wire] = {
        "pooled_max_abs_error": float(value_error.max()),
        "pooled_mean_abs_error": float(value_error.mean()),
        "pooled_max_abs_value": float(np.abs(exact.values["bag"]).max()),
        "pooled_max_rel_error": float(
            (value_error / np.maximum(np.abs(exact.values["bag"]), 1e-30)).max()),
        "grad_max_abs_error": float(grad_error.max()),
        "grad_mean_abs_error": float(grad_error.mean()),
        "grad_max_abs_value": float(np.abs(exact_grads).max()),
        "clamped_values": worker.stats()["clamped_values"],
    }
  return result


# Targets and report.


def evaluate_targets(tables: list[dict]) -> list[dict]:
  """Returns one pass/fail row per target, table and distribution."""
  targets = []

  def add(name, table, detail, measured, threshold):
    targets.append({"target": name, "table": f"{table['rows']:,} x {table['dim']}",
                    "case": detail, "measured": measured, "threshold": threshold,
                    "pass": bool(measured >= threshold if name != "bytes_per_row"
                                 else measured <= threshold)})

  for table in tables:
    paired = table["paired_reference"]
    for d in DISTRIBUTIONS:
      for t in THREADS:
        add("lookup / reference gather", table, f"{d}, {t} thread(s)",
            table["lookup"][d][str(t)] / paired["lookup"][d][str(t)],
            TARGET_LOOKUP_VS_GATHER)
        add("adagrad update / reference scatter", table, f"{d}, {t} thread(s)",
            table["update"]["adagrad"][d][str(t)]
            / paired["update_adagrad"][d][str(t)], TARGET_ADAGRAD_VS_SCATTER)
      add("lookup 2 threads / 1 thread", table, d,
          table["lookup"][d]["2"] / table["lookup"][d]["1"], TARGET_THREAD_SCALING)
      add("pooled lookup 2 threads / 1 thread", table, d,
          table["pooled_lookup"][d]["2"] / table["pooled_lookup"][d]["1"],
          TARGET_THREAD_SCALING)
      add("adagrad update 2 threads / 1 thread", table, d,
          table["update"]["adagrad"][d]["2"] / table["update"]["adagrad"][d]["1"],
          TARGET_THREAD_SCALING)
    for optimizer in OPTIMIZERS:
      add("bytes_per_row", table, optimizer,
          table["bytes_per_row"][optimizer]["ratio"], TARGET_BYTES_PER_ROW)
  return targets


def machine_info() -> dict:
  return {**benchmarking.machine_info(), "numba": numba.__version__}


def run_benchmark(config: BenchmarkConfig, seed: int = 0) -> dict:
  """Runs every measurement; returns the JSON-serializable results."""
  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  load_before = os.getloadavg()
  tables = [benchmark_table(rows, dim, config, rng) for rows, dim in config.tables]
  results = {
      "machine": machine_info(),
      "config": dataclasses.asdict(config),
      "threads": list(THREADS),
      "distributions": list(DISTRIBUTIONS),
      "zipf_exponent": ZIPF_EXPONENT,
      "bag_size": BAG_SIZE,
      "tables": tables,
      "dedup": benchmark_dedup(config.tables[0][0], config, rng),
      "wire_accuracy": benchmark_wire_accuracy(config, rng),
  }
  results["targets"] = evaluate_targets(tables)
  results["seconds"] = time.perf_counter() - start
  results["load_average_1min"] = {"start": load_before[0], "end": os.getloadavg()[0]}
  return results


def _span(values: Sequence[float], digits: int) -> str:
  """Formats the range of `values` as "low-high", or one number when they round alike."""
  low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
  return low if low == high else f"{low}-{high}"


def _duration(seconds: float) -> str:
  if seconds < 2:
    return "under 2 seconds"
  if seconds < 90:
    return f"about {seconds:.0f} seconds"
  return f"about {seconds / 60:.1f} minutes"


def _millions(value: float) -> str:
  return f"{value / 1e6:.2f}"


def render_markdown(results: dict, command: str) -> str:
  """Renders the "Embedding store" docs section from `results`."""
  machine = results["machine"]
  load = results["load_average_1min"]
  lines = [
      f"## {SECTION_TITLE}",
      "",
      f"Command: `{command}` ({_duration(results['seconds'])}).",
      f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['machine']}),"
      f" numpy {machine['numpy']}, numba {machine['numba']}. Other jobs shared the"
      f" machine (1-minute load average {load['start']:.1f} at the start and"
      f" {load['end']:.1f} at the end), so 2-thread numbers in particular vary from"
      " run to run.",
      "",
      f"Batches of {results['config']['batch_size']:,} IDs, Zipf({results['zipf_exponent']})"
      " truncated to the table size or uniform. Throughput is millions of IDs per"
      " second (duplicates counted); with 2 threads each thread works on its own"
      " batches and the number is the combined rate. The reference is a compiled"
      " numba gather (for lookups) or scatter-add (for updates) with precomputed row"
      " indices over a plain float32 array. Each operation is timed in two rounds"
      f" of {results['config']['repeats']} pass(es) over its batches. After each"
      " round, its reference makes as many passes over the same IDs. Ratio ="
      " best operation pass / best reference pass at the same thread count. Those"
      " paired reference rates are in the JSON (`paired_reference`). The reference"
      " rows below show the reference timed alone at the start. Pooled lookups go through"
      f" `EmbeddingWorker` (dedup, one store lookup, sum over bags of {results['bag_size']}).",
      "",
  ]
  for table in results["tables"]:
    lines += [f"### {table['rows']:,} rows x dim {table['dim']}", "",
              "| operation | distribution | 1 thread | ratio | 2 threads | ratio | 2T / 1T |",
              "|---|---|---|---|---|---|---|"]
    paired = table["paired_reference"]
    operations = [("reference gather", table["reference_gather"], table["reference_gather"]),
                  ("reference scatter-add", table["reference_scatter_add"],
                   table["reference_scatter_add"])]
    operations += [(label, table[key], paired[key]) for label, key in (
        ("lookup (train)", "lookup"), ("lookup (eval)", "lookup_eval"),
        ("pooled lookup, float32 wire", "pooled_lookup"),
        ("pooled lookup, float16 wire", "pooled_lookup_float16"),
        ("pooled lookup + backward + adagrad apply", "pooled_train_step"))]
    operations += [(f"update {name}", table["update"][name], paired[f"update_{name}"])
                   for name in OPTIMIZERS]
    for label, values, references in operations:
      for d in DISTRIBUTIONS:
        one, two = values[d]["1"], values[d]["2"]
        reference = references[d]
        lines.append(
            f"| {label} | {d} | {_millions(one)} | {one / reference['1']:.2f} |"
            f" {_millions(two)} | {two / reference['2']:.2f} | {two / one:.2f} |")
    backward = table["pooled_backward"]
    lines += ["", "Worker backward alone (pooled gradients to per-ID gradients, 1 thread): "
              + ", ".join(f"{d} {_millions(backward[d]['1'])} M IDs/s" for d in DISTRIBUTIONS)
              + f". Unique IDs per looked-up ID in pooled lookups: {table['unique_ratio']:.2f}.",
              "", "| optimizer | bytes per row | row + state bytes | ratio |", "|---|---|---|---|"]
    for optimizer in OPTIMIZERS:
      entry = table["bytes_per_row"][optimizer]
      lines.append(f"| {optimizer} | {entry['measured']:.1f} | {entry['row_and_state']:.0f} |"
                   f" {entry['ratio']:.2f} |")
    lines.append("")

  lines += ["### Deduplication of one batch", "",
            "| distribution | unique / IDs | hash table (ms) | np.unique (ms) |",
            "|---|---|---|---|"]
  for d, entry in results["dedup"].items():
    lines.append(f"| {d} | {entry['unique_ratio']:.2f} | {entry['hash_ms']:.3f} |"
                 f" {entry['sort_ms']:.3f} |")
  wire = results["wire_accuracy"]
  lines += ["", "### Wire compression accuracy", "",
            f"Sum-pooled bags of {wire['bag_size']} Zipf IDs from freshly initialised rows"
            f" (uniform in +-{wire['init_scale']}) and N(0, 1) upstream gradients, compared"
            " with the float32 wire. Relative errors are to the largest magnitude."
            " Values beyond the float16 range are clamped to +-65504 and counted in"
            " `EmbeddingWorker.stats()`; NaN passes through unchanged and is counted.", "",
            "| wire dtype | pooled max abs error | pooled mean abs error | max / max abs value"
            " | gradient max abs error | gradient mean abs error | max / max abs value |",
            "|---|---|---|---|---|---|---|"]
  for name in ("float16", "bfloat16"):
    entry = wire[name]
    lines.append(
        f"| {name} | {entry['pooled_max_abs_error']:.2e} | {entry['pooled_mean_abs_error']:.2e}"
        f" | {entry['pooled_max_abs_error'] / entry['pooled_max_abs_value']:.2e}"
        f" | {entry['grad_max_abs_error']:.2e} | {entry['grad_mean_abs_error']:.2e}"
        f" | {entry['grad_max_abs_error'] / entry['grad_max_abs_value']:.2e} |")
  lines += ["", "### Findings", ""] + _findings(results)
  if results.get("quick"):
    lines += ["", "This was a smoke run (`--quick`): each timed repeat lasts well under a"
              " millisecond, about as long as starting the threads, so its rates and"
              " ratios, the 2-thread ones most of all, say nothing about the store."]
  lines += ["", "### Targets", "", "| target | table | case | measured | threshold | result |",
            "|---|---|---|---|---|---|"]
  for target in results["targets"]:
    comparison = "<=" if target["target"] == "bytes_per_row" else ">="
    lines.append(
        f"| {target['target']} | {target['table']} | {target['case']} |"
        f" {target['measured']:.2f} | {comparison} {target['threshold']} |"
        f" {'pass' if target['pass'] else 'FAIL'} |")
  lines.append("")
  return "\n".join(lines)


def _findings(results: dict) -> list[str]:
  """Derives the measured facts that explain the targets, as markdown bullets."""
  lines = []
  for table in results["tables"]:
    name = f"{table['rows']:,} x {table['dim']}"
    lookup = [table["lookup"][d]["1"] / table["paired_reference"]["lookup"][d]["1"]
              for d in DISTRIBUTIONS]
    eval_speedup = [table["lookup_eval"][d]["1"] / table["lookup"][d]["1"]
                    for d in DISTRIBUTIONS]
    pooled = [table["pooled_lookup"][d]["1"] / table["lookup"][d]["1"] for d in DISTRIBUTIONS]
    reference_scaling = [table["reference_gather"][d]["2"] / table["reference_gather"][d]["1"]
                         for d in DISTRIBUTIONS]
    lines += [
        f"- {name}: store lookups reach {_span(lookup, 2)}x of the"
        " reference gather with 1 thread. The reference reads one random line per"
        " ID (its row). The store first deduplicates the call, with a probe of a"
        " small per-call hash table per ID and a row copy per repeat. Then it reads"
        " two random lines per distinct ID: the table line with key, row slot and"
        " stamp, then the row. With few repeats (uniform IDs) that second line"
        " bounds the ratio near 0.5. Eval lookups, which store no stamps and"
        f" insert nothing, run at {_span(eval_speedup, 1)}x"
        " the speed of training lookups.",
        f"- {name}: pooled lookups through the worker run at"
        f" {_span(pooled, 1)}x the speed of plain store lookups of the"
        " same IDs. The worker looks up each unique ID once (unique IDs were"
        f" {table['unique_ratio']:.2f} of all IDs over these batches).",
    ]
    scaling = (f"- {name}: the reference gather scales"
               f" {_span(reference_scaling, 2)}x from 1 to 2"
               " threads in this run")
    if results.get("quick"):
      scaling += "."
    elif max(reference_scaling) < TARGET_THREAD_SCALING:
      scaling += (", so the machine did not give two idle cores during this run and the"
                  " 2-thread targets say little about the store here.")
    else:
      scaling += "."
    lines.append(scaling)
  return lines


def main(argv):
  del argv
  if _RENDER_FROM.value:
    results = json.loads(pathlib.Path(_RENDER_FROM.value).read_text())
    command = results["command"]
  else:
    config = QUICK_CONFIG if _QUICK.value else BenchmarkConfig()
    command = ".venv/bin/python experiments/benchmark_embedding.py" + (
        " --quick" if _QUICK.value else "")
    results = run_benchmark(config)
    results["command"] = command
    results["quick"] = _QUICK.value
    name = "embedding_store_quick.json" if _QUICK.value else "embedding_store.json"
    benchmarking.write_results(results, pathlib.Path(_OUTPUT_DIR.value) / name,
                               docs_path=_DOCS_PATH.value, title=SECTION_TITLE,
                               section=render_markdown(results, command))
    return

  section = render_markdown(results, command)
  print(section)
  if _DOCS_PATH.value:
    benchmarking.update_docs_section(_DOCS_PATH.value, SECTION_TITLE, section)


if __name__ == "__main__":
  app.run(main)
