"""The spill warning, fed synthetic step times and memory readings."""

from __future__ import annotations

from lora_trainer.train.spill import SpillWatch, spill_warning

STEADY = [3.0, 1.0, 1.1, 0.9, 1.0]
"""Seconds per step: a warm-up measurement, then a steady pace."""


def test_a_jump_in_step_time_with_the_memory_near_the_limit_is_a_spill():
    warning = spill_warning([*STEADY, 6.0], [0.5, 0.9, 0.9, 0.9, 0.9, 0.97])
    assert warning is not None and "6.0x as long" in warning and "97% full" in warning
    assert "Sysmem Fallback" in warning


def test_a_jump_with_memory_to_spare_is_not_a_spill():
    assert spill_warning([*STEADY, 6.0], [0.5] * 6) is None


def test_full_memory_at_a_steady_pace_is_not_a_spill():
    assert spill_warning([*STEADY, 1.2], [0.99] * 6) is None


def test_the_warm_up_measurement_does_not_set_the_starting_pace():
    # Against the slow warm-up (3 s) the last step would look fast; against the steady pace it is a jump.
    assert spill_warning([*STEADY, 2.9], [0.95] * 6) is not None


def test_too_few_measurements_say_nothing():
    assert spill_warning([3.0, 1.0, 5.0], [0.99] * 3) is None


def test_the_watch_warns_once_and_not_where_memory_cannot_be_read():
    shares = iter([0.9, 0.9, 0.9, 0.9, 0.9, 0.98, 0.98])
    watch = SpillWatch(lambda: next(shares))
    warnings = [watch.observe(seconds) for seconds in [*STEADY, 5.0, 5.0]]
    assert [warning is not None for warning in warnings] == [False] * 5 + [True, False]
    blind = SpillWatch(lambda: None)
    assert all(blind.observe(seconds) is None for seconds in [*STEADY, 50.0])
