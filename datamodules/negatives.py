"""Hard negatives of training rows: sampled per row and pass, resolved from a corpus, counted.

A training row may carry a ``negatives`` column (``data.negatives_column``): a list of document
texts, or, when ``data.negatives_corpus`` names a corpus file, a list of ids into it (the file
``python -m datamodules.mine_negatives`` writes refers to the eval or training corpus this way, or
holds texts). Each pass over the data, a row gets up to ``data.num_negatives`` of them, drawn
without replacement by a generator seeded with ``(data.seed, pass, the row's id)``: the draw is a
function of the row and the pass alone, so a resumed run draws exactly what the uninterrupted one
drew, on any rank or worker. Rows with fewer usable negatives than asked (none included) train
with what they have (in-batch negatives only, with none) and are counted, reported like truncation.
An id that is not in the corpus file stops the run with a ``DataError`` naming it and the row.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.sources import json_lines
from errors import ConfigError, DataError


def load_negatives_corpus(location: str) -> dict[str, str]:
    """``{id: text}`` of a JSON Lines corpus (BEIR ``corpus.jsonl``: ``_id``, optional ``title``,
    ``text``; or ``id`` and ``text``). The title, when there is one, is left out as the eval sets do."""
    path = Path(location).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.negatives_corpus={location!r}: no such file (resolved to {path.resolve()}).")
    corpus = {}
    for number, row in json_lines(path):
        key = row.get("_id", row.get("id")) if isinstance(row, dict) else None
        if key is None or not isinstance(row.get("text"), str):
            raise DataError(f"{path}:{number}: a corpus row needs an '_id' (or 'id') and a 'text'.")
        corpus[str(key)] = row["text"]
    return corpus


def _row_seed(row: Mapping, id_column: str, query_column: str, document_column: str) -> int:
    """A stable integer per row: its id, or its query and document where it has none."""
    name = row.get(id_column)
    text = str(name) if name is not None else f"{row.get(query_column)}\0{row.get(document_column)}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class NegativeSampler:
    """``(row, pass) -> row`` with its negatives column replaced by up to ``count`` sampled texts.

    Picklable (it runs in DataLoader workers, applied by ``ShuffledEpochStream``).
    """

    def __init__(
        self,
        count: int,
        seed: int,
        columns: Mapping[str, str],
        negatives_column: str = "negatives",
        corpus: Mapping[str, str] | None = None,
        corpus_location: str | None = None,
    ):
        self.count = count
        self.seed = seed
        self.columns = dict(columns)
        self.negatives_column = negatives_column
        self.corpus = corpus
        self.corpus_location = corpus_location

    def candidates(self, row: Mapping) -> list[str]:
        """The row's usable negative texts (ids resolved); a missing or empty list gives none."""
        value = row.get(self.negatives_column)
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if self.corpus is None:
            return [text for text in value if isinstance(text, str) and text.strip()]
        texts = []
        for key in value:
            if key is None:
                continue
            text = self.corpus.get(str(key))
            if text is None:
                raise DataError(
                    f"training row {row.get(self.columns['id'])!r}: negatives id {str(key)!r} is not in "
                    f"data.negatives_corpus={self.corpus_location!r} ({len(self.corpus)} documents)."
                )
            if text.strip():
                texts.append(text)
        return texts

    def __call__(self, row: Mapping, epoch: int) -> dict:
        texts = self.candidates(row)
        if len(texts) > self.count:
            key = _row_seed(row, self.columns["id"], self.columns["query"], self.columns["document"])
            rng = np.random.default_rng([self.seed, epoch, key])
            texts = [texts[i] for i in sorted(rng.choice(len(texts), size=self.count, replace=False))]
        return {**row, self.negatives_column: texts}


def row_negatives(rows: Sequence[Mapping], column: str, count: int) -> tuple[list[str], list[int], tuple]:
    """The rows' negative texts in row order (at most ``count`` each), the row of each, and
    ``(rows, rows with fewer than count, rows with none)``."""
    texts, owners, short, without = [], [], 0, 0
    for position, row in enumerate(rows):
        value = row.get(column) or []
        own = [
            text
            for text in ([value] if isinstance(value, str) else value)
            if isinstance(text, str) and text.strip()
        ]
        own = own[:count]
        texts += own
        owners += [position] * len(own)
        short += len(own) < count
        without += not own
    return texts, owners, (len(rows), short, without)


@dataclass
class NegativesCount:
    """Training rows measured against ``data.num_negatives``: how many had fewer, how many none."""

    asked: int
    rows: int = 0
    short: int = 0
    without: int = 0

    def add_counts(self, rows: int, short: int, without: int) -> None:
        self.rows += rows
        self.short += short
        self.without += without

    def describe(self) -> str:
        return (
            f"{self.short} of {self.rows} rows had fewer than data.num_negatives={self.asked} hard negatives "
            f"({self.without} had none and trained with in-batch negatives only)"
        )


def report_negatives(where: str, count: NegativesCount, logger: logging.Logger) -> None:
    """One line: a warning when some rows had no hard negative at all, else info."""
    if not count.rows:
        return
    level = logging.WARNING if count.without else logging.INFO
    logger.log(level, "%s: %s.", where, count.describe())
