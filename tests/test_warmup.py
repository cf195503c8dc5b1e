"""The warm-up of the distillation term as a schedule object: linear from 0 in optimiser updates or in
epochs, exact across a checkpoint, and loud when a loop moves its clock backwards."""

import pytest

from aekt_plugin.warmup import KDWarmup


def test_warmup_counts_optimiser_steps_linearly_from_zero():
    warmup = KDWarmup(steps=4)
    factors = []
    for _ in range(6):
        factors.append(float(warmup.factor))
        warmup.step()
    assert factors == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert float(KDWarmup(steps=0).factor) == 1.0


def test_warmup_in_epochs_with_steps_per_epoch_jumps_to_the_epoch_start():
    warmup = KDWarmup(epochs=2, steps_per_epoch=5)
    warmup.set_epoch(1)
    assert float(warmup.factor) == pytest.approx(0.5)
    warmup.step()
    assert float(warmup.factor) == pytest.approx(0.6)


def test_warmup_by_epoch_follows_mdistillers_rule_and_needs_an_epoch():
    warmup = KDWarmup(epochs=4)
    with pytest.raises(RuntimeError, match="set_epoch"):
        _ = warmup.factor
    warmup.set_epoch(0)  # mdistiller's first epoch (1-based 1): min(1 / 4, 1)
    assert float(warmup.factor) == pytest.approx(0.25)
    warmup.set_epoch(9)
    assert float(warmup.factor) == 1.0


def test_warmup_state_survives_a_checkpoint():
    warmup = KDWarmup(epochs=3)
    warmup.set_epoch(1)
    resumed = KDWarmup(epochs=3)
    resumed.load_state_dict(warmup.state_dict())
    assert float(resumed.factor) == float(warmup.factor) == pytest.approx(2 / 3)
    steps = KDWarmup(steps=10)
    for _ in range(7):
        steps.step()
    restored = KDWarmup(steps=10)
    restored.load_state_dict(steps.state_dict())
    assert float(restored.factor) == pytest.approx(0.7)


def test_warmup_arguments_are_checked():
    for kwargs in ({}, {"steps": 3, "epochs": 2}, {"steps": -1}, {"epochs": 2, "steps_per_epoch": 0}):
        with pytest.raises(ValueError):
            KDWarmup(**kwargs)


def test_set_epoch_keeps_a_count_resumed_in_the_middle_of_that_epoch():
    """A run resumed mid-epoch has its exact update count back; the epoch's start must not overwrite it,
    or the first steps after resume use the epoch-start factor (0.5 instead of 0.625 here)."""
    uninterrupted = KDWarmup(epochs=2, steps_per_epoch=4)
    uninterrupted.set_epoch(0)
    for _ in range(5):  # one epoch and one update of the next
        uninterrupted.step()
    resumed = KDWarmup(epochs=2, steps_per_epoch=4)
    resumed.load_state_dict(uninterrupted.state_dict())
    resumed.set_epoch(1)
    assert float(resumed.factor) == float(uninterrupted.factor) == pytest.approx(5 / 8)
    resumed.set_epoch(3)  # a jump to a later epoch still moves the clock to its first update
    assert float(resumed.steps) == 12


def test_a_clock_that_moves_backwards_warns_once():
    warmup = KDWarmup(epochs=2, steps_per_epoch=3)
    for step in (1, 2, 3):
        warmup.set_step(step)
    with pytest.warns(UserWarning, match="moved back from 3 to 1"):
        warmup.set_step(1)  # enumerate(loader, 1) restarted inside an epoch loop
    assert float(warmup.factor) == pytest.approx(1 / 6)


def test_steps_per_epoch_can_be_given_once_the_loop_knows_it():
    warmup = KDWarmup(epochs=2)
    warmup.set_steps_per_epoch(5)
    assert not warmup.by_epoch
    warmup.set_step(5)
    assert float(warmup.factor) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        KDWarmup(steps=3).set_steps_per_epoch(2)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        warmup.set_steps_per_epoch(0)

