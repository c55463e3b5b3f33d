"""Shared fixtures: the demo assets are built once per session into a temporary folder.

Tests mirror the packages: ``tests/unit/<package>/`` build tiny models and data in-process;
``tests/integration/`` run the CLI, DDP processes or fits on the demo corpus, and carry the
``integration`` mark (``pytest -m "not integration"`` runs the unit tests alone); ``tests/gpu/``
carry the ``gpu`` mark and run only with ``-m gpu``, on CUDA.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from datamodules import tiny_models
from datamodules.demo import assets
from datamodules.demo.corpus import DemoCorpusConfig
from datamodules.demo.speech import write_demo_speech_corpus

# The speech corpus at test size: same generator, fewer rows (the full one takes ~2 min to render).
SMALL_CORPUS = DemoCorpusConfig(num_train_pairs=256, num_eval_queries=24, num_eval_distractor_documents=40)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """Demo assets for the session. Three are placed rather than built: the speech corpus (small),
    the text stage (the untrained tiny model instead of a 3-minute training run) and the pipelined
    demo's speech recognizer (an untrained tiny CTC model instead of a 15-minute one); the slow
    end-to-end test builds the real ones."""
    root = tmp_path_factory.mktemp("demo")
    previous = os.environ.get(assets.DEMO_DIR_ENV)
    os.environ[assets.DEMO_DIR_ENV] = str(root)
    text_model = assets.text_model_dir()  # builds the corpus too
    write_demo_speech_corpus(root / "speech", SMALL_CORPUS)
    shutil.copytree(text_model, root / "text-stage" / "text_encoder")
    tiny_models.save_tiny_ctc_asr(
        root / "asr-ctc" / "model", list("abdegijkmnopstuwxy"), assets.speech_model_dir()
    )
    yield root
    if previous is None:
        os.environ.pop(assets.DEMO_DIR_ENV, None)
    else:
        os.environ[assets.DEMO_DIR_ENV] = previous


@pytest.fixture(scope="session")
def tiny_text_model(demo_dir) -> Path:
    return assets.text_model_dir()


@pytest.fixture(scope="session")
def corpus_dir(demo_dir) -> Path:
    return assets.corpus_dir()


@pytest.fixture(scope="session")
def wide_tiny_text_model(tmp_path_factory, tiny_text_model) -> Path:
    """1024 wide, one narrow layer: a stand-in for Qwen3-Embedding-0.6B's embedding size."""
    path = tmp_path_factory.mktemp("wide-tiny-qwen3")
    tiny_models.save_tiny_text_model(path, tokenizer_source=tiny_text_model, hidden_size=1024, num_layers=1)
    return path


@pytest.fixture(scope="session")
def tiny_speech_model(demo_dir) -> Path:
    """The demo's speech tower: a w2v-BERT (filterbank input), batched with a mask."""
    return assets.speech_model_dir()


@pytest.fixture(scope="session")
def layer_norm_hubert(tmp_path_factory) -> Path:
    """A HuBERT-large-style waveform encoder (per-frame LayerNorm), batched with a mask."""
    path = tmp_path_factory.mktemp("tiny-hubert-layer-norm")
    tiny_models.save_tiny_hubert(path)
    return path


@pytest.fixture(scope="session")
def group_norm_hubert(tmp_path_factory) -> Path:
    """A HuBERT-base-style waveform encoder (GroupNorm over time): per-clip statistics or clip by clip."""
    path = tmp_path_factory.mktemp("tiny-hubert-group-norm")
    tiny_models.save_tiny_hubert(path, feat_extract_norm="group", do_stable_layer_norm=False)
    return path


@pytest.fixture(scope="session")
def tiny_ctc_asr(demo_dir) -> Path:
    """The pipelined demo's speech recognizer, untrained: a tiny w2v-BERT CTC model with its processor."""
    return assets.asr_model_dir()


@pytest.fixture(scope="session")
def speech_corpus_dir(demo_dir) -> Path:
    return assets.speech_corpus_dir()


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Two workers share the cores: one intra-op thread each (and in the processes they start),
        # or OpenMP threads spin waiting on each other (a 13 s fit took 270 s on a loaded machine).
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)
        if "gpu" in item.path.parts:  # tests/gpu/: run on CUDA, skipped without it
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def deep_tiny_text_model(tmp_path_factory, tiny_text_model) -> Path:
    """4 narrow layers: early exits at 1, 2 and 3 layers mean something (nested-layers tests)."""
    path = tmp_path_factory.mktemp("deep-tiny-qwen3")
    tiny_models.save_tiny_text_model(path, tokenizer_source=tiny_text_model, hidden_size=64, num_layers=4)
    return path


@pytest.fixture(scope="session")
def deep_wide_tiny_text_model(tmp_path_factory, tiny_text_model) -> Path:
    """Qwen3-Embedding-0.6B's depth (28) and width (1024) with one narrow attention head and MLP:
    the stand-in of recipes with early exits, a few MB."""
    from transformers import AutoModel, AutoTokenizer, Qwen3Config

    path = tmp_path_factory.mktemp("deep-wide-tiny-qwen3")
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_model)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=16, num_hidden_layers=28,
        num_attention_heads=1, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=True,
    )  # fmt: skip
    AutoModel.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
