"""The shared LightningModule: skipped-row counting, non-finite losses, trainable-only checkpoints."""

from __future__ import annotations

import pytest
import torch

from datamodules.pairs import StreamingPairDataModule
from lightning_modules import TextOnly
from lightning_modules.components.text_encoder import TextEncoderConfig


@pytest.fixture()
def model_and_batch(tiny_text_model):
    model = TextOnly(TextEncoderConfig(str(tiny_text_model)), matryoshka_dims=[32, 256])
    batches = StreamingPairDataModule(str(tiny_text_model)).batches
    rows = [
        {"id": "a", "query": "bita saaso", "document": "fèfé lôrôfê"},
        {"id": "b", "query": "mooje", "document": "vérô"},
        {"id": "bad", "query": "", "document": "vérô"},
    ]
    return model, batches.training_batch(rows)


def test_the_batch_guard_counts_skipped_rows(model_and_batch):
    model, batch = model_and_batch
    assert batch["skipped_ids"] == ["bad"]
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss)
    model.guard.on_train_batch_start(None, model, batch, 0)  # the callback the model adds itself
    assert model.guard.skipped_rows == 1
    model.guard.on_train_batch_start(None, model, batch, 1)
    assert model.guard.skipped_rows == 2


def test_non_finite_loss_skips_the_step_and_keeps_weights(model_and_batch):
    model, batch = model_and_batch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.text_encoder.model.get_input_embeddings().weight[0, 0] = float("nan")
    assert model.training_step(batch, 0) is None  # Lightning skips backward and the optimizer step
    assert model.guard.nonfinite_losses == 1
    with torch.no_grad():
        embeddings = model.text_encoder.model.get_input_embeddings().weight
        embeddings.copy_(before["text_encoder.model.embed_tokens.weight"])


def test_checkpoint_keeps_trainable_weights_only(tiny_text_model):
    from lightning_modules.components.text_encoder import LoraSettings

    config = TextEncoderConfig(str(tiny_text_model), lora=LoraSettings(r=2))
    model = TextOnly(config, matryoshka_dims=[32, 256])
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    saved_parameters = set(checkpoint["state_dict"]) & {name for name, _ in model.named_parameters()}
    assert saved_parameters == trainable and all("lora_" in name for name in trainable)
    model.on_load_checkpoint(checkpoint)  # complete: no error
    del checkpoint["state_dict"][sorted(trainable)[0]]
    with pytest.raises(ValueError, match="lacks 1 trainable"):
        model.on_load_checkpoint(checkpoint)


def test_a_run_whose_batches_are_all_unusable_stops_with_the_reason(tiny_text_model):
    """Skipping batch after batch would run on to max_steps: the 50th in a row stops the run."""
    from errors import DataError

    model = TextOnly(TextEncoderConfig(str(tiny_text_model)), matryoshka_dims=[32, 256])
    MAX_CONSECUTIVE_UNUSABLE_BATCHES = model.guard.max_unusable_in_a_row
    batches = StreamingPairDataModule(str(tiny_text_model)).batches
    usable = batches.training_batch([{"id": "a", "query": "bita", "document": "vérô"}] * 2)
    unusable = batches.training_batch([{"id": "a", "query": "bita", "document": ""}] * 2)
    for step in range(MAX_CONSECUTIVE_UNUSABLE_BATCHES - 1):
        assert model.training_step(unusable, step) is None
    assert torch.isfinite(model.training_step(usable, 0))  # one usable batch starts the count again
    for step in range(MAX_CONSECUTIVE_UNUSABLE_BATCHES - 1):
        model.training_step(unusable, step)
    with pytest.raises(DataError, match=r"50 training batches in a row .*'missing or empty document'"):
        model.training_step(unusable, 0)


def test_the_loss_is_rebuilt_from_the_models_hyperparameters(tiny_text_model):
    """load_from_checkpoint calls the class with the saved hyperparameters: the same loss comes back."""
    from lightning_modules.losses import MatryoshkaInfoNCE, WeightedSum

    loss = WeightedSum([MatryoshkaInfoNCE(temperature=0.3, symmetric=True)], [2.0])
    model = TextOnly(TextEncoderConfig(str(tiny_text_model)), matryoshka_dims=[32, 256], loss=loss)
    rebuilt = TextOnly(**model.hparams)
    assert isinstance(rebuilt.loss, WeightedSum) and rebuilt.loss.config() == loss.config()
    assert rebuilt.loss.losses[0].temperature == 0.3 and rebuilt.loss.weights == [2.0]
