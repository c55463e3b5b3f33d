"""(d) Evaluating 4 Matryoshka dims: this project vs sentence-transformers' evaluator run once per dim.

The paper's code runs ``InformationRetrievalEvaluator(truncate_dim=d)`` once per dim, encoding
the queries and the corpus again each time. This project's ``RetrievalEvaluator`` (in
``trainer.validate``) encodes once at full size and scores every dim from slices. Same tiny Qwen3,
same eval set (BEIR folder), same batch size; nDCG@10 per dim must agree to 1e-4.

    python benchmarks/evaluation_vs_sentence_transformers.py [--queries 500] [--documents 4000]
        [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
import warnings
from pathlib import Path

from common import (
    DIMS,
    accelerator,
    machine,
    print_table,
    sentence_transformer,
    synthetic_pairs,
    text_of_tokens,
    tiny_text_model,
    vocabulary,
)
from lightning.pytorch import Trainer
from transformers import AutoTokenizer

from callbacks.retrieval import RetrievalEvaluator
from datamodules.pairs import StreamingPairDataModule
from datamodules.text_batches import PromptConfig
from lightning_modules import TextOnly
from lightning_modules.components.text_encoder import TextEncoderConfig


def write_beir(directory: Path, tokenizer, queries: int, documents: int, length: int) -> None:
    """Each query has one relevant document; the rest of the corpus are distractors."""
    pairs = synthetic_pairs(tokenizer, queries, 16, length, seed=1)
    words, rng = vocabulary(tokenizer), random.Random(2)
    distractors = [text_of_tokens(tokenizer, words, length, rng) for _ in range(documents - queries)]
    (directory / "qrels").mkdir(parents=True)
    corpus = [{"_id": f"doc{i}", "text": p["document"]} for i, p in enumerate(pairs)]
    corpus += [{"_id": f"distractor{i}", "text": text} for i, text in enumerate(distractors)]
    (directory / "corpus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in corpus))
    rows = [{"_id": f"q{i}", "text": p["query"]} for i, p in enumerate(pairs)]
    (directory / "queries.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\tdoc{i}\t1\n" for i in range(queries))
    (directory / "qrels" / "test.tsv").write_text(qrels)


def this_project(text_model, eval_dir, args) -> tuple[float, dict[int, float]]:
    model = TextOnly(TextEncoderConfig(text_model), matryoshka_dims=DIMS)
    data = StreamingPairDataModule(
        text_model,
        eval_sets={"bench": str(eval_dir)},
        prompts=PromptConfig(query_template="{query}"),
        eval_batch_size=args.batch_size,
        max_query_length=args.max_length,
        max_document_length=args.max_length,
    )
    trainer = Trainer(
        accelerator=accelerator(args.device),
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RetrievalEvaluator(dashboards=False)],
    )
    started = time.perf_counter()
    trainer.validate(model, data, verbose=False)
    seconds = time.perf_counter() - started
    return seconds, {d: float(trainer.callback_metrics[f"val/bench/ndcg@10/d{d}"]) for d in DIMS}


def sentence_transformers_side(text_model, eval_dir, args) -> tuple[float, dict[int, float]]:
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    read = lambda name: [json.loads(line) for line in (eval_dir / name).read_text().splitlines()]  # noqa: E731
    corpus = {row["_id"]: row["text"] for row in read("corpus.jsonl")}
    queries = {row["_id"]: row["text"] for row in read("queries.jsonl")}
    relevant: dict[str, set[str]] = {}
    for line in (eval_dir / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        query, document, _ = line.split("\t")
        relevant.setdefault(query, set()).add(document)
    model = sentence_transformer(text_model, args.max_length, args.device)
    started = time.perf_counter()
    scores = {}
    for dim in DIMS:  # as the paper's code: one evaluator, one full encoding, per dim
        evaluator = InformationRetrievalEvaluator(
            queries,
            corpus,
            relevant,
            batch_size=args.batch_size,
            truncate_dim=dim,
            name=f"d{dim}",
            write_csv=False,
        )
        result = evaluator(model)
        scores[dim] = float(next(v for k, v in result.items() if k.endswith("cosine_ndcg@10")))
    return time.perf_counter() - started, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both stacks on it)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    text_model = tiny_text_model()
    tokenizer = AutoTokenizer.from_pretrained(text_model)
    with tempfile.TemporaryDirectory() as directory:
        eval_dir = Path(directory) / "bench"
        write_beir(eval_dir, tokenizer, args.queries, args.documents, args.max_length)
        ours_seconds, ours = this_project(text_model, eval_dir, args)
        st_seconds, theirs = sentence_transformers_side(text_model, eval_dir, args)
    print(f"machine: {machine(args.device)}")
    print(
        f"{args.queries} queries (16 tokens), {args.documents} documents ({args.max_length} tokens), "
        f"batch {args.batch_size}, dims {DIMS}"
    )
    print_table(
        "Evaluation of 4 dims (encode + score)",
        ["stack", "seconds", *[f"nDCG@10 d{d}" for d in DIMS]],
        [
            ["this project (encode once)", f"{ours_seconds:.1f}", *[f"{ours[d]:.5f}" for d in DIMS]],
            [
                "sentence-transformers (once per dim)",
                f"{st_seconds:.1f}",
                *[f"{theirs[d]:.5f}" for d in DIMS],
            ],
        ],
    )
    print(f"\nspeed-up: {st_seconds / ours_seconds:.2f}x")
    print(f"max |nDCG@10 difference| over dims: {max(abs(ours[d] - theirs[d]) for d in DIMS):.2e}")


if __name__ == "__main__":
    main()
