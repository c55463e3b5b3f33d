"""Speech-query batches: the text batch (documents, transcriptions) plus audio and task prompts.

A training row needs a document, a known task (or none) and usable audio; bad audio (undecodable,
empty, silent: all-zero or its peak below ``silence_threshold_dbfs``, NaN/inf, wrong type,
missing, outside the data's folder, cut off unless kept, outside the duration limits, too short
for the speech model to encode) is dropped and named with its reason in ``skipped_ids`` /
``skip_reasons`` (and its kind, for counting, in ``skip_kinds``), which the training step counts
and logs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from datamodules.audio import AudioLoader, AudioSettings, BadAudio, pad_waveforms
from datamodules.fast_features import minimum_samples
from datamodules.text_batches import TextBatchBuilder, usable_text


class SpeechBatchBuilder:
    """Adds ``query_audio`` (padded waveforms + mask) and ``prompt`` (task tokens) to text batches."""

    def __init__(self, text: TextBatchBuilder, settings: AudioSettings, feature_extractor):
        self.text = text
        self.settings = settings
        self.feature_extractor = feature_extractor
        self.loader = AudioLoader(
            feature_extractor.sampling_rate,
            settings.min_duration,
            settings.max_duration,
            min_samples=minimum_samples(feature_extractor),
            allow_outside_paths=settings.allow_outside_paths,
            truncated=settings.truncated,
            silence_threshold_dbfs=settings.silence_threshold_dbfs,
        )

    def _speech_fields(self, waveforms: list[np.ndarray], tasks: Sequence[str | None]) -> dict:
        return {
            "query_audio": pad_waveforms(self.feature_extractor, waveforms),
            "prompt": self.text.prompt_tokens(tasks),
        }

    def training_batch(
        self,
        rows: Sequence[Mapping],
        transcription_required: bool = False,
        base_dir: Path | Sequence[Path] | None = None,
    ) -> dict:
        """Speech pairs batch; rows without a usable clip or document (or, with
        ``transcription_required``, transcription), or with an unknown task, are dropped and named
        with their reason.
        Relative audio paths start at ``base_dir`` (see ``sources.relative_path_roots``)."""
        kept, waveforms, skipped, reasons, kinds = [], [], [], [], []
        for position, row in enumerate(rows):
            reason = kind = None
            # Checked before decoding: no decoding for nothing.
            if not usable_text(row.get(self.text.columns["document"])):
                reason = kind = "missing or empty document"
            elif transcription_required and not usable_text(row.get(self.text.columns["query"])):
                reason = "missing or empty transcription (the alignment objective needs it)"
                kind = "missing or empty transcription"
            elif (problem := self.text.task_problem(row)) is not None:
                reason, kind = problem, "unknown task"
            else:
                try:
                    name = self.text.row_id(row, position)
                    waveforms.append(self.loader.load(row.get(self.settings.column), base_dir, name=name))
                except BadAudio as error:
                    reason, kind = str(error), error.kind
            if reason is None:
                kept.append(row)
            else:
                skipped.append(self.text.row_id(row, position))
                reasons.append(reason)
                kinds.append(kind)
        batch = self.text.training_batch(kept, query_text_required=False)  # drops nothing more
        # The transcriptions as written (None where a row has none): an ASR's training targets.
        batch["transcriptions"] = [row.get(self.text.columns["query"]) for row in kept]
        batch["skipped_ids"] = skipped + batch["skipped_ids"]
        batch["skip_reasons"] = reasons + batch["skip_reasons"]
        batch["skip_kinds"] = kinds + batch["skip_kinds"]
        if batch["ids"]:
            batch.update(self._speech_fields(waveforms, batch["tasks"]))
        return batch

    def eval_batch(self, items: Sequence[tuple[int, Mapping]], eval_set: str, side: str) -> dict:
        batch = self.text.eval_batch(items, eval_set, side)
        if side == "queries":
            rows = [row for _, row in items]
            tasks = [row.get("task") for row in rows]
            batch.update(self._speech_fields([row["waveform"] for row in rows], tasks))
            batch["tasks"] = tasks  # a model that transcribes formats its text queries with them
        return batch

    def load_eval_waveforms(self, rows: list[dict], base_dir: Path | None) -> tuple[list[dict], list[str]]:
        """Decodes every eval query's audio once; returns (usable rows, 'id: reason' of dropped ones).

        Eval clips are not filtered by duration: an eval set is used as published.
        """
        usable, dropped = [], []
        for row in rows:
            try:
                cell = row.get(self.settings.column)
                waveform = self.loader.load(cell, base_dir, check_duration=False, name=row["id"])
            except BadAudio as error:
                dropped.append(f"{row['id']}: {error}")
                continue
            usable.append(
                {**{k: v for k, v in row.items() if k != self.settings.column}, "waveform": waveform}
            )
        return usable, dropped
