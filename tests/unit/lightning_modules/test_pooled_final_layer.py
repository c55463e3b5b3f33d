"""The final decoder layer run at the pooled token only: same embeddings and gradients as the full layer.

Reference: the same weights with ``pooled_final_layer=False`` (transformers' own layer at every
position), on rows padded left, right and with a hole, for each supported layout.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model, Qwen3Config, Qwen3Model

from lightning_modules.components.text_encoder import LoraSettings, TextEncoder, TextEncoderConfig

SHAPE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, as Qwen3-Embedding
    max_position_embeddings=64,
)
LAYOUTS = {
    "qwen3": (Qwen3Config, Qwen3Model, {"head_dim": 24}),  # per-head q/k norms, head_dim != hidden/heads
    "qwen2": (Qwen2Config, Qwen2Model, {}),  # q/k/v biases
    "llama": (LlamaConfig, LlamaModel, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def decoder_dir(request, tmp_path_factory):
    config_class, model_class, extra = LAYOUTS[request.param]
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model_class(config_class(**SHAPE, **extra)).save_pretrained(path)
    return str(path)


def _batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, SHAPE["vocab_size"], (5, 12), generator=generator)
    attention_mask = torch.ones(5, 12, dtype=torch.long)
    attention_mask[1, 7:] = 0  # right padding
    attention_mask[2, :4] = 0  # left padding
    attention_mask[3, 5:8] = 0  # a hole (hand-built masks), pooled token after it
    attention_mask[4, 1:] = 0  # a single token
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _embeddings_and_gradients(encoder: TextEncoder, batch, from_embeds=False) -> tuple[torch.Tensor, dict]:
    encoder.zero_grad()
    if from_embeds:
        inputs_embeds = encoder.embed_tokens(batch["input_ids"])
        embeddings = encoder(inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"])
    else:
        embeddings = encoder(**batch)
    # Random weights, not a sum of squares: the final RMSNorm makes |embedding|^2 almost constant,
    # so its gradient is mostly cancellation and would compare rounding, not the computation.
    weights = torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(1))
    (embeddings * weights).sum().backward()
    gradients = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    return embeddings.detach(), gradients


def _count_pooled_calls(encoder: TextEncoder) -> list:
    """Records each pruned run of the final layer (a silent fallback would pass every equality)."""
    calls, pooled_forward = [], encoder.pooled_final_layer._pooled_forward

    def counted(*args):
        calls.append(args[0].shape)
        return pooled_forward(*args)

    encoder.pooled_final_layer._pooled_forward = counted
    return calls


def _assert_same(pruned, full, tolerance=1e-5):
    (pruned_embeddings, pruned_gradients), (full_embeddings, full_gradients) = pruned, full
    scale = full_embeddings.abs().max()
    assert (pruned_embeddings - full_embeddings).abs().max() <= tolerance * scale
    assert pruned_gradients.keys() == full_gradients.keys()
    for name, gradient in full_gradients.items():
        difference = (pruned_gradients[name] - gradient).abs().max()
        assert difference <= tolerance * gradient.abs().max().clamp(min=1e-8), name


def test_same_embeddings_and_gradients_as_the_full_final_layer(decoder_dir):
    pruned = TextEncoder(TextEncoderConfig(decoder_dir))
    full = TextEncoder(TextEncoderConfig(decoder_dir, pooled_final_layer=False))
    assert pruned.pooled_final_layer is not None and full.pooled_final_layer is None
    calls = _count_pooled_calls(pruned)
    batch = _batch()
    _assert_same(_embeddings_and_gradients(pruned, batch), _embeddings_and_gradients(full, batch))
    assert calls == [(5, 12, SHAPE["hidden_size"])]


def test_same_from_inputs_embeds_and_under_gradient_checkpointing(tiny_text_model):
    """Late fusion's path (``inputs_embeds``), with the earlier layer recomputed in backward."""
    pruned = TextEncoder(TextEncoderConfig(str(tiny_text_model), gradient_checkpointing=True))
    full = TextEncoder(TextEncoderConfig(str(tiny_text_model), pooled_final_layer=False))
    batch = _batch()
    batch["input_ids"] = batch["input_ids"] % pruned.embedding_table().shape[0]
    calls = _count_pooled_calls(pruned)
    _assert_same(
        _embeddings_and_gradients(pruned, batch, from_embeds=True),
        _embeddings_and_gradients(full, batch, from_embeds=True),
    )
    assert len(calls) == 1


def test_lora_adapters_get_the_same_gradients_and_keep_their_names(tiny_text_model, tmp_path):
    lora = LoraSettings(r=4, dropout=0.0)
    pruned = TextEncoder(TextEncoderConfig(str(tiny_text_model), lora=lora))
    full = TextEncoder(TextEncoderConfig(str(tiny_text_model), lora=lora, pooled_final_layer=False))
    with torch.no_grad():  # the same adapters on both, with a non-zero B so they change the output
        for (name, p), q in zip(pruned.named_parameters(), full.parameters(), strict=True):
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
            q.copy_(p)
    assert pruned.pooled_final_layer is not None
    assert pruned.state_dict().keys() == full.state_dict().keys()
    calls = _count_pooled_calls(pruned)
    batch = _batch()
    batch["input_ids"] = batch["input_ids"] % pruned.embedding_table().shape[0]
    _assert_same(_embeddings_and_gradients(pruned, batch), _embeddings_and_gradients(full, batch))
    assert len(calls) == 1
    pruned.save_pretrained(tmp_path)  # merges a deep copy of the patched model
    assert (tmp_path / "model.safetensors").exists()


def test_the_model_called_directly_runs_its_own_final_layer(tiny_text_model):
    """Outside ``TextEncoder.forward`` every position is computed, as transformers does."""
    pruned = TextEncoder(TextEncoderConfig(str(tiny_text_model))).eval()
    full = TextEncoder(TextEncoderConfig(str(tiny_text_model), pooled_final_layer=False)).eval()
    batch = _batch()
    batch["input_ids"] = batch["input_ids"] % pruned.embedding_table().shape[0]
    with torch.no_grad():
        ours = pruned.model(**batch).last_hidden_state
        theirs = full.model(**batch).last_hidden_state
    assert torch.equal(ours, theirs)


def test_a_pickled_encoder_still_prunes_its_own_layer(tiny_text_model):
    """ddp_spawn pickles the module; the restored forward must point at the restored layer."""
    encoder = TextEncoder(TextEncoderConfig(str(tiny_text_model))).eval()
    restored = pickle.loads(pickle.dumps(encoder))
    assert restored.pooled_final_layer.layer is restored.model.layers[-1]
    assert restored.model.layers[-1].forward is restored.pooled_final_layer
    batch = _batch()
    batch["input_ids"] = batch["input_ids"] % encoder.embedding_table().shape[0]
    with torch.no_grad():
        assert torch.equal(encoder(**batch), restored(**batch))


def test_mean_pooling_and_unsupported_models_keep_the_full_layer(tiny_text_model, tmp_path):
    assert TextEncoder(TextEncoderConfig(str(tiny_text_model), pooling="mean")).pooled_final_layer is None
    sliding = Qwen3Config(**SHAPE, layer_types=["full_attention", "sliding_attention"], sliding_window=4)
    Qwen3Model(sliding).save_pretrained(tmp_path)
    assert TextEncoder(TextEncoderConfig(str(tmp_path))).pooled_final_layer is None
