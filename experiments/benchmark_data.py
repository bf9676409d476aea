r"""Benchmark of the input pipeline: rows per second of every reader.

Measures full `build_input` iteration (read, parse, hash, split, shuffle,
batch, prefetch) on the committed real slices (repeated for several epochs so
each run lasts long enough to time), on a synthetic file in the Criteo
`train.txt` layout written to a temporary directory (plain and gzip), on a
libFM file and on the synthetic stream. Files on disk are timed with 1 and 2
parse threads.

The loader should deliver at least twice the trainer's samples per second, so
the trainer never waits for input. The same run trains the default config
(`configs/criteo_dlrm.py`, hybrid mode) to measure the trainer's samples per
second, and times the Criteo reader at the trainer's batch size too;
`--trainer_samples_per_s` replaces that measurement with a given rate.

Run (full, 1M-row Criteo-format file, several minutes on a 2-core x86_64 VM):

  .venv/bin/python experiments/benchmark_data.py

Smoke run:

  .venv/bin/python experiments/benchmark_data.py --quick

Writes `data_pipeline.json` (or `data_pipeline_quick.json`) to `--output_dir`
and replaces the "Data pipeline" section of `--docs_path`.
"""

from __future__ import annotations

import gzip
import pathlib
import shutil
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

# pylint: disable=g-import-not-at-top,wrong-import-position
from persia_jax import benchmarking  # noqa: E402
from persia_jax.data import (adult_config, avazu_config, build_input,  # noqa: E402
                             criteo_config, libsvm_config, synthetic_config,
                             taobao_config)
from persia_jax.data.synthetic import SyntheticSource, write_criteo_file  # noqa: E402

SECTION_TITLE = "Data pipeline"
TARGET_LOADER_TO_TRAINER = 2.0

_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", "benchmarks/results", "Directory of the JSON results.")
_DOCS_PATH = flags.DEFINE_string(
    "docs_path", "docs/benchmarks.md",
    "Markdown file whose 'Data pipeline' section is replaced; empty to skip.")
_QUICK = flags.DEFINE_bool("quick", False, "Small files and short runs, for a smoke test.")
_ROWS = flags.DEFINE_integer("rows", 1_000_000, "Rows of the synthetic Criteo-format file.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 4096, "Rows per batch.")
_MIN_ROWS = flags.DEFINE_integer(
    "min_rows", 300_000, "Rows read per timed run at least (small slices repeat epochs).")
_TRAINER_SAMPLES_PER_S = flags.DEFINE_float(
    "trainer_samples_per_s", 0.0,
    "The trainer's samples per second to compare with; 0 measures it in this run by"
    " training configs/criteo_dlrm.py.")


def time_iterator(config, *, batch_size: int, max_rows: int | None = None) -> dict:
  """Iterates the train split once (all epochs of `config`); returns rows, seconds, rows/s."""
  start = time.perf_counter()
  rows = 0
  with build_input(config, split="train", batch_size=batch_size, seed=0) as iterator:
    for batch in iterator:
      rows += batch.size
      if max_rows is not None and rows >= max_rows:
        break
  seconds = time.perf_counter() - start
  return {"rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 1)}


def epochs_for(rows_per_epoch: int, min_rows: int) -> int:
  return max(1, -(-min_rows // rows_per_epoch))


def write_libfm_file(path: pathlib.Path, num_rows: int) -> None:
  """Writes libFM lines with 13 dense-valued and 26 categorical tokens per row."""
  source = SyntheticSource(synthetic_config(block_size=num_rows))
  chunk, _, ranks = source.generate("train", 0, num_rows)
  columns = [np.char.add(f"{j}:", ranks[f"cat_{j}"].astype(str)) for j in range(26)]
  tokens = [np.char.add(c, ":1") for c in columns]
  dense = [np.char.add(f"26:{j}:", np.round(chunk.dense[:, j], 3).astype(str))
           for j in range(13)]
  lines = chunk.labels.astype(np.int64).astype(str)
  for part in tokens + dense:
    lines = np.char.add(np.char.add(lines, " "), part)
  path.write_text("\n".join(lines.tolist()) + "\n")


def measure_trainer(quick: bool) -> dict:
  """Trains the default config briefly; returns its steady-state samples/s and batch size."""
  from configs import criteo_dlrm
  from persia_jax.training import trainer as trainer_lib

  config = criteo_dlrm.get_config()
  config.export = False
  config.eval_every_steps = 0
  if quick:
    config.num_train_steps = 50
  workdir = tempfile.mkdtemp(prefix="persia_jax_benchmark_trainer_")
  try:
    summary = trainer_lib.train_and_evaluate(config, workdir)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  return {"samples_per_s": round(summary["samples_per_second"], 1),
          "batch_size": config.batch_size, "mode": config.mode, "measured": True}


def run_benchmark(quick: bool) -> dict:
  batch_size = _BATCH_SIZE.value
  min_rows = 30_000 if quick else _MIN_ROWS.value
  num_rows = 50_000 if quick else _ROWS.value
  results = {"machine": benchmarking.describe_machine(),
             "batch_size": batch_size, "readers": []}

  def record(name, source, config, threads=None, note="", rows_per_batch=None):
    if threads is not None:
      config.num_parse_threads = threads
    result = time_iterator(config, batch_size=rows_per_batch or batch_size)
    result.update(name=name, source=source, parse_threads=config.num_parse_threads, note=note,
                  batch_size=rows_per_batch or batch_size)
    logging.info("%s: %s", name, result)
    results["readers"].append(result)

  # Committed slices, train split, default shuffling, repeated epochs.
  slices = [("criteo", "data/criteo/train_head8k.txt (6,400 train rows)", criteo_config, 6400),
            ("avazu", "data/avazu/train_head8k.csv (6,400 train rows)", avazu_config, 6400),
            ("taobao", "data/taobao/tiny_train.csv (100 rows)", taobao_config, 100),
            ("adult (parquet)", "data/adult/adult.parquet.brotli (39,074 train rows)",
             adult_config, 39074)]
  for name, source, make_config, rows in slices:
    # One untimed epoch loads the compiled numba kernels and warms the page cache.
    time_iterator(make_config(), batch_size=batch_size)
    record(name, source, make_config(num_epochs=epochs_for(rows, min_rows)))

  trainer = _TRAINER_SAMPLES_PER_S.value
  if trainer:
    results["trainer"] = {"samples_per_s": trainer, "batch_size": 128, "measured": False}
  else:
    results["trainer"] = measure_trainer(quick)
    trainer = results["trainer"]["samples_per_s"]
  trainer_batch = results["trainer"]["batch_size"]
  record("criteo", f"data/criteo/train_head8k.txt, batch of {trainer_batch} as the trainer",
         criteo_config(num_epochs=epochs_for(6400, min_rows)), rows_per_batch=trainer_batch)

  workdir = pathlib.Path(tempfile.mkdtemp(prefix="persia_jax_benchmark_data_"))
  try:
    path = workdir / "criteo_synthetic.txt"
    start = time.perf_counter()
    write_criteo_file(str(path), num_rows)
    write_seconds = time.perf_counter() - start
    size_mb = path.stat().st_size / 1e6
    results["criteo_file"] = {"rows": num_rows, "megabytes": round(size_mb, 1),
                              "write_seconds": round(write_seconds, 2)}
    source = f"synthetic Criteo layout, {num_rows:,} rows, {size_mb:.0f} MB"
    for threads in (1, 2):
      record("criteo (file)", source,
             criteo_config(files=str(path), test_fraction=0.0), threads)
    gz_path = workdir / "criteo_synthetic.txt.gz"
    with open(path, "rb") as src, gzip.open(gz_path, "wb", compresslevel=1) as dst:
      shutil.copyfileobj(src, dst, 1 << 22)
    record("criteo (gzip file)", source + ", gzip level 1",
           criteo_config(files=str(gz_path), test_fraction=0.0), 2)
    record("criteo (file, 80/20 split)", source + ", train part",
           criteo_config(files=str(path), test_fraction=0.2), 2,
           note="includes the one-off row count")

    libfm_rows = 20_000 if quick else 200_000
    libfm_path = workdir / "synthetic.ffm"
    write_libfm_file(libfm_path, libfm_rows)
    features = [dict(name=f"field_{j}", kind="multi_value", column=str(j), delimiter=" ")
                for j in range(26)]
    features += [dict(name=f"dense_{j}", kind="dense", column=f"26:{j}", transform="identity")
                 for j in range(13)]
    record("libfm (file)", f"synthetic libFM, {libfm_rows:,} rows, 26 fields + 13 dense",
           libsvm_config(files=str(libfm_path), num_fields=27, features=features,
                         num_epochs=epochs_for(libfm_rows, min_rows)), 2)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)

  synthetic = synthetic_config(num_epochs=None)
  synthetic.synthetic.num_samples = None
  for threads in (1, 2):
    synthetic.num_parse_threads = threads
    result = time_iterator(synthetic, batch_size=batch_size, max_rows=min_rows)
    result.update(name="synthetic stream", parse_threads=threads, note="", batch_size=batch_size,
                  source="13 dense, 26 categorical (vocab 1M, Zipf 1.05), hidden-model labels")
    results["readers"].append(result)
  results["synthetic_auc_ceiling"] = round(
      SyntheticSource(synthetic_config()).auc_ceiling(), 4)
  results["trainer_samples_per_s"] = trainer
  for result in results["readers"]:
    result["loader_to_trainer"] = round(result["rows_per_s"] / trainer, 2) if trainer else None
  return results


def render_markdown(results: dict, command: str) -> str:
  """Renders the "Data pipeline" docs section from `results`."""
  lines = [
      f"## {SECTION_TITLE}",
      "",
      f"Command: `{command}`. Machine: {results['machine']}. Rows per second of full `build_input` iteration of the"
      f" train split (read, parse, hash, shuffle, batch of {results['batch_size']:,},"
      " prefetch). Each row is a single run, so timings vary between runs when other"
      " jobs share the machine.",
      "",
      "| reader | input | batch | parse threads | rows | seconds | rows/s | loader / trainer |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for r in results["readers"]:
    ratio = f"{r['loader_to_trainer']:.2f}" if r["loader_to_trainer"] else "not measured"
    note = f" ({r['note']})" if r["note"] else ""
    lines.append(f"| {r['name']} | {r['source']}{note} | {r.get('batch_size', '')} |"
                 f" {r['parse_threads']} |"
                 f" {r['rows']:,} | {r['seconds']:.2f} | {r['rows_per_s']:,.0f} | {ratio} |")
  lines.append("")
  if results.get("criteo_file"):
    f = results["criteo_file"]
    lines.append(f"Writing the {f['rows']:,}-row Criteo-format file ({f['megabytes']} MB) took"
                 f" {f['write_seconds']} s. The synthetic stream's hidden model reaches AUC"
                 f" {results['synthetic_auc_ceiling']} (the best achievable on that data).")
  trainer = results["trainer"]
  how = ("measured in this run by training configs/criteo_dlrm.py"
         f" ({trainer.get('mode', 'hybrid')} mode, batch {trainer['batch_size']}, one JAX CPU"
         " device, after the first log interval)" if trainer["measured"]
         else "given with --trainer_samples_per_s")
  lines.append(f"The trainer ran at {trainer['samples_per_s']:,.0f} samples/s, {how}. The"
               f" target is loader / trainer >= {TARGET_LOADER_TO_TRAINER}.")
  lines.append("")
  return "\n".join(lines)


def main(argv):
  del argv
  command = ".venv/bin/python experiments/benchmark_data.py" + (" --quick" if _QUICK.value else "")
  if _TRAINER_SAMPLES_PER_S.value:
    command += f" --trainer_samples_per_s={_TRAINER_SAMPLES_PER_S.value:g}"
  results = run_benchmark(_QUICK.value)
  results["command"] = command

  name = "data_pipeline_quick.json" if _QUICK.value else "data_pipeline.json"
  benchmarking.write_results(results, pathlib.Path(_OUTPUT_DIR.value) / name,
                             docs_path=_DOCS_PATH.value, title=SECTION_TITLE,
                             section=render_markdown(results, command))


if __name__ == "__main__":
  app.run(main)
