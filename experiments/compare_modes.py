"""Trains one config in sync, hybrid and async mode (several seeds) and compares them.

  python experiments/compare_modes.py --config=configs/criteo_dlrm.py \
      --seeds=0,1,2 --output_dir=benchmarks/results
  python experiments/compare_modes.py --variants=hybrid,hybrid_bf16,hybrid_fp16_wire \
      --name=precision

Writes compare_modes.json, compare_modes.md (test AUC, logloss, samples/s, each
relative to sync) and compare_modes_auc.png into --output_dir, and one workdir
per run under --workdir_root.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from persia_jax.training import studies  # pylint: disable=g-import-not-at-top
from persia_jax.training import trainer  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/criteo_dlrm.py", "Base config file; modes are set per run.")
_VARIANTS = flags.DEFINE_list("variants", list(studies.DEFAULT_VARIANTS),
                              f"Variants to run, from {sorted(studies.VARIANTS)}.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; each variant runs once per seed.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "benchmarks/results",
                                  "Where the JSON, markdown table and plot go.")
_NAME = flags.DEFINE_string("name", "compare_modes", "Prefix of the output files.")
_WORKDIR_ROOT = flags.DEFINE_string("workdir_root", "workdirs/compare_modes",
                                    "Parent directory of the per-run workdirs.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  unknown = [v for v in _VARIANTS.value if v not in studies.VARIANTS]
  if unknown:
    raise app.UsageError(f"Unknown --variants {unknown}; expected {sorted(studies.VARIANTS)}.")
  variants = {v: studies.VARIANTS[v] for v in _VARIANTS.value}
  trainer.quiet_library_logs()
  summaries = studies.run_study(_CONFIG.value, variants=variants,
                                seeds=[int(s) for s in _SEEDS.value],
                                root=f"{_WORKDIR_ROOT.value}/{_NAME.value}")
  command = "python " + " ".join(sys.argv)
  report = studies.write_report(summaries, _OUTPUT_DIR.value, command=command,
                                name=_NAME.value)
  print(studies.markdown_table(report["rows"]))


if __name__ == "__main__":
  app.run(main)
