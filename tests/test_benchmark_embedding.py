"""Smoke test of experiments/benchmark_embedding.py on tiny tables (no timing checks)."""

import importlib.util
import json
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "experiments" / "benchmark_embedding.py"


def _load_module():
  # The script defines absl flags at import, so it is imported only once.
  if "benchmark_embedding" not in sys.modules:
    spec = importlib.util.spec_from_file_location("benchmark_embedding", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_embedding"] = module
    spec.loader.exec_module(module)
  return sys.modules["benchmark_embedding"]


def test_quick_run_writes_json_and_docs(tmp_path):
  docs = tmp_path / "benchmarks.md"
  docs.write_text("# Benchmarks\n\n## Embedding store\n\nold numbers\n\n## Other\n\nkept\n")
  subprocess.run(
      [sys.executable, str(SCRIPT), "--quick", f"--output_dir={tmp_path}",
       f"--docs_path={docs}"],
      check=True, cwd=REPO_ROOT, capture_output=True, timeout=600)
  results = json.loads((tmp_path / "embedding_store_quick.json").read_text())

  for key in ("machine", "config", "tables", "dedup", "wire_accuracy", "targets",
              "command"):
    assert key in results, key
  table = results["tables"][0]
  for key in ("reference_gather", "reference_scatter_add", "lookup", "lookup_eval",
              "pooled_lookup", "pooled_lookup_float16", "pooled_backward",
              "pooled_train_step", "update",
              "bytes_per_row"):
    assert key in table, key
  assert sorted(table["update"]) == sorted(
      ["sgd", "adagrad", "rowwise_adagrad", "adam", "ftrl"])
  assert sorted(table["lookup"]["zipf"]) == ["1", "2"]
  assert set(results["wire_accuracy"]) >= {"float16", "bfloat16"}
  assert {"target", "measured", "threshold", "pass"} <= set(results["targets"][0])

  text = docs.read_text()
  assert "old numbers" not in text
  assert "## Other\n\nkept" in text
  assert text.count("## Embedding store") == 1

  docs.write_text("# Benchmarks\n")
  subprocess.run(
      [sys.executable, str(SCRIPT),
       f"--render_from={tmp_path / 'embedding_store_quick.json'}", f"--docs_path={docs}"],
      check=True, cwd=REPO_ROOT, capture_output=True, timeout=600)
  rendered = docs.read_text()
  section = text[text.index("## Embedding store"):text.index("## Other")].rstrip("\n")
  assert rendered == "# Benchmarks\n\n" + section + "\n"


def test_zipf_ids_stay_in_table():
  module = _load_module()
  import numpy as np  # pylint: disable=g-import-not-at-top
  ids = module.draw_ids(np.random.default_rng(0), "zipf", 1000, 5000)
  assert ids.min() >= 0
  assert ids.max() < 1000
  # A bijection of ranks: the most frequent ID is rank 0, mapped to 0.
  assert np.bincount(ids).argmax() == 0
