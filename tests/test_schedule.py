"""Embedding schedules: when pushes are applied relative to lookups."""

import threading
import time

import pytest

from persia_jax.training import schedule as schedule_lib


class Recorder:
  """Collects the steps whose gradients were applied, in order."""

  def __init__(self, delay: float = 0.0):
    self.applied = []
    self.delay = delay
    self.lock = threading.Lock()

  def __call__(self, grads):
    if self.delay:
      time.sleep(self.delay)
    with self.lock:
      self.applied.append(grads["step"])


def _grads(step):
  return lambda: {"step": step}


def _run(schedule, num_steps, recorder):
  """Interleaves lookups and pushes like the trainer; returns applied steps seen at each lookup."""
  seen = []
  for step in range(num_steps):
    schedule.before_lookup(step)
    with recorder.lock:
      seen.append(sorted(recorder.applied))
    schedule.submit(step, _grads(step))
  schedule.flush()
  return seen


def test_sync_applies_before_next_lookup():
  recorder = Recorder()
  schedule = schedule_lib.SyncSchedule(recorder)
  seen = _run(schedule, 5, recorder)
  for step, applied in enumerate(seen):
    assert applied == list(range(step))
  assert schedule.staleness == [0] * 5


@pytest.mark.parametrize("tau", [0, 1, 3])
def test_replay_applies_exactly_tau_late(tau):
  recorder = Recorder()
  schedule = schedule_lib.ReplaySchedule(recorder, staleness=tau)
  seen = _run(schedule, 8, recorder)
  for step, applied in enumerate(seen):
    assert applied == list(range(max(0, step - tau)))
  assert schedule.staleness == [min(step, tau) for step in range(8)]
  assert recorder.applied == list(range(8))


def test_replay_pending_round_trip():
  recorder = Recorder()
  schedule = schedule_lib.ReplaySchedule(recorder, staleness=2)
  for step in range(4):
    schedule.before_lookup(step)
    schedule.submit(step, _grads(step))
  pending = schedule.pending()
  # Before lookup(4), batches 1..3 are unapplied: tau + 1 of them.
  assert [step for step, _ in pending] == [1, 2, 3]

  resumed_recorder = Recorder()
  resumed = schedule_lib.ReplaySchedule(resumed_recorder, staleness=2, start_step=4)
  resumed.restore_pending(pending)
  assert resumed.before_lookup(4) == 2
  assert resumed_recorder.applied == [1]
  resumed.submit(4, _grads(4))
  assert resumed.before_lookup(5) == 2
  assert resumed_recorder.applied == [1, 2]


@pytest.mark.parametrize("tau", [0, 2])
def test_threaded_respects_bound(tau):
  recorder = Recorder(delay=0.002)
  schedule = schedule_lib.ThreadedSchedule(recorder, staleness=tau, num_threads=2)
  seen = _run(schedule, 12, recorder)
  schedule.close()
  for step, applied in enumerate(seen):
    missing = step - len(applied)
    assert missing <= tau, (step, applied)
  assert all(s <= tau for s in schedule.staleness)
  assert sorted(recorder.applied) == list(range(12))


def test_threaded_tau_zero_is_ordered():
  recorder = Recorder(delay=0.001)
  schedule = schedule_lib.ThreadedSchedule(recorder, staleness=0, num_threads=4)
  _run(schedule, 10, recorder)
  schedule.close()
  assert recorder.applied == list(range(10))


def test_threaded_error_reaches_caller():

  def failing_apply(grads):
    raise OSError(f"disk full at step {grads['step']}")

  schedule = schedule_lib.ThreadedSchedule(failing_apply, staleness=1, num_threads=1)
  schedule.before_lookup(0)
  schedule.submit(0, _grads(0))
  with pytest.raises(RuntimeError, match="disk full at step 0"):
    schedule.flush()
  schedule.close()


def test_threaded_close_leaves_no_threads():
  recorder = Recorder()
  schedule = schedule_lib.ThreadedSchedule(recorder, staleness=1, num_threads=2)
  _run(schedule, 3, recorder)
  schedule.close()
  names = [t.name for t in threading.enumerate()]
  assert not [n for n in names if n.startswith("embedding-push")]


def test_make_schedule_rejects_unknown_mode():
  with pytest.raises(ValueError, match="config.mode='fast'"):
    schedule_lib.make_schedule("fast", Recorder(), staleness=1, num_threads=1,
                               deterministic=False)


def test_negative_staleness_rejected():
  with pytest.raises(ValueError, match="must be >= 0"):
    schedule_lib.ReplaySchedule(Recorder(), staleness=-1)
