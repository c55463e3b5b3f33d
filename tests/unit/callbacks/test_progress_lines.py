"""A line every N steps where no progress bar draws."""

from __future__ import annotations

import logging

from lightning.pytorch.demos.boring_classes import BoringModel
from trainers import quiet_cpu_trainer

from callbacks.progress_lines import ProgressLines


def test_a_line_every_n_steps_with_the_time_left(caplog):
    trainer = quiet_cpu_trainer(max_steps=5, limit_val_batches=0, callbacks=[ProgressLines(every_n_steps=2)])
    with caplog.at_level(logging.INFO, logger="callbacks.progress_lines"):
        trainer.fit(BoringModel())
    lines = [r.getMessage() for r in caplog.records if r.name == "callbacks.progress_lines"]
    assert [line.split(",")[0] for line in lines] == ["step 2/5 (40 %)", "step 4/5 (80 %)"]
    assert all("s/step" in line and "min left" in line for line in lines)
