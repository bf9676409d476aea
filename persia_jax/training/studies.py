"""Convergence studies: the same config trained in several modes and seeds, side by side."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Sequence

import ml_collections
import numpy as np
from absl import logging

from persia_jax import benchmarking
from persia_jax.evaluation import plots as plots_lib
from persia_jax.training import trainer as trainer_lib

# Each study variant: a label and the config fields it sets on top of the base
# config, as dotted names like `--config.FIELD=VALUE` flags use.
VARIANTS = {
    "sync": {"mode": "sync", "embedding_staleness": 0, "dense_staleness": 0},
    "hybrid": {"mode": "hybrid", "dense_staleness": 0},
    "async": {"mode": "async", "dense_staleness": 4},
    "replay": {"mode": "hybrid", "dense_staleness": 0, "deterministic_replay": True},
    "hybrid_bf16": {"mode": "hybrid", "dense_staleness": 0, "model.dtype": "bfloat16"},
    "hybrid_fp16_wire": {"mode": "hybrid", "dense_staleness": 0,
                         "embedding.wire_dtype": "float16"},
}
DEFAULT_VARIANTS = ("sync", "hybrid", "async")


def variant_config(base: ml_collections.ConfigDict, overrides: dict[str, Any],
                   seed: int) -> ml_collections.ConfigDict:
  """Returns a copy of `base` with dotted-name `overrides` and `seed` applied."""
  config = ml_collections.ConfigDict(base.to_dict())
  config.update_from_flattened_dict(overrides)
  config.seed = seed
  return config


def run_study(base: ml_collections.ConfigDict, *, variants: dict[str, dict[str, Any]],
              seeds: Sequence[int], root: str | pathlib.Path) -> list[dict[str, Any]]:
  """Trains every variant with every seed into `root/<variant>_seed<k>`; returns summaries."""
  root = pathlib.Path(root)
  summaries = []
  for label, overrides in variants.items():
    for seed in seeds:
      workdir = root / f"{label}_seed{seed}"
      logging.info("Study run %s seed %d in %s", label, seed, workdir)
      config = variant_config(base, overrides, seed)
      summary = trainer_lib.train_and_evaluate(config, str(workdir))
      summary["variant"] = label
      summary["seed"] = seed
      summaries.append(summary)
  return summaries


def aggregate(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean and standard deviation over seeds of AUC, logloss and throughput per variant."""
  rows = []
  for label in dict.fromkeys(s["variant"] for s in summaries):
    runs = [s for s in summaries if s["variant"] == label]
    row = {"variant": label, "mode": runs[0]["mode"], "seeds": len(runs),
           "embedding_staleness": runs[0]["embedding_staleness"],
           "dense_staleness": runs[0]["dense_staleness"]}
    for key in ("eval_auc", "eval_logloss", "samples_per_second", "train_seconds"):
      values = np.asarray([r[key] for r in runs], np.float64)
      row[key] = float(values.mean())
      row[key + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    rows.append(row)
  return rows


def markdown_table(rows: list[dict[str, Any]], reference: str = "sync") -> str:
  """Formats aggregated rows, with AUC and throughput relative to `reference`.

  Without a `reference` row, the first row is the reference.
  """
  ref = next((r for r in rows if r["variant"] == reference), rows[0] if rows else None)
  ref_name = ref["variant"] if ref else reference
  lines = ["| variant | mode | tau | dense delay | seeds | test AUC | test logloss |"
           f" AUC vs {ref_name} | samples/s | throughput vs {ref_name} |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    auc_delta = throughput_ratio = float("nan")
    if ref:
      auc_delta = row["eval_auc"] - ref["eval_auc"]
      throughput_ratio = row["samples_per_second"] / ref["samples_per_second"]
    lines.append(
        f"| {row['variant']} | {row['mode']} | {row['embedding_staleness']} |"
        f" {row['dense_staleness']} | {row['seeds']} |"
        f" {row['eval_auc']:.4f} ± {row['eval_auc_std']:.4f} |"
        f" {row['eval_logloss']:.4f} ± {row['eval_logloss_std']:.4f} |"
        f" {auc_delta:+.4f} | {row['samples_per_second']:.0f} | {throughput_ratio:.2f}x |")
  return "\n".join(lines)


def write_report(summaries: list[dict[str, Any]], output_dir: str | pathlib.Path,
                 *, command: str, name: str = "compare_modes") -> dict[str, Any]:
  """Writes `<name>.json`, `<name>.md` and `<name>_auc.png` into `output_dir`."""
  output_dir = pathlib.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  rows = aggregate(summaries)
  machine = benchmarking.describe_machine()
  report = {"command": command, "machine": machine, "rows": rows, "runs": summaries}
  with open(output_dir / f"{name}.json", "w") as f:
    json.dump(report, f, indent=2, default=lambda x: None if isinstance(x, float) and
              math.isnan(x) else str(x))
  table = markdown_table(rows)
  with open(output_dir / f"{name}.md", "w") as f:
    f.write(f"Command: `{command}`\n\nMachine: {machine}\n\n{table}\n")
  plots_lib.plot_metric(mean_curves(summaries, output_dir / f"{name}_curves"),
                        key="eval_auc", out_png=output_dir / f"{name}_auc.png",
                        title=f"test AUC, mean over {len(set(s['seed'] for s in summaries))} seeds")
  return report


def mean_curves(summaries: list[dict[str, Any]], out_dir: pathlib.Path,
                key: str = "eval_auc") -> dict[str, pathlib.Path]:
  """Writes one JSON-lines file per variant with `key` averaged over seeds at each step.

  Returns:
    Variant label to the written file, ready for `plots.plot_metric`.
  """
  out_dir.mkdir(parents=True, exist_ok=True)
  curves = {}
  for label in dict.fromkeys(s["variant"] for s in summaries):
    by_step: dict[int, list[float]] = {}
    for run in (s for s in summaries if s["variant"] == label):
      for row in plots_lib.read_metrics(pathlib.Path(run["workdir"]) / "metrics.jsonl"):
        if row.get(key) is not None:
          by_step.setdefault(int(row["step"]), []).append(float(row[key]))
    path = out_dir / f"{label}.jsonl"
    with open(path, "w") as f:
      for step in sorted(by_step):
        f.write(json.dumps({"step": step, key: float(np.mean(by_step[step]))}) + "\n")
    curves[label] = path
  return curves
