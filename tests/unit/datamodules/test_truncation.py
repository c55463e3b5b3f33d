"""Truncation is reported, never hidden: the share of texts cut by the token limits, per eval set
and for the training stream, measured with a word-level tokenizer whose lengths are known by hand."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

import datamodules.pairs
from datamodules.pairs import StreamingPairDataModule
from datamodules.text_batches import PromptConfig
from errors import ConfigError

# No instruction: a query's tokens are its words, so its length is known by counting them.
NO_PROMPT = PromptConfig(prompts={"document_retrieval": ""}, query_template="{query}")


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> Path:
    """One token per whitespace-separated word and no special tokens: a text of n words is n tokens."""
    vocabulary = {"[PAD]": 0, "[UNK]": 1} | {f"w{i}": i + 2 for i in range(100)}
    tokenizer = Tokenizer(WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    folder = tmp_path_factory.mktemp("word-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(
        folder
    )
    return folder


def _words(n: int) -> str:
    return " ".join(f"w{i % 100}" for i in range(n))


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _eval_set(root: Path, document_words: list[int], query_words: list[int]) -> Path:
    (root / "qrels").mkdir(parents=True)
    _write_jsonl(
        root / "corpus.jsonl", [{"_id": f"d{i}", "text": _words(n)} for i, n in enumerate(document_words)]
    )
    _write_jsonl(
        root / "queries.jsonl", [{"_id": f"q{i}", "text": _words(n)} for i, n in enumerate(query_words)]
    )
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\n", encoding="utf-8")
    return root


def _records(caplog) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "datamodules.pairs"]


FIX = (
    "Above data.truncation_warning_share=0.05: the model sees only the first tokens of these texts "
    "(they are cut, never dropped); raise {} to keep more of them."
)


def test_an_eval_set_reports_the_share_of_documents_and_queries_cut_once(word_tokenizer, tmp_path, caplog):
    # Documents of 10, 30, 25 (exactly the limit: kept whole) and 40 words against a limit of 25:
    # two of four cut. Queries of 3, 4 and 12 words against 10: one of three.
    root = _eval_set(tmp_path / "toy", [10, 30, 25, 40], [3, 4, 12])
    data = StreamingPairDataModule(
        str(word_tokenizer), eval_sets={"toy": str(root)}, prompts=NO_PROMPT,
        max_query_length=10, max_document_length=25,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="datamodules"):
        data.setup("validate")
        data.setup("validate")  # the same split again: nothing loaded, nothing reported
    line = (
        "eval set toy: 2 of 4 documents (50.0 %) cut to data.max_document_length=25 tokens (longest 40); "
        "1 of 3 query texts (33.3 %) cut to data.max_query_length=10 tokens (longest 12)"
    )
    truncation = [record for record in _records(caplog) if "cut to" in record[1]]
    assert truncation == [
        ("WARNING", f"{line}. " + FIX.format("data.max_document_length / data.max_query_length"))
    ]
    # Nothing is dropped: every document is still there, the longest cut to 25 tokens.
    eval_set = data.eval_sets["toy"]
    assert [row["id"] for row in eval_set.corpus] == ["d0", "d1", "d2", "d3"]
    tokens = data.batches.eval_batch(list(enumerate(eval_set.corpus)), "toy", "corpus")["document"]
    assert tokens["attention_mask"].sum(dim=1).tolist() == [10, 25, 25, 25]


def test_an_eval_set_under_the_warning_share_is_reported_as_info(word_tokenizer, tmp_path, caplog):
    root = _eval_set(tmp_path / "toy", [10, 30, 25, 40], [3, 4, 12])
    data = StreamingPairDataModule(
        str(word_tokenizer), eval_sets={"toy": str(root)}, prompts=NO_PROMPT,
        max_query_length=10, max_document_length=25, truncation_warning_share=0.5,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="datamodules"):
        data.setup("validate")
    assert (
        "INFO",
        "eval set toy: 2 of 4 documents (50.0 %) cut to data.max_document_length=25 tokens (longest 40); "
        "1 of 3 query texts (33.3 %) cut to data.max_query_length=10 tokens (longest 12).",
    ) in _records(caplog)


def test_the_training_stream_reports_its_share_cut_after_its_first_batches_and_at_the_end(
    word_tokenizer, tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr(datamodules.pairs, "TRUNCATION_REPORT_AFTER_BATCHES", 2)
    # Documents of 10, 30, 25, 40, 5 and 26 words against 25: 30, 40 and 26 are cut (3 of 6).
    rows = [
        {"id": f"r{i}", "query": _words(3), "document": _words(n)}
        for i, n in enumerate([10, 30, 25, 40, 5, 26])
    ]
    data = StreamingPairDataModule(
        str(word_tokenizer), train_data=str(_write_jsonl(tmp_path / "train.jsonl", rows)), prompts=NO_PROMPT,
        batch_size=2, passes=1, max_query_length=10, max_document_length=25,
    )  # fmt: skip
    data.setup("fit")
    with caplog.at_level(logging.INFO, logger="datamodules"):
        documents = [data.on_before_batch_transfer(batch, 0)["document"] for batch in data.train_dataloader()]
        data.teardown("fit")
    assert sorted(n for d in documents for n in d["attention_mask"].sum(dim=1).tolist()) == [
        5,
        10,
        25,
        25,
        25,
        25,
    ]
    (first, last) = [record for record in _records(caplog) if record[1].startswith("training stream")]
    # After 2 batches (4 rows, in shuffled order) the share is over 5 % whatever the order: warned once.
    assert first[0] == "WARNING" and first[1].startswith("training stream, its first 2 batches: ")
    assert first[1].endswith(FIX.format("data.max_document_length"))
    assert last == (
        "INFO",
        "training stream, the 3 batches of this fit: 3 of 6 documents (50.0 %) cut to "
        "data.max_document_length=25 tokens (longest 40); 0 of 6 query texts (0.0 %) cut to "
        "data.max_query_length=10 tokens (longest 3).",
    )


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_a_warning_share_outside_zero_to_one_is_refused(word_tokenizer, share):
    with pytest.raises(ConfigError, match="data.truncation_warning_share"):
        StreamingPairDataModule(str(word_tokenizer), truncation_warning_share=share)
