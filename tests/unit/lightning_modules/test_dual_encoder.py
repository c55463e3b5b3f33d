"""Dual encoders: masked pooling, per-dim heads, the alignment objective, and model swapping by config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from demo_recipes import DEMO_MODELS, ROOT, model_section, recipe_without_model
from speech_inputs import (
    DIMS,
    assert_first_query_embeds_alone_as_batched,
    query_batch,
    sample_clips,
    speech_text_batch,
)
from transformers import AutoConfig, AutoTokenizer

from cli import cli_main
from datamodules.text_batches import PromptConfig, TextBatchBuilder
from errors import ConfigError
from lightning_modules import DualEncoder
from lightning_modules.components.matryoshka import MatryoshkaHeads
from lightning_modules.components.pooling import AttentionPooling
from lightning_modules.losses import MatryoshkaInfoNCE, TranscriptionAlignment, matryoshka_alignment_loss


def _model(text_model, speech_model, **kwargs) -> DualEncoder:
    torch.manual_seed(0)
    speech = {"pretrained_model_name_or_path": str(speech_model), "freeze": False}
    return DualEncoder(
        text_encoder={"pretrained_model_name_or_path": str(text_model)},
        speech_encoder=speech,
        matryoshka_dims=DIMS,
        **kwargs,
    )


def test_attention_pooling_ignores_padded_frames():
    torch.manual_seed(0)
    pooling = AttentionPooling(hidden_size=16, num_heads=4)
    frames = torch.randn(1, 7, 16)
    alone = pooling(frames, torch.ones(1, 7, dtype=torch.long))
    padded = torch.cat([frames, 50 * torch.randn(1, 5, 16)], dim=1)  # loud garbage after the end
    batch = torch.cat([padded, torch.randn(1, 12, 16)])
    mask = torch.tensor([[1] * 7 + [0] * 5, [1] * 12])
    assert (pooling(batch, mask)[0] - alone[0]).abs().max() < 1e-6


def test_matryoshka_heads_are_separate_projections_not_slices():
    torch.manual_seed(0)
    heads = MatryoshkaHeads(input_size=8, dims=[4, 8])
    out = heads(torch.randn(3, 8))
    assert {d: tuple(v.shape) for d, v in out.items()} == {4: (3, 4), 8: (3, 8)}
    assert torch.allclose(out[8].norm(dim=-1), torch.ones(3))
    assert not torch.allclose(out[4], F.normalize(out[8][:, :4], dim=-1))


@pytest.mark.parametrize("speech_fixture", ["tiny_speech_model", "layer_norm_hubert", "group_norm_hubert"])
def test_query_embedding_is_the_same_alone_or_batched_with_longer_clips(
    request, tiny_text_model, speech_fixture
):
    speech_model = request.getfixturevalue(speech_fixture)
    model = _model(tiny_text_model, speech_model).eval()
    assert_first_query_embeds_alone_as_batched(
        model, tiny_text_model, speech_model, ["document_retrieval"] * 3
    )


def test_alignment_loss_is_zero_exactly_at_the_targets_and_matches_a_direct_computation():
    torch.manual_seed(0)
    targets = {d: F.normalize(torch.randn(5, d), dim=-1) for d in (4, 8)}
    same = {d: t.clone() for d, t in targets.items()}
    assert matryoshka_alignment_loss(same, targets).item() < 1e-6
    queries = {d: torch.randn(5, d) for d in (4, 8)}
    reference = 0.0
    for d in (4, 8):
        q = F.normalize(queries[d], dim=-1)
        reference += (1 - F.cosine_similarity(q, targets[d])).mean() + F.l1_loss(q, targets[d])
    loss = matryoshka_alignment_loss(queries, targets)
    assert loss.item() > 0.1
    assert torch.allclose(loss, reference, atol=1e-6)
    # Anything but the target costs something: a small nudge of one query of one dim.
    nudged = {d: t.clone() for d, t in targets.items()}
    nudged[4][0, 0] += 1e-2
    assert matryoshka_alignment_loss(nudged, targets).item() > 1e-4


def test_alignment_gradient_reaches_the_speech_side_only(tiny_text_model, tiny_speech_model):
    model = _model(tiny_text_model, tiny_speech_model, loss=TranscriptionAlignment())
    model.train()
    assert not model.text_encoder.training
    # Even a text tower that could take gradients gets none: the targets are computed without them.
    model.text_encoder.requires_grad_(True)
    loss = model.training_loss(speech_text_batch(tiny_text_model, tiny_speech_model))
    loss.backward()
    for name, parameter in model.named_parameters():
        if name.startswith("text_encoder."):
            assert parameter.grad is None, name
    for prefix in ("heads.", "pooling.", "norm.", "speech_encoder.model.encoder."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None for g in grads), prefix
        assert sum(g.abs().sum() for g in grads) > 0, prefix


def test_alignment_without_transcriptions_names_the_problem(tiny_text_model, tiny_speech_model):
    model = _model(tiny_text_model, tiny_speech_model, loss=TranscriptionAlignment())
    batch = query_batch(tiny_text_model, tiny_speech_model, sample_clips(), ["document_retrieval"] * 3)
    with pytest.raises(ValueError, match="transcription"):
        model.training_loss(batch)


def test_symmetric_retrieval_adds_the_document_to_query_direction(tiny_text_model, tiny_speech_model):
    model = _model(
        tiny_text_model, tiny_speech_model, loss=MatryoshkaInfoNCE(temperature=0.5, symmetric=True)
    ).eval()
    batch = speech_text_batch(tiny_text_model, tiny_speech_model)
    text = TextBatchBuilder(AutoTokenizer.from_pretrained(tiny_text_model), PromptConfig(), 64, 64, {})
    batch["document"] = text.documents(["teere bi", "kër gi ak ndox", "xale yi dem"])
    batch["ids"] = ["a", "b", "c"]
    with torch.no_grad():
        loss = model.training_loss(batch)
        queries, documents = model.embed_queries(batch), model.embed_documents(batch)
    targets = torch.arange(3)
    expected = 0.0
    for dim in DIMS:
        similarity = F.normalize(queries[dim], dim=-1) @ F.normalize(documents[dim], dim=-1).T / 0.5
        expected += (F.cross_entropy(similarity, targets) + F.cross_entropy(similarity.T, targets)) / 2
    assert torch.allclose(loss, expected, atol=1e-6)


def test_a_loss_the_model_cannot_feed_is_a_config_error(tiny_text_model):
    from lightning_modules import TextOnly

    # TextOnly has no speech query to align to a transcription: refused when built, not mid-run.
    with pytest.raises(ConfigError, match="aligns to transcriptions"):
        TextOnly({"pretrained_model_name_or_path": str(tiny_text_model)}, loss=TranscriptionAlignment())
    with pytest.raises(ConfigError, match=r"dim_weights names dims \[48\]"):
        TextOnly(
            {"pretrained_model_name_or_path": str(tiny_text_model)},
            matryoshka_dims=DIMS,
            loss=MatryoshkaInfoNCE(dim_weights={48: 2.0}),
        )


def test_text_tower_stays_frozen_and_out_of_the_checkpoint(tiny_text_model, tiny_speech_model):
    model = _model(tiny_text_model, tiny_speech_model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert not any(name.startswith("text_encoder.") for name in trainable)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == trainable


@pytest.mark.integration
def test_models_swap_by_config_on_one_datamodule_and_one_callback_list(demo_dir, tmp_path, monkeypatch):
    """Every demo model runs on the late-fusion recipe's data and callbacks; only ``--model`` changes."""
    monkeypatch.chdir(ROOT)
    shared_file = recipe_without_model("late_fusion.yaml", tmp_path / "trainer-and-data.yaml")
    tags = {}
    for recipe in DEMO_MODELS:
        run_dir = tmp_path / recipe.removesuffix(".yaml")
        model_file = model_section(recipe, tmp_path / f"model-{recipe}", max_steps=2)
        cli = cli_main(
            [
                "fit",
                f"--config={shared_file}",
                f"--model={model_file}",
                f"--trainer.default_root_dir={run_dir}",
                "--trainer.max_steps=2",
                "--trainer.val_check_interval=2",
                "--trainer.enable_progress_bar=false",
                "--data.init_args.batch_size=8",
            ]
        )
        assert type(cli.model).__name__ == yaml.safe_load(model_file.read_text())["class_path"].split(".")[-1]
        assert cli.trainer.global_step == 2
        tags[recipe] = sorted(k for k in cli.trainer.callback_metrics if k.startswith("val/"))
    expected = tags["late_fusion.yaml"]
    assert all(f"val/demo/ndcg@10/d{d}" in expected for d in DIMS)
    assert all(value == expected for value in tags.values()), tags


@pytest.mark.parametrize("layers", [[0, 1], None], ids=["lower-layers", "every-layer"])
@pytest.mark.parametrize("speech_fixture", ["tiny_speech_model", "layer_norm_hubert", "group_norm_hubert"])
def test_a_training_tower_trains_exactly_what_its_selected_layers_read(request, speech_fixture, layers):
    """A weight without a gradient makes DDP (find_unused_parameters off) fail at the first step.
    What the selection does not read is dropped (the layers above it) or frozen (a pre-norm
    model's final norm, read by no hidden state even with every layer selected), and nothing it
    reads is frozen."""
    from transformers import AutoFeatureExtractor

    from datamodules.audio import pad_waveforms
    from lightning_modules.components.speech_encoder import SpeechEncoder, SpeechEncoderConfig

    path = str(request.getfixturevalue(speech_fixture))
    torch.manual_seed(0)
    encoder = SpeechEncoder(
        SpeechEncoderConfig(path, layers=layers, freeze=False, freeze_feature_encoder=False)
    )
    layers_run = len(encoder.model.encoder.layers)
    assert layers_run == (1 if layers else AutoConfig.from_pretrained(path).num_hidden_layers) > 0
    frozen = {name for name, p in encoder.named_parameters() if not p.requires_grad}
    assert all("encoder.layer_norm" in name for name in frozen)

    encoder.requires_grad_(True)  # which parameters does the selection really reach?
    inputs = pad_waveforms(AutoFeatureExtractor.from_pretrained(path), sample_clips())
    states = encoder(**inputs)
    sum(layer.sum() for layer in states.hidden_states).backward()
    unreached = {name for name, p in encoder.named_parameters() if p.grad is None or not p.grad.any()}
    assert frozen == unreached


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "training"])
@pytest.mark.parametrize("speech_fixture", ["tiny_speech_model", "layer_norm_hubert", "group_norm_hubert"])
def test_layers_above_the_selection_are_dropped_and_the_selected_states_unchanged(
    request, speech_fixture, freeze
):
    """The cut tower returns the very states the whole model's forward gives at the selected layers."""
    from transformers import AutoFeatureExtractor, AutoModel

    from datamodules.audio import pad_waveforms
    from lightning_modules.components.speech_encoder import SpeechEncoder, SpeechEncoderConfig

    path = str(request.getfixturevalue(speech_fixture))
    whole = AutoModel.from_pretrained(path).eval()
    assert whole.config.num_hidden_layers == 2
    encoder = SpeechEncoder(
        SpeechEncoderConfig(path, layers=[1, 0], freeze=freeze, per_utterance=True)
    ).eval()
    assert len(encoder.model.encoder.layers) == encoder.model.config.num_hidden_layers == 1
    for clip in sample_clips():
        inputs = pad_waveforms(AutoFeatureExtractor.from_pretrained(path), [clip])
        (values,) = (v for k, v in inputs.items() if k != "attention_mask")
        with torch.no_grad():
            expected = whole(values, output_hidden_states=True).hidden_states
            states = encoder(**inputs).hidden_states
        assert torch.equal(states[0], expected[1]) and torch.equal(states[1], expected[0])
