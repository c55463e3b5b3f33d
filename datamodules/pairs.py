"""Streaming query/document pairs for training, BEIR-style eval sets for validation and test."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from datamodules.audio import AudioSettings
from datamodules.eval_sets import EvalSet, load_beir_eval_set
from datamodules.lengths import clip_seconds, text_length
from datamodules.loader import STATE_KEY, ConsumedPositionLoader
from datamodules.negatives import NegativeSampler, NegativesCount, load_negatives_corpus, report_negatives
from datamodules.sources import load_stream, looks_local, read_error, relative_path_roots
from datamodules.speech_batches import SpeechBatchBuilder
from datamodules.streaming import ShuffledEpochStream
from datamodules.text_batches import PromptConfig, TextBatchBuilder, usable_text
from datamodules.truncation import TruncationCount, report_truncation
from errors import ConfigError, DataError

log = logging.getLogger(__name__)
TRUNCATION_REPORT_AFTER_BATCHES = 100
"""The training stream's truncation is reported after this many batches, and again at the end of fit."""


def _check_local_paths_exist(locations: dict[str, str | None]) -> None:
    """Fails at start-up, before any model loads, on a local path that is not there."""
    for key, location in locations.items():
        if location and looks_local(location) and not Path(location).expanduser().exists():
            raise ConfigError(
                f"{key}={location!r}: no such file or folder (resolved to {Path(location).resolve()})."
            )


def _eval_batch(builder, item: tuple[str, str, list]) -> dict:
    """The eval batch of one ``(eval set, side, [(position, row), ...])`` item of the eval loader."""
    name, side, rows = item
    return builder.eval_batch(rows, eval_set=name, side=side)


def _document_texts(row: dict, columns: list[str]) -> Iterator:
    """The row's document, then the texts of its negatives column when that is read too."""
    yield row.get(columns[0])
    if len(columns) > 1:
        negatives = row.get(columns[1]) or []
        yield from [negatives] if isinstance(negatives, str) else negatives


def _length(row: dict) -> int:
    waveform = row.get("waveform")
    return len(waveform) if waveform is not None else len(row.get("text") or "")


class StreamingPairDataModule(LightningDataModule):
    """Query -> document pairs streamed with ``datasets`` (local files or hub names).

    Queries are text, or speech when ``audio`` is set: batches then carry the padded waveforms,
    each row's task prompt and, when the data has it, the transcription as ``query_text``, so
    one datamodule serves text-only, late-fusion and dual-encoder models alike.

    Training data is read with ``streaming=True``, shuffled by shard and by block, split per rank
    and served by a stateful loader, so a checkpoint resumes at the exact next row. Each eval set yields two
    loaders (queries, corpus), sorted by length so padding stays small; batches carry each row's
    position so evaluation callbacks can reassemble them.
    """

    def __init__(
        self,
        tokenizer: str,
        train_data: str | None = None,
        eval_sets: dict[str, str] | None = None,
        classification_sets: dict[str, str] | None = None,
        train_split: str = "train",
        train_config_name: str | None = None,
        eval_split: str = "test",
        val_split: str | None = None,
        query_column: str = "query",
        document_column: str = "document",
        task_column: str = "task",
        id_column: str = "id",
        prompts: PromptConfig | None = None,
        audio: AudioSettings | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        max_query_length: int = 512,
        max_document_length: int = 2048,
        truncation_warning_share: float | None = 0.05,
        shuffle_block_size: int = 10_000,
        group_by_length: bool = False,
        passes: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        num_negatives: int = 0,
        negatives_column: str = "negatives",
        negatives_corpus: str | None = None,
    ):
        """
        Args:
            tokenizer: Tokenizer name or folder; linked from the model's text encoder by the CLI.
            train_data: Training pairs: a .jsonl/.json/.parquet/.csv file, a folder, or a hub dataset name.
            eval_sets: Eval set name -> BEIR folder or hub name; names appear in metric tags.
            classification_sets: Name -> BEIR folder whose corpus holds one text per class (keyword
                transcriptions, intent names) and whose qrels give each query's class; scored by
                the nearest class: accuracy, macro recall and macro F1 per dim.
            train_split: Split of a folder/hub training dataset.
            train_config_name: Config (subset) name of a hub training dataset.
            eval_split: Qrels split of the eval sets (qrels/<split>.tsv) that ``test`` and
                ``predict`` use, and validation too unless ``val_split`` is set.
            val_split: Qrels split scored at validation (``fit``'s checkpoint selection, and
                ``validate``), e.g. ``dev``, for every eval and classification set (each needs
                ``qrels/<val_split>.tsv``); None: ``eval_split``, so the "best" checkpoint is
                chosen on the very judgments ``test`` reports (a warning says so at fit start).
            query_column: Column holding the query text (the transcription, for speech data).
            document_column: Column holding the document text.
            task_column: Column naming each row's task (optional in the data).
            id_column: Column holding the row id (used to name skipped rows).
            prompts: Task instructions and the query template.
            audio: Speech queries: the audio column, the speech model's feature extractor, duration
                limits, whether audio paths may lead outside the data's folder, cut-off clips.
            batch_size: Training pairs per step per device (in-batch negatives = batch_size - 1).
            eval_batch_size: Queries or documents per evaluation forward pass.
            max_query_length: Token limit of a query including its prompt.
            max_document_length: Token limit of a document.
            truncation_warning_share: Longer queries and documents are cut to their token limit
                (never dropped); the share cut, and the longest length seen, is logged once per
                eval set (when it is loaded) and for the training stream (after its first 100
                batches and at the end of fit, rank 0's share), as a warning when a share is above
                this (0.05: more than 5 % of the texts cut). null: never a warning.
            shuffle_block_size: Consecutive rows shuffled together (held in memory); shards are
                also read in a new random order every epoch.
            group_by_length: Batch rows of similar length together: each shuffle block is sorted by
                the query clip's duration (speech) or the document's length (text queries), cut into
                batches, and the batches served in random order. Less padding, so faster steps,
                while every row is still served once per epoch; a batch's in-batch negatives then
                share a length range. Needs shuffle_block_size to be a multiple of batch_size. The
                epoch's last block is usually partial, so its rank (and worker) ends the epoch on one
                smaller batch (plain batches run on across epochs instead); a batch of one row is
                skipped, as any batch under two rows.
            passes: Passes over the training data, each in a new order; then training ends, its
                last step validated and checkpointed as at trainer.max_steps (whichever comes
                first). The passes make one Lightning epoch, which ends fit (callbacks/training_guards.py).
                None: repeat forever; stop with trainer.max_steps. Must be None under DDP, where
                ranks may hold different numbers of rows.
            num_workers: DataLoader worker processes.
            seed: Shuffle seed (and the seed of the hard negatives' draw).
            num_negatives: Hard negatives per training row: each pass draws up to this many of the
                row's ``negatives_column`` (seeded by seed, pass and row id, so resumes are exact);
                they join the row's in-batch negatives in the loss. Rows with fewer (or none) are
                counted and reported like truncation. 0: in-batch negatives only.
            negatives_column: Column holding each row's hard negatives: a list of document texts, or
                of ids into ``negatives_corpus`` when that is set.
            negatives_corpus: A JSON Lines corpus (BEIR corpus.jsonl: ``_id``, ``text``) that the
                negatives column's ids refer to; an id not in it stops the run, naming it. None:
                the column holds texts.
        """
        super().__init__()
        self.save_hyperparameters()
        # Plain data in checkpoints: resuming reads them with torch.load(weights_only=True), which
        # refuses our classes (AudioSettings, PromptConfig).
        for key, value in list(self.hparams.items()):
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                self.hparams[key] = dataclasses.asdict(value)
        if batch_size < 2:
            raise ConfigError(
                f"data.batch_size={batch_size}: in-batch InfoNCE needs at least 2 pairs per batch."
            )
        if group_by_length and shuffle_block_size % batch_size:
            raise ConfigError(
                f"data.group_by_length: data.shuffle_block_size={shuffle_block_size} must be a multiple of "
                f"data.batch_size={batch_size}, so every full block cuts into whole batches."
            )
        if truncation_warning_share is not None and not 0 <= truncation_warning_share <= 1:
            raise ConfigError(
                f"data.truncation_warning_share={truncation_warning_share} must be a share between 0 "
                "and 1 (0.05: warn when more than 5 % of the texts are cut), or null for no warning."
            )
        if passes is not None and passes < 1:
            raise ConfigError(
                f"data.passes={passes} must be >= 1, or null to repeat until trainer.max_steps."
            )
        if num_negatives < 0:
            raise ConfigError(
                f"data.num_negatives={num_negatives} must be >= 0 (0: in-batch negatives only)."
            )
        if negatives_corpus is not None and not num_negatives:
            raise ConfigError(
                f"data.negatives_corpus={negatives_corpus!r} is set but data.num_negatives is 0: set "
                "data.num_negatives (e.g. 3) to train with the rows' hard negatives, or drop it."
            )
        _check_local_paths_exist(
            {
                "data.train_data": train_data,
                "data.negatives_corpus": negatives_corpus,
                **{f"data.eval_sets.{k}": v for k, v in (eval_sets or {}).items()},
                **{f"data.classification_sets.{k}": v for k, v in (classification_sets or {}).items()},
            }
        )
        self.prompts = prompts or PromptConfig()
        self.columns = {
            "query": query_column,
            "document": document_column,
            "task": task_column,
            "id": id_column,
        }
        self.audio = AudioSettings(**audio) if isinstance(audio, dict) else audio
        self.eval_sets: dict[str, EvalSet] = {}
        self.eval_queries_dropped: dict[str, list[str]] = {}
        self._batches: TextBatchBuilder | SpeechBatchBuilder | None = None
        self._train_loader: ConsumedPositionLoader | None = None
        self._loaded_split: str | None = None  # the qrels split self.eval_sets holds
        self._train_truncation: dict[str, TruncationCount] = {}
        self._train_batches_measured = 0
        self._train_truncation_warned = False
        self._train_negatives = NegativesCount(num_negatives)

    @property
    def _is_rank_zero(self) -> bool:
        return self.trainer is None or self.trainer.global_rank == 0

    @property
    def batches(self) -> TextBatchBuilder | SpeechBatchBuilder:
        if self._batches is None:
            from transformers import AutoTokenizer

            hp = self.hparams
            self._batches = TextBatchBuilder(
                AutoTokenizer.from_pretrained(hp.tokenizer),
                self.prompts,
                hp.max_query_length,
                hp.max_document_length,
                self.columns,
                num_negatives=hp.num_negatives,
                negatives_column=hp.negatives_column,
            )
            if self.audio is not None:
                from transformers import AutoFeatureExtractor

                feature_extractor = AutoFeatureExtractor.from_pretrained(self.audio.feature_extractor)
                self._batches = SpeechBatchBuilder(self._batches, self.audio, feature_extractor)
        return self._batches

    def _with_decoded_audio(self, eval_set: EvalSet, key: str) -> EvalSet:
        """Decodes eval audio once per run; unusable queries are left out, counted and named."""
        usable, dropped = self.batches.load_eval_waveforms(eval_set.queries, eval_set.root)
        return self._leaving_out(eval_set, usable, dropped, "unusable audio", key)

    def _with_query_text(self, eval_set: EvalSet, key: str) -> EvalSet:
        """Text queries: those without text are left out, counted and named (a batch holding
        one would have no ``query_text`` for the model to embed)."""
        usable, dropped = [], []
        for row in eval_set.queries:
            if usable_text(row.get("text")):
                usable.append(row)
            else:
                dropped.append(f"{row['id']}: missing or empty text")
        return self._leaving_out(eval_set, usable, dropped, "no text", key)

    def _leaving_out(
        self, eval_set: EvalSet, usable: list[dict], dropped: list[str], why: str, key: str
    ) -> EvalSet:
        if dropped:
            log.warning(
                "eval set %s: %d of %d queries have %s and are left out: %s",
                eval_set.name,
                len(dropped),
                len(eval_set.queries),
                why,
                dropped[:20],
            )
        self.eval_queries_dropped[key] = dropped
        return eval_set.with_queries(usable)

    def _truncation_counts(self) -> dict[str, TruncationCount]:
        """Empty counts per tokenized batch key: documents, and the query texts (with their prompt)."""
        hp = self.hparams
        queries = "query texts" if self.audio is None else "transcriptions"
        return {
            "document": TruncationCount("documents", "data.max_document_length", hp.max_document_length),
            "query_text": TruncationCount(queries, "data.max_query_length", hp.max_query_length),
        }

    def _report_eval_truncation(self, eval_set: EvalSet) -> None:
        """One line per eval set: how many of its documents (and text queries) the limits cut.
        Speech queries are embedded from their audio: their transcriptions are not measured."""
        text = getattr(self.batches, "text", self.batches)
        counts = self._truncation_counts()
        counts["document"].add(text.token_lengths([row["text"] for row in eval_set.corpus]))
        if self.audio is None:
            queries = [row for row in eval_set.queries if usable_text(row.get("text"))]
            texts, tasks = [row["text"] for row in queries], [row.get("task") for row in queries]
            counts["query_text"].add(text.token_lengths(text.format_queries(texts, tasks)))
        report_truncation(
            f"eval set {eval_set.name}", list(counts.values()), self.hparams.truncation_warning_share, log
        )

    def _count_training_truncation(self, measured: dict | None) -> None:
        """Adds one training batch's ``truncation`` (see ``TextBatchBuilder.training_batch``)."""
        if not measured:
            return
        if not self._train_truncation:
            self._train_truncation = self._truncation_counts()
        for key, (rows, cut, longest) in measured.items():
            self._train_truncation[key].add_counts(rows, cut, longest)
        self._train_batches_measured += 1
        if self._train_batches_measured == TRUNCATION_REPORT_AFTER_BATCHES:
            self._report_training_truncation(f"its first {TRUNCATION_REPORT_AFTER_BATCHES} batches")
            self._report_training_negatives(f"its first {TRUNCATION_REPORT_AFTER_BATCHES} batches")

    def _report_training_truncation(self, which_batches: str) -> None:
        if not self._is_rank_zero:
            return
        world_size = self.trainer.world_size if self.trainer is not None else 1
        share = " (rank 0's share)" if world_size > 1 else ""
        over = report_truncation(
            f"training stream{share}, {which_batches}",
            list(self._train_truncation.values()),
            self.hparams.truncation_warning_share,
            log,
            warn=not self._train_truncation_warned,
        )
        self._train_truncation_warned |= over

    def _report_training_negatives(self, which_batches: str) -> None:
        if self._is_rank_zero and self.hparams.num_negatives:
            world_size = self.trainer.world_size if self.trainer is not None else 1
            share = " (rank 0's share)" if world_size > 1 else ""
            report_negatives(f"training stream{share}, {which_batches}", self._train_negatives, log)

    @property
    def training_negatives(self) -> NegativesCount:
        """Rows of the training batches taken so far with fewer hard negatives than asked, or none."""
        return self._train_negatives

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self._train_batches_measured:
            self._report_training_truncation(f"the {self._train_batches_measured} batches of this fit")
            self._report_training_negatives(f"the {self._train_batches_measured} batches of this fit")

    def split_for(self, stage: str) -> str:
        """The qrels split a stage scores: ``val_split`` for fit and validate, else ``eval_split``."""
        hp = self.hparams
        return hp.val_split if stage in ("fit", "validate") and hp.val_split is not None else hp.eval_split

    @property
    def selects_on_the_test_split(self) -> bool:
        """Whether validation, hence checkpoint selection, scores the qrels ``test`` reports by
        default: ``val_split`` unset (one set explicitly, even to ``eval_split``, is a choice)."""
        return bool(self.hparams.eval_sets) and self.hparams.val_split is None

    def setup(self, stage: str) -> None:
        split = self.split_for(stage)
        if self._loaded_split != split:
            hp = self.hparams
            self.eval_sets, self.eval_queries_dropped = {}, {}
            overlap = set(hp.eval_sets or {}) & set(hp.classification_sets or {})
            if overlap:
                raise ConfigError(
                    f"data.eval_sets and data.classification_sets both name {sorted(overlap)}: "
                    "names become metric tags, so they must differ."
                )
            for name in [*(hp.eval_sets or {}), *(hp.classification_sets or {})]:
                eval_set = self.load_eval_set(name, split, record_as=name)
                self.eval_sets[name] = eval_set
                log.info(
                    "eval set %s: %d queries (%d without relevant documents), %d documents",
                    name,
                    len(eval_set.queries),
                    eval_set.num_queries_without_relevant,
                    len(eval_set.corpus),
                )
                if self._is_rank_zero:
                    self._report_eval_truncation(eval_set)
            self._loaded_split = split
        if stage == "fit" and not self.hparams.train_data:
            raise ConfigError(
                "data.train_data is not set: name a pairs file, folder or hub dataset to fit on."
            )

    def load_eval_set(self, name: str, split: str, record_as: str | None = None) -> EvalSet:
        """One split of a configured eval or classification set, checked and with its queries'
        audio decoded (or text checked) as evaluation reads it; unusable queries are left out and
        named in ``eval_queries_dropped[record_as]`` (default ``<name>/<split>``)."""
        hp = self.hparams
        kinds = {key: "retrieval" for key in hp.eval_sets or {}}
        kinds |= {key: "classification" for key in hp.classification_sets or {}}
        if name not in kinds:
            raise ConfigError(
                f"{name!r} is not in data.eval_sets or data.classification_sets (known: {sorted(kinds)})."
            )
        location = {**(hp.eval_sets or {}), **(hp.classification_sets or {})}[name]
        eval_set = load_beir_eval_set(name, location, split)
        eval_set.kind = kinds[name]
        if eval_set.kind == "classification":
            eval_set.gold_labels()  # a query without a class fails now, not at the first validation
        for row in eval_set.queries:  # unknown tasks fail now, not mid-run
            if not self.prompts.has_instruction(row.get("task")):
                raise ConfigError(
                    f"eval set {name!r}: query {row['id']!r} has task {row.get('task')!r}, which has "
                    f"no instruction; add it under data.prompts.prompts (known tasks: "
                    f"{sorted(self.prompts.prompts)})."
                )
        key = record_as or f"{name}/{split}"
        if self.audio is not None:
            return self._with_decoded_audio(eval_set, key)
        return self._with_query_text(eval_set, key)

    # ----- training -----------------------------------------------------------------------
    def _training_stream(self) -> ShuffledEpochStream:
        hp = self.hparams
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if world_size > 1 and hp.passes is not None:
            # A rank that runs out of rows first would leave the others waiting in a collective.
            raise ConfigError(
                f"data.passes={hp.passes} under DDP ({world_size} ranks): ranks can hold different "
                "numbers of rows; set data.passes: null and stop with trainer.max_steps."
            )
        dataset = load_stream(hp.train_data, hp.train_split, hp.train_config_name, key="data.train_data")
        grouping = {}
        if hp.group_by_length:
            length_of = (
                partial(
                    clip_seconds,
                    column=self.audio.column,
                    base_dir=relative_path_roots(hp.train_data),
                    allow_outside_paths=self.audio.allow_outside_paths,
                )
                if self.audio is not None
                else partial(text_length, column=self.columns["document"])
            )
            grouping = {"length_of": length_of, "batch_size": hp.batch_size}
        return ShuffledEpochStream(
            dataset,
            hp.seed,
            hp.shuffle_block_size,
            hp.passes,
            rank=rank,
            world_size=world_size,
            read_error=partial(read_error, "data.train_data", hp.train_data),
            transform=self._negative_sampler(),
            **grouping,
        )

    def _negative_sampler(self) -> NegativeSampler | None:
        hp = self.hparams
        if not hp.num_negatives:
            return None
        corpus = load_negatives_corpus(hp.negatives_corpus) if hp.negatives_corpus else None
        return NegativeSampler(
            hp.num_negatives, hp.seed, self.columns, hp.negatives_column, corpus, hp.negatives_corpus
        )

    def train_dataloader(self) -> ConsumedPositionLoader:
        hp = self.hparams
        collate = self.batches.training_batch
        if self.audio is not None:
            # A row without its transcription would fail an alignment loss for the whole batch; the
            # model's loss says whether it reads them (its ``needs``, see lightning_modules/losses.py).
            model = self.trainer.lightning_module if self.trainer is not None else None
            needs = getattr(getattr(model, "loss", None), "needs", frozenset())
            collate = partial(
                collate,
                transcription_required="transcriptions" in needs,
                base_dir=relative_path_roots(hp.train_data),
            )
        stream = self._training_stream()
        self._train_truncation, self._train_batches_measured, self._train_truncation_warned = {}, 0, False
        self._train_negatives = NegativesCount(hp.num_negatives)
        source = f"data.train_data={hp.train_data!r}"
        if stream.world_size > 1:
            source += f" (the share of rank {stream.rank} of {stream.world_size})"
        self._train_loader = ConsumedPositionLoader(
            stream,
            # Grouped by length, the stream yields whole batches (the builder gets each as is).
            batch_size=None if hp.group_by_length else hp.batch_size,
            collate_fn=collate,
            num_workers=hp.num_workers,
            source=source,
            endless=hp.passes is None,
        )
        return self._train_loader

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Called when the training loop takes a batch (fetching ran one ahead): from here on a
        # checkpoint resumes after this batch.
        if isinstance(batch, dict) and STATE_KEY in batch:
            if "negatives_count" in batch:  # before truncation, whose count may report both
                self._train_negatives.add_counts(*batch.pop("negatives_count"))
            self._count_training_truncation(batch.pop("truncation", None))
            if self._train_loader is not None:
                self._train_loader.mark_consumed(batch)
            else:
                batch.pop(STATE_KEY)
        return batch

    # ----- training audio, for what a model fits on it before training (a unit codebook) -------
    def training_audio(self, rows: int, batch_size: int | None = None) -> Iterator[dict]:
        """Speech batches of the first ``rows`` training rows (file order, one fresh read: the
        training stream's position is untouched); unusable rows are left out as in training."""
        hp = self.hparams
        if self.audio is None or not hp.train_data:
            raise ConfigError("training_audio needs data.train_data and data.audio (speech training data).")
        stream = load_stream(hp.train_data, hp.train_split, hp.train_config_name, key="data.train_data")
        base_dir = relative_path_roots(hp.train_data)
        chunk = []
        for row in itertools.islice(stream, rows):
            chunk.append(row)
            if len(chunk) == (batch_size or hp.batch_size):
                yield self.batches.training_batch(chunk, base_dir=base_dir)
                chunk = []
        if chunk:
            yield self.batches.training_batch(chunk, base_dir=base_dir)

    def training_transcriptions(self) -> Iterator[str]:
        """Every training row's query text (file order, one fresh read of that column only): an
        ASR's characters come from them."""
        hp = self.hparams
        if not hp.train_data:
            raise ConfigError("data.train_data is not set: the training transcriptions are read from it.")
        column = self.columns["query"]
        stream = load_stream(
            hp.train_data, hp.train_split, hp.train_config_name, key="data.train_data", columns=[column]
        )
        return (row.get(column) for row in stream)

    # ----- documents, for a frozen-document cache -----------------------------------------
    def distinct_documents(self, include_training: bool = True) -> Iterator[str]:
        """Each distinct document text: the training data (one pass, file order), then the eval corpora."""
        sources = []
        if include_training and self.hparams.train_data:
            hp = self.hparams
            column = self.columns["document"]
            # Hard negatives are documents too: their texts (or their corpus) go in the cache.
            by_text = hp.num_negatives and not hp.negatives_corpus
            columns = [column, hp.negatives_column] if by_text else [column]
            # Only these columns are read: no audio is fetched or decoded.
            read = partial(
                load_stream, hp.train_data, hp.train_split, hp.train_config_name, key="data.train_data"
            )
            try:
                stream = read(columns=columns)
            except DataError:
                if len(columns) == 1:
                    raise
                columns = columns[:1]  # no negatives column at all: every row trains in-batch only
                stream = read(columns=columns)
            sources.append(text for row in stream for text in _document_texts(row, columns))
            if hp.num_negatives and hp.negatives_corpus:
                sources.append(load_negatives_corpus(hp.negatives_corpus).values())
        if not self.eval_sets:
            self.setup("validate")
        sources += [(row.get("text") for row in eval_set.corpus) for eval_set in self.eval_sets.values()]
        seen: set[bytes] = set()
        for text in itertools.chain.from_iterable(sources):
            if not usable_text(text):
                continue
            digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if digest not in seen:
                seen.add(digest)
                yield text

    def tokenize_documents(self, texts: list[str]) -> dict:
        """Documents tokenized exactly as training and evaluation batches tokenize them."""
        batches = self.batches
        return getattr(batches, "text", batches).documents(texts)

    # ----- evaluation ---------------------------------------------------------------------
    def _eval_loader(self) -> DataLoader:
        """Every eval set's queries then corpus, in batches of one set and side, in one loader.

        One loader, not one per set and side: Lightning prints and returns every epoch-level
        metric once per dataloader, so one loader per set and side would repeat each metric in as
        many identical columns of the validate table (six for the late-fusion demo). Each item is
        a whole batch (``batch_size=None``), so under DDP the distributed sampler deals out
        batches, and a batch never mixes sets or sides.
        """
        size = self.hparams.eval_batch_size
        batches = []
        for name, eval_set in self.eval_sets.items():
            for side, rows in (("queries", eval_set.queries), ("corpus", eval_set.corpus)):
                # Longest first: similar lengths share a batch, and an out-of-memory shows up at once.
                order = sorted(range(len(rows)), key=lambda i: -_length(rows[i]))
                batches += [
                    (name, side, [(i, rows[i]) for i in order[start : start + size]])
                    for start in range(0, len(order), size)
                ]
        return DataLoader(
            batches,
            batch_size=None,
            shuffle=False,
            collate_fn=partial(_eval_batch, self.batches),
            num_workers=self.hparams.num_workers,
            # Starting the loader draws its workers' base seed; from torch's global generator, that
            # draw would shift the dropout and augmentation of every later training step, so how
            # often a run validates would change what it trains.
            generator=torch.Generator(),
        )

    def val_dataloader(self):
        return self._eval_loader()

    def test_dataloader(self):
        return self._eval_loader()

    def predict_dataloader(self):
        return self._eval_loader()
