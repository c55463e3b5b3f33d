"""Mid-epoch resume under DDP: every rank continues from its own position in the stream.

Two gloo processes (``ddp_spawn``) read a parquet folder whose four shards hold different numbers
of rows, so after a few steps the ranks stand at different places of their own shards. A
checkpoint is written by rank 0 alone; it must still carry rank 1's position, or rank 1 would
resume at rank 0's.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from trainers import quiet_cpu_trainer

from datamodules.pairs import StreamingPairDataModule
from lightning_modules import TextOnly
from lightning_modules.components.text_encoder import TextEncoderConfig

TOTAL_STEPS = 6
# Unequal on purpose. With seed 0 rank 0 reads shards 2 then 1 and rank 1 shards 0 then 3, so at
# the step-3 checkpoint rank 0 has finished its short first shard and rank 1 has not. `datasets`
# resumes from the last shard boundary plus a row count: rank 0's position, loaded by rank 1, sends
# rank 1 past its whole first shard (measured: with the fix removed, rank 1 resumes at row 10 of
# shard 0 instead of row 4).
SHARD_SIZES = (30, 14, 6, 46)


class SaveBatchIdsPerRank(Callback):
    """Writes the ids of every batch this rank trained on to ``<root>/ids-rank<r>.json``, and
    rank 0 the trainable weights to ``<root>/weights.pt``."""

    def __init__(self):
        self.ids: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.append(list(batch["ids"]))

    def on_train_end(self, trainer, pl_module):
        path = f"{trainer.default_root_dir}/ids-rank{trainer.global_rank}.json"
        with open(path, "w") as handle:
            json.dump(self.ids, handle)
        if trainer.global_rank == 0:
            weights = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
            torch.save(weights, f"{trainer.default_root_dir}/weights.pt")


@pytest.fixture(scope="module")
def sharded_train_folder(tmp_path_factory, corpus_dir):
    rows = [json.loads(line) for line in (corpus_dir / "train.jsonl").read_text().splitlines()]
    folder = tmp_path_factory.mktemp("ddp-resume") / "train"
    folder.mkdir()
    start = 0
    for shard, size in enumerate(SHARD_SIZES):
        chunk = rows[start : start + size]
        start += size
        table = pa.table(
            {
                "id": [f"shard{shard}-row{i}" for i in range(size)],
                "query": [row["query"] for row in chunk],
                "document": [row["document"] for row in chunk],
            }
        )
        pq.write_table(table, folder / f"train-{shard:05d}-of-{len(SHARD_SIZES):05d}.parquet")
    return folder


def _fit(root, text_model, train_folder, max_steps, ckpt_path=None, callbacks=()):
    root.mkdir(parents=True, exist_ok=True)
    seed_everything(0)
    # Default optimizer (AdamW): ddp_spawn pickles the model, and a lambda factory cannot be pickled.
    model = TextOnly(TextEncoderConfig(str(text_model)), matryoshka_dims=[32, 256])
    data = StreamingPairDataModule(
        str(text_model),
        train_data=str(train_folder),
        batch_size=4,
        shuffle_block_size=5,
        max_query_length=32,
        max_document_length=48,
    )
    trainer = quiet_cpu_trainer(
        devices=2,
        strategy="ddp_spawn",
        max_steps=max_steps,
        default_root_dir=str(root),
        limit_val_batches=0,
        callbacks=[SaveBatchIdsPerRank(), *callbacks],
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    ids = [json.loads((root / f"ids-rank{rank}.json").read_text()) for rank in (0, 1)]
    return ids, torch.load(root / "weights.pt")


def test_ddp_resume_continues_every_rank_from_its_own_position(
    tmp_path, tiny_text_model, sharded_train_folder
):
    folder = sharded_train_folder
    expected_ids, expected_weights = _fit(tmp_path / "straight", tiny_text_model, folder, TOTAL_STEPS)
    # The premise: the ranks read different rows (their own shards).
    assert not {i for b in expected_ids[0] for i in b} & {i for b in expected_ids[1] for i in b}

    every_step = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1, save_top_k=-1)
    first_ids, _ = _fit(tmp_path / "first", tiny_text_model, folder, 3, callbacks=[every_step])
    checkpoint = tmp_path / "checkpoints" / "epoch=0-step=3.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    positions = [state[0]["dataset_state"]["block_start"] for state in saved["loader_states_per_rank"]]
    assert positions[0] != positions[1], "the ranks stood at the same place: the test would prove nothing"

    resumed_ids, weights = _fit(tmp_path / "second", tiny_text_model, folder, TOTAL_STEPS, checkpoint)
    for rank in (0, 1):
        assert first_ids[rank] + resumed_ids[rank] == expected_ids[rank], f"rank {rank} resumed elsewhere"
    assert weights.keys() == expected_weights.keys()
    for name in weights:
        assert torch.allclose(weights[name], expected_weights[name], atol=1e-6, rtol=0), name
