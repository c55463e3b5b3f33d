"""Exact resume with hard negatives: a run stopped mid-pass and resumed draws the same negatives,
crosses into the next pass with the same new draw, and ends with the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from trainers import quiet_cpu_trainer

from datamodules.pairs import StreamingPairDataModule
from lightning_modules import TextOnly
from lightning_modules.components.text_encoder import LoraSettings, TextEncoderConfig

TOTAL_STEPS = 7  # 30 rows, 6 per batch: 5 steps per pass, so the run crosses into a second pass


class RecordNegatives(Callback):
    """Each step's row ids and, per negative, its key and the row it belongs to."""

    def __init__(self):
        self.steps: list[tuple] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(
            (list(batch["ids"]), batch["negative_keys"].tolist(), batch["negative_rows"].tolist())
        )


@pytest.fixture(scope="module")
def train_file(tmp_path_factory, corpus_dir):
    rows = [json.loads(line) for line in (corpus_dir / "train.jsonl").read_text().splitlines()[:60]]
    # The first 30 rows train; each lists 5 of the other 30 documents (2 drawn per pass).
    train = [
        dict(row, negatives=[rows[30 + (i + k) % 30]["document"] for k in range(5)])
        for i, row in enumerate(rows[:30])
    ]
    path = tmp_path_factory.mktemp("resume-negatives") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in train))
    return path


def _fit(root, text_model, train_file, max_steps, ckpt_path=None, callbacks=()):
    seed_everything(0)
    model = TextOnly(
        TextEncoderConfig(str(text_model), lora=LoraSettings(r=4, dropout=0.2)),
        matryoshka_dims=[32, 256],
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )
    data = StreamingPairDataModule(
        str(text_model),
        train_data=str(train_file),
        batch_size=6,
        shuffle_block_size=12,
        max_query_length=32,
        max_document_length=48,
        num_negatives=2,
    )
    recorder = RecordNegatives()
    trainer = quiet_cpu_trainer(
        max_steps=max_steps, default_root_dir=root, callbacks=[recorder, *callbacks], limit_val_batches=0
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return recorder.steps, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_resumed_run_draws_the_same_negatives_and_ends_with_the_same_weights(
    tmp_path, tiny_text_model, train_file
):
    expected_steps, expected_weights = _fit(tmp_path / "straight", tiny_text_model, train_file, TOTAL_STEPS)
    assert all(len(keys) == 12 for _, keys, _ in expected_steps)  # 2 negatives for each of 6 rows
    every_step = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1, save_top_k=-1)
    first, _ = _fit(tmp_path / "first", tiny_text_model, train_file, 3, callbacks=[every_step])
    checkpoint = tmp_path / "checkpoints" / "epoch=0-step=3.ckpt"
    resumed, weights = _fit(tmp_path / "second", tiny_text_model, train_file, TOTAL_STEPS, checkpoint)
    assert first + resumed == expected_steps
    assert weights.keys() == expected_weights.keys() and weights
    for name, value in expected_weights.items():
        assert torch.allclose(weights[name], value, atol=1e-6, rtol=0), name
