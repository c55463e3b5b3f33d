"""Batched GroupNorm waveform encoders whose output does not depend on the batch's padding.

HuBERT-base, wav2vec2-base and WavLM-base (``feat_extract_norm="group"``) normalize each channel
of their first convolution's output over the whole clip. Padded to a batch, the statistics take
in the padding, and a clip is encoded differently next to longer clips. Everything after that
norm is padding-invariant for a clip's own frames:
- the later convolutions have no padding, and a clip's frames (``_get_feat_extract_output_lengths``)
  are exactly those whose receptive field lies inside the clip;
- the transformer zeroes padded frames before its positional convolution (as the convolution's
  own zero padding does for a clip alone) and masks them out of attention.
So taking that one norm's statistics over each clip's own frames makes the batched encoder
compute what it computes for each clip alone (in training, SpecAugment's spans are then drawn per
clip by ``SpeechEncoder``, as for each clip alone). ``ClipGroupNorm`` runs the module's own
GroupNorm on each clip's frames (the same kernel, dtype and autocast policy as a clip alone).

Only the families checked to be padding-invariant after that norm are converted (``FAMILIES``):
Wav2Vec2-Conformer's convolution module reads padded frames, so it keeps running one clip at a
time (SEW and SEW-D, which also pool the padding mask with their frames, are refused outright).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

# transformers model types whose encoder is padding-invariant after the first norm (module docstring).
FAMILIES = {"hubert", "wav2vec2", "wavlm", "unispeech", "unispeech-sat"}


class ClipGroupNorm(nn.GroupNorm):
    """A GroupNorm that, while ``frame_lengths`` is set, normalizes each row over its own frames."""

    frame_lengths: list[int] | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.frame_lengths is None:
            return super().forward(hidden_states)
        rows, _, longest = hidden_states.shape
        if len(self.frame_lengths) != rows or not all(0 < n <= longest for n in self.frame_lengths):
            raise ValueError(
                f"frame lengths {self.frame_lengths} do not fit a batch of shape {tuple(hidden_states.shape)}"
            )
        output = None
        for row, n in enumerate(self.frame_lengths):
            normalized = super().forward(hidden_states[row : row + 1, :, :n])
            if output is None:  # the norm's output dtype (float32 under CUDA autocast, as for a clip alone)
                output = normalized.new_zeros(hidden_states.shape)
            output[row, :, :n] = normalized[0]
        return output


def clip_group_norm(model: nn.Module) -> ClipGroupNorm | None:
    """The waveform encoder's first-layer GroupNorm, turned into a ``ClipGroupNorm`` in place.

    The module keeps its parameters and state-dict names (only its class changes); calling again
    returns the same module. None when the model has no such norm (LayerNorm or filterbank
    encoders) or is not of a family known to be padding-invariant after it (``FAMILIES``).
    """
    if getattr(model.config, "model_type", None) not in FAMILIES:
        return None
    layers = getattr(getattr(model, "feature_extractor", None), "conv_layers", None)
    norm = getattr(layers[0], "layer_norm", None) if layers else None
    if not isinstance(norm, nn.GroupNorm):
        return None
    if type(norm) is nn.GroupNorm:
        norm.__class__ = ClipGroupNorm
    return norm if isinstance(norm, ClipGroupNorm) else None


def first_convolution_lengths(model: nn.Module, input_lengths: list[int]) -> list[int]:
    """Frames of the first convolution's output for clips of ``input_lengths`` samples."""
    conv = model.feature_extractor.conv_layers[0].conv
    (kernel,), (stride,), (padding,), (dilation,) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    span = dilation * (kernel - 1) + 1
    return [(n + 2 * padding - span) // stride + 1 for n in input_lengths]


@contextlib.contextmanager
def statistics_per_clip(norm: ClipGroupNorm, frame_lengths: list[int]) -> Iterator[None]:
    """Within the block, ``norm`` normalizes row ``i`` over its first ``frame_lengths[i]`` frames."""
    norm.frame_lengths = list(frame_lengths)
    try:
        yield
    finally:
        norm.frame_lengths = None
