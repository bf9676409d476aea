"""Benchmark of the jitted dense step alone: the dense-only throughput bound.

Feeds random dense features and embeddings of the default config's shapes
(Criteo: 13 dense features, 26 embeddings of dim 16) straight to
`DenseTrainer.train_step`, with no embedding store or input pipeline, and
reports samples per second after compilation. The trainer's samples/s divided
by this number measures how close the whole hybrid pipeline comes to the dense
step's own speed.

It also checks the step on the current backend: the jitted step is compared
with the same step run op by op under `jax.disable_jit()`, and the largest
differences are reported (float32 rounding only, if the compiler is correct).

  .venv/bin/python experiments/benchmark_dense.py
  .venv/bin/python experiments/benchmark_dense.py --model=dnn --batch_sizes=512,2048

Writes `dense_step_<backend>.json` to --output_dir and the "Dense step
(<backend>)" section of --docs_path, so CPU and GPU results sit side by side.
"""

from __future__ import annotations

import pathlib
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import criteo_dlrm  # noqa: E402
from persia_jax import benchmarking  # noqa: E402
from persia_jax import models as models_lib  # noqa: E402
from persia_jax.training import dense as dense_lib  # noqa: E402

SECTION_TITLE = "Dense step"

_MODEL = flags.DEFINE_string("model", "dlrm", "Model name, with its default hyperparameters.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["128", "1024", "8192"], "Global batch sizes.")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps per batch size, after 3 warmup steps.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "benchmarks/results", "Directory of the JSON.")
_DOCS_PATH = flags.DEFINE_string("docs_path", "docs/benchmarks.md",
                                 "Markdown file whose 'Dense step' section is replaced; empty to skip.")

NUM_DENSE = 13
NUM_FEATURES = 26
DIM = 16


def make_batch(dense_trainer, batch_size: int, seed: int):
  rng = np.random.default_rng(seed)
  embeddings = {f"C{i + 1}": rng.normal(0, 0.05, (batch_size, DIM)).astype(np.float32)
                for i in range(NUM_FEATURES)}
  return dense_trainer.put_batch(
      rng.normal(0, 1, (batch_size, NUM_DENSE)).astype(np.float32), embeddings, {},
      (rng.random(batch_size) < 0.25).astype(np.float32), np.ones(batch_size, np.float32))


def build(model_name: str):
  config = criteo_dlrm.get_config(f"model={model_name}")
  model = models_lib.build_model(
      config.model, feature_dims={f"C{i + 1}": DIM for i in range(NUM_FEATURES)},
      num_dense=NUM_DENSE)
  mesh = dense_lib.create_mesh(0)
  return dense_lib.DenseTrainer(model, dense_lib.build_optimizer(config.optimizer), mesh,
                                donate=False)


def check_step(dense_trainer) -> dict:
  """Runs one step jitted and op by op; returns the largest differences."""
  batch_size = 8 * dense_trainer.mesh.devices.size
  batch = make_batch(dense_trainer, batch_size, seed=1)
  state = dense_trainer.init(jax.random.PRNGKey(0), batch)
  jitted_state, jitted_grads, jitted_metrics = dense_trainer.train_step(state, batch)
  with jax.disable_jit():
    eager_state, eager_grads, eager_metrics = dense_trainer._train_step_impl(  # pylint: disable=protected-access
        state, state.params, batch)

  def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  return {"params_max_abs_diff": max_diff(jitted_state.params, eager_state.params),
          "embedding_grads_max_abs_diff": max_diff(jitted_grads, eager_grads),
          "loss_abs_diff": abs(float(jitted_metrics["loss"]) - float(eager_metrics["loss"]))}


def time_batch_size(dense_trainer, batch_size: int, steps: int) -> dict:
  batch = make_batch(dense_trainer, batch_size, seed=0)
  state = dense_trainer.init(jax.random.PRNGKey(0), batch)
  for _ in range(3):
    state, grads, _ = dense_trainer.train_step(state, batch)
  jax.block_until_ready((state, grads))
  start = time.perf_counter()
  for _ in range(steps):
    state, grads, _ = dense_trainer.train_step(state, batch)
  jax.block_until_ready((state, grads))
  seconds = time.perf_counter() - start
  return {"batch_size": batch_size, "steps": steps, "seconds": round(seconds, 4),
          "samples_per_s": round(batch_size * steps / seconds, 1)}


def section_title(backend: str) -> str:
  return f"{SECTION_TITLE} ({backend})"


def render_markdown(results: dict) -> str:
  check = results["check"]
  lines = [
      f"## {section_title(results['backend'])}", "",
      f"Command: `{results['command']}`. Machine: {results['machine']}; backend"
      f" {results['backend']} with {results['devices']} device(s), jax {results['jax']}."
      f" Model {results['model']} with the default config's shapes (13 dense features,"
      " 26 embeddings of dim 16), random inputs, no embedding store or input pipeline:"
      " the dense-only bound of the trainer's throughput.", "",
      "| global batch | steps | seconds | samples/s |", "|---|---|---|---|"]
  for row in results["timings"]:
    lines.append(f"| {row['batch_size']:,} | {row['steps']} | {row['seconds']:.3f} |"
                 f" {row['samples_per_s']:,.0f} |")
  lines += ["", "Jitted step against the same step run op by op (`jax.disable_jit`): largest"
            f" parameter difference {check['params_max_abs_diff']:.2e}, largest embedding"
            f" gradient difference {check['embedding_grads_max_abs_diff']:.2e}, loss"
            f" difference {check['loss_abs_diff']:.2e}.", ""]
  return "\n".join(lines)


def main(argv):
  del argv
  dense_trainer = build(_MODEL.value)
  num_devices = dense_trainer.mesh.devices.size
  results = {"command": "python " + " ".join(sys.argv), "model": _MODEL.value,
             "machine": benchmarking.describe_machine(), "backend": jax.default_backend(),
             "devices": num_devices, "jax": jax.__version__, "timings": []}
  results["check"] = check_step(dense_trainer)
  logging.info("Correctness check: %s", results["check"])
  for value in _BATCH_SIZES.value:
    batch_size = int(value)
    dense_lib.check_batch_size(batch_size, dense_trainer.mesh)
    results["timings"].append(time_batch_size(dense_trainer, batch_size, _STEPS.value))
    logging.info("%s", results["timings"][-1])

  backend = results["backend"]
  benchmarking.write_results(
      results, pathlib.Path(_OUTPUT_DIR.value) / f"dense_step_{backend}.json",
      docs_path=_DOCS_PATH.value, title=section_title(backend), section=render_markdown(results))


if __name__ == "__main__":
  app.run(main)
