"""Shared fixtures: the demo assets are built once per session into a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from datamodules.demo import assets


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    previous = os.environ.get(assets.DEMO_DIR_ENV)
    os.environ[assets.DEMO_DIR_ENV] = str(root)
    assets.text_model_dir()  # builds the corpus too
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
    assets.save_tiny_text_model(path, tokenizer_source=tiny_text_model, hidden_size=1024, num_layers=1)
    return path
