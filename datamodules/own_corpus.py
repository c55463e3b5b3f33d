"""Your own corpus: a tokenizer and laptop-size random-init models built from your training pairs.

    python -m datamodules.own_corpus --train_data PATH --output DIR [--vocab_size N]

``PATH`` is what ``data.train_data`` reads (a .jsonl/.json/.parquet/.csv file, a folder, or a hub
dataset). Writes ``DIR/text_model/`` (a byte-level BPE tokenizer trained on the training queries
and documents, with a random-init Qwen3 of the demo's size) and ``DIR/speech_model/`` (the demo's
random-init w2v-BERT and its feature extractor), as the demo builds its own, then prints the
tokens per word of the new tokenizer and of the demo's (or ``--compare_with``'s) on the training
queries and documents. Only the training data is read: the eval sets stay unseen.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from datamodules.sources import load_stream
from datamodules.text_batches import PromptConfig, usable_text
from datamodules.tiny_models import (
    instruction_texts,
    save_tiny_text_model,
    save_tiny_w2v_bert,
    train_tokenizer,
)
from errors import ConfigError, DataError, InputError

# Twice the demo's: a real language has more words than the demo's 130 a side. Larger cuts words
# into fewer pieces, but each rare token then gets few updates in a short CPU run.
DEFAULT_VOCAB_SIZE = 4096


def training_texts(
    train_data: str, split: str = "train", query_column: str = "query", document_column: str = "document"
) -> tuple[list[str], list[str]]:
    """The distinct query texts (transcriptions, for audio rows that have one) and document texts."""
    key = "--train_data"
    names = load_stream(train_data, split, key=key).column_names  # None where the format says later
    columns = None
    if names is not None:
        if document_column not in names:
            raise DataError(f"{key}={train_data!r} has no {document_column!r} column (it has {names}).")
        # Only the text columns: a parquet file's audio is not read.
        columns = [column for column in (query_column, document_column) if column in names]
    queries, documents = {}, {}
    for row in load_stream(train_data, split, key=key, columns=columns):
        if usable_text(row.get(query_column)):
            queries[row[query_column]] = None
        if usable_text(row.get(document_column)):
            documents[row[document_column]] = None
    if not documents:
        raise DataError(f"{key}={train_data!r}: no row has {document_column!r} text to train a tokenizer on.")
    return list(queries), list(documents)


def tokens_per_word(tokenizer, texts: list[str]) -> float:
    """Tokens per whitespace-separated word, special tokens left out."""
    pieces = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return sum(map(len, pieces)) / max(1, sum(len(text.split()) for text in texts))


def build(
    train_data: str,
    output: Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    split: str = "train",
    prompts: PromptConfig | None = None,
) -> tuple[list[str], list[str]]:
    """Writes ``output/text_model`` and ``output/speech_model``; returns the queries and documents the
    tokenizer was trained on (with ``prompts``' instructions, the paper's by default)."""
    if vocab_size <= 257:
        raise ConfigError(
            f"--vocab_size={vocab_size}: a byte-level tokenizer needs more than 257 (256 bytes + end token)."
        )
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"--output={str(output)!r} is not empty; delete it or name another folder.")
    queries, documents = training_texts(train_data, split)
    text_model = output / "text_model"
    train_tokenizer([*instruction_texts(prompts), *queries, *documents], text_model, vocab_size)
    save_tiny_text_model(text_model, tokenizer_source=text_model)
    save_tiny_w2v_bert(output / "speech_model")
    return queries, documents


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """The command; returns tokens per word, ``{"queries"|"documents": {"new"|"compared": rate}}``."""
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.own_corpus", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--train_data", required=True, help="Training pairs, as data.train_data reads them.")
    parser.add_argument(
        "--output", required=True, type=Path, help="Folder to write text_model/ and speech_model/ in."
    )
    parser.add_argument(
        "--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE, help="Tokenizer vocabulary (at most)."
    )
    parser.add_argument("--train_split", default="train", help="Split of a folder or hub dataset.")
    defaults = PromptConfig()
    for side in ("query", "document"):
        parser.add_argument(
            f"--{side}_language",
            default=getattr(defaults, f"{side}_language"),
            help=f"As data.init_args.prompts.{side}_language: the instructions' words are trained on too.",
        )
    parser.add_argument(
        "--compare_with",
        help="Tokenizer (name or folder) to compare with; default: the demo's (built if missing).",
    )
    args = parser.parse_args(argv)
    prompts = PromptConfig(query_language=args.query_language, document_language=args.document_language)
    queries, documents = build(args.train_data, args.output, args.vocab_size, args.train_split, prompts)

    from transformers import AutoTokenizer

    if args.compare_with is None:
        from datamodules.demo.assets import text_model_dir

        print("Comparing with the demo's tokenizer (built first if missing: a few seconds, once).")
        args.compare_with = str(text_model_dir())
    new = AutoTokenizer.from_pretrained(args.output / "text_model")
    other = AutoTokenizer.from_pretrained(args.compare_with)
    print(
        f"Trained a tokenizer of {len(new)} tokens on {len(queries)} queries and {len(documents)} documents."
    )
    print(f"Tokens per word     {'new':>8}  {args.compare_with}")
    rates = {}
    for side, texts in (("queries", queries), ("documents", documents)):
        if texts:
            rates[side] = {"new": tokens_per_word(new, texts), "compared": tokens_per_word(other, texts)}
            print(f"  training {side:<9} {rates[side]['new']:>8.2f}  {rates[side]['compared']:.2f}")
    text_model, speech_model = args.output / "text_model", args.output / "speech_model"
    print(f"Wrote {text_model} (tiny Qwen3) and {speech_model} (tiny w2v-BERT), random init.")
    return rates


if __name__ == "__main__":
    try:
        main()
    except InputError as error:  # the message names the argument or file and the fix
        sys.exit(f"error: {error}")
