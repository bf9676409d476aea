"""Tests for reading metrics.jsonl files and plotting runs side by side."""

import json

import pytest

from persia_jax.evaluation import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ROWS = [
    {"step": 100, "loss": 0.6},
    {"step": 100, "eval_auc": 0.70},
    {"step": 200, "loss": 0.5},
    {"step": 200, "eval_auc": 0.74},
]


def write_jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return path


def test_read_metrics_returns_rows(tmp_path):
  path = write_jsonl(tmp_path / "metrics.jsonl", ROWS)
  assert plots.read_metrics(path) == ROWS


def test_read_metrics_skips_incomplete_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
  assert plots.read_metrics(path) == [{"step": 1, "loss": 0.5}]


def test_read_metrics_reports_file_line_column(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n{"step": 2,, "loss": 1}\n{"step": 3}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2:12: invalid JSON"):
    plots.read_metrics(path)


def test_read_metrics_rejects_non_object(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("[1, 2]\n")
  with pytest.raises(ValueError, match=r"metrics.jsonl:1:1: expected a JSON object"):
    plots.read_metrics(path)


def test_metric_series_skips_missing_and_null():
  rows = ROWS + [{"step": 300, "eval_auc": None}, {"step": 50, "eval_auc": 0.6}]
  assert plots.metric_series(rows, "eval_auc") == ([50, 100, 200], [0.6, 0.70, 0.74])


def test_plot_metric_writes_png_for_dict_of_runs(tmp_path):
  runs = {
      "sync": write_jsonl(tmp_path / "sync" / "metrics.jsonl", ROWS),
      "hybrid": write_jsonl(tmp_path / "hybrid" / "metrics.jsonl", ROWS[:2]),
  }
  out = plots.plot_metric(runs, key="eval_auc", out_png=tmp_path / "plots" / "auc.png")
  assert out.exists()
  assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_metric_accepts_list_of_paths(tmp_path):
  paths = [write_jsonl(tmp_path / name / "metrics.jsonl", ROWS) for name in ("a", "b")]
  out = plots.plot_metric(paths, key="loss", out_png=tmp_path / "loss.png")
  assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_metric_labels_runs_by_directory():
  labelled = plots._runs_by_label(["runs/sync/metrics.jsonl", "runs/async/metrics.jsonl"])
  assert list(labelled) == ["sync", "async"]


def test_plot_metric_missing_key_raises(tmp_path):
  path = write_jsonl(tmp_path / "run" / "metrics.jsonl", ROWS)
  with pytest.raises(ValueError, match="No run has a value for 'eval_logloss'"):
    plots.plot_metric(path, key="eval_logloss", out_png=tmp_path / "x.png")
