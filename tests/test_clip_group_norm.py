"""GroupNorm waveform encoders batched with per-clip statistics: the reference is each clip alone."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from speech_inputs import DIMS, assert_first_query_embeds_alone_as_batched, query_batch, sample_clips
from transformers import AutoModel, Wav2Vec2Config, WavLMConfig

from lightning_modules import LateFusion
from lightning_modules.components.clip_group_norm import ClipGroupNorm, clip_group_norm
from lightning_modules.components.speech_encoder import SpeechEncoder, SpeechEncoderConfig


def _tiny_group_norm_config(config_class):
    """A wav2vec2-base-style config at test size (GroupNorm first convolution, post-norm layers)."""
    return config_class(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        conv_dim=(32, 32, 32),
        conv_kernel=(10, 3, 3),
        conv_stride=(5, 4, 4),
        feat_extract_norm="group",
        do_stable_layer_norm=False,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        mask_time_prob=0.0,
    )


FAMILIES = {"hubert": None, "wav2vec2": Wav2Vec2Config, "wavlm": WavLMConfig}


@pytest.fixture(scope="module", params=list(FAMILIES.values()), ids=list(FAMILIES))
def group_norm_encoder(request, tmp_path_factory) -> Path:
    """Each GroupNorm waveform family at test size (HuBERT: the shared fixture)."""
    if request.param is None:
        return request.getfixturevalue("group_norm_hubert")
    path = tmp_path_factory.mktemp(f"tiny-{request.param.model_type}-group-norm")
    torch.manual_seed(1)
    AutoModel.from_config(_tiny_group_norm_config(request.param)).save_pretrained(path)
    return path


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


def test_batched_with_clip_statistics_equals_each_clip_alone(group_norm_encoder):
    per_clip, batched = _encoders(group_norm_encoder)
    values, mask = _clips_with_noisy_padding()
    with torch.no_grad():
        reference = per_clip(attention_mask=mask, input_values=values)
        states = batched(attention_mask=mask, input_values=values)
        # Plain padding (the norm's statistics over the whole padded row) shifts the short clip.
        plain = batched.model(values, attention_mask=mask, output_hidden_states=True).hidden_states
    assert torch.equal(states.frame_mask, reference.frame_mask)
    frames = reference.frame_mask.sum(dim=1).tolist()
    for layer, (expected, got) in enumerate(zip(reference.hidden_states, states.hidden_states, strict=True)):
        scale = float(expected.abs().max())
        for row, n in enumerate(frames):
            error = float((got[row, :n] - expected[row, :n]).abs().max()) / scale
            assert error <= 1e-4, (layer, row)  # float rounding of differently shaped products
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
    assert got.dtype == reference.dtype
    n = int(per_clip.frame_lengths(mask.sum(dim=1))[0])
    # bf16 rounding of differently shaped products; the plain padded norm is off by > 1e-1 here.
    assert (got[0, :n].float() - reference[0, :n].float()).abs().max() <= 3e-2 * reference.abs().max()


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
    assert isinstance(torch.load(buffer, weights_only=False), ClipGroupNorm)
    assert SpeechEncoder(SpeechEncoderConfig(str(layer_norm_hubert))).clip_norm is None


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
