"""Unit fusion: units as new tokens of the LLM, a codebook fitted on training audio at the start,
nothing frozen moving, and checkpoints that hold the codebook and the trained rows only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from speech_inputs import DIMS, sample_clips, speech_text_batch
from trainers import quiet_cpu_trainer

from datamodules.audio import AudioSettings
from datamodules.pairs import StreamingPairDataModule
from errors import ConfigError
from lightning_modules import UnitFusion
from lightning_modules.components.text_encoder import LoraSettings, TextEncoderConfig
from lightning_modules.components.unit_tokenizer import PAD_UNIT, UnitCodebook, UnitSettings, fit_codebook
from lightning_modules.losses import MatryoshkaInfoNCE


def _model(text_model, speech_model, **units) -> UnitFusion:
    torch.manual_seed(0)
    return UnitFusion(
        TextEncoderConfig(str(text_model), lora=LoraSettings(r=4, dropout=0.0)),
        {"pretrained_model_name_or_path": str(speech_model)},
        units={"size": 8, "layer": 1, "pool": 2} | units,
        matryoshka_dims=DIMS,
        loss=MatryoshkaInfoNCE(temperature=1.0, symmetric=True),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    )


def _batch(text_model, speech_model):
    batch = speech_text_batch(text_model, speech_model)
    text = StreamingPairDataModule(str(text_model)).batches
    batch["document"] = text.documents(["kër gi", "ndox mi tàng na", "xale yi dem nañu"])
    batch["ids"] = ["a", "b", "c"]
    return batch


def _fit_codebook_on(model, batch) -> None:
    frames, mask = model._layer_frames(batch["query_audio"])
    from lightning_modules.components.unit_tokenizer import pool_frames, sample_frames

    frames = sample_frames([pool_frames(frames, mask, 2)], 1000)
    model._use_codebook(fit_codebook(frames, 8, model.unit_settings))


def test_units_are_new_tokens_and_nothing_frozen_moves(tiny_text_model, tiny_speech_model):
    model = _model(tiny_text_model, tiny_speech_model)
    batch = _batch(tiny_text_model, tiny_speech_model)
    with pytest.raises(RuntimeError, match="not fitted"):
        model.training_loss(batch)
    _fit_codebook_on(model, batch)
    units, mask = model.query_units(batch)
    assert units[mask.bool()].min() >= 0 and (units[~mask.bool()] == PAD_UNIT).all()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    table = model.text_encoder.embedding_table().detach().clone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "unit_embeddings.weight" in trainable and any("lora_" in n for n in trainable)
    assert not any(n.startswith("speech_encoder") for n in trainable)
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    rows_before = model.unit_embeddings.weight.detach().clone()
    for _ in range(3):  # weight decay and Adam moments would move anything in the optimizer
        optimizer.zero_grad()
        model.training_loss(batch).backward()
        optimizer.step()
    for name, value in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
    assert torch.equal(model.text_encoder.embedding_table(), table)  # the LLM's own vocabulary
    used = units[mask.bool()].unique()
    moved = (model.unit_embeddings.weight - rows_before).abs().sum(dim=1) > 0
    assert moved[used].all()


def test_new_rows_start_at_the_scale_of_the_llms_table(tiny_text_model, tiny_speech_model):
    model = _model(tiny_text_model, tiny_speech_model, size=4000)
    table = model.text_encoder.embedding_table().float()
    rows = model.unit_embeddings.weight.detach()
    assert torch.allclose(rows.mean(dim=0), table.mean(dim=0), atol=0.1 * float(table.std()))
    assert abs(float(rows.std()) / float(table.std()) - 1) < 0.1


def test_a_clip_embeds_the_same_alone_and_batched(tiny_text_model, tiny_speech_model):
    model = _model(tiny_text_model, tiny_speech_model).eval()
    batch = _batch(tiny_text_model, tiny_speech_model)
    _fit_codebook_on(model, batch)
    from speech_inputs import query_batch

    tasks = ["transcription_retrieval"] * 3
    with torch.no_grad():
        alone = model.embed_queries(
            query_batch(tiny_text_model, tiny_speech_model, sample_clips()[:1], tasks[:1])
        )
        batched = model.embed_queries(query_batch(tiny_text_model, tiny_speech_model, sample_clips(), tasks))
    for dim in DIMS:
        assert (alone[dim][0] - batched[dim][0]).abs().max() < 1e-4, dim


def test_a_saved_codebook_is_checked_against_the_model(tiny_text_model, tiny_speech_model, tmp_path):
    wrong_width = UnitCodebook(np.zeros((8, 5), dtype=np.float32), UnitSettings(layer=1, pool=2)).save(
        tmp_path / "a"
    )
    with pytest.raises(ConfigError, match="needs"):
        _model(tiny_text_model, tiny_speech_model, codebook=str(wrong_width))
    with pytest.raises(ConfigError, match="frozen speech tower"):
        UnitFusion(
            TextEncoderConfig(str(tiny_text_model)),
            {"pretrained_model_name_or_path": str(tiny_speech_model), "freeze": False},
            matryoshka_dims=DIMS,
        )


def test_fit_fits_the_codebook_on_training_audio_and_checkpoints_it(
    tiny_text_model, tiny_speech_model, speech_corpus_dir, tmp_path
):
    model = _model(tiny_text_model, tiny_speech_model, fit_rows=32, fit_frames=2000)
    data = StreamingPairDataModule(
        str(tiny_text_model),
        train_data=str(speech_corpus_dir / "train"),
        eval_sets={"demo": str(speech_corpus_dir / "eval" / "demo")},
        audio=AudioSettings(feature_extractor=str(tiny_speech_model), min_duration=0.5),
        batch_size=8,
    )
    trainer = quiet_cpu_trainer(
        max_steps=2, default_root_dir=tmp_path, enable_checkpointing=False, limit_val_batches=0
    )
    trainer.fit(model, data)
    assert bool(model.codebook_ready) and model.unit_centroids.abs().sum() > 0
    metrics = trainer.callback_metrics  # unit usage, logged each step
    assert 0 < float(metrics["train/units_used_share"]) <= 1
    # pool 2, no collapsing: ceil(n / 2) units of n 20 ms frames, 25-25.5 a second for clips of
    # 50 frames or more
    assert 25 <= float(metrics["train/units_per_second"]) <= 25.5
    saved = UnitCodebook.load(tmp_path / "units")
    assert torch.equal(saved.centroids, model.unit_centroids) and saved.settings == model.unit_settings
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(state["unit_centroids"], model.unit_centroids) and "unit_embeddings.weight" in state
    assert any("lora_" in key for key in state)
    assert not any(key.startswith("speech_encoder.") for key in state)  # frozen towers are not saved
    restored = _model(tiny_text_model, tiny_speech_model, fit_rows=32, fit_frames=2000)
    restored.load_state_dict(state, strict=False)
    assert bool(restored.codebook_ready) and torch.equal(restored.unit_centroids, model.unit_centroids)

    # predict writes each eval query's units, the ones its embedding was computed from
    quiet_cpu_trainer(default_root_dir=tmp_path / "predict").predict(model, data)
    import json

    lines = [json.loads(line) for line in (tmp_path / "predict" / "units" / "demo.queries.jsonl").open()]
    queries = data.eval_sets["demo"].queries
    assert [line["id"] for line in lines] == [query["id"] for query in queries]
    first = data.batches.eval_batch([(0, queries[0])], "demo", "queries")
    units, mask = model.eval().query_units(first)
    assert lines[0]["units"] == units[0, mask[0].bool()].tolist() and all(
        0 <= u < 8 for u in lines[0]["units"]
    )


@pytest.mark.slow  # Qwen3-0.6B and HuBERT-base shapes with random weights: about a minute on 2 cores
def test_one_training_step_at_the_real_recipes_shapes(tiny_text_model, tmp_path):
    from datamodules.demo.assets import save_real_size_models

    text_dir, speech_dir = save_real_size_models(tmp_path, tiny_text_model)
    model = UnitFusion(
        TextEncoderConfig(str(text_dir), lora=LoraSettings(r=16, dropout=0.0)),
        {"pretrained_model_name_or_path": str(speech_dir)},
        units={"size": 1024, "pool": 2},  # layer: the middle of HuBERT-base's 12
        adapt_documents=False,
        matryoshka_dims=[128, 256, 512, 1024],
        loss=MatryoshkaInfoNCE(symmetric=True),
    )
    assert model.unit_settings.layer == 6 and model.speech_encoder.hidden_size == 768
    assert model.unit_embeddings.weight.shape == (1024, 1024)
    rng = np.random.default_rng(0)
    model._use_codebook(UnitCodebook(rng.normal(size=(1024, 768)).astype(np.float32), model.unit_settings))
    batch = _batch(text_dir, speech_dir)
    loss = model.training_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.unit_embeddings.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.speech_encoder.parameters())


def test_the_unit_cache_gives_the_same_losses_and_skips_the_speech_tower(tiny_text_model, tiny_speech_model):
    """Batches that repeat clips in other company: with the cache, a batch of clips seen before
    runs no speech tower, and every loss equals the uncached model's."""
    from speech_inputs import query_batch

    text = StreamingPairDataModule(str(tiny_text_model)).batches
    clips, documents = sample_clips(), ["kër gi", "ndox mi tàng na", "xale yi dem nañu"]

    def batch_of(order):
        batch = query_batch(
            tiny_text_model, tiny_speech_model, [clips[i] for i in order], ["document_retrieval"] * len(order)
        )
        batch["document"] = text.documents([documents[i] for i in order])
        batch["ids"] = [str(i) for i in order]
        return batch

    batches = [batch_of([0, 1, 2]), batch_of([2, 0]), batch_of([1, 2, 0])]
    cached, uncached = (_model(tiny_text_model, tiny_speech_model, cache=c) for c in (True, False))
    _fit_codebook_on(cached, _batch(tiny_text_model, tiny_speech_model))
    uncached._use_codebook(cached.codebook())
    tower_runs = []
    cached.speech_encoder.register_forward_hook(lambda *args: tower_runs.append(1))
    for batch in batches:
        with torch.no_grad():
            assert torch.equal(cached.training_loss(batch), uncached.training_loss(batch))
    assert len(tower_runs) == 1 and len(cached.unit_cache) == 3 and not uncached.unit_cache


def test_units_of_layer_zero_read_the_same_states_as_the_whole_tower(tiny_speech_model):
    """Layer 0 alone (the demo's choice): the tower keeps one layer, since w2v-BERT cut to none
    returns no hidden states, and layer 0's states are the whole tower's."""
    from transformers import AutoFeatureExtractor

    from datamodules.audio import pad_waveforms
    from lightning_modules.components.speech_encoder import SpeechEncoder, SpeechEncoderConfig

    alone = SpeechEncoder(SpeechEncoderConfig(str(tiny_speech_model), layers=[0])).eval()
    whole = SpeechEncoder(SpeechEncoderConfig(str(tiny_speech_model), layers=[0, 1, 2])).eval()
    audio = pad_waveforms(AutoFeatureExtractor.from_pretrained(tiny_speech_model), sample_clips())
    with torch.no_grad():
        assert torch.equal(alone(**audio).hidden_states[0], whole(**audio).hidden_states[0])


@pytest.mark.integration  # three short fits on the demo's speech corpus
def test_a_resumed_run_is_the_same_run_with_the_checkpoints_codebook(
    tiny_text_model, tiny_speech_model, speech_corpus_dir, tmp_path
):
    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(root, steps, ckpt_path=None, callbacks=()):
        seed_everything(0)
        model = _model(tiny_text_model, tiny_speech_model, fit_rows=32, fit_frames=2000)
        data = StreamingPairDataModule(
            str(tiny_text_model),
            train_data=str(speech_corpus_dir / "train"),
            audio=AudioSettings(feature_extractor=str(tiny_speech_model), min_duration=0.5),
            batch_size=8,
            shuffle_block_size=32,
        )
        trainer = quiet_cpu_trainer(
            max_steps=steps, default_root_dir=root, limit_val_batches=0, callbacks=list(callbacks)
        )
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model

    straight = fit(tmp_path / "straight", 4)
    every_step = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1, save_top_k=-1)
    fit(tmp_path / "first", 2, callbacks=[every_step])
    resumed = fit(tmp_path / "second", 4, ckpt_path=tmp_path / "checkpoints" / "epoch=0-step=2.ckpt")
    assert not (tmp_path / "second" / "units").exists()  # the checkpoint's codebook, not a new one
    assert torch.equal(resumed.unit_centroids, straight.unit_centroids)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        if a.requires_grad:
            assert torch.allclose(a, b, atol=1e-6, rtol=0), name
