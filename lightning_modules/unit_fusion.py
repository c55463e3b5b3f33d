"""Unit fusion: speech as discrete acoustic units, new tokens of the text LLM (arXiv 2404.01616).

Query: waveform -> frozen speech encoder, one layer's frames (frame mask) -> pooled to a lower rate
-> nearest of K k-means centroids (``components/unit_tokenizer.py``) -> one trainable embedding row
per unit -> ``[prompt | units | end token]`` into the text LLM (``speech_into_llm.py``), which
trains with LoRA or fully, or stays frozen. The unit rows live beside the LLM's own table rather
than in it: the table (possibly tied to an output head, possibly frozen) is never resized, so no
frozen weight can move through weight decay or optimizer moments of a resized vocabulary.

The codebook defines the tokens, so it is part of the model: fitted when fit (or an evaluation)
starts and none is loaded, on frames of the first ``units.fit_rows`` training clips (never an eval
set), saved under the run folder (``units/``) and in every checkpoint (buffer ``unit_centroids``);
``units.codebook`` names a saved one instead.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from callbacks.query_records import write_query_records
from errors import ConfigError
from lightning_modules.components.speech_encoder import SpeechEncoderConfig
from lightning_modules.components.text_encoder import TextEncoderConfig
from lightning_modules.components.unit_tokenizer import (
    PAD_UNIT,
    UnitCodebook,
    UnitSettings,
    fit_codebook,
    pool_frames,
    sample_frames,
)
from lightning_modules.speech_into_llm import SpeechIntoLLM

log = logging.getLogger(__name__)

FRAME_SECONDS = 0.02  # the frame period of the HuBERT / wav2vec2 / w2v-BERT families (50 Hz)


@dataclass
class UnitConfig:
    """The discrete units: where they come from and how many."""

    size: int = 1024
    """K, the number of units (the paper: 1024)."""
    layer: int | None = None
    """The speech encoder layer the units are read from (None: its middle layer)."""
    pool: int = 2
    """Frames averaged before assignment (HuBERT's 50 Hz -> the paper's 25 Hz)."""
    collapse_runs: bool = False
    """Each run of one unit kept once (GSLM's practice; the paper is silent)."""
    codebook: str | None = None
    """A saved codebook folder (``centroids.npy`` + ``units.json``); None: fitted at the start."""
    fit_rows: int = 2000
    """Training clips read to fit the codebook."""
    fit_frames: int = 100_000
    """Frames sampled from them for k-means."""
    seed: int = 0
    cache: bool = True
    """Keep each clip's units in memory, keyed by its audio: the speech tower is frozen, so a clip
    seen before skips it (a later pass over the data runs the LLM only)."""

    @classmethod
    def coerce(cls, value: UnitConfig | Mapping | None) -> UnitConfig:
        if isinstance(value, cls):
            return value
        return cls(**dict(value or {}))


def clip_keys(audio: Mapping) -> list[bytes]:
    """One key per clip of a speech batch: a hash of its real input (samples or filterbanks)."""
    values = audio.get("input_values", audio.get("input_features"))
    mask = audio.get("attention_mask")
    keys = []
    for row in range(values.shape[0]):
        real = values[row] if mask is None else values[row, : int(mask[row].sum())]
        digest = hashlib.blake2b(real.detach().float().cpu().numpy().tobytes(), digest_size=16)
        digest.update(str(tuple(real.shape)).encode())
        keys.append(digest.digest())
    return keys


def _middle_layer(speech: SpeechEncoderConfig) -> int:
    """The middle transformer layer of the configured tower (HuBERT-base: 6 of 12)."""
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(speech.pretrained_model_name_or_path).num_hidden_layers
    return max(1, layers // 2)


class UnitFusion(SpeechIntoLLM):
    """Spoken queries as discrete units, new trainable tokens of the text LLM."""

    def __init__(
        self,
        text_encoder: TextEncoderConfig,
        speech_encoder: SpeechEncoderConfig,
        units: UnitConfig | None = None,
        freeze_text_encoder: bool = True,
        adapt_documents: bool = True,
        cache_prompt_states: bool = True,
        **kwargs,
    ):
        """
        Args:
            text_encoder: The text Matryoshka embedder (e.g. the exported text-only stage); with
                ``lora`` set its LoRA adapters train, with ``freeze_text_encoder: false`` all of it.
            speech_encoder: The frozen speech model the units are read from (its ``layers`` are
                set from ``units.layer``).
            units: Number of units, their layer, pooling, run collapsing, a saved codebook.
            freeze_text_encoder: Keep the text model frozen apart from LoRA (only the unit rows train
                without LoRA).
            adapt_documents: With LoRA, whether documents also go through the adapters (False:
                the text model's own, cacheable embeddings).
            cache_prompt_states: Reuse the frozen LLM's keys and values of each task prompt.
        """
        config = UnitConfig.coerce(units)
        if config.size < 2:
            raise ConfigError(f"model.units.size must be >= 2, got {config.size}.")
        speech = SpeechEncoderConfig.coerce(speech_encoder)
        if not speech.freeze:
            raise ConfigError(
                "UnitFusion reads units from a frozen speech tower: remove speech_encoder.freeze."
            )
        layer = config.layer if config.layer is not None else _middle_layer(speech)
        # The tower runs up to the units' layer only (the layers above are dropped at load).
        speech = replace(speech, layers=[layer])
        super().__init__(
            text_encoder, speech, freeze_text_encoder, adapt_documents, cache_prompt_states, **kwargs
        )
        self.units_config = config
        self.unit_settings = UnitSettings(layer=layer, pool=config.pool, collapse_runs=config.collapse_runs)
        # Centroids and whether they were fitted: buffers, so every checkpoint holds the codebook.
        self.register_buffer("unit_centroids", torch.zeros(config.size, self.speech_encoder.hidden_size))
        self.register_buffer("codebook_ready", torch.tensor(False))
        # clip key -> (its units, its speech frames) (``units.cache``)
        self.unit_cache: dict[bytes, tuple[torch.Tensor, int]] = {}
        if config.codebook is not None:
            self._use_codebook(UnitCodebook.load(config.codebook))
        # New rows start where the LLM's own token embeddings are: their mean and spread per
        # channel, so the LLM reads them at the scale of its vocabulary.
        table = self.text_encoder.embedding_table().detach().float()
        self.unit_embeddings = nn.Embedding(config.size, self.text_encoder.hidden_size)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(config.seed)
            noise = torch.randn(config.size, table.shape[1], generator=generator)
            self.unit_embeddings.weight.copy_(table.mean(dim=0) + noise * table.std(dim=0))
        self.train()

    # ----- the codebook ----------------------------------------------------------------------
    def codebook(self) -> UnitCodebook:
        if not bool(self.codebook_ready):
            raise RuntimeError(
                "the unit codebook is not fitted yet (it is at the start of fit or evaluation)."
            )
        return UnitCodebook(self.unit_centroids, self.unit_settings)

    def _use_codebook(self, codebook: UnitCodebook) -> None:
        expected = (self.units_config.size, self.speech_encoder.hidden_size)
        if tuple(codebook.centroids.shape) != expected:
            raise ConfigError(
                f"model.units.codebook holds {tuple(codebook.centroids.shape)} centroids; this model "
                f"needs {expected} (units.size x the speech layer's width)."
            )
        if codebook.settings != self.unit_settings:
            raise ConfigError(
                f"model.units.codebook was made with {codebook.settings}, not {self.unit_settings}."
            )
        self.unit_centroids.copy_(codebook.centroids.to(self.unit_centroids))
        self.codebook_ready.fill_(True)
        self.unit_cache.clear()  # units of another codebook

    def _layer_frames(self, audio: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            states = self.speech_encoder(**audio)
        return states.hidden_states[0], states.frame_mask

    def ensure_codebook(self) -> None:
        """Fits the codebook on the run's training audio when none is loaded, and saves it under
        the run folder (every rank fits the same one from the same rows; rank 0's is broadcast so
        they agree bit for bit)."""
        if bool(self.codebook_ready):
            return
        trainer = self._trainer
        data = getattr(trainer, "datamodule", None) if trainer is not None else None
        if data is None or not hasattr(data, "training_audio"):
            raise ConfigError(
                "model.units.codebook is not set and there is no training data to fit one on: "
                "name a saved codebook, or run with data.train_data."
            )
        codebook = self.fit_codebook(data)
        centroids = trainer.strategy.broadcast(codebook.centroids, src=0)
        self._use_codebook(UnitCodebook(centroids, self.unit_settings))
        if trainer.is_global_zero:
            folder = Path(trainer.default_root_dir) / "units"
            self.codebook().save(folder)
            log.info("Saved the unit codebook to %s (model.units.codebook=%s reuses it).", folder, folder)

    def fit_codebook(self, data) -> UnitCodebook:
        """k-means on frames of the first ``units.fit_rows`` training clips of ``data`` (a data
        module with ``training_audio``), pooled as units are read; the model uses it from then on."""
        config = self.units_config
        log.info(
            "Fitting %d discrete units (k-means) on layer %d of the speech tower, frames of the first %d "
            "training clips; model.units.codebook=<folder> names a saved codebook instead.",
            config.size,
            self.unit_settings.layer,
            config.fit_rows,
        )
        batches = (
            self._layer_frames({k: v.to(self.device) for k, v in batch["query_audio"].items()})
            for batch in data.training_audio(config.fit_rows)
            if batch["ids"]
        )
        pooled = (pool_frames(frames, mask, self.unit_settings.pool) for frames, mask in batches)
        frames = sample_frames(pooled, config.fit_frames, seed=config.seed)
        codebook = fit_codebook(frames, config.size, self.unit_settings, seed=config.seed)
        self._use_codebook(codebook)
        return codebook

    def on_fit_start(self) -> None:
        self.ensure_codebook()
        super().on_fit_start()

    def on_validation_start(self) -> None:
        self.ensure_codebook()
        super().on_validation_start()

    def on_test_start(self) -> None:
        self.ensure_codebook()
        super().on_test_start()

    def on_predict_start(self) -> None:
        self.ensure_codebook()
        self._predicted_units: dict[str, dict[int, list[int]]] = {}
        super().on_predict_start()

    def predict_step(self, batch: Mapping, batch_idx: int = 0, dataloader_idx: int = 0) -> dict:
        """The evaluation outputs, and each eval query's units (those its embedding was computed
        from) kept for ``on_predict_end``."""
        outputs = self.evaluation_step(batch, batch_idx, dataloader_idx)
        if batch["side"] == "queries":
            units, mask = self._last_query_units
            rows = self._predicted_units.setdefault(batch["eval_set"], {})
            for row, index in enumerate(batch["index"].tolist()):
                rows[index] = units[row, mask[row].bool()].tolist()
        return outputs

    def on_predict_end(self) -> None:
        """Writes ``<run>/units/<eval set>.queries.jsonl``: each eval query's id and unit ids."""
        write_query_records(
            self._trainer,
            self._predicted_units,
            "units",
            lambda row, units: {"id": row["id"], "units": units},
        )

    # ----- queries ---------------------------------------------------------------------------
    def query_units(self, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's clips as unit ids ``[B, U]`` (``PAD_UNIT`` at padding) and their mask."""
        audio = batch["query_audio"]
        keys = clip_keys(audio) if self.units_config.cache else None
        if keys is not None and all(key in self.unit_cache for key in keys):
            rows, frames = zip(*(self.unit_cache[key] for key in keys), strict=True)
            units = pad_sequence(rows, batch_first=True, padding_value=PAD_UNIT).to(self.device)
            unit_mask = (units != PAD_UNIT).long()
            frames_seen = sum(frames)
        else:
            frames, mask = self._layer_frames(audio)
            units, unit_mask = self.codebook().units(frames, mask)
            frames_seen = int(mask.sum())
            if keys is not None:
                for row, key in enumerate(keys):
                    self.unit_cache[key] = (units[row, unit_mask[row].bool()].cpu(), int(mask[row].sum()))
        if self.training and self._trainer is not None:
            # Unit usage in TensorBoard: the share of the K units a batch uses, and units per second
            # of speech (HuBERT / wav2vec2 / w2v-BERT frames are 20 ms: 25 units/s at pool 2).
            real = unit_mask.bool()
            rows = len(units)
            used = units[real].unique().numel() / self.units_config.size
            self.log("train/units_used_share", used, batch_size=rows, sync_dist=True)
            per_second = float(real.sum()) / max(1e-9, FRAME_SECONDS * frames_seen)
            self.log("train/units_per_second", per_second, batch_size=rows, sync_dist=True)
        return units, unit_mask

    def speech_tokens(self, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        units, mask = self._last_query_units = self.query_units(batch)
        embedded = self.unit_embeddings(units.clamp_min(0))
        return embedded * mask[..., None].to(embedded.dtype), mask
