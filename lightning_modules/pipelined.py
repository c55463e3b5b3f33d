"""Pipelined: the cascade baseline. Speech recognition, then the text embedder.

Query: waveform -> any ``transformers`` ASR model (CTC or sequence-to-sequence,
``components/speech_recognizer.py``) -> transcript -> formatted with its task prompt and tokenized
by the data's text batch builder (the text stage's tokenizer, exactly as a written query) ->
``TextOnly.embed_queries``. Documents go through the same text model, as in ``TextOnly``. The
eval queries' own transcriptions (their ``text``) never reach the model: the evaluator compares
them with the transcripts (CER/WER beside nDCG).

Evaluation-only: validate, test and predict; ``predict`` also writes each eval query's transcript
to ``<run>/transcripts/<eval set>.queries.jsonl``. A transcript the ASR leaves empty is embedded
as an empty query with its prompt (the prompt alone), like any other: it is scored, not dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from callbacks.query_records import write_query_records
from errors import ConfigError
from lightning_modules.components.speech_recognizer import SpeechRecognizer, SpeechRecognizerConfig
from lightning_modules.components.text_encoder import TextEncoderConfig
from lightning_modules.text_only import TextOnly

log = logging.getLogger(__name__)


def text_query_builder(datamodule):
    """The datamodule's text batch builder (prompts, tokenizer, query length), which formats and
    tokenizes written queries; a speech datamodule wraps it as ``.text``."""
    batches = getattr(datamodule, "batches", None)
    builder = getattr(batches, "text", batches)
    if builder is None or not hasattr(builder, "queries"):
        raise ConfigError(
            f"Pipelined needs the datamodule's text batches to embed its transcripts; "
            f"{type(datamodule).__name__} has none (use datamodules.StreamingPairDataModule)."
        )
    return builder


def check_feature_extractor(data_extractor, recognizer: SpeechRecognizer) -> None:
    """The data's audio must be prepared by the recognizer's own feature extractor."""
    name = recognizer.config.pretrained_model_name_or_path
    if data_extractor is None:
        raise ConfigError(
            f"Pipelined transcribes spoken queries: set data.init_args.audio (its feature_extractor: {name})."
        )
    own = getattr(recognizer.processor, "feature_extractor", None)
    if own is not None and data_extractor.to_dict() != own.to_dict():
        raise ConfigError(
            f"data.init_args.audio.feature_extractor is not the speech recognizer's ({name}): set it to "
            f"{name} (the recipes write ${{model.init_args.asr.pretrained_model_name_or_path}})."
        )


class Pipelined(TextOnly):
    """Spoken queries transcribed by an ASR model, then embedded as written queries by the text stage."""

    def __init__(self, text_encoder: TextEncoderConfig, asr: SpeechRecognizerConfig, **kwargs):
        """
        Args:
            text_encoder: The text Matryoshka embedder (e.g. the exported text-only stage).
            asr: The speech recognizer (CTC or sequence-to-sequence, by name or folder) and its
                generation settings.
        """
        super().__init__(text_encoder, **kwargs)
        self.asr = SpeechRecognizer(SpeechRecognizerConfig.coerce(asr))
        self.freeze_tower("asr")
        self.freeze_tower("text_encoder")
        self.text_queries = None  # the data's TextBatchBuilder, set at setup (or by hand, without a Trainer)
        self.last_transcripts: list[str] = []
        self._predicted: dict[str, dict[int, str]] = {}

    def setup(self, stage: str) -> None:
        if stage == "fit":
            raise ConfigError(
                "Pipelined is evaluation-only (a trained ASR model, then a trained text stage): run "
                "validate, test or predict. Train the text stage with TextOnly (configs/text_only.yaml) "
                "and a CTC ASR with lightning_modules.AsrCtc (configs/asr_ctc.yaml)."
            )
        data = self.trainer.datamodule
        self.text_queries = text_query_builder(data)
        check_feature_extractor(getattr(data.batches, "feature_extractor", None), self.asr)

    @property
    def document_tower_frozen(self) -> bool:
        return True

    def document_tower(self) -> torch.nn.Module:
        return self.text_encoder

    def transcribe(self, batch: Mapping) -> list[str]:
        """The ASR's transcript of each clip of the batch's ``query_audio``."""
        return self.asr(batch["query_audio"])

    def embed_queries(self, batch: Mapping) -> dict[int, torch.Tensor]:
        if self.text_queries is None:
            raise ConfigError(
                "Pipelined.text_queries is not set: it is the datamodule's text batch builder, set at "
                "setup (without a Trainer: model.text_queries = text_query_builder(datamodule))."
            )
        self.last_transcripts = self.transcribe(batch)
        tasks = batch.get("tasks") or [None] * len(self.last_transcripts)
        tokens = self.text_queries.queries(self.last_transcripts, tasks)
        query_text = {key: value.to(self.device) for key, value in tokens.items()}
        return super().embed_queries({"query_text": query_text})

    def evaluation_step(self, batch: Mapping, batch_idx: int = 0, dataloader_idx: int = 0) -> dict:
        """The embeddings, and for query batches each query's transcript (the evaluator's CER/WER)."""
        outputs = super().evaluation_step(batch, batch_idx, dataloader_idx)
        if batch["side"] == "queries":
            outputs["transcripts"] = list(self.last_transcripts)
        return outputs

    validation_step = test_step = evaluation_step

    # ----- predict: the transcripts on disk beside the embeddings ---------------------------
    def on_predict_start(self) -> None:
        self._predicted = {}

    def predict_step(self, batch: Mapping, batch_idx: int = 0, dataloader_idx: int = 0) -> dict:
        outputs = self.evaluation_step(batch, batch_idx, dataloader_idx)
        if batch["side"] == "queries":
            rows = self._predicted.setdefault(batch["eval_set"], {})
            rows.update(zip(batch["index"].tolist(), outputs["transcripts"], strict=True))
        return outputs

    def on_predict_end(self) -> None:
        """Writes ``<run>/transcripts/<eval set>.queries.jsonl``: each eval query's id, its
        transcript and its reference transcription (the eval set's ``text``, where it has one)."""
        write_query_records(
            self._trainer,
            self._predicted,
            "transcripts",
            lambda row, transcript: {"id": row["id"], "transcript": transcript, "reference": row.get("text")},
        )
