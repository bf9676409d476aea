"""The embedding side: the parameter-server store and the embedding worker.

`EmbeddingStore` keeps rows and sparse optimizer state on the host.
`EmbeddingWorker` deduplicates, pools and compresses lookups for the dense step
and turns pooled gradients back into per-ID gradients.
"""

from persia_jax.embedding.buffers import BufferPool
from persia_jax.embedding.features import FeatureSpec, TableSpec, build_stores, specs_from_config
from persia_jax.embedding.optimizers import OptimizerSpec
from persia_jax.embedding.store import EmbeddingStore
from persia_jax.embedding.worker import EmbeddingWorker

__all__ = ["BufferPool", "EmbeddingStore", "EmbeddingWorker", "FeatureSpec", "OptimizerSpec",
           "TableSpec", "build_stores", "specs_from_config"]
