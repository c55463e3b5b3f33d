"""Any ``transformers`` speech recognizer, by name or folder, transcribing padded batches (no Lightning).

Two kinds, told apart by the model's config:
- CTC models (wav2vec2 / w2v-BERT / HuBERT CTC, ``AutoModelForCTC``): greedy decoding, the most
  likely token per frame; frames past a clip's end are set to the blank (the tokenizer's pad) so
  the processor's ``batch_decode`` (which collapses repeats and drops blanks) sees each clip as if
  it were alone;
- sequence-to-sequence models (Whisper, Speech2Text, ``AutoModelForSpeechSeq2Seq``): ``generate``
  with the settings in ``generation`` (e.g. ``num_beams``, ``max_new_tokens``, Whisper's
  ``language`` and ``task``), then the processor's ``batch_decode``.

The batch is the datamodule's ``query_audio``, made by the feature extractor of the same folder
(recipes name it as ``data.init_args.audio.feature_extractor``). A model whose feature extractor
does not return an attention mask (wav2vec2-base: GroupNorm over time, where padding changes the
output) runs a padded batch clip by clip, so a batch transcribes exactly as its clips would alone
(Whisper's extractor pads every clip to 30 s itself: nothing is padded, the batch runs whole).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from errors import ConfigError
from lightning_modules.components.text_encoder import DTYPES

KINDS = ("auto", "ctc", "seq2seq")


@dataclass
class SpeechRecognizerConfig:
    """Which speech recognizer transcribes the queries, and how it decodes."""

    pretrained_model_name_or_path: str
    """Hub name or local folder of a CTC or sequence-to-sequence ASR model with its processor."""
    kind: str = "auto"
    """'ctc', 'seq2seq', or 'auto': from the model's config (encoder-decoder models are seq2seq)."""
    generation: dict = field(default_factory=dict)
    """Sequence-to-sequence only: keyword arguments of ``generate`` (num_beams, max_new_tokens,
    language, task, ...)."""
    dtype: str | None = None
    """Weights dtype at load time: float32, bfloat16 or float16 (None: float32)."""

    @classmethod
    def coerce(cls, value: SpeechRecognizerConfig | Mapping) -> SpeechRecognizerConfig:
        return value if isinstance(value, cls) else cls(**dict(value))

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"asr.kind={self.kind!r} is unknown; choose one of {list(KINDS)}.")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"asr.dtype={self.dtype!r} is unknown; choose one of {sorted(DTYPES)}.")
        if self.generation and self.kind == "ctc":
            raise ConfigError(
                "asr.generation is for sequence-to-sequence models; a CTC model decodes greedily."
            )


def recognizer_kind(model_config, kind: str = "auto") -> str:
    """'ctc' or 'seq2seq' for a transformers model config (``kind`` other than auto: as told)."""
    if kind != "auto":
        return kind
    from transformers.models.auto.modeling_auto import MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES

    seq2seq = model_config.model_type in MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES
    return "seq2seq" if seq2seq or getattr(model_config, "is_encoder_decoder", False) else "ctc"


def ctc_frame_lengths(model, input_lengths: torch.Tensor) -> torch.Tensor:
    """Logit frames a CTC model makes of clips of these input lengths (samples or filterbank frames),
    after its adapter if it has one (the logits come after it)."""
    return model._get_feat_extract_output_lengths(input_lengths).to(torch.long)


def greedy_ctc_ids(logits: torch.Tensor, frame_lengths: torch.Tensor, blank_id: int) -> torch.Tensor:
    """The most likely token per frame ``[B, T]``, the blank past each clip's last frame."""
    ids = logits.argmax(dim=-1)
    frames = torch.arange(ids.shape[1], device=ids.device)[None, :]
    return ids.masked_fill(frames >= frame_lengths.to(ids.device)[:, None], blank_id)


class SpeechRecognizer(nn.Module):
    """Transcribes a padded audio batch (``input_values``/``input_features`` + ``attention_mask``)."""

    def __init__(self, config: SpeechRecognizerConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCTC, AutoModelForSpeechSeq2Seq, AutoProcessor

        self.config = config
        name = config.pretrained_model_name_or_path
        self.kind = recognizer_kind(AutoConfig.from_pretrained(name), config.kind)
        if self.kind == "ctc" and config.generation:
            raise ConfigError("asr.generation is for sequence-to-sequence models; this one is a CTC model.")
        loader = AutoModelForCTC if self.kind == "ctc" else AutoModelForSpeechSeq2Seq
        kwargs = {} if config.dtype is None else {"dtype": DTYPES[config.dtype]}
        self.model = loader.from_pretrained(name, **kwargs).eval()
        self.processor = AutoProcessor.from_pretrained(name)
        extractor = getattr(self.processor, "feature_extractor", self.processor)
        # Without an attention mask from its own extractor, padding would change the output.
        self.masked = "attention_mask" in extractor.model_input_names and getattr(
            extractor, "return_attention_mask", True
        )

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @torch.no_grad()
    def forward(self, audio: Mapping[str, torch.Tensor]) -> list[str]:
        """One transcript per clip of the batch."""
        if self.masked or bool(audio["attention_mask"].all()):  # masked, or nothing padded (Whisper)
            return self._transcribe(audio)
        # Clip by clip, each cut to its own length.
        transcripts = []
        lengths = audio["attention_mask"].sum(dim=1).tolist()
        for row, length in enumerate(lengths):
            alone = {key: value[row : row + 1, :length] for key, value in audio.items()}
            transcripts += self._transcribe(alone)
        return transcripts

    def _transcribe(self, audio: Mapping[str, torch.Tensor]) -> list[str]:
        dtype = next(self.model.parameters()).dtype
        inputs = {
            key: value.to(dtype) if value.is_floating_point() else value
            for key, value in audio.items()
            if key != "attention_mask" or self.masked
        }
        if self.kind == "ctc":
            logits = self.model(**inputs).logits
            lengths = ctc_frame_lengths(self.model, audio["attention_mask"].sum(dim=1))
            ids = greedy_ctc_ids(logits, lengths, self.tokenizer.pad_token_id)
            return self.processor.batch_decode(ids)
        generated = self.model.generate(**inputs, **self.config.generation)
        sequences = getattr(generated, "sequences", generated)
        return self.processor.batch_decode(sequences, skip_special_tokens=True)
