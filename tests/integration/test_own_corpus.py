"""README's "Your own corpus", end to end, on a corpus unlike the demo's (about a minute).

The test writes two toy languages of its own (an IPA-like script for queries, Greek letters for
documents: no letter of the demo's), spoken queries in mixed containers and rates (wav 16 kHz,
flac 22.05 kHz, ogg 8 kHz, float wav 44.1 kHz) beside a JSON Lines manifest, and a BEIR eval set
named ``lomasi``. Then the README's commands, shortened to 120 and 40 steps: build the tokenizer
and tiny models from the training file, the text stage (validated untrained, then fit, which
exports it), late fusion on that export (the same). Each trained model must beat its untrained
score, and the new tokenizer must cut the corpus's words into fewer pieces than the demo's.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from cli import cli_main
from datamodules import own_corpus
from datamodules.demo.speech import DemoSpeechConfig, DemoVoice, chord_table

ROOT = Path(__file__).resolve().parents[2]
EVAL_SET = "lomasi"
QUERY_LETTERS = ("ŋɓɗñƙ", ("ɛ", "ɔ", "ə", "i"))
DOCUMENT_LETTERS = ("κλμνπρστ", ("α", "ε", "ο", "ω", "ι"))
NUM_CONCEPTS, NUM_FILLERS, TRAIN_PAIRS, VOICES, EVAL_QUERIES = 24, 4, 240, 1, 16
# (container, rate, subtype): every clip is stored in the next one.
AUDIO_FORMATS = [
    ("wav", 16000, "PCM_16"),
    ("flac", 22050, "PCM_16"),
    ("ogg", 8000, "VORBIS"),
    ("wav", 44100, "FLOAT"),
]
# The tiny random-init text model sits near chance for ~60 steps, then learns the word mapping.
TEXT_STEPS, FUSION_STEPS = 120, 80
DIMS = (32, 64, 128, 256)


def _words(rng: random.Random, letters: tuple[str, tuple[str, ...]], count: int) -> list[str]:
    consonants, vowels = letters
    words: list[str] = []
    while len(words) < count:
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 3)))
        if word not in words:
            words.append(word)
    return words


def write_corpus(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """``root/train.jsonl`` (query, document, audio path) and ``root/eval/lomasi`` (BEIR + audio)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    query_words = _words(rng, QUERY_LETTERS, NUM_CONCEPTS + NUM_FILLERS)
    document_words = _words(rng, DOCUMENT_LETTERS, NUM_CONCEPTS + NUM_FILLERS)
    speech = DemoSpeechConfig(seed=seed)
    chords = chord_table(query_words, speech)
    audio_rng = np.random.default_rng(seed)
    clips = 0

    def spoken(base: Path, stem: str, words: list[str]) -> str:
        """Writes the clip under ``base`` in the next format; returns its path relative to ``base``."""
        nonlocal clips
        container, rate, subtype = AUDIO_FORMATS[clips % len(AUDIO_FORMATS)]
        clips += 1
        voice = DemoVoice(DemoSpeechConfig(seed=seed, sampling_rate=rate), chords, audio_rng)
        (base / stem).parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(base / f"{stem}.{container}", voice.say(words), rate, subtype=subtype)
        return f"{stem}.{container}"

    def pair(concepts: list[int]) -> tuple[list[str], str]:
        said = [query_words[c] for c in concepts]
        said.insert(rng.randint(0, len(said)), rng.choice(query_words[NUM_CONCEPTS:]))
        written = [document_words[c] for c in concepts] + rng.sample(document_words[NUM_CONCEPTS:], 2)
        rng.shuffle(written)
        return said, " ".join(written)

    combinations = []
    while len(combinations) < TRAIN_PAIRS + EVAL_QUERIES:
        concepts = sorted(rng.sample(range(NUM_CONCEPTS), rng.randint(2, 3)))
        if concepts not in combinations:
            combinations.append(concepts)
    with open(root / "train.jsonl", "w", encoding="utf-8") as handle:
        for i, concepts in enumerate(combinations[:TRAIN_PAIRS]):
            said, document = pair(concepts)
            for voice in range(VOICES):
                audio = spoken(root, f"clips/train-{i}-v{voice}", said)
                row = {
                    "id": f"train-{i}-v{voice}",
                    "query": " ".join(said),
                    "document": document,
                    "audio": audio,
                }
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    eval_root = root / "eval" / EVAL_SET
    (eval_root / "qrels").mkdir(parents=True)
    queries, corpus, qrels = [], [], ["query-id\tcorpus-id\tscore"]
    for i, concepts in enumerate(combinations[TRAIN_PAIRS:]):
        said, document = pair(concepts)
        audio = spoken(eval_root, f"audio/q{i}", said)
        queries.append({"_id": f"q{i}", "text": " ".join(said), "audio": audio})
        corpus.append({"_id": f"d{i}", "text": document})
        qrels.append(f"q{i}\td{i}\t1")
    for i in range(EVAL_QUERIES):  # documents that answer no query
        corpus.append({"_id": f"distractor-{i}", "text": pair(rng.sample(range(NUM_CONCEPTS), 3))[1]})
    for name, rows in (("queries.jsonl", queries), ("corpus.jsonl", corpus)):
        (eval_root / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (eval_root / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
    return root / "train.jsonl", eval_root


def _ndcg(cli) -> dict[int, float]:
    metrics = cli.trainer.callback_metrics
    return {d: round(float(metrics[f"val/{EVAL_SET}/ndcg@10/d{d}"]), 3) for d in DIMS}


def _untrained_then_trained(args: list[str], root: Path, steps: int) -> tuple[dict, dict]:
    """nDCG@10 per dim of ``validate`` before training and of ``fit``'s one validation, at its end."""
    shortened = [
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.batch_size=32",
        "--model.init_args.lr_scheduler.init_args.warmup_steps=10",
    ]
    untrained = cli_main(["validate", *args, *shortened, f"--trainer.default_root_dir={root / 'untrained'}"])
    started = time.monotonic()
    trained = cli_main(["fit", *args, *shortened, f"--trainer.default_root_dir={root}"])
    print(f"{root.name}: fit of {steps} steps took {time.monotonic() - started:.0f} s")
    assert trained.trainer.checkpoint_callback.monitor == f"val/{EVAL_SET}/ndcg@10/d256"  # named by no one
    return _ndcg(untrained), _ndcg(trained)


@pytest.fixture
def one_thread():
    """One intra-op thread: where other processes load the cores, two threads wait on each other
    (the text fit below took 270 s with two on a loaded 2-core machine, 13 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_own_corpus_path_trains_text_stage_then_late_fusion(tmp_path, monkeypatch, one_thread):
    demo = tmp_path / "demo"
    monkeypatch.setenv("DEMO_DATA_DIR", str(demo))
    train, eval_set = write_corpus(tmp_path / "corpus")
    models = tmp_path / "models"

    started = time.monotonic()
    languages = ["--query_language", "Lomasi", "--document_language", "Greek"]
    rates = own_corpus.main(["--train_data", str(train), "--output", str(models), *languages])
    print(f"own_corpus took {time.monotonic() - started:.0f} s")
    assert rates["queries"]["new"] < rates["queries"]["compared"]
    assert rates["documents"]["new"] < rates["documents"]["compared"]

    data = [
        f"--data.init_args.train_data={train}",
        f"--data.init_args.eval_sets={{{EVAL_SET}: {eval_set}}}",
        "--data.init_args.prompts.query_language=Lomasi",
        "--data.init_args.prompts.document_language=Greek",
    ]
    text_stage = tmp_path / "runs" / "text"
    text_args = [
        "--config",
        str(ROOT / "configs" / "demo" / "text_only.yaml"),
        f"--model.init_args.text_encoder.pretrained_model_name_or_path={models / 'text_model'}",
        *data,
    ]
    text_before, text_after = _untrained_then_trained(text_args, text_stage, TEXT_STEPS)
    print(f"text stage nDCG@10: untrained {text_before}, trained {text_after}")
    assert (text_stage / "text_encoder" / "config.json").is_file()  # the export, written by fit

    late_fusion_args = [
        "--config",
        str(ROOT / "configs" / "demo" / "late_fusion.yaml"),
        f"--model.init_args.text_encoder.pretrained_model_name_or_path={text_stage / 'text_encoder'}",
        f"--model.init_args.speech_encoder.pretrained_model_name_or_path={models / 'speech_model'}",
        f"--data.init_args.audio.feature_extractor={models / 'speech_model'}",
        *data,
    ]
    fusion_before, fusion_after = _untrained_then_trained(
        late_fusion_args, tmp_path / "runs" / "late_fusion", FUSION_STEPS
    )
    print(f"late fusion nDCG@10: untrained {fusion_before}, trained {fusion_after}")

    assert text_after[256] > text_before[256] + 0.3
    assert fusion_after[256] > fusion_before[256] + 0.2
    # Only the demo tokenizer compared with was built: no demo data or stage stood in for the user's.
    assert sorted(p.name for p in demo.iterdir() if not p.name.startswith(".")) == ["corpus", "tiny-qwen3"]
