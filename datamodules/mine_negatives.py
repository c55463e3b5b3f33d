"""Mines hard negatives for a training file with a trained model, for a second training stage.

    python -m datamodules.mine_negatives --config configs/demo/text_only.yaml \\
        --ckpt_path runs/demo_text_only/checkpoints/last.ckpt --out data/mined/train.jsonl

Builds the recipe's model and datamodule (any recipe: speech recipes embed the training rows'
audio, text recipes their query text, with each row's task prompt), loads the checkpoint, embeds
the training file's queries and a corpus (``--corpus``, a BEIR ``corpus.jsonl``; default: the
training file's own distinct documents) at one Matryoshka dim, ranks the corpus for every query
with the evaluator's exact chunked search (``callbacks.metrics.top_k_search``) on the recipe's
device, and writes the training file again with a ``negatives`` column: the documents ranked
``--rank_window START END`` (1-based, inclusive, counted after leaving the positive out) that are
not the row's positive (by text) and score at most ``positive - margin``. With ``--corpus`` the
column holds corpus ids (train with ``--data.init_args.negatives_corpus=CORPUS``), else texts.
Then train with ``--data.init_args.train_data=OUT --data.init_args.num_negatives=3``.
Extra ``--key=value`` arguments are passed to the recipe (e.g. ``--trainer.accelerator=gpu``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from errors import ConfigError

log = logging.getLogger(__name__)


def select_negatives(
    scores: torch.Tensor,
    indices: torch.Tensor,
    positives: Sequence[int | None],
    positive_scores: torch.Tensor,
    rank_window: tuple[int, int],
    margin: float | None,
) -> list[list[int]]:
    """Per query, the corpus indices of its negatives, best first.

    ``scores``/``indices``: each query's top-k (``top_k_search``), at least ``END + 1`` deep.
    ``positives``: each query's positive document's corpus index (None: not in the corpus); it is
    never a negative. Ranks count the retrieved documents other than the positive, from 1; those
    ranked ``START..END`` are kept if their score is at most ``positive score - margin``.
    """
    start, end = rank_window
    chosen = []
    for query, positive in enumerate(positives):
        others = [
            (float(score), int(index))
            for score, index in zip(scores[query].tolist(), indices[query].tolist(), strict=True)
            if index != positive
        ]
        window = others[start - 1 : end]
        if margin is not None:
            ceiling = float(positive_scores[query]) - margin
            window = [(score, index) for score, index in window if score <= ceiling]
        chosen.append([index for _, index in window])
    return chosen


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def embed_rows(
    embed: Callable[[dict], dict], make_batch: Callable[[list], dict], rows: list, size: int, dim: int, device
) -> torch.Tensor:
    """``[rows, dim]`` float32 embeddings, ``size`` rows per forward pass."""
    from lightning.pytorch.utilities import move_data_to_device

    out = []
    for chunk in _batches(rows, size):
        batch = move_data_to_device(make_batch(chunk), device)
        out.append(embed(batch)[dim].float())
    return torch.cat(out) if out else torch.zeros(0, dim)


def _read_rows(path: str) -> list[dict]:
    from datamodules.sources import load_stream

    return list(load_stream(path, key="--train_data"))


def _read_corpus(path: str) -> tuple[list[str], list[str]]:
    from datamodules.negatives import load_negatives_corpus

    corpus = load_negatives_corpus(path)
    return list(corpus), list(corpus.values())


def mine(
    model,
    datamodule,
    rows: list[dict],
    corpus_ids: list[str] | None,
    corpus_texts: list[str],
    dim: int,
    rank_window: tuple[int, int],
    margin: float | None,
    batch_size: int,
    device,
    forward_context: Callable = contextlib.nullcontext,
    base_dir=None,
) -> tuple[list[dict], dict]:
    """The rows with their mined ``negatives`` (corpus ids when ``corpus_ids``, else texts), and counts."""
    from callbacks.metrics import top_k_search
    from datamodules.text_batches import usable_text

    columns, batches = datamodule.columns, datamodule.batches
    speech = datamodule.audio is not None
    queries = [
        {
            "id": str(row.get(columns["id"], position)),
            "text": row.get(columns["query"]),
            "task": row.get(columns["task"]),
            **({datamodule.audio.column: row.get(datamodule.audio.column)} if speech else {}),
            "position": position,
        }
        for position, row in enumerate(rows)
        if usable_text(row.get(columns["document"]))
    ]
    if speech:
        queries, dropped = batches.load_eval_waveforms(queries, base_dir)
    else:
        dropped = [f"{q['id']}: missing or empty query" for q in queries if not usable_text(q["text"])]
        queries = [q for q in queries if usable_text(q["text"])]
    model.eval()
    with forward_context():
        query_embeddings = embed_rows(
            model.embed_queries,
            lambda chunk: batches.eval_batch(list(enumerate(chunk)), "mining", "queries"),
            queries,
            batch_size,
            dim,
            device,
        )
        # Each query's positive: its row's document, found in the corpus by text, or embedded apart
        # (for its score only) when the corpus does not hold it.
        positive_texts = [rows[q["position"]][columns["document"]] for q in queries]
        where = {text: index for index, text in enumerate(corpus_texts)}
        positives = [where.get(text) for text in positive_texts]
        outside = sorted({text for text in positive_texts if text not in where})
        embed_documents = model.embed_documents
        document_batch = lambda chunk: {"document": datamodule.tokenize_documents(chunk)}  # noqa: E731
        corpus_embeddings = embed_rows(embed_documents, document_batch, corpus_texts, batch_size, dim, device)
        outside_embeddings = embed_rows(embed_documents, document_batch, outside, batch_size, dim, device)
    everything = torch.cat([corpus_embeddings, outside_embeddings])
    place = where | {text: len(corpus_texts) + index for index, text in enumerate(outside)}
    positive_embeddings = everything[torch.tensor([place[text] for text in positive_texts], dtype=torch.long)]
    positive_scores = (query_embeddings * positive_embeddings).sum(dim=1)
    scores, indices = top_k_search(query_embeddings, corpus_embeddings, rank_window[1] + 1)
    chosen = select_negatives(
        scores.cpu(), indices.cpu(), positives, positive_scores.cpu(), rank_window, margin
    )
    mined = [dict(row, negatives=[]) for row in rows]
    for query, negatives in zip(queries, chosen, strict=True):
        names = corpus_ids if corpus_ids is not None else corpus_texts
        mined[query["position"]]["negatives"] = [names[i] for i in negatives]
    counts = {
        "rows": len(rows),
        "queries_embedded": len(queries),
        "rows_without_negatives": sum(not row["negatives"] for row in mined),
        "mean_negatives": sum(len(row["negatives"]) for row in mined) / max(len(rows), 1),
        "corpus_documents": len(corpus_texts),
    }
    if dropped:
        log.warning(
            "%d training rows have no usable query and get no negatives: %s", len(dropped), dropped[:10]
        )
    return mined, counts


def write_rows(path: Path, rows: list[dict]) -> None:
    """JSON Lines, or Parquet for a ``.parquet`` path (audio stored in the rows, as bytes, stays so)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
        return
    try:
        lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    except TypeError as error:  # audio stored as bytes
        raise ConfigError(f"--out {path}: the rows hold binary data ({error}); write .parquet.") from error
    path.write_text("".join(lines), encoding="utf-8")


def _absolute_audio_paths(rows: list[dict], column: str, roots) -> None:
    """Relative audio paths resolved where the training file's start (the mined file lives elsewhere)."""
    for row in rows:
        cell = row.get(column)
        path = cell.get("path") if isinstance(cell, dict) and not cell.get("bytes") else cell
        if isinstance(path, str) and not Path(path).is_absolute():
            found = next((root / path for root in roots or () if (root / path).exists()), None)
            if found is not None:
                row[column] = (
                    str(found.resolve()) if isinstance(cell, str) else dict(cell, path=str(found.resolve()))
                )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.mine_negatives",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Further --key=value arguments are the recipe's (as for cli.py): --trainer.accelerator=gpu.",
    )
    parser.add_argument("--config", required=True, help="The recipe of the model (a configs/*.yaml).")
    parser.add_argument(
        "--ckpt_path", help="The trained checkpoint (default: the recipe's model as configured)."
    )
    parser.add_argument(
        "--train_data", help="The training file to mine for (default: the recipe's data.train_data)."
    )
    parser.add_argument(
        "--corpus", help="A BEIR corpus.jsonl to mine from (default: the training documents)."
    )
    parser.add_argument(
        "--out",
        required=True,
        help="The training file to write: .jsonl, or .parquet (for rows holding audio bytes).",
    )
    parser.add_argument("--dim", type=int, help="Matryoshka dim searched (default: the largest).")
    parser.add_argument(
        "--rank_window",
        type=int,
        nargs=2,
        default=(10, 100),
        metavar=("START", "END"),
        help="Keep the documents ranked START..END (1-based, positive left out); skipping the top ranks "
        "avoids unlabelled positives (default 10 100).",
    )
    parser.add_argument(
        "--margin", type=float, help="Keep a negative only if its cosine <= the positive's - margin."
    )
    parser.add_argument("--batch_size", type=int, default=128, help="Rows per forward pass.")
    return parser


def main(argv: list[str] | None = None) -> dict:
    from cli import cli_main, configure_logging
    from datamodules.sources import relative_path_roots

    args, recipe = _parser().parse_known_args(argv)
    start, end = args.rank_window
    if not 1 <= start <= end:
        raise ConfigError(f"--rank_window {start} {end}: needs 1 <= START <= END.")
    configure_logging()
    overrides = [f"--data.init_args.train_data={args.train_data}"] if args.train_data else []
    # The recipe's own negatives settings would resolve ids while mining: mining reads the file as is.
    overrides += ["--data.init_args.num_negatives=0", "--data.init_args.negatives_corpus=null"]
    cli = cli_main(["--config", args.config, *overrides, *recipe], run=False)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    train_data = data.hparams.train_data
    if not train_data:
        raise ConfigError("--train_data: the recipe names no data.train_data; name the file to mine for.")
    if args.ckpt_path:
        checkpoint = torch.load(args.ckpt_path, map_location="cpu", weights_only=True)
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"], strict=False)
    dim = args.dim or model.matryoshka_dims[-1]
    if dim not in model.matryoshka_dims:
        raise ConfigError(f"--dim {dim} is not one of the model's matryoshka_dims {model.matryoshka_dims}.")
    device = trainer.strategy.root_device
    model.to(device)
    rows = _read_rows(train_data)
    if data.audio is not None:
        _absolute_audio_paths(rows, data.audio.column, relative_path_roots(train_data))
    if args.corpus:
        corpus_ids, corpus_texts = _read_corpus(args.corpus)
    else:
        corpus_ids = None
        column = data.columns["document"]
        corpus_texts = list(dict.fromkeys(row[column] for row in rows if isinstance(row.get(column), str)))
    mined, counts = mine(
        model,
        data,
        rows,
        corpus_ids,
        corpus_texts,
        dim,
        (start, end),
        args.margin,
        args.batch_size,
        device,
        trainer.precision_plugin.forward_context,
        relative_path_roots(train_data),
    )
    out = Path(args.out)
    write_rows(out, mined)
    then = f"--data.init_args.train_data={out} --data.init_args.num_negatives=3"
    if args.corpus:
        then += f" --data.init_args.negatives_corpus={args.corpus}"
    print(
        f"mined {counts['mean_negatives']:.1f} negatives per row (ranks {start}-{end} at d{dim}"
        + (f", margin {args.margin}" if args.margin is not None else "")
        + f") for {counts['rows']} rows from {counts['corpus_documents']} documents; "
        f"{counts['rows_without_negatives']} rows got none. Wrote {out}. Train with: {then}"
    )
    return counts


if __name__ == "__main__":
    main()
