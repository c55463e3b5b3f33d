"""Nested embedding-table ranks: SVD initialisation, nested ranks, export at a rank, checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from text_rows import text_rows
from transformers import AutoModel

from datamodules.pairs import StreamingPairDataModule
from errors import ConfigError
from lightning_modules import TextOnly
from lightning_modules.components.factorised_embedding import (
    EmbeddingRanks,
    FactorisedEmbedding,
    parameters_at_rank,
)
from lightning_modules.components.text_encoder import (
    LoraSettings,
    TextEncoder,
    TextEncoderConfig,
    load_factorised,
)
from lightning_modules.losses import MatryoshkaInfoNCE

DIMS = [16, 32, 64]


def _documents(path, count=6):
    texts = [row["document"] for row in text_rows(count)]
    return StreamingPairDataModule(str(path)).tokenize_documents(texts)


def test_at_full_rank_the_factorised_table_reproduces_the_original_embeddings(deep_tiny_text_model):
    batch = _documents(deep_tiny_text_model)
    original = TextEncoder(TextEncoderConfig(str(deep_tiny_text_model))).eval()
    factorised = TextEncoder(
        TextEncoderConfig(str(deep_tiny_text_model), embedding_ranks=EmbeddingRanks(rank=64))
    ).eval()
    table = factorised.model.get_input_embeddings()
    assert isinstance(table, FactorisedEmbedding) and table.left.shape[1] == 64
    with torch.no_grad():
        assert (table.weight - original.embedding_table()).abs().max() < 1e-5  # float rounding
        difference = (factorised(**batch) - original(**batch)).abs().max()
    assert difference < 1e-4, f"{difference:.2e}"


def test_a_reduced_rank_is_the_best_low_rank_approximation_at_initialisation():
    torch.manual_seed(0)
    weight = torch.randn(50, 12)
    table = FactorisedEmbedding(weight, rank=12)
    table.rank = 4
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    assert torch.allclose(table.weight, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5)
    ids = torch.tensor([[3, 7, 49]])
    assert torch.allclose(table(ids), table.weight[ids], atol=1e-6)


def test_the_default_ranks_are_the_powers_of_two_up_to_the_rank_and_draws_follow_the_rank():
    settings = EmbeddingRanks(rank=48)
    ranks = settings.check(hidden_size=64)
    assert ranks == [1, 2, 4, 8, 16, 32, 48]
    draws = [settings.draw(ranks, step) for step in range(4000)]
    assert draws == [settings.draw(ranks, step) for step in range(4000)]  # step-seeded: every DDP rank agrees
    share = draws.count(48) / len(draws)
    assert abs(share - 48 / sum(ranks)) < 0.03  # proportional to the rank, as ML-Embed
    assert parameters_at_rank(1000, 64, 16) == 1000 * 16 + 16 * 64


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            EmbeddingRanks(rank=65),
            r"embedding_ranks\.rank=65 must be between 1 and the model's hidden size 64",
        ),
        (EmbeddingRanks(rank=32, ranks=[16, 8]), r"embedding_ranks\.ranks=\[16, 8\] must be ascending"),
        (EmbeddingRanks(rank=32, ranks=[8, 64]), r"embedding_ranks\.ranks"),
        (EmbeddingRanks(rank=32, sampling="all"), r"embedding_ranks\.sampling"),
    ],
)
def test_bad_ranks_are_refused_naming_the_key(settings, message):
    with pytest.raises(ConfigError, match=message):
        settings.check(hidden_size=64)


def test_ranks_with_lora_are_refused(deep_tiny_text_model):
    config = TextEncoderConfig(str(deep_tiny_text_model), lora=LoraSettings(), embedding_ranks={"rank": 32})
    with pytest.raises(ConfigError, match="embedding_ranks trains the token table, which LoRA freezes"):
        TextEncoder(config)


def test_export_at_a_rank_loads_dense_or_factorised_with_the_in_training_embeddings(
    deep_tiny_text_model, tmp_path
):
    torch.manual_seed(0)
    model = TextOnly(
        TextEncoderConfig(str(deep_tiny_text_model), embedding_ranks={"rank": 64}),
        matryoshka_dims=DIMS,
        loss=MatryoshkaInfoNCE(),
    ).eval()
    # Not in the checkpoint's hyperparameters, which LightningCLI lays over `validate`'s command line.
    assert "eval_rank" not in model.hparams["text_encoder"]["embedding_ranks"]
    model.text_encoder.set_embedding_rank(16)
    batch = _documents(deep_tiny_text_model)
    with torch.no_grad():
        in_training = model.text_encoder(**batch)
    model.export_text_encoder(tmp_path / "r16", rank=16)
    dense = AutoModel.from_pretrained(tmp_path / "r16")
    factorised = load_factorised(tmp_path / "r16")
    table = factorised.get_input_embeddings()
    assert table.left.shape == (dense.config.vocab_size, 16) and table.right.shape == (16, 64)
    assert sum(p.numel() for p in table.parameters()) == parameters_at_rank(dense.config.vocab_size, 64, 16)
    for loaded in (dense, factorised):
        positions = (batch["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
        with torch.no_grad():
            states = loaded(**batch, position_ids=positions).last_hidden_state[:, -1]
        assert (F.normalize(states, dim=-1) - F.normalize(in_training, dim=-1)).abs().max() < 1e-5
