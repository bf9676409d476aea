"""Sparse optimizer settings for the embedding store.

An `OptimizerSpec` names the update rule and its hyperparameters. The store
keeps `slot_width(dim)` float32 values of optimizer state per row, at the same
row slot as the row, and its compiled update (kernels.py) reads the
hyperparameters packed by `OptimizerSpec.hyperparameters()`. The update rules
of SGD, Adagrad, row-wise Adagrad, Adam and FTRL-Proximal are written out in
the module docstring of store.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

OPTIMIZER_NAMES = ("sgd", "adagrad", "rowwise_adagrad", "adam", "ftrl")

# Integer codes the compiled kernels branch on; the order matches OPTIMIZER_NAMES.
SGD, ADAGRAD, ROWWISE_ADAGRAD, ADAM, FTRL = range(5)

# Positions of the hyperparameters in the float64 vector passed to the kernels.
HP_LR, HP_WEIGHT_DECAY, HP_EPSILON, HP_BETA1, HP_BETA2 = range(5)
HP_L1, HP_L2, HP_FTRL_BETA, HP_LR_POWER, HP_WEIGHT_BOUND = range(5, 10)
NUM_HYPERPARAMETERS = 10


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """A sparse optimizer and its hyperparameters.

  Attributes:
    name: one of "sgd", "adagrad", "rowwise_adagrad", "adam", "ftrl".
    learning_rate: step size, > 0.
    weight_decay: SGD only: L2 coefficient added to the gradient, which for
      plain SGD equals decoupled weight decay of learning_rate * weight_decay.
    initial_accumulator: starting value of the Adagrad accumulators, >= 0.
    epsilon: added to the square-root denominator of Adagrad, row-wise Adagrad
      and Adam.
    beta1: Adam first-moment decay, in [0, 1).
    beta2: Adam second-moment decay, in [0, 1).
    ftrl_l1: FTRL L1 strength, >= 0.
    ftrl_l2: FTRL L2 strength, >= 0.
    ftrl_beta: FTRL beta (smooths the per-coordinate learning rate), >= 0.
    learning_rate_power: FTRL power of the accumulator, <= 0 (-0.5 gives the
      usual 1/sqrt(n) schedule).
    weight_bound: if > 0, every weight of an updated row is clipped to
      [-weight_bound, weight_bound].
  """

  name: str = "adagrad"
  learning_rate: float = 0.01
  weight_decay: float = 0.0
  initial_accumulator: float = 0.1
  epsilon: float = 1e-8
  beta1: float = 0.9
  beta2: float = 0.999
  ftrl_l1: float = 0.0
  ftrl_l2: float = 0.0
  ftrl_beta: float = 1.0
  learning_rate_power: float = -0.5
  weight_bound: float = 0.0

  def __post_init__(self):
    if self.name not in OPTIMIZER_NAMES:
      raise ValueError(
          f"Unknown sparse optimizer {self.name!r}; expected one of {OPTIMIZER_NAMES}.")
    for field in dataclasses.fields(self):
      if field.name == "name":
        continue
      value = getattr(self, field.name)
      if not np.isfinite(value):
        raise ValueError(f"OptimizerSpec.{field.name} must be finite, got {value}.")
    checks = (
        ("learning_rate", self.learning_rate > 0, "> 0"),
        ("weight_decay", self.weight_decay >= 0, ">= 0"),
        ("initial_accumulator", self.initial_accumulator >= 0, ">= 0"),
        ("epsilon", self.epsilon >= 0, ">= 0"),
        ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
        ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
        ("ftrl_l1", self.ftrl_l1 >= 0, ">= 0"),
        ("ftrl_l2", self.ftrl_l2 >= 0, ">= 0"),
        ("ftrl_beta", self.ftrl_beta >= 0, ">= 0"),
        ("learning_rate_power", self.learning_rate_power <= 0, "<= 0"),
        ("weight_bound", self.weight_bound >= 0, ">= 0 (0 disables clipping)"),
    )
    for field_name, ok, expected in checks:
      if not ok:
        raise ValueError(
            f"OptimizerSpec.{field_name} must be {expected}, got {getattr(self, field_name)}.")
    if (self.name in ("adagrad", "rowwise_adagrad") and self.initial_accumulator == 0
        and self.epsilon == 0):
      raise ValueError(
          f"{self.name} with initial_accumulator=0 and epsilon=0 divides by zero on a"
          " zero gradient; set initial_accumulator or epsilon > 0.")
    if self.name == "ftrl" and self.ftrl_beta == 0 and self.ftrl_l2 == 0:
      raise ValueError(
          "ftrl with ftrl_beta=0 and ftrl_l2=0 divides by zero before the first"
          " non-zero gradient; set ftrl_beta or ftrl_l2 > 0.")

  @property
  def code(self) -> int:
    """Integer code of the update rule used by the kernels."""
    return OPTIMIZER_NAMES.index(self.name)

  def slot_width(self, dim: int) -> int:
    """Returns the number of float32 optimizer-state values stored per row."""
    if self.name == "sgd":
      return 0
    if self.name == "adagrad":
      return dim
    if self.name == "rowwise_adagrad":
      return 1
    if self.name == "adam":
      return 2 * dim + 1  # m, v and the row's step count t (exact up to 2**24 steps).
    return 2 * dim  # ftrl: z, n.

  def initial_state(self, dim: int) -> np.ndarray:
    """Returns the float32 [slot_width(dim)] state a newly inserted row starts with."""
    state = np.zeros(self.slot_width(dim), np.float32)
    if self.name in ("adagrad", "rowwise_adagrad"):
      state[:] = self.initial_accumulator
    return state

  def hyperparameters(self) -> np.ndarray:
    """Packs the hyperparameters into the float64 vector the kernels index."""
    hp = np.zeros(NUM_HYPERPARAMETERS, np.float64)
    hp[HP_LR] = self.learning_rate
    hp[HP_WEIGHT_DECAY] = self.weight_decay
    hp[HP_EPSILON] = self.epsilon
    hp[HP_BETA1] = self.beta1
    hp[HP_BETA2] = self.beta2
    hp[HP_L1] = self.ftrl_l1
    hp[HP_L2] = self.ftrl_l2
    hp[HP_FTRL_BETA] = self.ftrl_beta
    hp[HP_LR_POWER] = self.learning_rate_power
    hp[HP_WEIGHT_BOUND] = self.weight_bound
    return hp

  def to_dict(self) -> dict[str, Any]:
    """Returns a JSON-serializable dict; `from_dict` inverts it."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, config: dict[str, Any]) -> "OptimizerSpec":
    """Builds a spec from a dict such as `to_dict()` output or a config section.

    Raises:
      ValueError: if the dict has a key that is not an `OptimizerSpec` field.
    """
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
      raise ValueError(
          f"Unknown OptimizerSpec fields {unknown}; valid fields are {sorted(known)}.")
    values = dict(config)
    for key, value in values.items():
      if key != "name":
        values[key] = float(value)
    return cls(**values)

  @classmethod
  def coerce(cls, optimizer: "OptimizerSpec | dict[str, Any] | None") -> "OptimizerSpec":
    """Accepts a spec, a dict of fields or None (the default Adagrad)."""
    if optimizer is None:
      return cls()
    if isinstance(optimizer, cls):
      return optimizer
    if isinstance(optimizer, dict):
      return cls.from_dict(optimizer)
    # ml_collections.ConfigDict and similar mappings.
    if hasattr(optimizer, "to_dict"):
      return cls.from_dict(optimizer.to_dict())
    raise TypeError(
        f"optimizer must be an OptimizerSpec, a dict or None, got {type(optimizer).__name__}.")
