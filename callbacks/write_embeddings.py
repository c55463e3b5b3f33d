"""Writes what ``predict`` embeds to disk: every eval set, both sides, every Matryoshka dim.

``python cli.py predict --config <recipe> --ckpt_path <checkpoint>`` embeds the recipe's eval sets
(``data.init_args.eval_sets``, BEIR folders) with the trained model the way validation does (one
pass, every dim), and this callback writes them for a search index or any other tool:

    <dirpath>/manifest.json                   model, checkpoint, dims, dtype, rows per set and side
    <dirpath>/<eval set>/queries.ids.json     the query ids, in row order
    <dirpath>/<eval set>/queries.d<dim>.npy   [rows, dim], L2-normalized (cosine = dot product)
    <dirpath>/<eval set>/corpus.ids.json, corpus.d<dim>.npy

Each dim is its own array: for sliced Matryoshka models the normalized prefix of the largest, for
per-dim heads (``DualEncoder``) that head's output. Rows an eval set leaves out (queries with
unusable audio or no text, documents with no text) are not in the files; the ids say which rows are.
``read_embeddings(dirpath, eval_set)`` reads a set back in its row order, for
``callbacks.evaluation.Evaluator`` to score as validation does.
Under DDP every rank embeds a share and rank 0 writes; an error there is raised on every rank. The
folder is written aside (``<dirpath>.partial``) and swapped in only when complete, so a failed run
never leaves a half-written folder in its place (a crash within the swap itself leaves the earlier
output as ``<dirpath>.old``), and a new run leaves no stale dim of an earlier model behind. A folder
is only ever replaced if its manifest says this callback wrote it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.eval_outputs import add_eval_output, assemble, chunks_of_all_ranks
from callbacks.exit_grid import exit_view
from errors import ConfigError, DataError

if TYPE_CHECKING:
    from datamodules.eval_sets import EvalSet

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WRITER = "callbacks.write_embeddings.WriteEmbeddings"  # in the manifest: the folder is ours to replace
SIDES = ("queries", "corpus")
DTYPES = ("float32", "float16")


class WriteEmbeddings(Callback):
    """At the end of ``predict``, writes ``<dirpath>/<eval set>/<side>.d<dim>.npy`` and the ids."""

    def __init__(self, dirpath: str, dtype: str = "float32"):
        """
        Args:
            dirpath: Output folder, replaced as a whole by each predict. It must be new, empty, or
                an earlier output of this callback (its ``manifest.json`` names this writer).
            dtype: ``float32``, or ``float16`` for half the disk (CostPerDimension logs the
                search time of both).
        """
        if dtype not in DTYPES:
            raise ConfigError(f"WriteEmbeddings.dtype={dtype!r}: choose one of {list(DTYPES)}.")
        self.dirpath = Path(dirpath)
        self.dtype = dtype
        self._chunks: dict[tuple[str, str], list] = defaultdict(list)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Before any embedding work, and on every rank (rank 0 writes, so it decides): a rank
        # left waiting in the gather while rank 0 fails would hang.
        problem = _why_not_replaceable(self.dirpath) if trainer.is_global_zero else None
        if trainer.world_size > 1:
            problem = trainer.strategy.broadcast(problem, src=0)
        if problem:
            raise ConfigError(problem)

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._chunks = defaultdict(list)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        add_eval_output(self._chunks, outputs)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        chunks = chunks_of_all_ranks(trainer, self._chunks)
        self._chunks = defaultdict(list)
        failure = None
        if chunks is not None:
            try:
                self._write(trainer, pl_module, chunks)
            except Exception as error:  # told to every rank, or they would wait for rank 0 forever
                if trainer.world_size == 1:
                    raise
                failure = error
        if trainer.world_size > 1:
            # Also the barrier: no rank ends before the files exist.
            message = trainer.strategy.broadcast(None if failure is None else repr(failure), src=0)
            if message is not None:
                raise RuntimeError(f"WriteEmbeddings failed on rank 0: {message}") from failure

    def _write(self, trainer: Trainer, pl_module: LightningModule, chunks: dict) -> None:
        eval_sets = getattr(trainer.datamodule, "eval_sets", {}) if trainer.datamodule is not None else {}
        staging = self.dirpath.with_name(self.dirpath.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            written = self._write_into(staging, trainer, pl_module, chunks, eval_sets)
            _swap_in(staging, self.dirpath)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("Wrote the embeddings of %s to %s", sorted(written) or "no eval set", self.dirpath)

    def _write_into(self, staging: Path, trainer, pl_module, chunks: dict, eval_sets: dict) -> list[str]:
        """Every fully embedded eval set and the manifest, into ``staging``; returns the sets written."""
        written = {}
        for name, eval_set in eval_sets.items():
            rows = {"queries": eval_set.queries, "corpus": eval_set.corpus}
            sides = {
                side: assemble(chunks.get((name, side), []), len(rows[side]), pl_module.matryoshka_dims)
                for side in SIDES
            }
            if any(embeddings is None for embeddings in sides.values()):
                log.warning("eval set %s was not fully embedded (limit_predict_batches?): not written.", name)
                continue
            folder = staging / name
            folder.mkdir()
            for side, embeddings in sides.items():
                _ids_file(folder, side).write_text(json.dumps([row["id"] for row in rows[side]]))
                # The full depth; an early exit is written by predicting with its exported model.
                for dim, values in exit_view(embeddings, None).items():
                    np.save(_array_file(folder, side, dim), values.numpy().astype(self.dtype))
            written[name] = {side: len(rows[side]) for side in SIDES}
        manifest = {
            "writer": WRITER,
            "model": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
            "checkpoint": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "dims": list(pl_module.matryoshka_dims),
            "dtype": self.dtype,
            "normalized": True,
            "eval_sets": written,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return list(written)


def load_embeddings(dirpath: str | Path, eval_set: str, side: str, dim: int) -> tuple[list[str], np.ndarray]:
    """The ids and the ``[rows, dim]`` array that ``WriteEmbeddings`` wrote for one set, side and dim."""
    folder = Path(dirpath) / eval_set
    return json.loads(_ids_file(folder, side).read_text()), np.load(_array_file(folder, side, dim))


def read_embeddings(
    dirpath: str | Path, eval_set: EvalSet
) -> tuple[EvalSet, dict[str, dict[int, torch.Tensor]]]:
    """What ``WriteEmbeddings`` wrote for ``eval_set`` (found by its name), ready to score:
    the eval set restricted to the written queries, and ``{"queries": {dim: [rows, dim]},
    "corpus": {...}}`` (float32 tensors) in its row order.

    Written rows are matched to the eval set's by id; the queries predict left out (unusable audio,
    no text) are left out of the returned set, as validation leaves them out of its scores.
    """
    folder = Path(dirpath) / eval_set.name
    manifest = json.loads((Path(dirpath) / MANIFEST).read_text())
    if eval_set.name not in manifest["eval_sets"]:
        raise DataError(
            f"{dirpath}: no embeddings of eval set {eval_set.name!r} "
            f"(written: {sorted(manifest['eval_sets'])})."
        )
    written_ids = {side: json.loads(_ids_file(folder, side).read_text()) for side in SIDES}
    rows = {row["id"]: row for row in eval_set.queries}
    unknown = [query_id for query_id in written_ids["queries"] if query_id not in rows]
    if unknown:
        raise DataError(
            f"{folder}: query ids {unknown[:5]} are not in eval set {eval_set.name!r} "
            "(another set, or another qrels split?)."
        )
    eval_set = eval_set.with_queries([rows[query_id] for query_id in written_ids["queries"]])
    position = {side: {row_id: i for i, row_id in enumerate(written_ids[side])} for side in SIDES}
    missing = [row["id"] for row in eval_set.corpus if row["id"] not in position["corpus"]]
    if missing or len(position["corpus"]) != len(eval_set.corpus):
        raise DataError(
            f"{folder}: the embedded corpus ({len(position['corpus'])} documents) is not the corpus of eval "
            f"set {eval_set.name!r} ({len(eval_set.corpus)} documents; not embedded: {missing[:5]})."
        )
    order = {
        "queries": list(range(len(eval_set.queries))),
        "corpus": [position["corpus"][row["id"]] for row in eval_set.corpus],
    }
    embeddings = {
        side: {
            dim: torch.from_numpy(np.load(_array_file(folder, side, dim)).astype(np.float32)[order[side]])
            for dim in manifest["dims"]
        }
        for side in SIDES
    }
    return eval_set, embeddings


# The layout of one eval set's folder (the module docstring), shared by the writer and the readers.
def _ids_file(folder: Path, side: str) -> Path:
    return folder / f"{side}.ids.json"


def _array_file(folder: Path, side: str, dim: int) -> Path:
    return folder / f"{side}.d{dim}.npy"


def _written_here(dirpath: Path) -> bool:
    try:
        return json.loads((dirpath / MANIFEST).read_text()).get("writer") == WRITER
    except (OSError, ValueError, AttributeError):  # missing, unreadable, not JSON, not an object
        return False


def _why_not_replaceable(dirpath: Path) -> str | None:
    if dirpath.is_dir() and any(dirpath.iterdir()) and not _written_here(dirpath):
        return (
            f"WriteEmbeddings.dirpath={str(dirpath)!r} holds files this callback did not write (no "
            f"{MANIFEST} of its own); each predict replaces the whole folder, so name a new one."
        )
    if dirpath.exists() and not dirpath.is_dir():
        return f"WriteEmbeddings.dirpath={str(dirpath)!r} is a file, not a folder."
    return None


def _swap_in(staging: Path, dirpath: Path) -> None:
    """Puts ``staging`` at ``dirpath``; the earlier output stays whole until the new one is there."""
    problem = _why_not_replaceable(dirpath)  # written to since predict started
    if problem:
        raise ConfigError(problem)
    if not dirpath.exists():
        os.replace(staging, dirpath)
        return
    old = dirpath.with_name(dirpath.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dirpath, old)
    os.replace(staging, dirpath)
    shutil.rmtree(old)
