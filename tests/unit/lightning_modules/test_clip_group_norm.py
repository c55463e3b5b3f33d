"""Speech towers batched exactly: each family batched (GroupNorm ones with per-clip statistics)
against each clip run alone, and the families that cannot be batched exactly run clip by clip."""

from __future__ import annotations

import copy
import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from speech_inputs import DIMS, assert_first_query_embeds_alone_as_batched, query_batch, sample_clips
from transformers import (
    AutoModel,
    Data2VecAudioConfig,
    HubertConfig,
    SEWConfig,
    SEWDConfig,
    UniSpeechConfig,
    UniSpeechSatConfig,
    Wav2Vec2Config,
    Wav2Vec2ConformerConfig,
    WavLMConfig,
)

from errors import ConfigError
from lightning_modules import LateFusion
from lightning_modules.components.clip_group_norm import ClipGroupNorm, clip_group_norm
from lightning_modules.components.speech_encoder import SpeechEncoder, SpeechEncoderConfig


def _tiny_config(config_class, norm: str = "group"):
    """A wav2vec2-style config at test size: base-style (GroupNorm first convolution, post-norm
    layers) or large-style (``norm="layer"``: LayerNorm in every convolution, pre-norm layers)."""
    return config_class(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        conv_dim=(32, 32, 32),
        conv_kernel=(10, 3, 3),
        conv_stride=(5, 4, 4),
        feat_extract_norm=norm,
        do_stable_layer_norm=norm == "layer",
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        mask_time_prob=0.0,
    )


BATCHED = {  # every family in speech_encoder.BATCHED_FAMILIES with a convolutional front
    "hubert-group": None,  # the shared fixture
    "wav2vec2-group": (Wav2Vec2Config, "group"),
    "wavlm-group": (WavLMConfig, "group"),
    "unispeech-group": (UniSpeechConfig, "group"),
    "unispeech-sat-group": (UniSpeechSatConfig, "group"),
    "hubert-layer": (HubertConfig, "layer"),
    "wav2vec2-layer": (Wav2Vec2Config, "layer"),
    "wavlm-layer": (WavLMConfig, "layer"),
}


def _save(config, directory: Path) -> Path:
    torch.manual_seed(1)
    AutoModel.from_config(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=list(BATCHED.values()), ids=list(BATCHED))
def batched_family(request, tmp_path_factory) -> Path:
    if request.param is None:
        return request.getfixturevalue("group_norm_hubert")
    config_class, norm = request.param
    return _save(_tiny_config(config_class, norm), tmp_path_factory.mktemp(f"tiny-{config_class.model_type}"))


def _clips_with_noisy_padding() -> tuple[torch.Tensor, torch.Tensor]:
    """Three clips of 0.5-1 s, right-padded with loud noise (a result must not depend on it)."""
    clips = [torch.from_numpy(clip) for clip in sample_clips()]
    longest = max(len(clip) for clip in clips)
    values = 3 * torch.randn(len(clips), longest, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(len(clips), longest, dtype=torch.long)
    for row, clip in enumerate(clips):
        values[row, : len(clip)] = clip
        mask[row, : len(clip)] = 1
    return values, mask


def _encoders(path: Path, **config) -> tuple[SpeechEncoder, SpeechEncoder]:
    per_clip = SpeechEncoder(SpeechEncoderConfig(str(path), per_utterance=True, **config))
    batched = SpeechEncoder(SpeechEncoderConfig(str(path), per_utterance=False, **config))
    batched.load_state_dict(per_clip.state_dict())
    return per_clip.eval(), batched.eval()


def test_batched_equals_each_clip_alone(batched_family):
    per_clip, batched = _encoders(batched_family)
    assert batched.runs_clip_by_clip(torch.device("cpu")) is False
    values, mask = _clips_with_noisy_padding()
    with torch.no_grad():
        reference = per_clip(attention_mask=mask, input_values=values)
        states = batched(attention_mask=mask, input_values=values)
        plain = batched.model(values, attention_mask=mask, output_hidden_states=True).hidden_states
    assert torch.equal(states.frame_mask, reference.frame_mask)
    frames = reference.frame_mask.sum(dim=1).tolist()
    for layer, (expected, got) in enumerate(zip(reference.hidden_states, states.hidden_states, strict=True)):
        scale = float(expected.abs().max())
        for row, n in enumerate(frames):
            error = float((got[row, :n] - expected[row, :n]).abs().max()) / scale
            assert error <= 1e-4, (layer, row)  # float rounding of differently shaped products
    if batched.clip_norm is not None:  # plain padding (statistics over the padded row) shifts the short clip
        last, n = batched.layers[-1], frames[0]
        expected = reference.hidden_states[-1]
        assert (plain[last][0, :n] - expected[0, :n]).abs().max() > 1e-2 * expected.abs().max()


def test_gradients_of_a_training_feature_encoder_equal_each_clip_alone(group_norm_hubert):
    per_clip, batched = _encoders(group_norm_hubert, freeze=False, freeze_feature_encoder=False)
    values, mask = _clips_with_noisy_padding()
    weights = None
    for encoder in (per_clip, batched):
        states = encoder(attention_mask=mask, input_values=values)
        real = states.frame_mask[..., None].float()
        if weights is None:
            generator = torch.Generator().manual_seed(2)
            weights = [torch.randn(h.shape, generator=generator) for h in states.hidden_states]
        sum((h * w * real).sum() for h, w in zip(states.hidden_states, weights, strict=True)).backward()
    norm = clip_group_norm(batched.model)
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    for (name, a), (_, b) in zip(per_clip.named_parameters(), batched.named_parameters(), strict=True):
        if a.grad is None:
            assert b.grad is None, name
            continue
        assert (a.grad - b.grad).abs().max() <= 1e-4 * a.grad.abs().max() + 1e-7, name


def test_the_same_under_bf16_autocast(group_norm_hubert):
    per_clip, batched = _encoders(group_norm_hubert)
    values, mask = _clips_with_noisy_padding()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = per_clip(attention_mask=mask, input_values=values).hidden_states[-1]
        got = batched(attention_mask=mask, input_values=values).hidden_states[-1]
        plain = batched.model(values, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    assert got.dtype == reference.dtype
    scale = reference.abs().max()
    for row, n in enumerate(per_clip.frame_lengths(mask.sum(dim=1)).tolist()):
        # bf16 rounding of differently shaped products, well below what plain padding changes.
        assert (got[row, :n].float() - reference[row, :n].float()).abs().max() <= 3e-2 * scale, row
    assert (plain[0, : got.shape[1]].float() - reference[0].float()).abs().max() > 1e-1 * scale


def test_conversion_keeps_weights_names_and_copies(group_norm_hubert, layer_norm_hubert):
    encoder = SpeechEncoder(SpeechEncoderConfig(str(group_norm_hubert)))
    fresh = AutoModel.from_pretrained(group_norm_hubert)
    assert isinstance(encoder.clip_norm, ClipGroupNorm)
    assert clip_group_norm(encoder.model) is encoder.clip_norm
    assert list(encoder.model.state_dict()) == list(fresh.state_dict())
    assert not any(name.startswith("clip_norm") for name in encoder.state_dict())
    assert isinstance(copy.deepcopy(encoder).clip_norm, ClipGroupNorm)
    buffer = io.BytesIO()
    torch.save(encoder.clip_norm, buffer)  # HuBERT itself refuses pickling (weight-norm parametrization)
    buffer.seek(0)
    # A pickled module, not a checkpoint: only weights_only=False loads one (the point of this check).
    assert isinstance(torch.load(buffer, weights_only=False), ClipGroupNorm)
    assert SpeechEncoder(SpeechEncoderConfig(str(layer_norm_hubert))).clip_norm is None


@pytest.mark.parametrize(
    ("config_class", "norm"),
    [(Wav2Vec2ConformerConfig, "group"), (Wav2Vec2ConformerConfig, "layer"), (Data2VecAudioConfig, "layer")],
    ids=["conformer-group", "conformer-layer", "data2vec-audio"],
)
def test_families_that_let_padding_in_run_clip_by_clip(config_class, norm, tmp_path):
    """The conformer's convolution module and data2vec-audio's stacked positional convolutions
    read padded frames, mask or not."""
    per_clip, encoder = _encoders(_save(_tiny_config(config_class, norm), tmp_path))  # asked to batch
    assert encoder.clip_norm is None and encoder.runs_clip_by_clip(torch.device("cuda"))
    values, mask = _clips_with_noisy_padding()
    # Why: forced batched, the short clip's encoding moves with its padding.
    encoder.per_utterance = False
    with torch.no_grad():
        alone = per_clip(attention_mask=mask, input_values=values).hidden_states[-1]
        batched = encoder(attention_mask=mask, input_values=values).hidden_states[-1]
    n = int(per_clip.frame_lengths(mask.sum(dim=1))[0])
    assert (batched[0, :n] - alone[0, :n]).abs().max() > 1e-2 * alone.abs().max()


@pytest.mark.parametrize("config_class", [SEWConfig, SEWDConfig], ids=["sew", "sew-d"])
def test_encoders_that_squeeze_their_frames_are_refused_at_start_up(config_class, tmp_path):
    """SEW and SEW-D run their transformer at half the feature encoder's frame rate (and pool the
    padding mask with the frames): no frame mask fits their hidden states."""
    path = _save(_tiny_config(config_class), tmp_path)
    with pytest.raises(ConfigError, match="squeezes its hidden states"):
        SpeechEncoder(SpeechEncoderConfig(str(path)))


def test_checkpointed_training_runs_clip_by_clip(group_norm_hubert):
    """Checkpointed layers rerun in backward without the per-clip lengths, so they are not batched."""
    config = SpeechEncoderConfig(str(group_norm_hubert), freeze=False, freeze_feature_encoder=False)
    encoder = SpeechEncoder(dataclasses.replace(config, per_utterance=False))
    encoder.model.gradient_checkpointing_enable()
    rows = []
    encoder.model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    values, mask = _clips_with_noisy_padding()
    encoder.train()(attention_mask=mask, input_values=values)
    with torch.no_grad():
        encoder(attention_mask=mask, input_values=values)
    encoder.eval()(attention_mask=mask, input_values=values)
    assert rows == [1, 1, 1, 3, 3]


def test_a_clip_shorter_than_the_receptive_field_is_a_clear_error(group_norm_hubert):
    per_clip, batched = _encoders(group_norm_hubert)
    values, mask = _clips_with_noisy_padding()
    mask[1, 300:] = 0  # 300 samples: the first convolution spans 400
    for encoder in (per_clip, batched):
        with pytest.raises(ValueError, match=r"clips \[1\] .*\[300\].*receptive field"):
            encoder(attention_mask=mask, input_values=values)


def test_clip_by_clip_on_cpu_only_for_group_norm_encoders(
    group_norm_hubert, layer_norm_hubert, tiny_speech_model
):
    group = SpeechEncoder(SpeechEncoderConfig(str(group_norm_hubert)))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert group.runs_clip_by_clip(cpu) and not group.runs_clip_by_clip(cuda)
    for batched_everywhere in (layer_norm_hubert, tiny_speech_model):  # per-frame LayerNorm, filterbanks
        encoder = SpeechEncoder(SpeechEncoderConfig(str(batched_everywhere)))
        assert not encoder.runs_clip_by_clip(cpu) and not encoder.runs_clip_by_clip(cuda)
    forced = SpeechEncoder(SpeechEncoderConfig(str(group_norm_hubert), per_utterance=False))
    assert not forced.runs_clip_by_clip(cpu)
    calls = []
    group.model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    values, mask = _clips_with_noisy_padding()
    with torch.no_grad():
        group(attention_mask=mask, input_values=values)
    assert calls == [1, 1, 1]


def test_late_fusion_queries_batched_equal_clip_by_clip(tiny_text_model, group_norm_hubert):
    def model(per_utterance: bool) -> LateFusion:
        torch.manual_seed(0)
        return LateFusion(
            text_encoder={"pretrained_model_name_or_path": str(tiny_text_model)},
            speech_encoder={
                "pretrained_model_name_or_path": str(group_norm_hubert),
                "per_utterance": per_utterance,
            },
            adapter={"conv_channels": 32, "kernel_size": 5, "stride": 2},
            matryoshka_dims=DIMS,
        ).eval()

    batched = model(False)
    tasks = ["document_retrieval", "translation_retrieval", "transcription_retrieval"]
    assert_first_query_embeds_alone_as_batched(batched, tiny_text_model, group_norm_hubert, tasks)
    batch = query_batch(tiny_text_model, group_norm_hubert, sample_clips(), tasks)
    with torch.no_grad():
        expected = model(True).embed_queries(batch)
        got = batched.embed_queries(batch)
    for dim in DIMS:
        np.testing.assert_allclose(got[dim].numpy(), expected[dim].numpy(), atol=1e-5)
