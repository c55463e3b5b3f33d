"""The mining command on the demo recipes: text queries (text-only) and spoken ones (late fusion),
checked against a full sort of the model's own scores; its output trains with num_negatives."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from demo_recipes import ROOT

from cli import cli_main
from datamodules.demo import assets
from datamodules.mine_negatives import main as mine_negatives
from datamodules.pairs import StreamingPairDataModule
from datamodules.sources import load_stream


def _in_root(function, *args):
    here = os.getcwd()
    os.chdir(ROOT)
    try:
        return function(*args)
    finally:
        os.chdir(here)


def test_text_only_mining_matches_a_full_sort_and_trains(demo_dir, tmp_path):
    lines = (assets.corpus_dir() / "train.jsonl").read_text().splitlines()[:40]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    out = tmp_path / "mined.jsonl"
    recipe = ["--config", "configs/demo/text_only.yaml", f"--train_data={train}"]
    counts = _in_root(mine_negatives, [*recipe, f"--out={out}", "--rank_window", "2", "6", "--dim", "64"])
    mined = [json.loads(line) for line in out.read_text().splitlines()]
    rows = [json.loads(line) for line in lines]
    assert [{k: v for k, v in row.items() if k != "negatives"} for row in mined] == rows
    assert counts["rows_without_negatives"] == 0 and counts["mean_negatives"] == 5
    # The same untrained model, scored with a plain matrix product and a full sort.
    cli = _in_root(
        cli_main, ["--config", "configs/demo/text_only.yaml", f"--data.init_args.train_data={train}"], False
    )
    model, data = cli.model.eval(), cli.datamodule
    documents = [row["document"] for row in rows]
    with torch.no_grad():
        queries = model.embed_queries(
            data.batches.eval_batch(
                [(i, {"id": r["id"], "text": r["query"], "task": r["task"]}) for i, r in enumerate(rows)],
                "x",
                "queries",
            )
        )[64]
        corpus = model.embed_documents({"document": data.tokenize_documents(documents)})[64]
    scores = queries @ corpus.T
    for i, row in enumerate(mined):
        order = [j for j in torch.argsort(scores[i], descending=True, stable=True).tolist() if j != i]
        assert row["negatives"] == [documents[j] for j in order[1:6]]
        assert rows[i]["document"] not in row["negatives"]
    # A second stage reads the mined file: 3 negatives per row.
    datamodule = StreamingPairDataModule(
        str(assets.text_model_dir()), train_data=str(out), num_negatives=3, batch_size=8
    )
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["negative_rows"].tolist() == [i for i in range(8) for _ in range(3)]


def test_late_fusion_mining_embeds_the_spoken_queries(demo_dir, tmp_path):
    """A speech recipe: the training rows' audio is embedded (the parquet shards' audio bytes stay
    in the mined file); a corpus file gives ids, which train with data.negatives_corpus."""
    source = load_stream(str(assets.speech_corpus_dir() / "train"))
    rows = [row for _, row in zip(range(12), source, strict=False)]
    train = tmp_path / "speech.parquet"
    pq.write_table(pa.Table.from_pylist(rows), train)
    corpus = tmp_path / "corpus.jsonl"
    documents = sorted({row["document"] for row in rows})
    corpus.write_text(
        "".join(json.dumps({"_id": f"c{i}", "text": text}) + "\n" for i, text in enumerate(documents))
    )
    out = tmp_path / "mined.parquet"
    arguments = ["--config", "configs/demo/late_fusion.yaml", f"--train_data={train}", f"--corpus={corpus}"]
    counts = _in_root(mine_negatives, [*arguments, f"--out={out}", "--rank_window", "1", "3"])
    assert counts["queries_embedded"] == 12 and counts["rows_without_negatives"] == 0
    mined = pq.read_table(out).to_pylist()
    ids = {text: f"c{i}" for i, text in enumerate(documents)}
    for row, original in zip(mined, rows, strict=True):
        assert row["audio"] == original["audio"]
        assert len(row["negatives"]) == 3 and ids[row["document"]] not in row["negatives"]
    # The second stage: late fusion trains on the mined file, 2 negatives per row from the corpus.
    fit = ["fit", "--config", "configs/demo/late_fusion.yaml", f"--data.init_args.train_data={out}"]
    fit += ["--data.init_args.num_negatives=2", f"--data.init_args.negatives_corpus={corpus}"]
    fit += ["--data.init_args.batch_size=4", "--trainer.max_steps=2", "--trainer.val_check_interval=null"]
    fit += ["--trainer.check_val_every_n_epoch=null", "--trainer.callbacks=[]", "--trainer.logger=false"]
    fit += ["--trainer.enable_progress_bar=false", "--model.init_args.lr_scheduler.init_args.warmup_steps=1"]
    cli = _in_root(cli_main, [*fit, f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert cli.trainer.global_step == 2
    assert cli.datamodule.training_negatives.rows == 8 and cli.datamodule.training_negatives.short == 0
