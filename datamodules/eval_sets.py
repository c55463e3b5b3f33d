"""BEIR-style evaluation sets: queries, corpus and graded qrels, held in memory by position.

Layout on disk (as BEIR): ``corpus.jsonl`` (``_id``, ``text``, optional ``title``),
``queries.jsonl`` (``_id``, ``text``, optional ``task``), ``qrels/<split>.tsv`` (header, then
``query-id  corpus-id  score``). A hub name follows the BeIR convention instead: configs
``corpus`` and ``queries`` in the dataset, qrels in ``<name>-qrels``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from datamodules.sources import looks_local
from lightning_modules.components.errors import ConfigError, DataError


@dataclass
class EvalSet:
    """One eval set. Queries and documents are addressed by position; qrels map positions too."""

    name: str
    queries: list[dict]
    """Rows with at least ``id``; ``text`` and ``task`` when the data has them."""
    corpus: list[dict]
    """Rows with ``id`` and ``text``."""
    qrels: dict[int, dict[int, int]] = field(default_factory=dict)
    """Query position -> {document position: grade > 0}."""

    root: Path | None = None
    """Local folder of the set (relative audio paths in queries resolve against it)."""

    kind: str = "retrieval"
    """``retrieval`` (rank the corpus: nDCG, recall, MRR) or ``classification`` (the corpus is
    one text per class, the qrels give each query's class: accuracy and macro recall/F1 of the
    nearest class, e.g. keyword spotting or zero-shot intent)."""

    def gold_labels(self) -> list[int]:
        """Each query's class (its highest-graded document), for a classification set."""
        missing = [self.queries[i]["id"] for i in range(len(self.queries)) if not self.qrels.get(i)]
        if missing:
            raise DataError(
                f"classification set {self.name!r}: queries without a class in qrels: {missing[:5]}"
            )
        return [max(self.qrels[i], key=self.qrels[i].get) for i in range(len(self.queries))]

    @property
    def num_queries_without_relevant(self) -> int:
        return sum(1 for i in range(len(self.queries)) if not self.qrels.get(i))

    def with_queries(self, queries: list[dict]) -> EvalSet:
        """The same set with (a subset of) its queries replaced; qrels follow the ids."""
        old_position = {row["id"]: i for i, row in enumerate(self.queries)}
        qrels = {
            new: self.qrels[old_position[row["id"]]]
            for new, row in enumerate(queries)
            if old_position[row["id"]] in self.qrels
        }
        return EvalSet(self.name, queries, self.corpus, qrels, self.root, self.kind)


class Judgment(NamedTuple):
    """One qrels row, and where it was read (``file:line``), to name it in an error."""

    query_id: str
    doc_id: str
    grade: int
    where: str


def build_eval_set(
    name: str, queries: list[dict], corpus: list[dict], judgments: Iterable[Judgment], source: str
) -> EvalSet:
    """Checks ids and turns id-keyed qrels into position-keyed ones; names any unknown id."""
    query_index = _index_by_id(queries, f"{source} queries")
    doc_index = _index_by_id(corpus, f"{source} corpus")
    qrels: dict[int, dict[int, int]] = {}
    for query_id, doc_id, grade, where in judgments:
        if query_id not in query_index:
            raise DataError(
                f"eval set {name!r}, {where}: qrels name query id {query_id!r}, which is not in "
                f"{source} queries."
            )
        if doc_id not in doc_index:
            raise DataError(
                f"eval set {name!r}, {where}: qrels name corpus id {doc_id!r}, which is not in "
                f"{source} corpus."
            )
        if grade > 0:
            qrels.setdefault(query_index[query_id], {})[doc_index[doc_id]] = grade
    return EvalSet(name=name, queries=queries, corpus=corpus, qrels=qrels)


def _index_by_id(rows: list[dict], what: str) -> dict[str, int]:
    index: dict[str, int] = {}
    for position, row in enumerate(rows):
        row_id = row["id"]
        if row_id in index:
            raise DataError(f"{what}: id {row_id!r} appears twice.")
        index[row_id] = position
    return index


def _document_text(row: dict) -> str:
    title = (row.get("title") or "").strip()
    text = row.get("text") or ""
    return f"{title} {text}".strip() if title else text


def _normalize_rows(raw_rows: Iterable[tuple[str, dict]], is_corpus: bool) -> list[dict]:
    """``(where, row)`` pairs as read (``where``: ``file:line``) -> rows with ``id`` (and ``text``)."""
    rows = []
    for where, raw in raw_rows:
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object with an '_id', got {type(raw).__name__}.")
        if raw.get("_id") is None or str(raw["_id"]).strip() == "":
            raise DataError(f"{where}: the row has no '_id' (every query and document needs one).")
        row = {key: value for key, value in raw.items() if key not in ("_id", "title")}
        row["id"] = str(raw["_id"])
        if is_corpus:
            row["text"] = _document_text(raw)
        rows.append(row)
    return rows


def load_beir_eval_set(name: str, location: str, split: str = "test") -> EvalSet:
    """Loads a BEIR folder (or a BeIR-convention hub dataset) as an EvalSet."""
    if looks_local(location):
        root = Path(location).expanduser()
        needed = [root / "queries.jsonl", root / "corpus.jsonl", root / "qrels" / f"{split}.tsv"]
        for path in needed:
            if not path.exists():
                raise ConfigError(
                    f"eval set {name!r}: {path} is missing (expected BEIR layout under {root})."
                )
        queries = _normalize_rows(_read_jsonl(needed[0]), is_corpus=False)
        corpus = _normalize_rows(_read_jsonl(needed[1]), is_corpus=True)
        qrel_rows = _read_qrels_tsv(needed[2])
    else:
        import datasets

        from datamodules.sources import undecoded_audio

        queries = _normalize_rows(
            _numbered(undecoded_audio(datasets.load_dataset(location, "queries", split="queries")), location),
            is_corpus=False,
        )
        corpus = _normalize_rows(
            _numbered(datasets.load_dataset(location, "corpus", split="corpus"), location), is_corpus=True
        )
        qrels_name = f"{location}-qrels"
        qrel_rows = [
            Judgment(str(r["query-id"]), str(r["corpus-id"]), _grade(r["score"], where), where)
            for where, r in _numbered(datasets.load_dataset(qrels_name, split=split), f"{qrels_name} {split}")
        ]
    eval_set = build_eval_set(name, queries, corpus, qrel_rows, source=location)
    eval_set.root = Path(location).expanduser() if looks_local(location) else None
    return eval_set


def _numbered(rows: Iterable[dict], source: str) -> Iterable[tuple[str, dict]]:
    """Hub rows with where they are (``<dataset> row <n>``), as ``_read_jsonl`` gives file lines."""
    return ((f"{source} row {number}", row) for number, row in enumerate(rows))


def _read_jsonl(path: Path) -> Iterable[tuple[str, dict]]:
    """``(file:line, row)`` for every non-blank line."""
    with open(path, encoding="utf-8-sig") as handle:  # a byte-order mark is not data
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield f"{path}:{line_number}", json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{line_number}: not valid JSON ({error}).") from error


def _grade(value, where: str) -> int:
    """A qrels score as an integer grade; an integer written as a float (``1.0``) is that integer."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number.is_integer()):
        raise DataError(
            f"{where}: score {value!r} is not an integer grade (0: not relevant; 1, 2, ...: relevant)."
        )
    return int(number)


def _read_qrels_tsv(path: Path) -> list[Judgment]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
            raise DataError(f"{path}: expected the header 'query-id<TAB>corpus-id<TAB>score', got {header}.")
        judgments = []
        for row in reader:
            if not row:
                continue
            where = f"{path}:{reader.line_num}"
            if len(row) < 3:
                raise DataError(
                    f"{where}: expected query-id, corpus-id and score separated by tabs, got {row}."
                )
            judgments.append(Judgment(row[0], row[1], _grade(row[2], where), where))
        return judgments
