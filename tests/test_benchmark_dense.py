"""The dense-step benchmark runs and its jitted step agrees with the op-by-op step."""

import json
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_benchmark_dense_quick(tmp_path):
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "experiments" / "benchmark_dense.py"),
       "--batch_sizes=8", "--steps=2", f"--output_dir={tmp_path}",
       f"--docs_path={tmp_path / 'benchmarks.md'}"],
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / "dense_step_cpu.json").read_text())
  assert results["timings"][0]["batch_size"] == 8
  assert results["timings"][0]["samples_per_s"] > 0
  # Jitted and op-by-op float32 steps differ by rounding only.
  assert results["check"]["params_max_abs_diff"] < 1e-4
  assert results["check"]["embedding_grads_max_abs_diff"] < 1e-5
  assert "## Dense step (cpu)" in (tmp_path / "benchmarks.md").read_text()
