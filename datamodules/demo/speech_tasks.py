"""Two more spoken eval sets for the demo, in the paper's other evaluations (same voices, same words).

- ``keywords/`` (keyword spotting = transcription retrieval): a few query-language words, each
  said inside a short carrier phrase of filler words by several voices; the classes are the
  keywords' transcriptions, the queries carry the ``transcription_retrieval`` task.
- ``intents/`` (zero-shot intent): each intent is one concept; a request mentions it among
  another concept and fillers; the class texts are the intents' names in the document language
  (the model never trained on them as labels: the nearest name is its zero-shot guess).

Both use the BEIR layout (queries with audio, corpus = one text per class, qrels = the class),
read by ``data.classification_sets``. Their ``test`` split is what validation scores; a ``train``
split (other voices, other carrier phrases, from random streams of its own so the test clips do
not change) holds the labelled examples n-shot classification draws from
(``callbacks.few_shot``).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from datamodules.demo.corpus import (
    TASK_DOCUMENT_RETRIEVAL,
    DemoCorpusConfig,
    DemoLanguagePair,
    _write_jsonl,
)
from datamodules.demo.speech import DemoSpeechConfig, DemoVoice, chord_table, encoded_audio

TASK_TRANSCRIPTION_RETRIEVAL = "transcription_retrieval"


def _write_set(
    root: Path, splits: dict[str, tuple[list[dict], list]], classes: list[str], config: DemoSpeechConfig
) -> None:
    """splits: name -> (queries ``{"id", "words", "class", "task"}``, their voices); writes audio/,
    one queries.jsonl, the corpus and ``qrels/<split>.tsv``."""
    (root / "audio").mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    rows = []
    for split, (queries, voices) in splits.items():
        for query, voice in zip(queries, voices, strict=True):
            path = f"audio/{query['id']}.{config.audio_format}"
            signal = voice.say(query["words"])
            (root / path).write_bytes(encoded_audio(signal, config.sampling_rate, config.audio_format))
            rows.append(
                {"_id": query["id"], "text": " ".join(query["words"]), "task": query["task"], "audio": path}
            )
        with open(root / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as handle:
            handle.write("query-id\tcorpus-id\tscore\n")
            for query in queries:
                handle.write(f"{query['id']}\tclass-{query['class']}\t1\n")
    _write_jsonl(root / "queries.jsonl", rows)
    _write_jsonl(
        root / "corpus.jsonl", ({"_id": f"class-{i}", "text": text} for i, text in enumerate(classes))
    )


def _keyword_queries(rng, language, keywords, per_class: int, tag: str) -> list[dict]:
    queries = []
    for index, concept in enumerate(keywords):
        for voice in range(per_class):
            words = [language.query_vocabulary[concept]]
            for _ in range(rng.randint(1, 2)):  # a carrier phrase around the keyword
                words.insert(rng.randint(0, len(words)), rng.choice(language.query_fillers))
            queries.append(
                {
                    "id": f"kw{index}-{tag}{voice}",
                    "words": words,
                    "class": index,
                    "task": TASK_TRANSCRIPTION_RETRIEVAL,
                }
            )
    return queries


def _intent_queries(rng, language, intents, others, per_class: int, tag: str) -> list[dict]:
    queries = []
    for index, concept in enumerate(intents):
        for voice in range(per_class):
            words = language.render_query(rng, [concept, rng.choice(others)])
            queries.append(
                {
                    "id": f"intent{index}-{tag}{voice}",
                    "words": words,
                    "class": index,
                    "task": TASK_DOCUMENT_RETRIEVAL,
                }
            )
    return queries


def write_demo_speech_tasks(
    root: Path,
    corpus_config: DemoCorpusConfig | None = None,
    config: DemoSpeechConfig | None = None,
    num_keywords: int = 16,
    num_intents: int = 8,
    voices_per_class: int = 5,
    train_examples_per_class: int = 16,
) -> Path:
    """Writes ``keywords/`` and ``intents/`` under root (``test`` split: ``voices_per_class`` clips
    per class; ``train``: ``train_examples_per_class`` clips by other voices); returns root."""
    corpus_config = corpus_config or DemoCorpusConfig()
    config = config or DemoSpeechConfig()
    language = DemoLanguagePair(corpus_config)
    chords = chord_table(language.query_vocabulary + language.query_fillers, config)
    rng = random.Random(config.seed + 7)
    audio_rng = np.random.default_rng(config.seed + 7)
    # The train split's own streams: drawing from rng / audio_rng would change every test clip.
    train_rng = random.Random(config.seed + 11)
    train_audio_rng = np.random.default_rng(config.seed + 11)
    concepts = rng.sample(range(corpus_config.num_concepts), num_keywords + num_intents)
    keywords, intents = concepts[:num_keywords], concepts[num_keywords:]
    others = [c for c in range(corpus_config.num_concepts) if c not in intents]

    def voices(rng_, queries):
        return [DemoVoice(config, chords, rng_) for _ in queries]

    test = _keyword_queries(rng, language, keywords, voices_per_class, "v")
    train = _keyword_queries(train_rng, language, keywords, train_examples_per_class, "t")
    splits = {"test": (test, voices(audio_rng, test)), "train": (train, voices(train_audio_rng, train))}
    _write_set(root / "keywords", splits, [language.query_vocabulary[c] for c in keywords], config)

    test = _intent_queries(rng, language, intents, others, voices_per_class, "v")
    train = _intent_queries(train_rng, language, intents, others, train_examples_per_class, "t")
    splits = {"test": (test, voices(audio_rng, test)), "train": (train, voices(train_audio_rng, train))}
    _write_set(root / "intents", splits, [language.document_vocabulary[c] for c in intents], config)
    return root
