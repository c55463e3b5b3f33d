"""Two more spoken eval sets for the demo, in the paper's other evaluations (same voices, same words).

- ``keywords/`` (keyword spotting = transcription retrieval): a few query-language words, each
  said inside a short carrier phrase of filler words by several voices; the classes are the
  keywords' transcriptions, the queries carry the ``transcription_retrieval`` task.
- ``intents/`` (zero-shot intent): each intent is one concept; a request mentions it among
  another concept and fillers; the class texts are the intents' names in the document language
  (the model never trained on them as labels: the nearest name is its zero-shot guess).

Both use the BEIR layout (queries with audio, corpus = one text per class, qrels = the class),
read by ``data.classification_sets``.
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


def _write_set(root: Path, queries: list[dict], classes: list[str], voices, config: DemoSpeechConfig) -> None:
    """queries: ``{"id", "words", "class", "task"}``; writes audio/, queries, corpus and qrels."""
    (root / "audio").mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    rows = []
    for query, voice in zip(queries, voices, strict=True):
        path = f"audio/{query['id']}.{config.audio_format}"
        signal = voice.say(query["words"])
        (root / path).write_bytes(encoded_audio(signal, config.sampling_rate, config.audio_format))
        rows.append(
            {"_id": query["id"], "text": " ".join(query["words"]), "task": query["task"], "audio": path}
        )
    _write_jsonl(root / "queries.jsonl", rows)
    _write_jsonl(
        root / "corpus.jsonl", ({"_id": f"class-{i}", "text": text} for i, text in enumerate(classes))
    )
    with open(root / "qrels" / "test.tsv", "w", encoding="utf-8") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for query in queries:
            handle.write(f"{query['id']}\tclass-{query['class']}\t1\n")


def write_demo_speech_tasks(
    root: Path,
    corpus_config: DemoCorpusConfig | None = None,
    config: DemoSpeechConfig | None = None,
    num_keywords: int = 16,
    num_intents: int = 8,
    voices_per_class: int = 5,
) -> Path:
    """Writes ``keywords/`` and ``intents/`` under root; returns root."""
    corpus_config = corpus_config or DemoCorpusConfig()
    config = config or DemoSpeechConfig()
    language = DemoLanguagePair(corpus_config)
    chords = chord_table(language.query_vocabulary + language.query_fillers, config)
    rng = random.Random(config.seed + 7)
    audio_rng = np.random.default_rng(config.seed + 7)
    concepts = rng.sample(range(corpus_config.num_concepts), num_keywords + num_intents)
    keywords, intents = concepts[:num_keywords], concepts[num_keywords:]

    queries = []
    for index, concept in enumerate(keywords):
        for voice in range(voices_per_class):
            words = [language.query_vocabulary[concept]]
            for _ in range(rng.randint(1, 2)):  # a carrier phrase around the keyword
                words.insert(rng.randint(0, len(words)), rng.choice(language.query_fillers))
            queries.append({"id": f"kw{index}-v{voice}", "words": words, "class": index})
    for query in queries:
        query["task"] = TASK_TRANSCRIPTION_RETRIEVAL
    keyword_texts = [language.query_vocabulary[c] for c in keywords]
    voices = [DemoVoice(config, chords, audio_rng) for _ in queries]
    _write_set(root / "keywords", queries, keyword_texts, voices, config)

    others = [c for c in range(corpus_config.num_concepts) if c not in intents]
    queries = []
    for index, concept in enumerate(intents):
        for voice in range(voices_per_class):
            words = language.render_query(rng, [concept, rng.choice(others)])
            queries.append({"id": f"intent{index}-v{voice}", "words": words, "class": index})
    for query in queries:
        query["task"] = TASK_DOCUMENT_RETRIEVAL
    intent_names = [language.document_vocabulary[c] for c in intents]
    voices = [DemoVoice(config, chords, audio_rng) for _ in queries]
    _write_set(root / "intents", queries, intent_names, voices, config)
    return root
