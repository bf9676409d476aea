"""persia_jax: hybrid synchronous/asynchronous training of deep recommenders in JAX.

The dense towers train synchronously under `jax.jit` across all devices; the
embedding rows live in host-side sharded stores that a background thread pool
updates, following PERSIA (Lian et al., KDD 2022, arXiv 2111.05897).
"""

__version__ = "0.1.0"
