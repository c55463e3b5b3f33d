"""``python -m datamodules.own_corpus``: a tokenizer from the training texts, tiny models beside it."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoTokenizer

from datamodules import own_corpus
from errors import ConfigError, DataError

ROWS = [
    {"query": "ŋɔɓə ñiɗɛ", "document": "κασιπω σελε", "audio": "clips/a.wav"},
    {"query": "ƙiɗɔ ŋɔɓə", "document": "σελε ροσαλι", "audio": "clips/b.flac"},
    {"document": "ροσαλι κασιπω", "audio": "clips/c.ogg"},  # audio without a transcription
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def test_builds_a_tokenizer_from_the_training_texts_and_tiny_models(tmp_path, capsys):
    train = _write_jsonl(tmp_path / "train.jsonl", ROWS * 20)
    # Compared with a tokenizer that never saw these letters: the first build's, on other words.
    other = own_corpus.build(
        str(_write_jsonl(tmp_path / "other.jsonl", [{"document": "xyz"}])), tmp_path / "o"
    )
    assert other == ([], ["xyz"])

    rates = own_corpus.main(
        [
            "--train_data",
            str(train),
            "--output",
            str(tmp_path / "out"),
            "--compare_with",
            str(tmp_path / "o" / "text_model"),
            "--query_language=Lomasi",
        ]
    )

    assert "Tokens per word" in capsys.readouterr().out
    assert rates["queries"]["new"] == 1.0 < rates["queries"]["compared"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out" / "text_model")
    assert len(tokenizer("ŋɔɓə", add_special_tokens=False)["input_ids"]) == 1
    assert (
        len(tokenizer("Given a Lomasi query", add_special_tokens=False)["input_ids"]) == 4
    )  # the instruction's
    assert AutoModel.from_pretrained(tmp_path / "out" / "text_model").config.vocab_size == len(tokenizer)
    assert AutoConfig.from_pretrained(tmp_path / "out" / "speech_model").model_type == "wav2vec2-bert"
    assert AutoFeatureExtractor.from_pretrained(tmp_path / "out" / "speech_model").sampling_rate == 16000


def test_reads_only_the_text_columns_it_needs(tmp_path):
    queries, documents = own_corpus.training_texts(str(_write_jsonl(tmp_path / "train.jsonl", ROWS * 2)))
    assert queries == ["ŋɔɓə ñiɗɛ", "ƙiɗɔ ŋɔɓə"]  # distinct, in file order; the row without one skipped
    assert documents == ["κασιπω σελε", "σελε ροσαλι", "ροσαλι κασιπω"]


def test_refuses_what_cannot_work(tmp_path):
    no_documents = _write_jsonl(tmp_path / "queries.jsonl", [{"query": "ŋɔɓə"}])
    with pytest.raises(DataError, match="no 'document' column"):
        own_corpus.build(str(no_documents), tmp_path / "a")
    train = _write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(ConfigError, match="--vocab_size=100"):
        own_corpus.build(str(train), tmp_path / "b", vocab_size=100)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").touch()
    with pytest.raises(ConfigError, match="not empty"):
        own_corpus.build(str(train), tmp_path / "taken")
