"""Speech adapter for late fusion: layer fusion -> 1-D conv downsampler -> projector (plain nn.Modules).

Masks travel through every step: padded frames are zeroed before each convolution, so a frame's
output depends only on its own clip, and the downsampled mask marks which outputs are real.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from errors import ConfigError

FUSIONS = ("concat", "weighted_sum")
OUTPUTS = ("embedding", "token_mixture")


def validate_fusion(mode: str, key: str) -> None:
    """Raises a ConfigError naming ``key`` unless ``mode`` is a known layer fusion."""
    if mode not in FUSIONS:
        raise ConfigError(f"{key}={mode!r} is unknown; choose one of {list(FUSIONS)}.")


@dataclass
class AdapterConfig:
    """Shape of the trainable bridge from speech-encoder states to the LLM's input embeddings."""

    fusion: str = "concat"
    """'concat': all selected layers side by side (the paper); 'weighted_sum': learned softmax weights."""
    conv_channels: int = 1024
    """Output channels of the downsampling convolution."""
    kernel_size: int = 3
    """Frames seen by each downsampler output."""
    stride: int = 2
    """Downsampling factor along time (50 Hz HuBERT frames / 2 = 25 speech tokens per second)."""
    projector_hidden: int | None = None
    """Hidden width of a 2-layer MLP projector; None: a single Linear."""
    output: str = "embedding"
    """'embedding': the projector's output is the speech token (the paper: any vector of the LLM's
    input space). 'token_mixture': the projector predicts a distribution over the LLM's vocabulary
    and the speech token is that mixture of the (frozen) token embeddings, so every speech token
    starts inside the region the LLM was trained to read. It costs a ``[batch, speech tokens,
    vocabulary]`` tensor: cheap for small vocabularies (the demo's 1.1k), 7.3 GB in float32 for
    the real recipe's batch of 16 clips of 30 s (25 speech tokens/s) with Qwen3's 152k."""

    @classmethod
    def coerce(cls, value: AdapterConfig | dict | None) -> AdapterConfig:
        if value is None:
            return cls()
        return value if isinstance(value, cls) else cls(**dict(value))

    def __post_init__(self):
        validate_fusion(self.fusion, key="adapter.fusion")
        if self.output not in OUTPUTS:
            raise ConfigError(f"adapter.output={self.output!r} is unknown; choose one of {list(OUTPUTS)}.")
        if self.stride < 1 or self.kernel_size < 1:
            raise ConfigError(
                f"adapter.stride={self.stride} and adapter.kernel_size={self.kernel_size} must be >= 1."
            )


class LayerFusion(nn.Module):
    """Several ``[B, T, H]`` layers -> one ``[B, T, F]`` sequence (F = L*H for concat, H for a sum)."""

    def __init__(self, mode: str, num_layers: int, hidden_size: int):
        super().__init__()
        self.mode = mode
        if mode == "weighted_sum":
            self.layer_logits = nn.Parameter(torch.zeros(num_layers))  # starts as the plain mean
        self.output_size = hidden_size * num_layers if mode == "concat" else hidden_size

    def forward(self, layers: list[torch.Tensor]) -> torch.Tensor:
        if self.mode == "concat":
            return torch.cat(layers, dim=-1)
        weights = torch.softmax(self.layer_logits, dim=0).to(layers[0].dtype)
        return torch.einsum("l,lbth->bth", weights, torch.stack(layers))


class ConvDownsampler(nn.Module):
    """LayerNorm, then a strided Conv1d over time with GELU; returns the new frames and their mask."""

    def __init__(self, input_size: int, channels: int, kernel_size: int, stride: int):
        super().__init__()
        # Fused layers have very different scales (early vs late transformer layers); normalize first.
        self.norm = nn.LayerNorm(input_size)
        self.padding = kernel_size // 2
        self.kernel_size = kernel_size
        self.stride = stride
        self.conv = nn.Conv1d(input_size, channels, kernel_size, stride=stride, padding=self.padding)
        self.activation = nn.GELU()

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return (lengths + 2 * self.padding - self.kernel_size) // self.stride + 1

    def convolve(self, frames: torch.Tensor) -> torch.Tensor:
        """``self.conv`` over time, ``[B, T, C]`` -> ``[B, T', channels]``.

        On CPU as one matrix product over the unfolded windows (the same weights and sums): for
        this strided convolution oneDNN's backward is about 2x slower than the product's
        (``benchmarks/README.md``). GPUs keep cuDNN's convolution, which needs no unfolded copy.
        """
        if frames.device.type != "cpu":
            return self.conv(frames.transpose(1, 2)).transpose(1, 2)
        padded = F.pad(frames, (0, 0, self.padding, self.padding))
        windows = padded.unfold(1, self.kernel_size, self.stride)  # [B, T', C, kernel]
        weight = self.conv.weight.reshape(self.conv.out_channels, -1)  # [channels, C * kernel]
        return F.linear(windows.reshape(*windows.shape[:2], -1), weight, self.conv.bias)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        real = mask.unsqueeze(-1).to(frames.dtype)
        # Zero padding frames: the conv then sees the same zeros past a clip's end as it would alone.
        hidden = self.activation(self.convolve(self.norm(frames) * real))
        lengths = self.output_lengths(mask.sum(dim=1)).clamp(min=1)
        new_mask = torch.arange(hidden.shape[1], device=mask.device)[None, :] < lengths[:, None]
        return hidden * new_mask.unsqueeze(-1).to(hidden.dtype), new_mask.to(torch.long)


class Projector(nn.Module):
    """Downsampled speech frames -> the LLM's input-embedding space."""

    def __init__(self, input_size: int, output_size: int, hidden_size: int | None = None):
        super().__init__()
        if hidden_size is None:
            self.layers = nn.Linear(input_size, output_size)
        else:
            self.layers = nn.Sequential(
                nn.Linear(input_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, output_size)
            )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.layers(frames)


class SpeechAdapter(nn.Module):
    """Selected speech-encoder layers + frame mask -> LLM-space speech tokens + token mask."""

    def __init__(
        self,
        config: AdapterConfig,
        num_layers: int,
        speech_hidden: int,
        llm_hidden: int,
        vocabulary_size: int | None = None,
    ):
        super().__init__()
        self.output = config.output
        if self.output == "token_mixture" and vocabulary_size is None:
            raise ValueError("adapter.output='token_mixture' needs the LLM's vocabulary_size.")
        self.fusion = LayerFusion(config.fusion, num_layers, speech_hidden)
        self.downsampler = ConvDownsampler(
            self.fusion.output_size, config.conv_channels, config.kernel_size, config.stride
        )
        width = vocabulary_size if self.output == "token_mixture" else llm_hidden
        self.projector = Projector(config.conv_channels, width, config.projector_hidden)

    def forward(
        self,
        layers: list[torch.Tensor],
        frame_mask: torch.Tensor,
        token_embeddings: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``token_embeddings [vocabulary, llm_hidden]``: the LLM's input embedding table, needed by
        the ``token_mixture`` output (passed in, not stored: it stays the LLM's own, frozen weight)."""
        # A frozen encoder loaded in bf16 feeds a float32 adapter: compute in the adapter's dtype.
        fused = self.fusion([layer.to(self.downsampler.norm.weight.dtype) for layer in layers])
        frames, mask = self.downsampler(fused, frame_mask)
        projected = self.projector(frames)
        if self.output == "embedding":
            return projected, mask
        if token_embeddings is None:
            raise ValueError("adapter.output='token_mixture' needs the LLM's token_embeddings.")
        weights = torch.softmax(projected.float(), dim=-1).to(token_embeddings.dtype)
        return weights @ token_embeddings, mask
