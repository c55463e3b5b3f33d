"""WarmupCosine: the learning rate against the formula, and warm-ups that do not fit the run."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from errors import ConfigError
from lightning_modules.schedules import WarmupCosine


def _rates(warmup_steps, total_steps: int, min_ratio: float = 0.0) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = WarmupCosine(optimizer, warmup_steps, total_steps, min_ratio)
    rates = []
    for _ in range(total_steps + 2):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


def _expected(warmup: int, total: int, min_ratio: float = 0.0) -> list[float]:
    rates = []
    for step in range(total + 2):
        if step < warmup:
            rates.append(2.0 * (step + 1) / warmup)
        else:
            progress = min(1.0, (step - warmup) / (total - warmup))
            rates.append(2.0 * (min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2))
    return rates


def test_rates_follow_linear_warmup_then_cosine():
    assert _rates(4, 20, min_ratio=0.1) == pytest.approx(_expected(4, 20, min_ratio=0.1))


def test_a_fraction_warms_up_over_that_part_of_the_run():
    assert _rates(0.2, 50) == pytest.approx(_expected(10, 50))
    assert _rates(0.0, 10) == pytest.approx(_expected(0, 10))


def test_a_warmup_longer_than_the_run_is_shortened_with_one_warning(caplog):
    """`--trainer.max_steps=30` on a recipe that warms up over 100 steps."""
    with caplog.at_level(logging.WARNING, logger="lightning_modules.schedules"):
        rates = _rates(100, 30)
    assert rates == pytest.approx(_expected(3, 30))
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == [
        "WarmupCosine: warmup_steps=100 does not fit a run of total_steps=30; warming up over 3 steps "
        "(a tenth of the run) instead. Set warmup_steps to a number or a fraction (e.g. 0.1) to choose."
    ]


@pytest.mark.parametrize(
    "warmup, total, message",
    [(10, -1, "set trainer.max_steps"), (1.5, 30, "between 0 and 1"), (-2, 30, "must be >= 0")],
)
def test_settings_that_cannot_work_name_the_key(warmup, total, message):
    with pytest.raises(ConfigError, match=message):
        _rates(warmup, total)
