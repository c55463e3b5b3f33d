"""A CTC speech recognizer to train: the ASR of the pipelined baseline, for languages that have none.

Model: a speech encoder with a linear CTC head over characters (``transformers``' ``*ForCTC``:
wav2vec2, HuBERT, w2v-BERT), either random-init from ``architecture`` (the demo: a tiny w2v-BERT
over filterbanks) or a pretrained encoder by name with a new head (``speech_model``). Its
characters (``Wav2Vec2CTCTokenizer``: blank = the pad token, ``|`` between words) come from the
training transcriptions when training starts, unless ``vocabulary`` names them; they are saved
with the hyperparameters, so a checkpoint rebuilds the same head.

Training reads the datamodule's speech batches (``query_audio`` and each row's transcription,
``transcriptions``); the loss is the model's own CTC loss (``torch.nn.functional.ctc_loss``, mean
over target lengths). Validation transcribes the eval sets' queries (greedy decoding through the
tokenizer's ``batch_decode``) and the evaluator logs ``val/<eval set>/cer`` and ``/wer`` against
their transcriptions: the eval queries, never the training clips. At the end of fit the best
checkpoint's model (lowest CER in the recipes) and its processor are written as a
``from_pretrained`` folder (``export_dir``) that ``Pipelined``'s ``asr`` names.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from callbacks.export import best_weights, was_preempted
from callbacks.model_callbacks import every_run_callbacks
from callbacks.training_guards import BatchGuard, skipped_step
from errors import ConfigError
from lightning_modules.components.speech_recognizer import ctc_frame_lengths, greedy_ctc_ids
from lightning_modules.schedules import optimizer_config

log = logging.getLogger(__name__)

BLANK, UNKNOWN, WORD_DELIMITER = "<pad>", "<unk>", "|"


def character_vocabulary(transcriptions: Iterable[str]) -> list[str]:
    """The sorted characters of the transcriptions, a space standing for the word delimiter."""
    characters = set()
    for text in transcriptions:
        if isinstance(text, str):
            characters.update(text.strip())
    characters.discard(" ")
    return sorted(characters)


def ctc_tokenizer(vocabulary: Sequence[str]):
    """A ``Wav2Vec2CTCTokenizer`` over ``vocabulary``: blank (pad) 0, unknown 1, word delimiter 2."""
    from transformers import Wav2Vec2CTCTokenizer

    tokens = [BLANK, UNKNOWN, WORD_DELIMITER, *vocabulary]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "vocab.json"
        path.write_text(json.dumps({token: i for i, token in enumerate(tokens)}), encoding="utf-8")
        # No sentence start and end tokens: a CTC head predicts characters, blanks and word breaks only.
        return Wav2Vec2CTCTokenizer(
            str(path),
            bos_token=None,
            eos_token=None,
            unk_token=UNKNOWN,
            pad_token=BLANK,
            word_delimiter_token=WORD_DELIMITER,
            do_lower_case=False,
        )


def ctc_labels(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Token ids of each transcription ``[B, L]``, -100 past its end (the CTC models' label padding)."""
    encoded = tokenizer(list(texts), padding=True, return_tensors="pt")
    return encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)


class CtcLoss(nn.Module):
    """The model's own CTC loss on a batch's audio and transcriptions (a batch must hold both)."""

    needs = frozenset({"transcriptions"})  # the datamodule then drops rows without one

    def forward(
        self, model: nn.Module, audio: Mapping[str, torch.Tensor], labels: torch.Tensor
    ) -> torch.Tensor:
        return model(**audio, labels=labels).loss


class AsrCtc(LightningModule):
    """Trains a CTC speech recognizer (characters) and exports it for ``Pipelined``."""

    def __init__(
        self,
        architecture: dict | None = None,
        speech_model: str | None = None,
        vocabulary: list[str] | None = None,
        freeze_feature_encoder: bool = True,
        export_dir: str | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        """
        Args:
            architecture: A random-init encoder's transformers config: ``model_type`` (e.g.
                ``wav2vec2-bert``, ``wav2vec2``) and its settings (hidden_size, num_hidden_layers, ...).
            speech_model: Or a pretrained speech encoder by name or folder (e.g.
                facebook/w2v-bert-2.0, facebook/wav2vec2-xls-r-300m), given a new CTC head.
            vocabulary: The characters the head predicts (None: those of the training transcriptions,
                read when fit starts).
            freeze_feature_encoder: With a pretrained waveform model, keep its convolutional
                feature encoder frozen (the usual CTC fine-tuning practice).
            export_dir: Where fit's model (the best checkpoint's weights, by the run's
                ``best_checkpoint.monitor``; the last without one) and processor are written as a
                from_pretrained folder (None: not exported; a preempted fit does not export).
            optimizer: Optimizer factory called on the parameters (default AdamW, lr 1e-4).
            lr_scheduler: Optional scheduler factory called on the optimizer, stepped every step.
        """
        super().__init__()
        if (architecture is None) == (speech_model is None):
            raise ConfigError(
                "model.architecture (a random-init encoder) or model.speech_model (a pretrained one): "
                "set exactly one."
            )
        if architecture is not None and "model_type" not in architecture:
            raise ConfigError("model.architecture needs a model_type, e.g. wav2vec2-bert or wav2vec2.")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.loss = CtcLoss()
        self.guard = BatchGuard()
        self.model = None
        self.tokenizer = None
        if vocabulary is not None:
            self._build(vocabulary)

    # ----- the model, once its characters are known ------------------------------------------
    def _build(self, vocabulary: Sequence[str]) -> None:
        from transformers import AutoConfig, AutoModelForCTC

        if not vocabulary:
            raise ConfigError("model.vocabulary is empty: the CTC head needs at least one character.")
        self.tokenizer = ctc_tokenizer(vocabulary)
        self.hparams["vocabulary"] = list(vocabulary)
        head = {
            "vocab_size": len(self.tokenizer),
            "pad_token_id": self.tokenizer.pad_token_id,
            "ctc_loss_reduction": "mean",
            "ctc_zero_infinity": True,  # a clip too short for its transcription adds nothing, not inf
        }
        if self.hparams.architecture is not None:
            settings = dict(self.hparams.architecture)
            config = AutoConfig.for_model(settings.pop("model_type"), **settings, **head)
            self.model = AutoModelForCTC.from_config(config)
        else:
            self.model = AutoModelForCTC.from_pretrained(
                self.hparams.speech_model, ignore_mismatched_sizes=True, layerdrop=0.0, **head
            )
            if self.hparams.freeze_feature_encoder and hasattr(self.model, "freeze_feature_encoder"):
                self.model.freeze_feature_encoder()
        self.model.train()

    def setup(self, stage: str) -> None:
        if self.model is not None:
            return
        data = self.trainer.datamodule
        if stage != "fit" or not hasattr(data, "training_transcriptions"):
            raise ConfigError(
                "AsrCtc has no vocabulary: fit it on data with transcriptions, or name its characters "
                "(model.vocabulary) or load a checkpoint of a fitted one (--ckpt_path)."
            )
        vocabulary = character_vocabulary(data.training_transcriptions())
        log.info(
            "AsrCtc: %d characters from the training transcriptions: %s", len(vocabulary), "".join(vocabulary)
        )
        self._build(vocabulary)

    # ----- training ---------------------------------------------------------------------------
    def training_loss(self, batch: Mapping) -> torch.Tensor:
        labels = ctc_labels(self.tokenizer, batch["transcriptions"]).to(self.device)
        return self.loss(self.model, batch["query_audio"], labels)

    def training_step(self, batch: Mapping, batch_idx: int):
        # Both checks are collectives: under DDP every rank skips the step or none does.
        if not self.guard.usable(batch, 1, self.device):
            return skipped_step(self.device)
        loss = self.training_loss(batch)
        if not self.guard.finite(loss, batch):
            return skipped_step(self.device)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["ids"]), sync_dist=True)
        return loss

    # ----- evaluation: transcripts out; the evaluator scores them ---------------------------
    @torch.no_grad()
    def transcribe(self, batch: Mapping) -> list[str]:
        """Greedy CTC transcripts of the batch's ``query_audio`` (each clip as if alone)."""
        audio = batch["query_audio"]
        logits = self.model(**audio).logits
        lengths = ctc_frame_lengths(self.model, audio["attention_mask"].sum(dim=1))
        return self.tokenizer.batch_decode(greedy_ctc_ids(logits, lengths, self.tokenizer.pad_token_id))

    def evaluation_step(self, batch: Mapping, batch_idx: int = 0, dataloader_idx: int = 0) -> dict | None:
        if batch["side"] != "queries":
            return None
        index = batch["index"].cpu()
        return {
            "eval_set": batch["eval_set"],
            "side": "queries",
            "index": index,
            "transcripts": self.transcribe(batch),
        }

    validation_step = test_step = evaluation_step

    # ----- optimization, callbacks, export ---------------------------------------------------
    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        return optimizer_config(trainable, self.optimizer_factory, self.lr_scheduler_factory)

    def configure_callbacks(self):
        return every_run_callbacks(self.guard)

    def processor(self):
        """The model's processor: the datamodule's feature extractor and the CTC tokenizer."""
        from transformers import Wav2Vec2BertProcessor, Wav2Vec2Processor

        extractor = self.trainer.datamodule.batches.feature_extractor
        bert = self.model.config.model_type == "wav2vec2-bert"
        return (Wav2Vec2BertProcessor if bert else Wav2Vec2Processor)(
            feature_extractor=extractor, tokenizer=self.tokenizer
        )

    def export(self, directory: str | Path) -> None:
        """Writes the model and its processor as a from_pretrained folder."""
        self.model.save_pretrained(directory)
        self.processor().save_pretrained(directory)

    @rank_zero_only
    def on_fit_end(self) -> None:
        directory = self.hparams.export_dir
        if directory is None or was_preempted(self.trainer, "the speech recognizer"):
            return
        with best_weights(self.trainer, self) as source:  # the lowest CER in the recipes
            self.export(directory)
        log.info("Exported the speech recognizer (%s) to %s (Pipelined's asr names it).", source, directory)
