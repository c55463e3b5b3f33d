"""Eval-set loading, the demo corpus, and the streaming pair datamodule on real `datasets` streams."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from trainers import quiet_cpu_trainer

from callbacks.training_guards import StopAtLastStep
from datamodules.demo.corpus import DemoCorpusConfig, DemoLanguagePair, generate_demo_corpus
from datamodules.eval_sets import load_beir_eval_set
from datamodules.pairs import StreamingPairDataModule
from datamodules.text_batches import PromptConfig
from errors import ConfigError, DataError


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _write_beir(root: Path, qrels: list[tuple[str, str, int]]) -> Path:
    (root / "qrels").mkdir(parents=True)
    _write_jsonl(root / "queries.jsonl", [{"_id": "a", "text": "query a"}, {"_id": "b", "text": "query b"}])
    _write_jsonl(
        root / "corpus.jsonl",
        [
            {"_id": "x", "title": "Title", "text": "doc x"},
            {"_id": "y", "text": "doc y"},
            {"_id": "z", "text": "doc z"},
        ],
    )
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{g}" for q, d, g in qrels]
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# ----- eval sets ------------------------------------------------------------------------------
def test_beir_folder_loads_with_positions_and_graded_qrels(tmp_path):
    eval_set = load_beir_eval_set(
        "toy", str(_write_beir(tmp_path / "toy", [("a", "y", 2), ("a", "x", 1), ("b", "z", 0)]))
    )
    assert [row["id"] for row in eval_set.corpus] == ["x", "y", "z"]
    assert eval_set.corpus[0]["text"] == "Title doc x"
    assert eval_set.qrels == {0: {1: 2, 0: 1}}  # grade 0 is not relevant
    assert eval_set.num_queries_without_relevant == 1


@pytest.mark.parametrize("bad", [("a", "nope", 1), ("nope", "x", 1)])
def test_qrels_naming_unknown_ids_fail_with_the_id(tmp_path, bad):
    with pytest.raises(DataError, match="nope"):
        load_beir_eval_set("toy", str(_write_beir(tmp_path / "toy", [("a", "x", 1), bad])))


def test_eval_files_with_a_byte_order_mark_load(tmp_path):
    """Windows tools write UTF-8 with a BOM; training files load that way, so eval files do too."""
    root = _write_beir(tmp_path / "toy", [("a", "x", 1)])
    for path in (root / "queries.jsonl", root / "corpus.jsonl", root / "qrels" / "test.tsv"):
        path.write_text(path.read_text(encoding="utf-8"), encoding="utf-8-sig")
    eval_set = load_beir_eval_set("toy", str(root))
    assert [row["id"] for row in eval_set.queries] == ["a", "b"] and eval_set.qrels == {0: {0: 1}}


def test_an_integer_score_written_as_a_float_is_that_grade(tmp_path):
    root = _write_beir(tmp_path / "toy", [("a", "x", "1.0"), ("b", "y", "2.0")])
    assert load_beir_eval_set("toy", str(root)).qrels == {0: {0: 1}, 1: {1: 2}}


@pytest.mark.parametrize(
    "bad_line, problem",
    [("b\ty\t0.5", "score '0.5' is not an integer grade"), ("b\ty\tyes", "score 'yes'"), ("b\ty", "got")],
)
def test_bad_qrels_rows_are_named_by_file_and_line(tmp_path, bad_line, problem):
    root = _write_beir(tmp_path / "toy", [("a", "x", 1)])
    qrels = root / "qrels" / "test.tsv"
    qrels.write_text(qrels.read_text() + bad_line + "\n")
    with pytest.raises(DataError, match=rf"test\.tsv:3: .*{problem}"):
        load_beir_eval_set("toy", str(root))


@pytest.mark.parametrize(
    "bad_row", [{"text": "no id"}, {"_id": None, "text": "null id"}, ["not", "an object"]]
)
def test_corpus_rows_without_an_id_are_named_by_file_and_line(tmp_path, bad_row):
    root = _write_beir(tmp_path / "toy", [("a", "x", 1)])
    corpus = root / "corpus.jsonl"
    corpus.write_text(corpus.read_text() + json.dumps(bad_row) + "\n")
    with pytest.raises(DataError, match=r"corpus\.jsonl:4: "):
        load_beir_eval_set("toy", str(root))


@pytest.mark.parametrize(
    "broken_line, where",
    [
        ('{"_id": "b", "text": ', "at the end of the line (Expecting value)"),  # cut off
        ('{"_id": "b" "text": "query b"}', "at column 13 (Expecting ',' delimiter)"),
    ],
)
def test_a_broken_json_line_is_named_by_file_line_and_column_only(tmp_path, broken_line, where):
    """json's own position ("line 2 column 1") counts within the line it was given."""
    root = _write_beir(tmp_path / "toy", [("a", "x", 1)])
    queries = root / "queries.jsonl"
    queries.write_text('{"_id": "a", "text": "query a"}\n' + broken_line + "\n")
    with pytest.raises(DataError) as error:
        load_beir_eval_set("toy", str(root))
    assert str(error.value) == f"{queries}:2: not valid JSON {where}."


def test_corpus_rows_without_text_are_left_out_and_named(tmp_path, caplog):
    """A title alone is a document; a row with neither would be embedded empty and ranked."""
    root = _write_beir(tmp_path / "toy", [("a", "x", 1), ("b", "empty", 0)])
    with open(root / "corpus.jsonl", "a", encoding="utf-8") as corpus:
        for row in ({"_id": "empty", "title": "", "text": "  "}, {"_id": "bare"}, {"_id": "t", "title": "T"}):
            corpus.write(json.dumps(row) + "\n")
    with caplog.at_level(logging.WARNING):
        eval_set = load_beir_eval_set("toy", str(root))
    assert [(row["id"], row["text"]) for row in eval_set.corpus][-2:] == [("z", "doc z"), ("t", "T")]
    assert eval_set.documents_left_out == ["empty", "bare"]
    assert "2 corpus rows have neither text nor title" in caplog.text and "'bare'" in caplog.text
    assert eval_set.qrels == {0: {0: 1}}  # the grade-0 judgment of 'empty' changes nothing

    qrels = root / "qrels" / "test.tsv"
    qrels.write_text(qrels.read_text() + "b\tbare\t1\n")
    with pytest.raises(DataError, match=r"test\.tsv:4: .*'bare' relevant.*corpus\.jsonl:5"):
        load_beir_eval_set("toy", str(root))


def _write_two_split_beir(root: Path, unjudged: bool = True) -> Path:
    """BEIR's usual layout: every split's queries in one queries.jsonl, one qrels file per split."""
    (root / "qrels").mkdir(parents=True)
    ids = [f"q{i}" for i in range(6)] + (["unjudged"] if unjudged else [])
    _write_jsonl(root / "queries.jsonl", [{"_id": i, "text": f"query {i}"} for i in ids])
    _write_jsonl(root / "corpus.jsonl", [{"_id": f"c{i}", "text": f"class {i}"} for i in range(2)])
    for split, judged in (("dev", range(3)), ("test", range(3, 6))):
        lines = "".join(f"q{i}\tc{i % 2}\t1\n" for i in judged)
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + lines)
    return root


def test_a_split_leaves_out_the_queries_only_another_split_judges(tmp_path, caplog):
    root = _write_two_split_beir(tmp_path / "toy")
    with caplog.at_level(logging.INFO):
        dev = load_beir_eval_set("toy", str(root), split="dev")
    test = load_beir_eval_set("toy", str(root), split="test")
    # A query no qrels file names stays (a corpus embedded before any judgment), unjudged.
    assert [row["id"] for row in dev.queries] == ["q0", "q1", "q2", "unjudged"]
    assert [row["id"] for row in test.queries] == ["q3", "q4", "q5", "unjudged"]
    assert test.qrels == {0: {1: 1}, 1: {0: 1}, 2: {1: 1}} and test.num_queries_without_relevant == 1
    assert "3 queries judged only in other splits (test) are left out" in caplog.text


def test_a_classification_set_with_a_dev_split_loads_each_split(tiny_text_model, tmp_path):
    root = _write_two_split_beir(tmp_path / "keywords", unjudged=False)
    datamodule = StreamingPairDataModule(
        str(tiny_text_model), classification_sets={"keywords": str(root)}, val_split="dev"
    )
    for stage, expected, classes in (
        ("validate", ["q0", "q1", "q2"], [0, 1, 0]),
        ("test", ["q3", "q4", "q5"], [1, 0, 1]),
    ):
        datamodule.setup(stage)
        eval_set = datamodule.eval_sets["keywords"]
        assert [row["id"] for row in eval_set.queries] == expected and eval_set.gold_labels() == classes


def test_a_hub_eval_set_leaves_out_other_splits_queries_and_reads_float_grades(tmp_path, monkeypatch):
    """The BeIR hub convention (configs ``queries`` / ``corpus``, qrels in ``<name>-qrels``)."""
    import datasets

    queries = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(4)]
    corpus = [{"_id": "d0", "title": "", "text": "doc 0"}, {"_id": "d1", "title": "", "text": ""}]
    qrels = {
        "test": [{"query-id": "q0", "corpus-id": "d0", "score": 1.0}],
        "dev": [
            {"query-id": "q1", "corpus-id": "d0", "score": 1},
            {"query-id": "q2", "corpus-id": "d1", "score": 0},
        ],
    }

    def load_dataset(path, name=None, split=None):
        if path == "org/toy-qrels":
            return datasets.Dataset.from_list(qrels[split])
        return datasets.Dataset.from_list({"queries": queries, "corpus": corpus}[name])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda path: list(qrels))
    eval_set = load_beir_eval_set("toy", "org/toy", split="test")
    assert [row["id"] for row in eval_set.queries] == ["q0", "q3"] and eval_set.qrels == {0: {0: 1}}
    assert [row["id"] for row in eval_set.corpus] == ["d0"] and eval_set.documents_left_out == ["d1"]


def test_missing_eval_folder_is_named(tmp_path):
    with pytest.raises(ConfigError, match="queries.jsonl"):
        load_beir_eval_set("toy", str(tmp_path / "absent"))


# ----- the demo corpus ------------------------------------------------------------------------
def test_demo_corpus_is_deterministic_and_needs_a_vocabulary_mapping():
    config = DemoCorpusConfig(num_train_pairs=300, num_eval_queries=50, num_eval_distractor_documents=40)
    first, second = generate_demo_corpus(config), generate_demo_corpus(config)
    assert [e.__dict__ for e in first[0]] == [e.__dict__ for e in second[0]]
    train, evaluation, distractors = first
    for example in train + evaluation:
        # No character is shared between a query and its document: nothing to match without learning.
        assert not (set(example.query) - {" "}) & (set(example.document) - {" "})
    language = DemoLanguagePair(config)
    for example in evaluation:
        assert all(language.document_vocabulary[c] in example.document.split() for c in example.concepts)
    train_sets = {frozenset(e.concepts) for e in train}
    assert not any(frozenset(e.concepts) in train_sets for e in evaluation)


# ----- the streaming datamodule ---------------------------------------------------------------
def _datamodule(tokenizer, train_data, **kwargs) -> StreamingPairDataModule:
    defaults = dict(batch_size=4, shuffle_block_size=8, max_query_length=32, max_document_length=32)
    return StreamingPairDataModule(str(tokenizer), train_data=str(train_data), **{**defaults, **kwargs})


def test_bad_training_rows_are_skipped_counted_and_named(tiny_text_model, tmp_path):
    rows = [
        {"id": "ok-1", "query": "bita", "document": "fèfé"},
        {"id": "empty-query", "query": "  ", "document": "fèfé"},
        {"id": "missing-document", "query": "bita"},
        {"id": "ok-2", "query": "saaso", "document": "lourôfeu", "task": "translation_retrieval"},
        {"id": "null-document", "query": "saaso", "document": None},
        {"id": "ok-3", "query": "mooje", "document": "vérô"},
    ]
    datamodule = _datamodule(
        tiny_text_model, _write_jsonl(tmp_path / "train.jsonl", rows), batch_size=6, passes=1
    )
    datamodule.setup("fit")
    batches = list(datamodule.train_dataloader())
    assert sorted(i for b in batches for i in b["ids"]) == ["ok-1", "ok-2", "ok-3"]
    assert sorted(i for b in batches for i in b["skipped_ids"]) == [
        "empty-query",
        "missing-document",
        "null-document",
    ]
    batch = batches[0]
    assert (
        batch["query_text"]["input_ids"].shape[0]
        == len(batch["ids"])
        == batch["document"]["input_ids"].shape[0]
    )


def test_training_rows_with_an_unknown_task_are_skipped_counted_and_named(tiny_text_model, tmp_path):
    """One mislabelled row stopped the run (and stopped it again at the same row on resume)."""
    rows = [{"id": f"r{i}", "query": "bita", "document": f"fèfé {i}"} for i in range(8)]
    rows[5]["task"] = "asr"
    datamodule = _datamodule(tiny_text_model, _write_jsonl(tmp_path / "train.jsonl", rows), passes=1)
    datamodule.setup("fit")
    batches = list(datamodule.train_dataloader())
    assert sorted(i for b in batches for i in b["ids"]) == sorted(f"r{i}" for i in range(8) if i != 5)
    skipped = [
        (i, reason) for b in batches for i, reason in zip(b["skipped_ids"], b["skip_reasons"], strict=True)
    ]
    assert skipped == [("r5", "unknown task 'asr' (not in data.prompts)")]


def test_an_eval_query_with_an_unknown_task_fails_at_setup_with_its_id(tiny_text_model, tmp_path):
    root = _write_beir(tmp_path / "toy", [("a", "x", 1)])
    _write_jsonl(
        root / "queries.jsonl", [{"_id": "a", "text": "query a"}, {"_id": "b", "text": "b", "task": "asr"}]
    )
    datamodule = StreamingPairDataModule(str(tiny_text_model), eval_sets={"toy": str(root)})
    with pytest.raises(ConfigError, match="eval set 'toy': query 'b' has task 'asr'.*data.prompts"):
        datamodule.setup("validate")


def test_queries_carry_their_task_prompt(tiny_text_model):
    from transformers import AutoTokenizer

    prompts = PromptConfig(
        prompts={"a": "Find A", "b": "Find B"}, default_task="a", query_template="{instruction}: {query}"
    )
    datamodule = StreamingPairDataModule(str(tiny_text_model), prompts=prompts)
    tokens = datamodule.batches.queries(["bita", "bita"], ["b", None])
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_model)
    decoded = tokenizer.batch_decode(tokens["input_ids"], skip_special_tokens=True)
    assert [text.strip() for text in decoded] == ["Find B: bita", "Find A: bita"]
    with pytest.raises(ConfigError, match="data.prompts"):
        datamodule.batches.queries(["bita"], ["unknown-task"])


def test_stream_repeats_passes_and_reshuffles_each_epoch(tiny_text_model, tmp_path):
    rows = [{"id": f"r{i}", "query": "bita", "document": "fèfé"} for i in range(12)]
    datamodule = _datamodule(tiny_text_model, _write_jsonl(tmp_path / "train.jsonl", rows), passes=2)
    datamodule.setup("fit")
    ids = [i for b in datamodule.train_dataloader() for i in b["ids"]]
    assert len(ids) == 24 and sorted(ids[:12]) == sorted(ids[12:]) == sorted(r["id"] for r in rows)
    assert ids[:12] != ids[12:]


def test_loader_state_resumes_at_the_next_row(tiny_text_model, tmp_path):
    rows = [{"id": f"r{i}", "query": "bita", "document": "fèfé"} for i in range(40)]
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    datamodule = _datamodule(tiny_text_model, train, passes=1, shuffle_block_size=1)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    iterator = iter(loader)
    seen = [next(iterator)["ids"] for _ in range(3)]
    state = loader.state_dict()
    rest = [b["ids"] for b in iterator]
    resumed = datamodule.train_dataloader()
    resumed.load_state_dict(state)
    assert [b["ids"] for b in resumed] == rest
    assert sum(len(b) for b in seen + rest) == 40


def _taken_batches(datamodule, loader, limit=None) -> list[list[str]]:
    """The ids of the batches the training loop takes (each marked consumed, as Lightning does)."""
    taken = []
    for batch in loader:
        taken.append(datamodule.on_before_batch_transfer(batch, 0)["ids"])
        if len(taken) == limit:
            break
    return taken


@pytest.mark.parametrize("stop_after", [5, 16])  # past a worker's first block, of each pass
def test_a_loader_with_workers_over_several_shards_resumes_at_the_next_row(
    tiny_text_model, tmp_path, stop_after
):
    """Two workers, four shards: each worker saves and restores the position in its own shards."""
    folder = tmp_path / "train"
    folder.mkdir()
    for shard in range(4):
        rows = [{"id": f"s{shard}-r{i}", "query": "bita", "document": "fèfé"} for i in range(10)]
        _write_jsonl(folder / f"part{shard}.jsonl", rows)
    options = dict(passes=2, num_workers=2, shuffle_block_size=8)

    def fresh():
        datamodule = _datamodule(tiny_text_model, folder, **options)
        datamodule.setup("fit")
        return datamodule, datamodule.train_dataloader()

    uninterrupted = _taken_batches(*fresh())
    datamodule, loader = fresh()
    seen = _taken_batches(datamodule, loader, limit=stop_after)
    state = loader.state_dict()
    datamodule, resumed = fresh()
    resumed.load_state_dict(state)
    assert seen + _taken_batches(datamodule, resumed) == uninterrupted
    ids = [i for batch in uninterrupted for i in batch]
    assert len(ids) == 80 and all(ids.count(f"s{s}-r{i}") == 2 for s in range(4) for i in range(10))


class _RecordIds(LightningModule):
    """One weight; records the ids of every batch it trains on, and the steps validated."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.ids: list[list[str]] = []
        self.validated_at: list[int] = []

    def training_step(self, batch, batch_idx):
        self.ids.append(list(batch["ids"]))
        return (self.weight**2).sum() + 1

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_start(self):
        self.validated_at.append(self.trainer.global_step)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root, datamodule, max_steps, ckpt_path=None, callbacks=(), **trainer_options) -> tuple:
    model = _RecordIds()
    trainer = quiet_cpu_trainer(
        max_steps=max_steps,
        default_root_dir=root,
        # What every framework model adds itself: the stream's end (its passes) ends fit.
        callbacks=[StopAtLastStep(), *callbacks],
        **trainer_options,
    )
    trainer.fit(model, datamodule, ckpt_path=ckpt_path)
    return trainer, model


def test_passes_end_training_after_that_many_passes_each_in_a_new_order(
    tiny_text_model, corpus_dir, tmp_path
):
    rows = [{"id": f"r{i}", "query": "bita", "document": "fèfé"} for i in range(12)]
    datamodule = _datamodule(
        tiny_text_model,
        _write_jsonl(tmp_path / "train.jsonl", rows),
        passes=2,
        shuffle_block_size=4,
        eval_sets={"demo": str(corpus_dir / "eval" / "demo")},
    )
    validating = dict(
        val_check_interval=4, check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=0
    )
    trainer, model = _fit(tmp_path, datamodule, 50, enable_checkpointing=False, **validating)
    ids = [i for batch in model.ids for i in batch]
    assert trainer.global_step == len(model.ids) == 6  # 2 passes of 12 rows in batches of 4
    assert Counter(ids) == {row["id"]: 2 for row in rows}
    assert sorted(ids[:12]) == sorted(ids[12:]) and ids[:12] != ids[12:]
    assert model.validated_at == [4, 6]  # the last step too, off the validation interval


def test_a_run_with_passes_resumes_at_the_next_batch_and_still_ends(tiny_text_model, tmp_path):
    rows = [{"id": f"r{i}", "query": "bita", "document": "fèfé"} for i in range(12)]
    train = _write_jsonl(tmp_path / "train.jsonl", rows)

    def fit(root, max_steps, ckpt_path=None):
        every_step = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1, save_top_k=-1)
        datamodule = _datamodule(tiny_text_model, train, passes=2, shuffle_block_size=4)
        return _fit(root, datamodule, max_steps, ckpt_path, callbacks=[every_step])

    _, straight = fit(tmp_path / "straight", 50)
    assert len(straight.ids) == 6
    _, first = fit(tmp_path / "first", 4)  # stops in the second pass
    trainer, resumed = fit(
        tmp_path / "resumed", 50, tmp_path / "first" / "checkpoints" / "epoch=0-step=4.ckpt"
    )
    assert first.ids + resumed.ids == straight.ids and trainer.global_step == 6
    # Resumed after the last batch: nothing is left, and no pass starts again.
    last = tmp_path / "straight" / "checkpoints" / "epoch=0-step=6.ckpt"
    trainer, after_the_end = fit(tmp_path / "after", 50, last)
    assert after_the_end.ids == [] and trainer.global_step == 6


def test_an_empty_training_file_is_named(tiny_text_model, tmp_path):
    """It ended in a bare StopIteration inside datasets' JSON builder, never naming the file."""
    empty = tmp_path / "train.jsonl"
    empty.write_bytes(b"")
    datamodule = _datamodule(tiny_text_model, empty)
    datamodule.setup("fit")
    with pytest.raises(DataError) as error:
        datamodule.train_dataloader()
    assert str(error.value) == (
        f"data.train_data='{empty}' is empty (0 bytes): put query/document pairs in it, or point "
        "data.train_data at the file that has them."
    )


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("name, content", [("train.csv", "id,query,document\n"), ("train.jsonl", "\n\n  \n")])
def test_a_training_file_without_rows_is_named(tiny_text_model, tmp_path, name, content, num_workers):
    """A header alone, or blank lines: the loader yielded nothing and fit stepped through empty
    epochs forever."""
    path = tmp_path / name
    path.write_text(content)
    datamodule = _datamodule(tiny_text_model, path, num_workers=num_workers)
    datamodule.setup("fit")
    with pytest.raises(DataError) as error:
        next(iter(datamodule.train_dataloader()))
    assert str(error.value) == (
        f"data.train_data='{path}' holds no rows to train on (a CSV file with only its header, a JSON "
        "Lines file with only blank lines, an empty split): put query/document pairs in it, or point "
        "data.train_data at the file that has them."
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_training_file_whose_every_row_is_skipped_stops_after_one_pass(
    tiny_text_model, tmp_path, num_workers
):
    """Every step skipped, pass after pass, until max_steps: now one pass and a DataError."""
    rows = [{"id": f"r{i}", "query": "bita", "text": "fèfé"} for i in range(6)]  # 'text', not 'document'
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    datamodule = _datamodule(tiny_text_model, train, num_workers=num_workers)
    datamodule.setup("fit")
    with pytest.raises(DataError) as error:
        for _ in datamodule.train_dataloader():
            pass
    assert str(error.value).startswith(
        f"data.train_data='{train}': a whole pass over the training data gave no usable row ("
    )
    assert "every one skipped: missing or empty document (" in str(error.value)
    assert "Check that data.query_column, data.document_column and data.audio.column" in str(error.value)


def test_a_training_file_with_a_usable_row_per_pass_is_not_refused(tiny_text_model, tmp_path):
    rows = [{"id": f"r{i}", "query": "bita"} for i in range(15)]  # no document
    rows.append({"id": "ok", "query": "q", "document": "d"})
    datamodule = _datamodule(tiny_text_model, _write_jsonl(tmp_path / "train.jsonl", rows), passes=5)
    datamodule.setup("fit")
    assert [i for batch in datamodule.train_dataloader() for i in batch["ids"]] == ["ok"] * 5


def test_a_broken_json_line_in_a_training_file_is_named_by_line_and_column(tiny_text_model, tmp_path):
    train = tmp_path / "train.jsonl"
    lines = ['{"id": "a", "query": "q", "document": "d"}', '{"id": "b", "query": "q" "document": "d"}']
    train.write_text("\n".join(lines) + "\n")
    datamodule = _datamodule(tiny_text_model, train)
    datamodule.setup("fit")
    with pytest.raises(DataError) as error:
        next(iter(datamodule.train_dataloader()))
    assert str(error.value) == (
        f"data.train_data='{train}': {train}:2: not valid JSON at column 26 (Expecting ',' delimiter). "
        "Fix or remove that line."
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_broken_line_found_while_streaming_is_named_even_from_a_worker(
    tiny_text_model, tmp_path, num_workers
):
    """The first file reads fine (datasets infers the columns from it), the second breaks while
    training streams it; from a DataLoader worker the error came back as the worker's traceback."""
    folder = tmp_path / "train"
    folder.mkdir()
    _write_jsonl(folder / "a.jsonl", [{"id": f"a{i}", "query": "q", "document": "d"} for i in range(8)])
    broken = folder / "b.jsonl"
    broken.write_text('{"id": "b0", "query": "q", "document": "d"}\n{"id": "b1", "query": "q",\n')
    datamodule = _datamodule(tiny_text_model, folder, num_workers=num_workers)
    datamodule.setup("fit")
    with pytest.raises(DataError) as error:
        for _ in datamodule.train_dataloader():
            pass
    assert str(error.value) == (
        f"data.train_data='{folder}': {broken}:2: not valid JSON at the end of the line (Expecting property "
        "name enclosed in double quotes). Fix or remove that line."
    )


def test_missing_paths_fail_at_construction_with_the_key(tiny_text_model, tmp_path):
    with pytest.raises(ConfigError, match="data.train_data"):
        _datamodule(tiny_text_model, tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="data.eval_sets.gone"):
        StreamingPairDataModule(str(tiny_text_model), eval_sets={"gone": str(tmp_path / "no-such-eval")})


def test_eval_batches_keep_positions_and_sides(tiny_text_model, corpus_dir):
    datamodule = StreamingPairDataModule(
        str(tiny_text_model), eval_sets={"demo": str(corpus_dir / "eval" / "demo")}, eval_batch_size=64
    )
    datamodule.setup("validate")
    batches = list(datamodule.val_dataloader())  # one loader: queries first, then the corpus
    sides = [b["side"] for b in batches]
    assert sides == sorted(sides, reverse=True) and {b["eval_set"] for b in batches} == {"demo"}
    eval_set = datamodule.eval_sets["demo"]
    for side, rows in (("queries", eval_set.queries), ("corpus", eval_set.corpus)):
        positions = [i for b in batches if b["side"] == side for i in b["index"].tolist()]
        assert sorted(positions) == list(range(len(rows)))
    corpus = next(b for b in batches if b["side"] == "corpus")
    assert "document" in corpus and "query_text" not in corpus and len(corpus["ids"]) == 64


def test_text_eval_queries_without_text_are_left_out_and_named(tiny_text_model, tmp_path, caplog):
    """One such query in a batch left the whole batch without ``query_text`` (a KeyError in the
    text model at the first validation: batches run longest first, so the sanity check passed)."""
    root = _write_beir(tmp_path / "toy", [("a", "x", 1), ("empty", "y", 1)])
    with open(root / "queries.jsonl", "a", encoding="utf-8") as queries:
        for row in ({"_id": "empty", "text": " "}, {"_id": "null", "text": None}, {"_id": "absent"}):
            queries.write(json.dumps(row) + "\n")
    datamodule = StreamingPairDataModule(
        str(tiny_text_model), eval_sets={"toy": str(root)}, eval_batch_size=2
    )
    with caplog.at_level(logging.WARNING):
        datamodule.setup("validate")
    eval_set = datamodule.eval_sets["toy"]
    assert [row["id"] for row in eval_set.queries] == ["a", "b"] and eval_set.qrels == {0: {0: 1}}
    assert datamodule.eval_queries_dropped["toy"] == [
        "empty: missing or empty text",
        "null: missing or empty text",
        "absent: missing or empty text",
    ]
    assert "3 of 5 queries have no text and are left out" in caplog.text
    for batch in datamodule.val_dataloader():
        if batch["side"] == "queries":
            assert batch["query_text"]["input_ids"].shape[0] == len(batch["ids"])


def test_finite_passes_under_ddp_is_a_clear_error(tiny_text_model, tmp_path):
    from types import SimpleNamespace

    rows = [{"id": f"r{i}", "query": "bita", "document": "fèfé"} for i in range(8)]
    datamodule = _datamodule(tiny_text_model, _write_jsonl(tmp_path / "train.jsonl", rows), passes=1)
    datamodule.trainer = SimpleNamespace(global_rank=0, world_size=2)
    with pytest.raises(ConfigError, match="data.passes"):
        datamodule.train_dataloader()


def test_validation_scores_the_val_split_and_test_the_eval_split(tiny_text_model, corpus_dir, tmp_path):
    """fit and validate read qrels/<val_split>.tsv; test and predict read qrels/<eval_split>.tsv."""
    import shutil

    folder = tmp_path / "demo"
    shutil.copytree(corpus_dir / "eval" / "demo", folder)
    test_lines = (folder / "qrels" / "test.tsv").read_text().splitlines()
    (folder / "qrels" / "dev.tsv").write_text("\n".join(test_lines[:51]) + "\n")  # header + 50 judgments
    datamodule = StreamingPairDataModule(
        str(tiny_text_model), eval_sets={"demo": str(folder)}, val_split="dev"
    )

    def judged_queries() -> int:
        return len(datamodule.eval_sets["demo"].qrels)

    datamodule.hparams.train_data = str(corpus_dir / "train.jsonl")  # fit needs one
    for stage, expected in [("fit", 50), ("test", len(test_lines) - 1), ("validate", 50), ("predict", 200)]:
        datamodule.setup(stage)
        assert judged_queries() == expected, stage
    assert not datamodule.selects_on_the_test_split
    plain = StreamingPairDataModule(str(tiny_text_model), eval_sets={"demo": str(folder)})
    plain.setup("validate")
    assert len(plain.eval_sets["demo"].qrels) == len(test_lines) - 1 and plain.selects_on_the_test_split
