"""Shared pieces of the benchmarks: the project's tiny models, synthetic data, timing and printing.

Everything is built locally (no download): the demo's tokenizer and tiny random-init models
(``datamodules.demo.assets``, built into ``$DEMO_DATA_DIR`` or ``data/demo`` on first use).
"""

from __future__ import annotations

import io
import json
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # scripts run as `python benchmarks/x.py` from the project root
    sys.path.insert(0, str(ROOT))

from datamodules.demo import assets  # noqa: E402

DIMS = [32, 64, 128, 256]
REAL_DIMS = [128, 256, 512, 1024]
# The real recipe's adapter (configs/late_fusion.yaml).
REAL_ADAPTER = {"fusion": "concat", "conv_channels": 1024, "kernel_size": 3, "stride": 2}


def tiny_text_model() -> str:
    return str(assets.text_model_dir())


def tiny_speech_model() -> str:
    return str(assets.speech_model_dir())


def real_size_models(directory: Path, layers: int | None = None) -> tuple[str, str]:
    """Qwen3-Embedding-0.6B and HuBERT-base shapes with random weights, with the demo tokenizer."""
    text_dir, speech_dir = assets.save_real_size_models(directory, Path(tiny_text_model()), layers)
    return str(text_dir), str(speech_dir)


def late_fusion_setup(directory: Path, real_size: bool, document_tokens: int, conv_channels: int = 1024):
    """A late-fusion model (frozen LLM and speech tower; the adapter trains) and the data module
    that builds its batches, as ``(model, data)``: the real recipe's shapes (Qwen3-0.6B and
    HuBERT-base with random weights, written under ``directory``, its adapter and dims) or the
    demo's tiny models with an adapter of ``conv_channels``."""
    from datamodules.audio import AudioSettings
    from datamodules.pairs import StreamingPairDataModule
    from lightning_modules import LateFusion
    from lightning_modules.components.text_encoder import TextEncoderConfig

    if real_size:
        text_model, speech_model = real_size_models(directory)
        dims, adapter = REAL_DIMS, REAL_ADAPTER
    else:
        text_model, speech_model = tiny_text_model(), tiny_speech_model()
        dims, adapter = DIMS, {"conv_channels": conv_channels}
    data = StreamingPairDataModule(
        text_model,
        audio=AudioSettings(feature_extractor=speech_model, min_duration=0.5),
        max_query_length=64,
        max_document_length=document_tokens,
    )
    torch.manual_seed(0)
    model = LateFusion(
        TextEncoderConfig(text_model),  # frozen (the paper's recipe): the adapter trains
        {"pretrained_model_name_or_path": speech_model},
        adapter=adapter,
        matryoshka_dims=dims,
    ).train()
    return model, data


def vocabulary(tokenizer, size: int = 400) -> list[str]:
    """Whole words of the demo tokenizer's vocabulary (so texts tokenize to predictable lengths)."""
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2]
    return sorted(words)[:size]


def text_of_tokens(tokenizer, words: list[str], tokens: int, rng: random.Random) -> str:
    """A random text of at least ``tokens`` tokens (truncation then cuts it to the exact length)."""
    text = ""
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += " " + " ".join(rng.choice(words) for _ in range(max(8, tokens // 4)))
    return text.strip()


def wav_bytes(seconds: float, rng: np.random.Generator, rate: int = 16000) -> bytes:
    """A tone-plus-noise clip as WAV bytes (what an audio column holds)."""
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * rng.uniform(150, 900) * t) + 0.05 * rng.standard_normal(t.shape)
    buffer = io.BytesIO()
    soundfile.write(buffer, wave.astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """The script's own arguments, and those after ``--`` (overrides passed on to ``cli.py``)."""
    if "--" not in argv:
        return list(argv), []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(function, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def run_child(script: Path, arguments: list[str]) -> dict:
    """Runs ``script --child ...`` in a fresh process (its own peak memory) and reads its JSON line."""
    result = subprocess.run(
        [sys.executable, str(script), "--child", *arguments], capture_output=True, text=True, cwd=ROOT
    )
    if result.returncode != 0:
        raise RuntimeError(f"{script.name} {arguments} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def accelerator(device: str) -> str:
    """Lightning's name for a torch device type."""
    return "gpu" if device == "cuda" else device


def machine(device: str = "cpu") -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    threads = torch.get_num_threads()
    return f"{platform.processor() or platform.machine()}, {threads} torch threads, torch {torch.__version__}"


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def sentence_transformer(text_model: str, max_length: int, device: str = "cpu"):
    """The tiny Qwen3 as a SentenceTransformer: last-token pooling, normalized (as Qwen3-Embedding)."""
    from sentence_transformers import SentenceTransformer, models

    transformer = models.Transformer(text_model, max_seq_length=max_length)
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode="lasttoken")
    return SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device=device)


def synthetic_pairs(
    tokenizer, count: int, query_tokens: int, document_tokens: int, seed: int = 0
) -> list[dict]:
    words, rng = vocabulary(tokenizer), random.Random(seed)
    return [
        {
            "id": f"row{i}",
            "query": text_of_tokens(tokenizer, words, query_tokens, rng),
            "document": text_of_tokens(tokenizer, words, document_tokens, rng),
        }
        for i in range(count)
    ]
