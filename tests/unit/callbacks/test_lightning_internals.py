"""The private Lightning state this project reaches into (callbacks/lightning_internals.py) still exists.

Each accessor runs against a real Trainer mid-fit, so a Lightning release that renames or moves
one of them fails here, by name, rather than as a silent change of behaviour in resume or
preemption.
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.utils.data import DataLoader
from trainers import quiet_cpu_trainer

from callbacks import lightning_internals as internals


class _Probe(Callback):
    def __init__(self):
        self.seen: dict[str, object] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.setdefault("last_batch", []).append(internals.is_last_batch(trainer))
        self.seen.setdefault("accumulating", []).append(internals.accumulating(trainer))
        self.seen.setdefault("validates", []).append(internals.validates_after_this_step(trainer))
        self.seen["environment"] = type(internals.cluster_environment(trainer)).__name__

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.seen["loop_state_keys"] = sorted(internals.fit_loop_state(checkpoint))


class _StatefulLoader(DataLoader):
    """A loader Lightning saves the position of (it has state_dict / load_state_dict)."""

    def state_dict(self) -> dict:
        return {"position": 1}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_every_accessor_reads_a_running_fit(tmp_path):
    probe = _Probe()
    trainer = quiet_cpu_trainer(
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=1,
        val_check_interval=2,
        accumulate_grad_batches=2,
        default_root_dir=tmp_path,
        callbacks=[probe, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )
    trainer.fit(BoringModel(), train_dataloaders=_StatefulLoader(RandomDataset(32, 8), batch_size=2))
    assert probe.seen["last_batch"] == [False, False, False, True]
    assert probe.seen["accumulating"] == [True, False, True, False]
    assert probe.seen["validates"] == [False, True, False, True]
    assert probe.seen["environment"] == "LightningEnvironment"
    assert "combined_loader" in probe.seen["loop_state_keys"]


def test_validation_can_be_skipped_and_run_on_demand(tmp_path):
    class Model(BoringModel):
        validations = 0

        def on_validation_start(self):
            type(self).validations += 1

        def training_step(self, batch, batch_idx):
            if batch_idx == 0:
                internals.skip_next_validation(self.trainer)
                self.trainer.should_stop = True
            return super().training_step(batch, batch_idx)

    trainer = quiet_cpu_trainer(
        max_steps=5,
        limit_val_batches=1,
        val_check_interval=1,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(Model())
    assert Model.validations == 0  # the stop's validation was skipped

    class RunNow(Callback):
        def on_train_start(self, trainer, pl_module: LightningModule):
            internals.run_validation_now(trainer)

    trainer = quiet_cpu_trainer(
        max_steps=1,
        limit_val_batches=1,
        val_check_interval=1,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=[RunNow()],
    )
    trainer.fit(Model())
    assert Model.validations == 1  # run on demand at train start; the stop's own was skipped again


def test_a_checkpoint_folder_resolved_from_the_logger_is_found(tmp_path):
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.loggers import CSVLogger

    checkpoint = ModelCheckpoint(save_last=True)  # no dirpath: <logger folder>/checkpoints
    trainer = quiet_cpu_trainer(
        max_steps=2,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path),
        callbacks=[checkpoint],
    )
    trainer.fit(BoringModel())
    assert {p.rsplit("/", 1)[-1] for p in internals.last_checkpoints_of(checkpoint, trainer)} == {"last.ckpt"}
    assert callable(LightningCLI._parse_ckpt_path)  # overridden by cli.py
