"""Speech encoder over ``transformers.AutoModel`` audio models (HuBERT / wav2vec2 family).

Returns every layer's hidden states with the frame-level mask (plain nn.Module, no Lightning).
The reference code gave its speech encoder no attention mask; here the mask always travels.
Two input kinds are served: waveform models (HuBERT, wav2vec2, WavLM: ``input_values``, a
convolutional feature encoder sets the frame rate) and filterbank models (w2v-BERT 2.0:
``input_features``, one hidden state per input frame).

Padding invariance: models whose convolutional feature encoder uses GroupNorm
(``feat_extract_norm="group"``: HuBERT-base, wav2vec2-base, WavLM-base) normalize every channel
over the whole clip, padding included, so a plainly padded clip is encoded differently from the
same clip alone (transformers documents this). Batched, their norm takes each clip's statistics
over its own frames (``clip_group_norm.py``), which gives what each clip gives alone. On CPU they
run one clip at a time by default instead: there batching saves little and computes the padding
(``benchmarks/speech_tower_batching.py``: 1.02-1.06x on clips of equal length, 0.49-0.56x on
3-10 s). On a GPU one clip at a time means a forward, with its hundreds of kernel launches, per
clip; batching is the default there (not yet measured on a GPU). Models with per-frame
LayerNorm (``"layer"``: HuBERT-large, wav2vec2-large-lv60) and w2v-BERT (the demo model) run
batched with the mask everywhere. Other families (data2vec-audio, wav2vec2-conformer) let padded
frames into real ones through their convolutions even with the mask, so they always run one clip
at a time. SEW and SEW-D squeeze their hidden states below the feature encoder's frame rate, which
no frame mask fits: they are refused at start-up. While the tower trains, SpecAugment's time
masks are drawn per clip within its own frames (``_time_masks_per_clip``), so a batched clip is
masked as it is alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from errors import ConfigError
from lightning_modules.components.clip_group_norm import (
    FAMILIES,
    clip_group_norm,
    first_convolution_lengths,
    statistics_per_clip,
)
from lightning_modules.components.text_encoder import DTYPES, checkpointing_activations
from lightning_modules.components.transformers_internals import speech_frame_lengths

log = logging.getLogger(__name__)

# transformers model types whose batched output (with the mask) is each clip's own: checked in
# tests/unit/lightning_modules/test_clip_group_norm.py against clips run alone. The GroupNorm ones
# need clip_group_norm.
BATCHED_FAMILIES = FAMILIES | {"wav2vec2-bert"}


@dataclass
class SpeechEncoderConfig:
    """Which pretrained speech model to load, which layers to expose and what trains."""

    pretrained_model_name_or_path: str
    """Hub name or local folder (e.g. facebook/hubert-base-ls960, a Wolof HuBERT)."""
    layers: list[int] | None = None
    """Hidden-state indices to expose (0 = input to the first transformer layer); None: every layer
    1..L. The layers above the highest index are not run (nor loaded into the optimizer)."""
    dtype: str | None = None
    """Weights dtype at load time: float32, bfloat16 or float16 (None: float32)."""
    freeze: bool = True
    """Keep the whole speech model frozen (eval mode, no gradients): the late-fusion recipe."""
    freeze_feature_encoder: bool = True
    """When the model trains, keep its convolutional waveform encoder frozen (the usual practice)."""
    per_utterance: bool | None = None
    """Encode clips one at a time (true) or batched (false); None: one at a time only for GroupNorm
    encoders on CPU. Families that cannot batch exactly always run one at a time (module docstring)."""

    @classmethod
    def coerce(cls, value: SpeechEncoderConfig | dict) -> SpeechEncoderConfig:
        return value if isinstance(value, cls) else cls(**dict(value))

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(
                f"speech_encoder.dtype={self.dtype!r} is unknown; choose one of {sorted(DTYPES)}."
            )


@dataclass
class SpeechStates:
    """Selected hidden states ``[B, T, H]`` each, and the frame mask ``[B, T]`` (1 = real frame)."""

    hidden_states: list[torch.Tensor]
    frame_mask: torch.Tensor


class SpeechEncoder(nn.Module):
    def __init__(self, config: SpeechEncoderConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.config = config
        name = config.pretrained_model_name_or_path
        model_config = AutoConfig.from_pretrained(name)
        if getattr(model_config, "squeeze_factor", 1) != 1:  # checked before the weights load
            raise ConfigError(
                f"speech_encoder {name!r} ({model_config.model_type}) squeezes its hidden states to "
                f"1/{model_config.squeeze_factor} of its feature encoder's frame rate, so no frame mask "
                "fits them: use a HuBERT / wav2vec2 / WavLM / w2v-BERT checkpoint."
            )
        # LayerDrop skips whole layers while training, which would drop entries of the hidden
        # states the adapter reads; the layer selection needs every layer every step.
        if hasattr(model_config, "layerdrop"):
            model_config.layerdrop = 0.0
        kwargs = {} if config.dtype is None else {"dtype": DTYPES[config.dtype]}
        self.model = AutoModel.from_pretrained(name, config=model_config, **kwargs)
        if not hasattr(self.model, "_get_feat_extract_output_lengths"):
            raise ConfigError(
                f"speech_encoder {config.pretrained_model_name_or_path!r} ({type(self.model).__name__}) "
                "is not a HuBERT/wav2vec2-family encoder (waveform or w2v-BERT filterbank input)."
            )
        available = model_config.num_hidden_layers + 1
        self.layers = list(config.layers) if config.layers is not None else list(range(1, available))
        bad = [i for i in self.layers if not 0 <= i < available]
        if bad or not self.layers:
            raise ConfigError(
                f"speech_encoder.layers={config.layers}: indices must lie in 0..{available - 1} "
                f"({model_config.num_hidden_layers} layers; 0 is the input to the first)."
            )
        # None: decided per device (runs_clip_by_clip). A family not known to batch exactly (or a
        # GroupNorm model whose norm clip_group_norm does not find) always runs clip by clip.
        group_norm = getattr(model_config, "feat_extract_norm", None) == "group"
        exact = model_config.model_type in BATCHED_FAMILIES and not (group_norm and self.clip_norm is None)
        if not exact and config.per_utterance is False:
            log.warning(
                "speech_encoder.per_utterance=false ignored: %s batches are not exact (padding reaches "
                "real frames), so clips run one at a time.",
                model_config.model_type,
            )
        self.per_utterance = config.per_utterance if exact else True
        if config.freeze:
            self.model.requires_grad_(False)
        elif config.freeze_feature_encoder and hasattr(self.model, "feature_extractor"):
            self.model.feature_extractor.requires_grad_(False)  # filterbank models have none
        self._drop_layers_above_the_selection()
        if not config.freeze:
            self._freeze_what_the_selection_does_not_read()
        self.model.train(not config.freeze)

    def _probe_states(self) -> list[torch.Tensor]:
        """The selected hidden states of a fixed one-second probe input (eval mode, no random draw)."""
        config = self.model.config
        if self.model.main_input_name == "input_features":  # filterbank frames (w2v-BERT)
            frames = torch.arange(100 * config.feature_projection_input_dim, dtype=torch.float32)
            probe = torch.sin(frames / 7.0).reshape(1, 100, -1)
        else:  # a 16 kHz waveform
            probe = 0.1 * torch.sin(torch.arange(16_000, dtype=torch.float32) / 7.0)[None]
        training = self.model.training
        self.model.eval()
        try:
            return self._run(probe.to(self.model.dtype), None)
        finally:
            self.model.train(training)

    def _drop_layers_above_the_selection(self) -> None:
        """Removes the transformer layers above the highest selected one: no selected state reads
        them, yet they would run at every forward (half the tower's time for a middle layer).

        Kept only if the cut model gives the same selected states as the whole one on a probe
        input: in transformers 5 every family's ``hidden_states[i]`` is layer ``i``'s raw output,
        so the cut is exact, while transformers 4 applied a pre-norm model's final norm to the
        last entry, which the cut would then move onto the selection's top layer.
        """
        encoder = getattr(self.model, "encoder", None)
        layers = getattr(encoder, "layers", None)
        # At least one layer stays: some families return no hidden states at all without one
        # (w2v-BERT with layers: [0], the projected features alone).
        top = max(1, max(self.layers))
        if not isinstance(layers, nn.ModuleList) or top >= len(layers):
            return
        with torch.no_grad():
            whole = self._probe_states()
            encoder.layers = layers[:top]
            cut = self._probe_states()
        if not all(torch.equal(a, b) for a, b in zip(whole, cut, strict=True)):
            encoder.layers = layers
            log.info(
                "speech_encoder.layers=%s: every layer runs (this model's states change when cut).",
                self.layers,
            )
            return
        self.model.config.num_hidden_layers = top  # what is left, should the model be saved
        log.info(
            "speech_encoder.layers=%s: the %d layers above layer %d are dropped (nothing reads them).",
            self.layers,
            len(layers) - top,
            top,
        )

    def _freeze_what_the_selection_does_not_read(self) -> None:
        """Freezes the trainable weights that no selected state depends on, found by one backward
        pass over the probe: DDP (find_unused_parameters=False) refuses a weight without a gradient
        at the first step. In transformers 5 a pre-norm model's (XLS-R, HuBERT-large) final norm is
        one, whichever layers are selected: it shapes ``last_hidden_state``, not ``hidden_states``.
        ``masked_spec_embed`` stays trainable when training draws time masks (it fills them), which
        the probe, in eval mode, does not."""
        config = self.model.config
        time_masked = (
            getattr(config, "apply_spec_augment", False) and getattr(config, "mask_time_prob", 0) > 0
        )
        trainable = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        with torch.enable_grad():
            torch.stack([state.sum() for state in self._probe_states()]).sum().backward()
        unread = [
            name
            for name, p in trainable.items()
            if p.grad is None and not (time_masked and name.endswith("masked_spec_embed"))
        ]
        for p in trainable.values():
            p.grad = None
        for name in unread:
            trainable[name].requires_grad_(False)
        if unread:
            log.info(
                "speech_encoder: %d weights no selected layer reads stay frozen: %s", len(unread), unread
            )

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def frozen(self) -> bool:
        return self.config.freeze

    def train(self, mode: bool = True):
        # A frozen tower stays in eval mode (no dropout) when Lightning calls model.train().
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def frame_lengths(self, input_lengths: torch.Tensor) -> torch.Tensor:
        """Hidden-state frames per clip, from its input length (samples or filterbank frames)."""
        return speech_frame_lengths(self.model, input_lengths)

    @property
    def clip_norm(self):
        """The waveform encoder's GroupNorm, made per-clip (None: no GroupNorm). Not a submodule
        of this one: registering it twice would put its weights twice in the state dict."""
        return clip_group_norm(self.model)

    def runs_clip_by_clip(self, device: torch.device) -> bool:
        """Whether a batch on ``device`` is encoded one clip at a time (see module docstring)."""
        if self.per_utterance is not None:
            return self.per_utterance
        return self.clip_norm is not None and device.type == "cpu"

    def _norm_recomputed_in_backward(self) -> bool:
        # Checkpointed layers rerun in backward, after the per-clip lengths are gone: the norm
        # would then see the padding, and the gradients would silently differ.
        return torch.is_grad_enabled() and self.model.training and checkpointing_activations(self.model)

    def _run(
        self, inputs: torch.Tensor, attention_mask: torch.Tensor | None, mask_time_indices=None
    ) -> list[torch.Tensor]:
        extra = {} if mask_time_indices is None else {"mask_time_indices": mask_time_indices}
        output = self.model(inputs, attention_mask=attention_mask, output_hidden_states=True, **extra)
        return [output.hidden_states[i] for i in self.layers]

    def _time_masks_per_clip(self, frame_mask: torch.Tensor) -> torch.Tensor | None:
        """SpecAugment's time mask for a training batch, drawn within each clip's own frames.

        HuBERT's forward draws it over the padded length (it does not pass the mask on): spans
        land in the padding, and a short clip beside a long one loses its ``mask_time_min_masks``
        spans. Drawn here with the frame mask, every family masks a clip in a batch as it masks
        the clip alone (None: no time masking now, i.e. eval mode or switched off).
        """
        config = self.model.config
        if not (self.model.training and getattr(config, "apply_spec_augment", False)):
            return None
        if getattr(config, "mask_time_prob", 0.0) <= 0:
            return None
        from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

        mask = _compute_mask_indices(
            tuple(frame_mask.shape),
            mask_prob=config.mask_time_prob,
            mask_length=config.mask_time_length,
            attention_mask=frame_mask,
            min_masks=config.mask_time_min_masks,
        )
        return torch.from_numpy(mask).to(frame_mask.device)

    def forward(self, attention_mask: torch.Tensor, **inputs: torch.Tensor) -> SpeechStates:
        """``attention_mask`` over the input, plus ``input_values`` or ``input_features``."""
        if len(inputs) != 1:
            raise ValueError(f"expected input_values or input_features, got {sorted(inputs)}")
        (values,) = inputs.values()
        values = values.to(self.model.dtype)
        input_lengths = attention_mask.sum(dim=1)
        frame_lengths = self.frame_lengths(input_lengths)
        # One copy of the lengths to the host (a sync on a GPU) serves the checks and the paths.
        samples, frames = input_lengths.tolist(), frame_lengths.tolist()
        short = [row for row, n in enumerate(frames) if n < 1]
        if short:
            raise ValueError(
                f"clips {short} of the batch ({[samples[row] for row in short]} input samples or frames) "
                "are shorter than the speech model's receptive field: they have no frame to encode "
                "(data.audio.min_duration keeps them out of training data)."
            )
        # [B, frames] (1 = real frame): the SpecAugment draw and the returned states share it.
        positions = torch.arange(max(frames), device=frame_lengths.device)
        frame_mask = (positions[None, :] < frame_lengths[:, None]).long()
        norm = self.clip_norm
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.runs_clip_by_clip(values.device) or (
                norm is not None and self._norm_recomputed_in_backward()
            ):
                rows = [self._run(values[i : i + 1, :n], None) for i, n in enumerate(samples)]
                hidden_states = [
                    _pad_rows([row[layer][0] for row in rows]) for layer in range(len(self.layers))
                ]
            else:
                time_masks = self._time_masks_per_clip(frame_mask)
                if norm is not None:
                    with statistics_per_clip(norm, first_convolution_lengths(self.model, samples)):
                        hidden_states = self._run(values, attention_mask, time_masks)
                else:
                    hidden_states = self._run(values, attention_mask, time_masks)
        longest = hidden_states[0].shape[1]
        if longest != max(frames):
            raise ConfigError(
                f"speech_encoder {self.config.pretrained_model_name_or_path!r} returned {longest} frames "
                f"where its output-length formula gives {max(frames)}: its hidden states are not at its "
                "feature encoder's frame rate (SEW squeezes them), so no frame mask fits them."
            )
        return SpeechStates(hidden_states, frame_mask)


def _pad_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stacks ``[T_i, H]`` rows into ``[B, max T, H]`` with zeros after each row's end."""
    return nn.utils.rnn.pad_sequence(rows, batch_first=True)
