"""Pooling and the text encoder wrapper: padding invariance, pooling choice, export round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from errors import ConfigError
from lightning_modules.components.pooling import last_token_pool, mean_pool
from lightning_modules.components.text_encoder import TextEncoder, TextEncoderConfig


def test_last_token_pool_reads_the_last_real_token_on_either_side():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert last_token_pool(hidden, left).flatten().tolist() == [3.0, 7.0]
    assert last_token_pool(hidden, right).flatten().tolist() == [1.0, 7.0]


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).item() == pytest.approx(2.0)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_embedding_does_not_depend_on_batch_padding(tiny_text_model, padding_side):
    encoder = TextEncoder(TextEncoderConfig(str(tiny_text_model))).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_model, padding_side=padding_side)
    short, long = "jaawaanun bita", "goyoo taaboo nona nage suwaaw yoosaaxet " * 4
    with torch.no_grad():
        alone = encoder(**tokenizer([short], return_tensors="pt"))
        batched = encoder(**tokenizer([short, long], padding=True, return_tensors="pt"))
    assert (alone[0] - batched[0]).abs().max() < 1e-4


def test_save_pretrained_round_trips(tiny_text_model, tmp_path):
    encoder = TextEncoder(TextEncoderConfig(str(tiny_text_model))).eval()
    with torch.no_grad():
        for parameter in encoder.parameters():  # make it differ from the source checkpoint
            parameter.add_(0.01 * torch.randn_like(parameter))
    encoder.save_pretrained(tmp_path)
    reloaded = TextEncoder(TextEncoderConfig(str(tmp_path))).eval()
    tokens = AutoTokenizer.from_pretrained(tmp_path)(
        ["bita xipoosa", "fèfé lôrôfê"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        assert torch.allclose(encoder(**tokens), reloaded(**tokens), atol=1e-6)
    assert isinstance(AutoModel.from_pretrained(tmp_path), torch.nn.Module)


def test_lora_trains_only_adapters_and_exports_merged(tiny_text_model, tmp_path):
    from lightning_modules.components.text_encoder import LoraSettings

    encoder = TextEncoder(TextEncoderConfig(str(tiny_text_model), lora=LoraSettings(r=4)))
    trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # B starts at zero; give the adapter an effect
    encoder.eval()
    encoder.save_pretrained(tmp_path)
    assert (tmp_path / "lora_adapter" / "adapter_config.json").exists()
    merged = TextEncoder(TextEncoderConfig(str(tmp_path))).eval()
    tokens = AutoTokenizer.from_pretrained(tmp_path)(["bita xipoosa"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(encoder(**tokens), merged(**tokens), atol=1e-4)


def test_unknown_pooling_is_a_clear_error(tiny_text_model):
    with pytest.raises(ConfigError, match="pooling"):
        TextEncoderConfig(str(tiny_text_model), pooling="max")
