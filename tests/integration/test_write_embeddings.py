"""``cli.py predict`` writes every eval set's embeddings, per side and dim, with their ids.

The reference is a second path: the checkpoint loaded with ``load_from_checkpoint`` and each row
embedded alone (a batch of one, no padding, no length ordering), against what predict wrote from
length-sorted, padded batches (and, under DDP, from two ranks' shares).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from demo_recipes import ROOT, quick_text_only

from callbacks.write_embeddings import WriteEmbeddings, load_embeddings
from cli import cli_main, find_input_error
from errors import ConfigError
from lightning_modules import TextOnly

DIMS = (32, 64, 128, 256)


def _predict(root, *extra):
    return cli_main(["predict", *quick_text_only(root, "--data.init_args.eval_batch_size=48", *extra)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_dir):
    """A 2-step text-only fit: its root folder and its last checkpoint."""
    root = tmp_path_factory.mktemp("predict")
    cli_main(["fit", *quick_text_only(root, "--trainer.max_steps=2")])
    return root, root / "checkpoints" / "last.ckpt"


def test_predict_writes_each_rows_embedding_from_the_checkpoint(trained):
    root, checkpoint = trained
    untrained = _predict(root)  # the recipe's initial weights, written first ...
    output = root / "embeddings"
    before = load_embeddings(output, "demo", "queries", 256)[1]
    (output / "demo" / "queries.d999.npy").write_bytes(b"stale")  # as from another model
    _predict(root, f"--ckpt_path={checkpoint}")  # ... then replaced by the checkpoint's

    manifest = json.loads((output / "manifest.json").read_text())
    eval_set = untrained.datamodule.eval_sets["demo"]
    assert manifest["checkpoint"] == str(checkpoint) and manifest["dims"] == list(DIMS)
    sizes = {"queries": len(eval_set.queries), "corpus": len(eval_set.corpus)}
    assert manifest["eval_sets"] == {"demo": sizes}
    assert not (output / "demo" / "queries.d999.npy").exists()
    assert not (root / "embeddings.partial").exists() and not (root / "embeddings.old").exists()

    model = TextOnly.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    batches = untrained.datamodule.batches
    for side, rows in (("queries", eval_set.queries), ("corpus", eval_set.corpus[:150])):
        embed = model.embed_queries if side == "queries" else model.embed_documents
        written = {dim: load_embeddings(output, "demo", side, dim) for dim in DIMS}
        for dim, (ids, values) in written.items():
            assert values.dtype == np.float32 and values.shape[1] == dim
            assert ids == [row["id"] for row in (eval_set.queries if side == "queries" else eval_set.corpus)]
            np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, atol=1e-5)
        with torch.no_grad():
            for position, row in enumerate(rows):
                alone = embed(batches.eval_batch([(position, row)], eval_set="demo", side=side))
                for dim, (_, values) in written.items():
                    np.testing.assert_allclose(values[position], alone[dim][0].numpy(), atol=1e-5)
    # The checkpoint's weights were used, not the recipe's initial ones.
    after = load_embeddings(output, "demo", "queries", 256)[1]
    assert np.abs(after - before).max() > 1e-3


def _extra_writer(dirpath, *options: str) -> list[str]:
    """CLI arguments that add a second WriteEmbeddings after the recipe's callbacks."""
    added = f"--trainer.callbacks+={WriteEmbeddings.__module__}.WriteEmbeddings"
    return [added, f"--trainer.callbacks.dirpath={dirpath}", *(f"--trainer.callbacks.{o}" for o in options)]


@pytest.mark.parametrize("manifest", [None, '{"audio_filepath": "a.wav", "duration": 3.2}'])
def test_a_folder_not_written_by_predict_is_never_replaced(trained, tmp_path, manifest):
    """Even one holding a manifest.json of its own (a NeMo-style speech manifest, say)."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    if manifest is not None:
        (foreign / "manifest.json").write_text(manifest)
    with pytest.raises(Exception) as error:
        _predict(tmp_path, *_extra_writer(foreign))
    assert isinstance(find_input_error(error.value), ConfigError) and "did not write" in str(error.value)
    kept = {"notes.txt"} | ({"manifest.json"} if manifest is not None else set())
    assert {p.name for p in foreign.iterdir()} == kept
    assert not (tmp_path / "mine.partial").exists()


def test_float16_and_a_partly_embedded_set(trained, tmp_path, caplog):
    _, checkpoint = trained
    # One run, two writers: the recipe's (float32) and a float16 one.
    half_writer = _extra_writer(tmp_path / "f16", "dtype=float16")
    _predict(tmp_path / "half", f"--ckpt_path={checkpoint}", *half_writer)
    for side in ("queries", "corpus"):
        ids, half = load_embeddings(tmp_path / "f16", "demo", side, 128)
        reference_ids, reference = load_embeddings(tmp_path / "half" / "embeddings", "demo", side, 128)
        assert ids == reference_ids and half.dtype == np.float16
        assert np.abs(half.astype(np.float32) - reference).max() < 1e-3

    partial = tmp_path / "partial"
    with caplog.at_level(logging.WARNING):
        _predict(partial, "--trainer.limit_predict_batches=1")
    assert "not fully embedded" in caplog.text
    assert json.loads((partial / "embeddings" / "manifest.json").read_text())["eval_sets"] == {}
    assert not (partial / "embeddings" / "demo").exists()


def test_a_corpus_without_judgments_is_embedded(trained, tmp_path, corpus_dir):
    """A BEIR folder whose qrels file holds only its header (nothing judged yet)."""
    _, checkpoint = trained
    folder = tmp_path / "unjudged"
    (folder / "qrels").mkdir(parents=True)
    for name, count in (("queries.jsonl", 5), ("corpus.jsonl", 20)):
        lines = (corpus_dir / "eval" / "demo" / name).read_text().splitlines()[:count]
        (folder / name).write_text("\n".join(lines) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")
    sets = f"{{demo: {corpus_dir / 'eval' / 'demo'}, unjudged: {folder}}}"
    _predict(tmp_path, f"--ckpt_path={checkpoint}", f"--data.init_args.eval_sets={sets}")
    ids, values = load_embeddings(tmp_path / "embeddings", "unjudged", "corpus", 64)
    reference_ids, reference = load_embeddings(tmp_path / "embeddings", "demo", "corpus", 64)
    assert ids == reference_ids[:20]
    np.testing.assert_allclose(values, reference[:20], atol=1e-5)


def test_a_corpus_without_queries_is_written_with_empty_query_arrays(trained, tmp_path, corpus_dir):
    """An empty queries.jsonl and a header-only qrels file: the corpus alone, for an index."""
    _, checkpoint = trained
    folder = tmp_path / "corpus_only"
    (folder / "qrels").mkdir(parents=True)
    (folder / "queries.jsonl").write_text("")
    lines = (corpus_dir / "eval" / "demo" / "corpus.jsonl").read_text().splitlines()[:20]
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")
    _predict(tmp_path, f"--ckpt_path={checkpoint}", f"--data.init_args.eval_sets={{corpus_only: {folder}}}")
    output = tmp_path / "embeddings"
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["eval_sets"] == {"corpus_only": {"queries": 0, "corpus": 20}}
    for dim in DIMS:
        ids, queries = load_embeddings(output, "corpus_only", "queries", dim)
        assert ids == [] and queries.shape == (0, dim) and queries.dtype == np.float32
        assert load_embeddings(output, "corpus_only", "corpus", dim)[1].shape == (20, dim)


def test_predict_under_ddp_writes_what_one_process_writes(trained, tmp_path):
    root, checkpoint = trained
    outputs = {}
    for devices in (1, 2):
        run = tmp_path / f"devices-{devices}"
        command = [sys.executable, "cli.py", "predict", *quick_text_only(run, f"--ckpt_path={checkpoint}")]
        command += ["--trainer.accelerator=cpu", f"--trainer.devices={devices}"]
        command += ["--trainer.strategy=" + ("ddp" if devices > 1 else "auto")]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[devices] = run / "embeddings"
        # The project's INFO lines reach the terminal (cli.configure_logging), each DDP rank's
        # prefixed with its rank; the writer reports from rank 0 only.
        wrote = f"INFO callbacks.write_embeddings: Wrote the embeddings of ['demo'] to {run / 'embeddings'}"
        eval_set = "INFO datamodules.pairs: eval set demo: 200 queries"
        if devices == 1:
            assert wrote in result.stderr and eval_set in result.stderr
        else:
            assert f"[rank 0] {wrote}" in result.stderr and f"[rank 1] {wrote}" not in result.stderr
            assert f"[rank 0] {eval_set}" in result.stderr and f"[rank 1] {eval_set}" in result.stderr
    for side in ("queries", "corpus"):
        for dim in DIMS:
            ids_one, one = load_embeddings(outputs[1], "demo", side, dim)
            ids_two, two = load_embeddings(outputs[2], "demo", side, dim)
            assert ids_one == ids_two
            np.testing.assert_allclose(one, two, atol=1e-5)
