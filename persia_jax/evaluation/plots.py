"""Read workdir metrics.jsonl files and plot one metric for several runs side by side.

Typical use, comparing training modes:

  plot_metric({"sync": "runs/sync/metrics.jsonl", "hybrid": "runs/hybrid/metrics.jsonl",
               "async": "runs/async/metrics.jsonl"}, key="eval_auc", out_png="auc.png")
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping, Sequence

from absl import logging
from matplotlib.backends import backend_agg
from matplotlib import figure as mpl_figure

PathLike = str | os.PathLike


def read_metrics(path: PathLike) -> list[dict[str, Any]]:
  """Reads a JSON-lines metrics file into a list of rows, in file order.

  A last line without a newline that does not parse, as a crash mid-write
  leaves, is skipped with a warning.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: a line is not valid JSON or not an object; the message gives
      the file, line and column.
  """
  path = pathlib.Path(path)
  text = path.read_text(encoding="utf-8")
  lines = text.split("\n")
  rows = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines):  # Last line, which has no newline after it.
        logging.warning("Skipping an incomplete last line %d of %s.", number, path)
        continue
      raise ValueError(f"{path}:{number}:{e.colno}: invalid JSON in metrics file: {e.msg}.") from e
    if not isinstance(row, dict):
      raise ValueError(f"{path}:{number}:1: expected a JSON object per line, got {line[:80]!r}.")
    rows.append(row)
  return rows


def _runs_by_label(runs: PathLike | Sequence[PathLike] | Mapping[str, PathLike]
                   ) -> dict[str, pathlib.Path]:
  """Maps each run to a legend label: the dict key, or the file's directory name."""
  if isinstance(runs, Mapping):
    return {str(label): pathlib.Path(path) for label, path in runs.items()}
  if isinstance(runs, (str, os.PathLike)):
    runs = [runs]
  labelled = {}
  for path in runs:
    path = pathlib.Path(path)
    label = path.parent.name or path.stem
    if label in labelled:
      label = str(path)
    labelled[label] = path
  return labelled


def metric_series(rows: Sequence[Mapping[str, Any]], key: str,
                  x: str = "step") -> tuple[list[float], list[float]]:
  """Returns the (x, y) values of rows that have a non-null `key` and `x`, sorted by x."""
  points = [(row[x], row[key]) for row in rows
            if row.get(key) is not None and row.get(x) is not None]
  points.sort(key=lambda point: point[0])
  return [point[0] for point in points], [point[1] for point in points]


def plot_metric(runs: PathLike | Sequence[PathLike] | Mapping[str, PathLike], *,
                key: str = "eval_auc", out_png: PathLike, x: str = "step",
                title: str | None = None) -> pathlib.Path:
  """Draws `key` against `x` with one line per run and saves a PNG.

  Args:
    runs: a metrics.jsonl path, a list of them (labelled by their directory
      name), or a dict from legend label to path.
    key: the metric to plot, e.g. "eval_auc" or "loss".
    out_png: output file; parent directories are created.
    x: the column for the horizontal axis, usually "step".
    title: figure title; defaults to the key.

  Returns:
    The PNG path.

  Raises:
    ValueError: no run has any row with `key`, so the plot would be empty.
  """
  labelled = _runs_by_label(runs)
  # A Figure with its own Agg canvas, rather than pyplot, leaves the global
  # backend alone, so notebooks keep their inline display.
  figure = mpl_figure.Figure(figsize=(7, 4.5))
  backend_agg.FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  plotted = 0
  for label, path in labelled.items():
    xs, ys = metric_series(read_metrics(path), key, x)
    if not xs:
      logging.warning("Run %r (%s) has no %r values; it is left out of the plot.",
                      label, path, key)
      continue
    axes.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    plotted += 1
  if plotted == 0:
    raise ValueError(
        f"No run has a value for {key!r}; check the key against the columns of"
        f" {[str(path) for path in labelled.values()]}.")
  axes.set_xlabel(x)
  axes.set_ylabel(key)
  axes.set_title(title if title is not None else key)
  axes.grid(True, alpha=0.3)
  axes.legend()
  out_png = pathlib.Path(out_png)
  out_png.parent.mkdir(parents=True, exist_ok=True)
  figure.tight_layout()
  figure.savefig(out_png, dpi=120)
  return out_png
