"""Scores a data file with an exported persia_jax model, one prediction per row.

  python experiments/predict.py --export_dir=workdirs/criteo_dlrm/export \
      --input=data/criteo/train_head8k.txt --output=/tmp/predictions.txt

The input is read with the data schema the model was trained with (same source
format, same feature hashing). A malformed row stops the run with its file, line
and column, so line k of the output always scores line k of the input.
Embedding lookups are read-only: unknown IDs get their seeded initial value (or
zeros) and are not inserted into the store.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from persia_jax.training import inference  # pylint: disable=g-import-not-at-top
from persia_jax.training import trainer  # pylint: disable=g-import-not-at-top

_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Directory written by the export step.")
_INPUT = flags.DEFINE_string("input", None, "Data file in the format the model was trained on.")
_OUTPUT = flags.DEFINE_string("output", None, "Text file to write, one probability per line.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1024, "Rows scored per dense step.")
_LABELLED = flags.DEFINE_bool(
    "labelled", True, "Whether the input has the label column; use --nolabelled for files"
    " without it, such as Criteo's Kaggle test.txt.")
flags.mark_flags_as_required(["export_dir", "input", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  trainer.quiet_library_logs()
  predictor = inference.Predictor(_EXPORT_DIR.value, batch_size=_BATCH_SIZE.value)
  num_rows = inference.predict_file(predictor, _INPUT.value, _OUTPUT.value,
                                    labelled=_LABELLED.value)
  logging.info("Embedding store counters after scoring: %s",
               {name: store.stats() for name, store in predictor.stores.items()})
  print(f"Wrote {num_rows} predictions to {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
