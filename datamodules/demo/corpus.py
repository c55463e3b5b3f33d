"""Deterministic bilingual retrieval corpus for the embedded demo.

Two invented languages share a set of *concepts*: each concept has a word in the query language
(the stand-in for Wolof) and a different word in the document language (the stand-in for French),
built from disjoint syllable inventories so no query token can match a document token. A query is
a few concept words in the query language among fillers; its document holds the translations of
those concepts among distractor words. Retrieval therefore needs a learned mapping between the two
vocabularies: an untrained model scores at chance.

Every example keeps its concept ids, so the speech issue can render the same queries as audio
(one acoustic pattern per query-language word) without changing anything here.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Disjoint letters: query-language words never share a character n-gram with document words.
QUERY_CONSONANTS = "bdgjkmnpstwxy"
QUERY_VOWELS = ("a", "e", "i", "o", "u", "aa", "ee", "oo")
DOCUMENT_CONSONANTS = "cfhlrvz"
DOCUMENT_VOWELS = ("é", "è", "ê", "ô", "â", "î", "û", "éé")

TASK_DOCUMENT_RETRIEVAL = "document_retrieval"
TASK_TRANSLATION_RETRIEVAL = "translation_retrieval"


@dataclass(frozen=True)
class DemoCorpusConfig:
    """Sizes and seed of the generated corpus; the defaults train in a few CPU minutes."""

    seed: int = 0
    """Seed of every random choice: the same config always gives byte-identical files."""
    num_concepts: int = 120
    """Number of shared concepts (one word in each language)."""
    num_filler_words: int = 12
    """Function words per language that carry no meaning (queries and documents both use them)."""
    num_train_pairs: int = 6000
    """Training pairs written to train.jsonl."""
    num_eval_queries: int = 200
    """Queries of the BEIR-style eval set (each with one relevant document)."""
    num_eval_distractor_documents: int = 800
    """Extra corpus documents in the eval set that answer no query."""
    concepts_per_query: tuple[int, int] = (2, 4)
    """Inclusive range of concepts a query mentions."""
    distractors_per_document: tuple[int, int] = (2, 5)
    """Inclusive range of unrelated concept words added to a document."""
    translation_task_fraction: float = 0.2
    """Share of training pairs whose target is the bare translation instead of a document."""


@dataclass
class DemoExample:
    """One query/target pair, with the concepts that generated it."""

    id: str
    task: str
    concepts: list[int]
    query: str
    document: str
    query_words: list[str] = field(default_factory=list)


class DemoLanguagePair:
    """The two invented vocabularies and the rules that render concepts into sentences."""

    def __init__(self, config: DemoCorpusConfig):
        rng = random.Random(config.seed)
        needed = config.num_concepts + config.num_filler_words
        query_words = _unique_words(rng, QUERY_CONSONANTS, QUERY_VOWELS, needed)
        document_words = _unique_words(rng, DOCUMENT_CONSONANTS, DOCUMENT_VOWELS, needed)
        self.config = config
        self.query_vocabulary = query_words[: config.num_concepts]
        self.document_vocabulary = document_words[: config.num_concepts]
        self.query_fillers = query_words[config.num_concepts :]
        self.document_fillers = document_words[config.num_concepts :]

    def render_query(self, rng: random.Random, concepts: list[int]) -> list[str]:
        words = [self.query_vocabulary[c] for c in concepts]
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randint(0, len(words)), rng.choice(self.query_fillers))
        return words

    def render_document(self, rng: random.Random, concepts: list[int]) -> str:
        low, high = self.config.distractors_per_document
        others = [c for c in rng.sample(range(self.config.num_concepts), high * 2) if c not in concepts]
        words = [self.document_vocabulary[c] for c in concepts + others[: rng.randint(low, high)]]
        words += rng.sample(self.document_fillers, 3)
        rng.shuffle(words)
        return " ".join(words)

    def render_translation(self, concepts: list[int]) -> str:
        return " ".join(self.document_vocabulary[c] for c in concepts)

    def example(self, rng: random.Random, example_id: str, concepts: list[int], task: str) -> DemoExample:
        query_words = self.render_query(rng, concepts)
        if task == TASK_TRANSLATION_RETRIEVAL:
            document = self.render_translation(concepts)
        else:
            document = self.render_document(rng, concepts)
        return DemoExample(
            id=example_id,
            task=task,
            concepts=concepts,
            query=" ".join(query_words),
            document=document,
            query_words=query_words,
        )


def _unique_words(rng: random.Random, consonants: str, vowels: tuple[str, ...], count: int) -> list[str]:
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        syllables = rng.randint(2, 3)
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
        if rng.random() < 0.4:
            word += rng.choice(consonants)
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _concept_sets(
    rng: random.Random, config: DemoCorpusConfig, count: int, exclude: set
) -> Iterator[list[int]]:
    low, high = config.concepts_per_query
    produced = 0
    while produced < count:
        concepts = rng.sample(range(config.num_concepts), rng.randint(low, high))
        key = frozenset(concepts)
        if key in exclude:
            continue
        exclude.add(key)
        produced += 1
        yield concepts


def generate_demo_corpus(config: DemoCorpusConfig) -> tuple[list[DemoExample], list[DemoExample], list[dict]]:
    """Returns (train examples, eval examples, eval distractor documents as BEIR corpus rows).

    Eval queries use concept combinations never seen in training, so the eval set measures the
    learned word mapping rather than memorised pairs.
    """
    language = DemoLanguagePair(config)
    rng = random.Random(config.seed + 1)
    seen_sets: set = set()
    eval_examples = [
        language.example(rng, f"q{i}", concepts, TASK_DOCUMENT_RETRIEVAL)
        for i, concepts in enumerate(_concept_sets(rng, config, config.num_eval_queries, seen_sets))
    ]
    train_examples = []
    for i, concepts in enumerate(_concept_sets(rng, config, config.num_train_pairs, seen_sets)):
        is_translation = rng.random() < config.translation_task_fraction
        task = TASK_TRANSLATION_RETRIEVAL if is_translation else TASK_DOCUMENT_RETRIEVAL
        train_examples.append(language.example(rng, f"train-{i}", concepts, task))
    distractors = []
    for i in range(config.num_eval_distractor_documents):
        low, high = config.concepts_per_query
        concepts = rng.sample(range(config.num_concepts), rng.randint(low, high))
        distractors.append({"_id": f"distractor-{i}", "text": language.render_document(rng, concepts)})
    return train_examples, eval_examples, distractors


def write_demo_corpus(config: DemoCorpusConfig, root: Path) -> Path:
    """Writes train.jsonl and a BEIR-style eval set (eval/demo/) under root; returns root."""
    train, evaluation, distractors = generate_demo_corpus(config)
    root.mkdir(parents=True, exist_ok=True)
    _write_jsonl(
        root / "train.jsonl",
        ({"id": e.id, "task": e.task, "query": e.query, "document": e.document} for e in train),
    )
    write_demo_eval_set(root / "eval" / "demo", evaluation, distractors)
    return root


def write_demo_eval_set(
    eval_root: Path,
    evaluation: list[DemoExample],
    distractors: list[dict],
    query_extras: dict[str, dict] | None = None,
) -> None:
    """BEIR layout: queries.jsonl (plus ``query_extras[id]`` fields, e.g. audio), corpus.jsonl, qrels."""
    query_extras = query_extras or {}
    (eval_root / "qrels").mkdir(parents=True, exist_ok=True)
    _write_jsonl(
        eval_root / "queries.jsonl",
        ({"_id": e.id, "text": e.query, "task": e.task, **query_extras.get(e.id, {})} for e in evaluation),
    )
    corpus_rows = [{"_id": f"doc-{e.id}", "text": e.document} for e in evaluation] + distractors
    _write_jsonl(eval_root / "corpus.jsonl", corpus_rows)
    with open(eval_root / "qrels" / "test.tsv", "w", encoding="utf-8") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for e in evaluation:
            handle.write(f"{e.id}\tdoc-{e.id}\t1\n")


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
