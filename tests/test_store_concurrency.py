"""EmbeddingStore under concurrent lookups, updates and saves: no lost update, no torn row.

Rows start at zero (init_scale=0) and every gradient row has all columns
equal, so every consistent row has all columns equal and any torn read shows
up as a row whose columns differ. With SGD and lr=1 each row ends at minus the
exact sum of its gradients (small integers, exact in float32).
"""

import threading

import numpy as np

from persia_jax.embedding.store import EmbeddingStore

DIM = 64
NUM_IDS = 2048
WRITERS = 4
STEPS = 40
BATCH = 2048


def _run_threads(targets) -> list[BaseException]:
  """Runs the callables in threads and returns the exceptions they raised."""
  errors = []

  def wrap(target):
    def run():
      try:
        target()
      except BaseException as error:  # pylint: disable=broad-except
        errors.append(error)
    return run

  threads = [threading.Thread(target=wrap(t)) for t in targets]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  return errors


def _writer_batches(writer: int):
  rng = np.random.default_rng(100 + writer)
  for _ in range(STEPS):
    rows = rng.integers(0, NUM_IDS, BATCH)
    amounts = rng.integers(1, 5, BATCH).astype(np.float32)
    yield rows, amounts


def test_concurrent_updates_lose_nothing_and_tear_nothing(tmp_path):
  store = EmbeddingStore(DIM, num_shards=2, init_scale=0.0,
                         optimizer={"name": "sgd", "learning_rate": 1.0})
  ids = np.arange(NUM_IDS, dtype=np.uint64) * 1_000_003
  store.lookup(ids)
  writers_done = threading.Event()
  torn_rows = []
  decreases = []

  def writer(index):
    def run():
      for rows, amounts in _writer_batches(index):
        grads = np.repeat(-amounts[:, None], DIM, axis=1)
        store.apply_gradients(ids[rows], grads)
    return run

  def reader(train):
    def run():
      last = np.zeros(NUM_IDS, np.float32)
      while not writers_done.is_set():
        values = store.lookup(ids, train=train)
        torn_rows.append(int(np.sum(np.any(values != values[:, :1], axis=1))))
        # Rows only grow, so a value below an earlier read means a lost update.
        decreases.append(int(np.sum(values[:, 0] < last)))
        last = values[:, 0].copy()
    return run

  def saver():
    while not writers_done.is_set():
      store.save(str(tmp_path / "ckpt"))

  writer_threads = [writer(i) for i in range(WRITERS)]

  def writers_then_signal():
    errors = _run_threads(writer_threads)
    writers_done.set()
    if errors:
      raise errors[0]

  errors = _run_threads([writers_then_signal, reader(True), reader(False), saver])
  assert not errors, errors

  expected = np.zeros(NUM_IDS, np.float64)
  for index in range(WRITERS):
    for rows, amounts in _writer_batches(index):
      np.add.at(expected, rows, amounts)
  final = store.lookup(ids, train=False)
  np.testing.assert_array_equal(final, np.repeat(expected[:, None], DIM, axis=1))
  assert len(torn_rows) > 0
  assert sum(torn_rows) == 0
  assert sum(decreases) == 0

  # The checkpoint written during the updates contains whole rows only.
  saved = EmbeddingStore.load(str(tmp_path / "ckpt")).lookup(ids, train=False)
  assert not np.any(saved != saved[:, :1])
  assert np.all(saved[:, 0] <= final[:, 0])


def test_concurrent_inserts_and_evictions_keep_map_consistent():
  store = EmbeddingStore(DIM, num_shards=3, capacity=300, init_scale=0.0,
                         optimizer={"name": "sgd", "learning_rate": 1.0})
  torn_rows = []

  def worker(index):
    def run():
      rng = np.random.default_rng(index)
      for _ in range(80):
        batch = rng.integers(0, 2000, 100).astype(np.uint64)
        values = store.lookup(batch)
        torn_rows.append(int(np.sum(np.any(values != values[:, :1], axis=1))))
        grads = np.repeat(rng.normal(size=(batch.size, 1)).astype(np.float32), DIM, axis=1)
        store.apply_gradients(batch, grads)
    return run

  errors = _run_threads([worker(i) for i in range(4)])
  assert not errors, errors
  assert sum(torn_rows) == 0
  assert len(store) == 300
  keys = np.concatenate([shard["keys"] for shard in store.export_shards()])
  assert np.unique(keys).size == 300
  stats_before = store.stats()
  store.lookup(keys, train=False)
  assert store.stats()["eval_misses"] == stats_before["eval_misses"]
  assert store.stats()["inserts"] - store.stats()["evictions"] == 300
