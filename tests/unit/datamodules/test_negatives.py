"""Hard negatives in training data: drawn per row and pass (seeded, resumable), tokenized with the
documents, ids resolved from a corpus file (an unknown id named), rows with too few counted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from datamodules.negatives import NegativeSampler
from datamodules.pairs import StreamingPairDataModule
from errors import ConfigError, DataError
from lightning_modules.document_cache import tokenized_document_keys

WORDS = "bita saaso mooje vérô fèfé lôrôfê kani dolo siri mana tigi bolo".split()


def _document(i: int) -> str:
    return " ".join(WORDS[(i * 5 + k) % len(WORDS)] for k in range(2 + i % 3)) + f" d{i}"


def _rows(count: int, negatives_per_row=lambda i: 5) -> list[dict]:
    rows = []
    for i in range(count):
        row = {"id": f"r{i}", "query": WORDS[i % len(WORDS)], "document": _document(i)}
        n = negatives_per_row(i)
        if n is not None:
            row["negatives"] = [_document(100 + 10 * i + k) for k in range(n)]
        rows.append(row)
    return rows


def _write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _datamodule(text_model, train, **options) -> StreamingPairDataModule:
    settings = {"batch_size": 4, "shuffle_block_size": 8, "max_query_length": 32, "max_document_length": 32}
    return StreamingPairDataModule(str(text_model), train_data=train, **(settings | options))


def _negative_texts(datamodule, batch) -> dict[str, list[str]]:
    """Each row id's negatives, decoded from the batch's tokens."""
    tokenizer = datamodule.batches.tokenizer
    texts = tokenizer.batch_decode(batch["negatives"]["input_ids"], skip_special_tokens=True)
    out = {row: [] for row in batch["ids"]}
    for text, owner in zip(texts, batch["negative_rows"].tolist(), strict=True):
        out[batch["ids"][owner]].append(text.strip())
    return out


def _taken(datamodule, loader, limit):
    taken = []
    for batch in loader:
        taken.append(datamodule.on_before_batch_transfer(batch, 0))
        if len(taken) == limit:
            break
    return taken


def test_each_pass_draws_up_to_num_negatives_per_row_seeded_and_new_each_pass():
    columns = {"id": "id", "query": "query", "document": "document"}
    sampler = NegativeSampler(3, seed=7, columns=columns)
    row = _rows(1, lambda i: 10)[0]
    first, again = sampler(row, 0)["negatives"], sampler(dict(row), 0)["negatives"]
    assert first == again and len(first) == 3 and set(first) <= set(row["negatives"])
    passes = {tuple(sampler(row, epoch)["negatives"]) for epoch in range(6)}
    assert len(passes) > 1  # a new draw each pass
    assert NegativeSampler(3, seed=8, columns=columns)(row, 0)["negatives"] != first or len(passes) == 1
    short = _rows(1, lambda i: 2)[0]
    assert sampler(short, 0)["negatives"] == short["negatives"]  # fewer than asked: all of them


def test_a_batch_holds_each_rows_negatives_tokenized_with_the_documents(tiny_text_model, tmp_path):
    rows = _rows(8, lambda i: [3, 0, None, 1][i % 4])
    datamodule = _datamodule(tiny_text_model, _write(tmp_path / "train.jsonl", rows), num_negatives=2)
    datamodule.setup("fit")
    batch = _taken(datamodule, datamodule.train_dataloader(), 1)[0]
    assert batch["negatives"]["input_ids"].shape[1] == batch["document"]["input_ids"].shape[1]
    by_id = {row["id"]: row for row in rows}
    got = _negative_texts(datamodule, batch)
    for row_id, negatives in got.items():
        listed = by_id[row_id].get("negatives") or []
        assert len(negatives) == min(2, len(listed)) and set(negatives) <= set(listed)
    separately = datamodule.batches.documents([t for ts in got.values() for t in ts])
    assert torch.equal(batch["negative_keys"], tokenized_document_keys(separately))
    assert "negatives_count" not in batch  # taken by the datamodule and counted
    count = datamodule.training_negatives
    # Rows with 0 and with no column at all had none; rows with 1 had fewer than 2.
    assert (count.rows, count.short, count.without) == (4, 3, 2)


def test_rows_without_negatives_are_counted_reported_and_train_in_batch_only(
    tiny_text_model, tmp_path, caplog
):
    from lightning_modules import TextOnly
    from lightning_modules.components.text_encoder import TextEncoderConfig

    rows = _rows(8, lambda i: [None, 0][i % 2])  # missing or empty everywhere
    train = _write(tmp_path / "train.jsonl", rows)
    with_negatives = _datamodule(tiny_text_model, train, num_negatives=3, shuffle_block_size=1)
    without = _datamodule(tiny_text_model, train, shuffle_block_size=1)
    for datamodule in (with_negatives, without):
        datamodule.setup("fit")
    batch = _taken(with_negatives, with_negatives.train_dataloader(), 1)[0]
    plain = _taken(without, without.train_dataloader(), 1)[0]
    assert "negatives" not in batch and batch["ids"] == plain["ids"]
    model = TextOnly(TextEncoderConfig(str(tiny_text_model)), matryoshka_dims=[32, 256])
    assert torch.equal(model.training_loss(batch), model.training_loss(plain))
    with caplog.at_level(logging.INFO, logger="datamodules.pairs"):
        with_negatives.teardown("fit")  # the end-of-fit report
    assert "4 of 4 rows had fewer than data.num_negatives=3 hard negatives (4 had none" in caplog.text


def test_negatives_given_as_corpus_ids_resolve_and_an_unknown_id_is_named(tiny_text_model, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"_id": f"c{i}", "text": _document(200 + i)}) + "\n" for i in range(6))
    )
    rows = _rows(4, lambda i: None)
    for i, row in enumerate(rows):
        row["negatives"] = [f"c{i}", f"c{i + 1}"]
    train = _write(tmp_path / "train.jsonl", rows)
    datamodule = _datamodule(tiny_text_model, train, num_negatives=2, negatives_corpus=str(corpus))
    datamodule.setup("fit")
    batch = _taken(datamodule, datamodule.train_dataloader(), 1)[0]
    got = _negative_texts(datamodule, batch)
    for row_id, negatives in got.items():
        i = int(row_id[1:])
        assert sorted(negatives) == sorted([_document(200 + i), _document(201 + i)])
    rows[2]["negatives"] = ["c1", "nowhere-7"]
    bad = _datamodule(
        tiny_text_model, _write(tmp_path / "bad.jsonl", rows), num_negatives=2, negatives_corpus=str(corpus)
    )
    bad.setup("fit")
    with pytest.raises(
        DataError, match=r"training row 'r2': negatives id 'nowhere-7' is not in data.negatives_corpus"
    ):
        _taken(bad, bad.train_dataloader(), 4)


def test_bad_negatives_settings_fail_at_construction(tiny_text_model, tmp_path):
    train = _write(tmp_path / "train.jsonl", _rows(4))
    with pytest.raises(ConfigError, match="data.num_negatives=-1"):
        _datamodule(tiny_text_model, train, num_negatives=-1)
    with pytest.raises(ConfigError, match="data.negatives_corpus=.* data.num_negatives is 0"):
        _datamodule(tiny_text_model, train, negatives_corpus=train)
    with pytest.raises(ConfigError, match="data.negatives_corpus"):
        _datamodule(tiny_text_model, train, num_negatives=2, negatives_corpus=str(tmp_path / "missing.jsonl"))


def test_the_loader_resumes_with_the_same_negatives(tiny_text_model, tmp_path):
    rows = _rows(12, lambda i: 6)
    train = _write(tmp_path / "train.jsonl", rows)
    datamodule = _datamodule(tiny_text_model, train, num_negatives=2, passes=3)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    uninterrupted = [(b["ids"], _negative_texts(datamodule, b)) for b in _taken(datamodule, loader, None)]
    assert len(uninterrupted) == 9
    first_pass = {i: n for ids, negatives in uninterrupted[:3] for i, n in negatives.items()}
    second_pass = {i: n for ids, negatives in uninterrupted[3:6] for i, n in negatives.items()}
    assert first_pass != second_pass  # a new draw each pass
    fresh = _datamodule(tiny_text_model, train, num_negatives=2, passes=3)
    fresh.setup("fit")
    loader = fresh.train_dataloader()
    iterator = iter(loader)
    for _ in range(4):  # into the second pass
        fresh.on_before_batch_transfer(next(iterator), 0)
    state = loader.state_dict()
    resumed = _datamodule(tiny_text_model, train, num_negatives=2, passes=3)
    resumed.setup("fit")
    resumed_loader = resumed.train_dataloader()
    resumed_loader.load_state_dict(state)
    rest = [(b["ids"], _negative_texts(resumed, b)) for b in _taken(resumed, resumed_loader, None)]
    assert rest == uninterrupted[4:]


def test_the_document_cache_lists_the_negatives_once(tiny_text_model, tmp_path):
    rows = _rows(4, lambda i: [2, None, 0, 1][i])
    rows[3]["negatives"] = [rows[0]["document"]]  # a negative that is another row's document
    train = _write(tmp_path / "train.jsonl", rows)
    listed = list(_datamodule(tiny_text_model, train, num_negatives=2).distinct_documents())
    expected = [
        rows[0]["document"],
        *rows[0]["negatives"],
        rows[1]["document"],
        rows[2]["document"],
        rows[3]["document"],
    ]
    assert listed == expected
    no_column = _write(tmp_path / "plain.jsonl", _rows(3, lambda i: None))
    assert len(list(_datamodule(tiny_text_model, no_column, num_negatives=2).distinct_documents())) == 3
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "c0", "text": "kani dolo"}) + "\n")
    with_corpus = _datamodule(tiny_text_model, no_column, num_negatives=2, negatives_corpus=str(corpus))
    assert list(with_corpus.distinct_documents())[-1] == "kani dolo"


def test_batches_grouped_by_length_draw_negatives_as_rows_do(tmp_path):
    from functools import partial

    from datamodules.lengths import text_length
    from datamodules.sources import load_stream
    from datamodules.streaming import ShuffledEpochStream

    columns = {"id": "id", "query": "query", "document": "document"}
    sampler = NegativeSampler(2, seed=3, columns=columns)
    rows = {row["id"]: row for row in _rows(12, lambda i: 4)}
    source = _write(tmp_path / "train.jsonl", list(rows.values()))
    length_of = partial(text_length, column="document")
    stream = ShuffledEpochStream(
        load_stream(source),
        seed=3,
        block_size=6,
        passes=2,
        length_of=length_of,
        batch_size=3,
        transform=sampler,
    )
    batches = list(stream)
    assert len(batches) == 8
    for position, batch in enumerate(batches):  # 4 batches per pass
        for row in batch:
            assert len(row["negatives"]) == 2
            assert row["negatives"] == sampler(rows[row["id"]], position // 4)["negatives"]
