"""BEIR-style evaluation sets: queries, corpus and graded qrels, held in memory by position.

Layout on disk (as BEIR): ``corpus.jsonl`` (``_id``, ``text``, optional ``title``),
``queries.jsonl`` (``_id``, ``text``, optional ``task``), ``qrels/<split>.tsv`` (header, then
``query-id  corpus-id  score``). A hub name follows the BeIR convention instead: configs
``corpus`` and ``queries`` in the dataset, qrels in ``<name>-qrels``.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from datamodules.sources import json_lines, looks_local
from errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """One eval set. Queries and documents are addressed by position; qrels map positions too."""

    name: str
    queries: list[dict]
    """Rows with at least ``id``; ``text`` and ``task`` when the data has them."""
    corpus: list[dict]
    """Rows with ``id`` and ``text`` (the title, if any, then the text; never empty)."""
    qrels: dict[int, dict[int, int]] = field(default_factory=dict)
    """Query position -> {document position: grade > 0}."""

    root: Path | None = None
    """Local folder of the set (relative audio paths in queries resolve against it)."""

    kind: str = "retrieval"
    """``retrieval`` (rank the corpus: nDCG, recall, MRR) or ``classification`` (the corpus is
    one text per class, the qrels give each query's class: accuracy and macro recall/F1 of the
    nearest class, e.g. keyword spotting or zero-shot intent)."""

    documents_left_out: list[str] = field(default_factory=list)
    """Ids of the corpus rows left out for having neither text nor title."""

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
        return replace(self, queries=queries, qrels=qrels)


class Judgment(NamedTuple):
    """One qrels row, and where it was read (``file:line``), to name it in an error."""

    query_id: str
    doc_id: str
    grade: int
    where: str


def build_eval_set(
    name: str,
    queries: list[dict],
    corpus: list[dict],
    judgments: Iterable[Judgment],
    source: str,
    documents_without_text: dict[str, str] | None = None,
) -> EvalSet:
    """Checks ids and turns id-keyed qrels into position-keyed ones; names any unknown id.

    ``documents_without_text`` (id -> where it was read) are the corpus rows left out: a
    judgment of one as not relevant (grade <= 0) changes nothing, one as relevant is an error.
    """
    without_text = documents_without_text or {}
    query_index = _index_by_id(queries, f"{source} queries")
    doc_index = _index_by_id(corpus, f"{source} corpus")
    for doc_id in without_text.keys() & doc_index.keys():
        raise DataError(f"{source} corpus: id {doc_id!r} appears twice.")
    qrels: dict[int, dict[int, int]] = {}
    for query_id, doc_id, grade, where in judgments:
        if query_id not in query_index:
            raise DataError(
                f"eval set {name!r}, {where}: qrels name query id {query_id!r}, which is not in "
                f"{source} queries."
            )
        if doc_id in without_text:
            if grade > 0:
                raise DataError(
                    f"eval set {name!r}, {where}: qrels judge corpus id {doc_id!r} relevant, but its "
                    f"row ({without_text[doc_id]}) has neither text nor title; give it its text or "
                    "remove the judgment."
                )
            continue
        if doc_id not in doc_index:
            raise DataError(
                f"eval set {name!r}, {where}: qrels name corpus id {doc_id!r}, which is not in "
                f"{source} corpus."
            )
        if grade > 0:
            qrels.setdefault(query_index[query_id], {})[doc_index[doc_id]] = grade
    return EvalSet(
        name=name, queries=queries, corpus=corpus, qrels=qrels, documents_left_out=list(without_text)
    )


def _index_by_id(rows: list[dict], what: str) -> dict[str, int]:
    index: dict[str, int] = {}
    for position, row in enumerate(rows):
        row_id = row["id"]
        if row_id in index:
            raise DataError(f"{what}: id {row_id!r} appears twice.")
        index[row_id] = position
    return index


def _document_text(row: dict) -> str:
    """The title (if any), then the text, as BEIR's models read a document (non-strings count as empty)."""
    title, text = (row.get(key) if isinstance(row.get(key), str) else "" for key in ("title", "text"))
    return f"{title.strip()} {text}".strip() if title.strip() else text


def _with_id(where: str, raw) -> dict:
    """A query or corpus row with its ``_id`` as ``id`` (a string); ``where`` names it in an error."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object with an '_id', got {type(raw).__name__}.")
    if raw.get("_id") is None or str(raw["_id"]).strip() == "":
        raise DataError(f"{where}: the row has no '_id' (every query and document needs one).")
    row = {key: value for key, value in raw.items() if key not in ("_id", "title")}
    row["id"] = str(raw["_id"])
    return row


def _query_rows(raw_rows: Iterable[tuple[str, dict]]) -> list[dict]:
    """``(where, row)`` pairs as read (``where``: ``file:line``) -> query rows."""
    return [_with_id(where, raw) for where, raw in raw_rows]


def _corpus_rows(raw_rows: Iterable[tuple[str, dict]]) -> tuple[list[dict], dict[str, str]]:
    """Corpus rows with their ``text``, and (id -> where) of those with neither text nor title,
    which are left out: an empty document would compete in every ranking."""
    rows, without_text = [], {}
    for where, raw in raw_rows:
        row = _with_id(where, raw)
        row["text"] = _document_text(raw)
        if row["text"].strip():
            rows.append(row)
        elif row["id"] in without_text:
            raise DataError(f"{where}: corpus id {row['id']!r} appears twice.")
        else:
            without_text[row["id"]] = where
    return rows, without_text


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
        queries = _query_rows(_read_jsonl(needed[0]))
        corpus, without_text = _corpus_rows(_read_jsonl(needed[1]))
        qrel_rows = _read_qrels_tsv(needed[2])
        other_splits = {
            path.stem: _read_qrels_tsv(path)
            for path in sorted((root / "qrels").glob("*.tsv"))
            if path.stem != split
        }
    else:
        import datasets

        from datamodules.sources import undecoded_audio

        queries = _query_rows(
            _numbered(undecoded_audio(datasets.load_dataset(location, "queries", split="queries")), location)
        )
        corpus, without_text = _corpus_rows(
            _numbered(datasets.load_dataset(location, "corpus", split="corpus"), location)
        )
        qrels_name = f"{location}-qrels"

        def hub_qrels(split_name: str) -> list[Judgment]:
            rows = _numbered(
                datasets.load_dataset(qrels_name, split=split_name), f"{qrels_name} {split_name}"
            )
            return [
                Judgment(str(r["query-id"]), str(r["corpus-id"]), _grade(r["score"], where), where)
                for where, r in rows
            ]

        qrel_rows = hub_qrels(split)
        other_splits = {s: hub_qrels(s) for s in datasets.get_dataset_split_names(qrels_name) if s != split}
    if without_text:
        log.warning(
            "eval set %s: %d corpus rows have neither text nor title and are left out: %s (first at %s)",
            name,
            len(without_text),
            list(without_text)[:20],
            next(iter(without_text.values())),
        )
    queries = _queries_of_split(name, queries, qrel_rows, other_splits, split)
    eval_set = build_eval_set(name, queries, corpus, qrel_rows, location, without_text)
    eval_set.root = Path(location).expanduser() if looks_local(location) else None
    return eval_set


def _queries_of_split(
    name: str,
    queries: list[dict],
    judgments: list[Judgment],
    other_splits: dict[str, list[Judgment]],
    split: str,
) -> list[dict]:
    """Leaves out the queries that only another split's qrels name.

    BEIR keeps every split's queries in one ``queries.jsonl``: split ``test`` would otherwise
    embed (and score as unjudged) the dev queries. A query no qrels file names stays: a corpus
    embedded before any judgment is a supported layout.
    """
    judged_here = {judgment.query_id for judgment in judgments}
    elsewhere = {judgment.query_id for rows in other_splits.values() for judgment in rows} - judged_here
    kept = [row for row in queries if row["id"] not in elsewhere]
    if len(kept) < len(queries):
        log.info(
            "eval set %s, split %s: %d queries judged only in other splits (%s) are left out",
            name,
            split,
            len(queries) - len(kept),
            ", ".join(sorted(other_splits)),
        )
    return kept


def _numbered(rows: Iterable[dict], source: str) -> Iterable[tuple[str, dict]]:
    """Hub rows with where they are (``<dataset> row <n>``), as ``_read_jsonl`` gives file lines."""
    return ((f"{source} row {number}", row) for number, row in enumerate(rows))


def _read_jsonl(path: Path) -> Iterable[tuple[str, dict]]:
    """``(file:line, row)`` for every non-blank line."""
    return ((f"{path}:{number}", row) for number, row in json_lines(path))


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
