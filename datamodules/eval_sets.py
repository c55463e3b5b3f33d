"""BEIR-style evaluation sets: queries, corpus and graded qrels, held in memory by position.

Layout on disk (as BEIR): ``corpus.jsonl`` (``_id``, ``text``, optional ``title``),
``queries.jsonl`` (``_id``, ``text``, optional ``task``), ``qrels/<split>.tsv`` (header, then
``query-id  corpus-id  score``). A hub name follows the BeIR convention instead: configs
``corpus`` and ``queries`` in the dataset, qrels in ``<name>-qrels``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

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


def build_eval_set(name: str, queries: list[dict], corpus: list[dict], qrel_rows, source: str) -> EvalSet:
    """Checks ids and turns id-keyed qrels into position-keyed ones; names any unknown id."""
    query_index = _index_by_id(queries, f"{source} queries")
    doc_index = _index_by_id(corpus, f"{source} corpus")
    qrels: dict[int, dict[int, int]] = {}
    for query_id, doc_id, grade in qrel_rows:
        if query_id not in query_index:
            raise DataError(
                f"eval set {name!r}: qrels name query id {query_id!r}, which is not in {source} queries."
            )
        if doc_id not in doc_index:
            raise DataError(
                f"eval set {name!r}: qrels name corpus id {doc_id!r}, which is not in {source} corpus."
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


def _normalize_rows(raw_rows, is_corpus: bool) -> list[dict]:
    rows = []
    for raw in raw_rows:
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
            undecoded_audio(datasets.load_dataset(location, "queries", split="queries")), is_corpus=False
        )
        corpus = _normalize_rows(datasets.load_dataset(location, "corpus", split="corpus"), is_corpus=True)
        qrels_table = datasets.load_dataset(f"{location}-qrels", split=split)
        qrel_rows = [(str(r["query-id"]), str(r["corpus-id"]), int(r["score"])) for r in qrels_table]
    eval_set = build_eval_set(name, queries, corpus, qrel_rows, source=location)
    eval_set.root = Path(location).expanduser() if looks_local(location) else None
    return eval_set


def _read_jsonl(path: Path):
    with open(path, encoding="utf-8-sig") as handle:  # a byte-order mark is not data
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{line_number}: not valid JSON ({error}).") from error


def _read_qrels_tsv(path: Path) -> list[tuple[str, str, int]]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
            raise DataError(f"{path}: expected the header 'query-id<TAB>corpus-id<TAB>score', got {header}.")
        return [(row[0], row[1], int(row[2])) for row in reader if row]
