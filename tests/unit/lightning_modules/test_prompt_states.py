"""Cached prompt states: late-fusion queries embed and train the same as with the prompt run in full.

Reference: the same model with the cache off (the whole ``prompt | speech | end`` sequence through
the LLM). Batches mix prompts of different lengths and clips of different lengths, so rows differ
in prompt padding, speech padding and positions.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from speech_inputs import DIMS, sample_clips
from transformers import AutoFeatureExtractor, AutoTokenizer

from datamodules.audio import pad_waveforms
from datamodules.text_batches import PromptConfig, TextBatchBuilder
from lightning_modules import LateFusion

# Instructions of different token lengths, so the cached prompts need left padding in the batch.
PROMPTS = PromptConfig(
    prompts={
        "short": "Find it",
        "long": "Given a spoken Wolof question, retrieve the French passages that answer it best",
        "medium": "Given a Wolof query, retrieve its transcription",
    },
    default_task="short",
)
TASKS = ["long", "short", "medium", "long"]


def _batch(text_model, speech_model, tasks=TASKS) -> dict:
    text = TextBatchBuilder(AutoTokenizer.from_pretrained(text_model), PROMPTS, 128, 64, {})
    clips = sample_clips()
    clips = (clips + clips)[: len(tasks)]
    clips[-1] = clips[-1][:5000]  # another speech length
    extractor = AutoFeatureExtractor.from_pretrained(speech_model)
    return {"query_audio": pad_waveforms(extractor, clips), "prompt": text.prompt_tokens(tasks)}


def _model(text_model, speech_model, **text_options) -> LateFusion:
    torch.manual_seed(0)
    return LateFusion(
        text_encoder={"pretrained_model_name_or_path": str(text_model), **text_options},
        speech_encoder={"pretrained_model_name_or_path": str(speech_model)},
        adapter={"conv_channels": 16},
        matryoshka_dims=DIMS,
    ).train()


def _embeddings_and_gradients(model: LateFusion, batch, cached: bool):
    cache = model.prompt_state_cache
    if not cached:
        model.prompt_state_cache = None
    try:
        model.zero_grad()
        embeddings = model.embed_queries(batch)
        # Random directions: a plain sum of a normalized embedding would hide most of the gradient.
        generator = torch.Generator().manual_seed(1)
        loss = sum((e * torch.randn(e.shape, generator=generator)).sum() for e in embeddings.values())
        loss.backward()
    finally:
        model.prompt_state_cache = cache
    gradients = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {d: e.detach() for d, e in embeddings.items()}, gradients


def _assert_same(model, batch):
    expected, expected_gradients = _embeddings_and_gradients(model, batch, cached=False)
    got, gradients = _embeddings_and_gradients(model, batch, cached=True)
    for dim in DIMS:
        assert torch.allclose(got[dim], expected[dim], rtol=1e-5, atol=1e-6), dim
    assert gradients.keys() == expected_gradients.keys() and gradients
    for name, gradient in gradients.items():
        scale = expected_gradients[name].abs().max()
        assert (gradient - expected_gradients[name]).abs().max() <= 1e-5 * scale, name


@pytest.mark.parametrize(
    ("pooled_final_layer", "attention"), [(True, "sdpa"), (False, "sdpa"), (True, "eager"), (False, "eager")]
)
def test_cached_prompts_give_the_same_embeddings_and_adapter_gradients(
    tiny_text_model, tiny_speech_model, pooled_final_layer, attention
):
    model = _model(
        tiny_text_model,
        tiny_speech_model,
        pooled_final_layer=pooled_final_layer,
        attn_implementation=attention,
    )
    assert (model.text_encoder.pooled_final_layer is not None) == pooled_final_layer
    _assert_same(model, _batch(tiny_text_model, tiny_speech_model))
    # Each distinct prompt ran through the LLM once, and a second batch reuses them.
    assert model.prompt_state_cache.computed == 3
    _assert_same(model, _batch(tiny_text_model, tiny_speech_model, ["medium", "short"]))
    assert model.prompt_state_cache.computed == 3


def test_the_cache_is_on_by_default_and_a_mutated_mask_is_caught(tiny_text_model, tiny_speech_model):
    """Guards against a silent fallback: the cached path must really run (and differ if broken)."""
    model = _model(tiny_text_model, tiny_speech_model).eval()
    batch = _batch(tiny_text_model, tiny_speech_model)
    with torch.no_grad():
        expected = model.embed_queries(batch)
        assert model.prompt_state_cache.computed == 3
        broken = model._prompt_states(batch["prompt"])
        broken.mask[:, 0] = 1  # attend to one padding slot of the shorter prompts
        original, model._prompt_states = model._prompt_states, lambda prompt: broken
        try:
            mutated = model.embed_queries(batch)
        finally:
            model._prompt_states = original
    assert not torch.allclose(mutated[DIMS[-1]][1], expected[DIMS[-1]][1], atol=1e-4)  # a short prompt
    assert torch.allclose(mutated[DIMS[-1]][0], expected[DIMS[-1]][0], atol=1e-6)  # the longest


def test_changed_llm_weights_recompute_the_states(tiny_text_model, tiny_speech_model):
    model = _model(tiny_text_model, tiny_speech_model)
    batch = _batch(tiny_text_model, tiny_speech_model)
    _assert_same(model, batch)
    with torch.no_grad():  # e.g. load_state_dict into the text tower: an in-place write
        model.text_encoder.embedding_table().mul_(1.5)
    _assert_same(model, batch)
    assert model.prompt_state_cache.computed == 6
    # A write through .data escapes the in-place version; each stage starts afresh.
    model.text_encoder.embedding_table().data.mul_(1.5)
    model.setup("validate")
    _assert_same(model, batch)
    assert model.prompt_state_cache.computed == 9


def test_training_gradients_with_grad_cache_chunks_match(tiny_text_model, tiny_speech_model):
    """GradCache replays each chunk's forward in backward: the cached path must replay the same."""
    model = _model(tiny_text_model, tiny_speech_model)
    batch = _batch(tiny_text_model, tiny_speech_model)
    text = TextBatchBuilder(AutoTokenizer.from_pretrained(tiny_text_model), PROMPTS, 128, 64, {})
    batch["ids"] = [str(i) for i in range(len(TASKS))]
    batch["document"] = text.documents(["un", "deux trois", "quatre cinq six", "sept"])
    model.gradient_chunk_size = 2
    results = []
    cache = model.prompt_state_cache
    for use_cache in (True, False):
        model.prompt_state_cache = cache if use_cache else None
        model.zero_grad()
        loss = model.training_loss(batch)
        loss.backward()
        gradients = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), gradients))
    assert cache.computed == 3
    (cached_loss, cached), (full_loss, full) = results
    assert torch.allclose(cached_loss, full_loss, rtol=1e-6)
    assert cached.keys() == full.keys() and all(name.startswith("adapter.") for name in cached)
    for name, gradient in cached.items():
        assert (gradient - full[name]).abs().max() <= 1e-5 * full[name].abs().max(), name


def test_no_cache_with_lora(tiny_text_model, tiny_speech_model):
    """LoRA makes the prompt's states depend on trained weights: the whole sequence runs."""
    model = _model(tiny_text_model, tiny_speech_model, lora={"r": 4, "alpha": 8})
    batch = _batch(tiny_text_model, tiny_speech_model)
    assert model._prompt_states(batch["prompt"]) is None
    sum(e.sum() for e in model.embed_queries(batch).values()).backward()
    assert model.prompt_state_cache.computed == 0


def test_gradient_checkpointing_keeps_the_cache_only_in_eval_mode(tiny_text_model, tiny_speech_model):
    """transformers drops key/value caches when it checkpoints, which it does in train mode only;
    a frozen tower stays in eval mode, so the cache applies."""
    model = _model(tiny_text_model, tiny_speech_model, gradient_checkpointing=True)
    batch = _batch(tiny_text_model, tiny_speech_model)
    assert not model.text_encoder.training
    _assert_same(model, batch)
    assert model.prompt_state_cache.computed == 3
    model.text_encoder.train()
    assert model._prompt_states(batch["prompt"]) is None


def test_no_cache_while_the_llm_is_unfrozen(tiny_text_model, tiny_speech_model):
    model = _model(tiny_text_model, tiny_speech_model)
    batch = _batch(tiny_text_model, tiny_speech_model)
    model.text_encoder.embedding_table().requires_grad_(True)
    assert model._prompt_states(batch["prompt"]) is None


def test_a_pickled_cache_drops_its_tensors(tiny_text_model, tiny_speech_model):
    """ddp_spawn pickles the module: the copy recomputes the states instead of shipping them."""
    model = _model(tiny_text_model, tiny_speech_model).eval()
    batch = _batch(tiny_text_model, tiny_speech_model)
    with torch.no_grad():
        expected = model.embed_queries(batch)
        model.prompt_state_cache = pickle.loads(pickle.dumps(model.prompt_state_cache))
        assert model.prompt_state_cache._states == {} and model.prompt_state_cache.computed == 3
        got = model.embed_queries(batch)
    assert model.prompt_state_cache.computed == 6
    assert torch.allclose(got[DIMS[-1]], expected[DIMS[-1]], atol=1e-6)


def test_bf16_autocast_states_are_kept_apart_from_float32(tiny_text_model, tiny_speech_model):
    """States computed in float32 are not reused under bf16 autocast (nor the reverse); the
    cached bf16 path stays within bf16 rounding of the full bf16 sequence."""
    model = _model(tiny_text_model, tiny_speech_model).eval()
    batch = _batch(tiny_text_model, tiny_speech_model)
    with torch.no_grad():
        model.embed_queries(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model.embed_queries(batch)
            cache, model.prompt_state_cache = model.prompt_state_cache, None
            expected = model.embed_queries(batch)
            model.prompt_state_cache = cache
        model.embed_queries(batch)
    assert cache.computed == 9  # float32, bf16, then float32 again (one set kept at a time)
    for dim in DIMS:
        difference = (got[dim].float() - expected[dim].float()).norm(dim=-1)
        assert (difference / expected[dim].float().norm(dim=-1)).max() < 2e-2, dim


def test_length_dependent_rope_and_bidirectional_models_are_not_cached():
    """A prompt encoded alone must be rotated and attended exactly as inside the full sequence."""
    from transformers import LlamaConfig, LlamaModel, Qwen3Config

    from lightning_modules.components.decoder_support import (
        full_attention_decoder,
        rope_is_length_independent,
    )

    assert rope_is_length_independent(Qwen3Config())
    assert rope_is_length_independent(LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert not rope_is_length_independent(LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    per_layer_type = {
        "full_attention": {"rope_type": "default"},
        "sliding_attention": {"rope_type": "dynamic"},
    }
    assert not rope_is_length_independent(type("Config", (), {"rope_parameters": per_layer_type})())
    shape = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, vocab_size=50
    )
    assert full_attention_decoder(LlamaModel(LlamaConfig(**shape)))
    bidirectional = LlamaConfig(**shape)
    bidirectional.is_causal = False
    assert not full_attention_decoder(LlamaModel(bidirectional))
