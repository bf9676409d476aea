"""Config files: arguments, model selection and the smoke-run shrink."""

import pytest

from configs import criteo_dlrm
from configs import criteo_lr
from persia_jax import models
from persia_jax.training import trainer as trainer_lib


def test_parse_arg_options():
  assert criteo_dlrm.parse_arg(None) == {}
  assert criteo_dlrm.parse_arg("runlocal,model=dnn") == {"runlocal": "", "model": "dnn"}


@pytest.mark.parametrize("arg, message", [
    ("runloca", "Unknown config arguments"),
    ("model=dnn,model=dcn_v2", "given twice"),
    ("model=", "needs a model name"),
])
def test_parse_arg_rejects(arg, message):
  with pytest.raises(ValueError, match=message):
    criteo_dlrm.parse_arg(arg)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_model_argument_selects_defaults(name):
  config = criteo_dlrm.get_config(f"model={name},runlocal")
  assert config.model.name == name
  assert config.model.to_dict() == {
      **models.default_model_config(name).to_dict(),
      **({"hidden_sizes": (256, 128)} if name == "dnn" else {})}
  assert config.num_train_steps == 20
  trainer_lib.validate_config(config)


def test_default_config_is_valid():
  config = criteo_dlrm.get_config()
  trainer_lib.validate_config(config)
  assert config.mode == "hybrid"
  assert config.model.name == "dlrm"


def test_lr_config_is_logistic_regression():
  config = criteo_lr.get_config()
  assert config.model.name == "logistic"
  assert config.embedding.tables.criteo.dim == 1
  assert config.mode == "sync"
  with pytest.raises(ValueError, match="logistic regression config"):
    criteo_lr.get_config("model=dnn")
