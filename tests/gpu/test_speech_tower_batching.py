"""GroupNorm speech towers (HuBERT-base style) batched with per-clip norm statistics, the default
on a GPU, against each clip run alone: float32 and under bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch
from bf16_error import PRODUCT, TAIL, autocast
from speech_inputs import sample_clips

from lightning_modules.components.speech_encoder import SpeechEncoder, SpeechEncoderConfig


def _encoders(path):
    """The same tower clip by clip and batched with per-clip statistics."""
    per_clip = SpeechEncoder(SpeechEncoderConfig(str(path), per_utterance=True))
    batched = SpeechEncoder(SpeechEncoderConfig(str(path), per_utterance=False))
    batched.load_state_dict(per_clip.state_dict())
    return per_clip.eval(), batched.eval()


def _clips_with_noisy_padding():
    """Three clips of 0.5-1 s, right-padded with loud noise (a result must not depend on it)."""
    clips = [torch.from_numpy(clip) for clip in sample_clips()]
    values = 3 * torch.randn(len(clips), max(map(len, clips)), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(values.shape, dtype=torch.long)
    for row, clip in enumerate(clips):
        values[row, : len(clip)], mask[row, : len(clip)] = clip, 1
    return values, mask


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16-autocast"])
def test_batched_group_norm_tower_equals_each_clip_alone(device, group_norm_hubert, figure, bf16):
    per_clip, batched = (encoder.to(device) for encoder in _encoders(group_norm_hubert))
    assert not batched.runs_clip_by_clip(device) and batched.clip_norm is not None
    values, mask = (tensor.to(device) for tensor in _clips_with_noisy_padding())
    with torch.no_grad(), autocast(device, enabled=bf16):
        reference = per_clip(attention_mask=mask, input_values=values)
        states = batched(attention_mask=mask, input_values=values)
        plain = batched.model(values, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    frames = reference.frame_mask.sum(dim=1).tolist()
    # The tiny HuBERT: 3 convolutions, the projection, the positional convolution, 2 layers of 6.
    products = 3 + 1 + 1 + 2 * 6
    # Two bf16 runs of differently shaped products, each within the path's bound of float32;
    # float32 alone: the CPU tests' 1e-4 of the largest value (summation order only).
    bound = 2 * TAIL * PRODUCT * math.sqrt(products) if bf16 else 1e-4
    expected, got = reference.hidden_states[-1].float(), states.hidden_states[-1].float()
    scale = float(expected.abs().max())
    error = max(float((got[row, :n] - expected[row, :n]).abs().max()) / scale for row, n in enumerate(frames))
    figure("batched vs each clip alone, max error / max value", error, bound)
    # What per-clip statistics are for: plain padding moves the short clip far beyond that.
    shift = float((plain[0, : frames[0]].float() - expected[0, : frames[0]]).abs().max()) / scale
    assert shift > 3 * bound, shift
