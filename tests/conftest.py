"""Test setup: four fake CPU devices, so sharding code runs as on a real mesh.

XLA reads the flag once, when JAX first initialises a backend, so it is set
here, before any test module imports JAX. Tests that need one device build a
mesh over `jax.devices()[:1]`.
"""

import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))
