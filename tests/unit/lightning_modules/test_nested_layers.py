"""Nested layers (early exits): the exits' embeddings, the loss over exits, GradCache, export, checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from text_rows import text_rows
from transformers import AutoModel, AutoTokenizer

from datamodules.pairs import StreamingPairDataModule
from errors import ConfigError
from lightning_modules import TextOnly
from lightning_modules.components.early_exit import validate_matryoshka_layers
from lightning_modules.components.text_encoder import TextEncoder, TextEncoderConfig
from lightning_modules.losses import LossInputs, MatryoshkaInfoNCE
from lightning_modules.nested_layers import NestedLayers

DIMS = [16, 32, 64]


def _model(path, layers=(1, 2), chunk=None, loss=None) -> TextOnly:
    torch.manual_seed(0)
    return TextOnly(
        TextEncoderConfig(str(path)),
        matryoshka_dims=DIMS,
        matryoshka_layers=list(layers),
        loss=loss or NestedLayers(MatryoshkaInfoNCE(temperature=1.0), layer_weights={1: 0.5, 4: 2.0}),
        gradient_chunk_size=chunk,
    ).train()


def _alone(model_dir, texts: list[str], num_layers: int | None = None) -> torch.Tensor:
    """The reference: transformers' own model, cut to ``num_layers`` at load (its final norm kept),
    each text run alone (no padding), its last token's state."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    extra = {} if num_layers is None else {"num_hidden_layers": num_layers}
    reference = AutoModel.from_pretrained(model_dir, **extra).eval()
    with torch.no_grad():
        return torch.cat(
            [reference(**tokenizer(text, return_tensors="pt")).last_hidden_state[:, -1] for text in texts]
        )


@pytest.mark.parametrize("pooled_final_layer", [True, False])
def test_each_exit_equals_the_model_truncated_to_its_layers_plus_the_final_norm(
    deep_tiny_text_model, pooled_final_layer
):
    encoder = TextEncoder(TextEncoderConfig(str(deep_tiny_text_model), pooled_final_layer=pooled_final_layer))
    texts = [row["query"] + " " + row["document"] for row in text_rows(5)]
    tokenizer = AutoTokenizer.from_pretrained(deep_tiny_text_model)
    batch = tokenizer(texts, padding=True, return_tensors="pt")  # left-padded, rows of unequal length
    with torch.no_grad():
        pooled = encoder.eval().forward_exits([1, 2, 3], **batch)
    assert sorted(pooled) == [1, 2, 3, 4]
    for layers in (1, 2, 3, 4):
        reference = _alone(deep_tiny_text_model, texts, layers)
        assert torch.allclose(pooled[layers], reference, atol=1e-5), f"exit {layers}"
    # The norm matters: without it the exit is another vector.
    raw = AutoModel.from_pretrained(deep_tiny_text_model, output_hidden_states=True).eval()
    with torch.no_grad():
        unnormed = raw(**tokenizer(texts[0], return_tensors="pt")).hidden_states[2][:, -1]
    assert not torch.allclose(unnormed, pooled[2][:1], atol=1e-3)


def _random_inputs(rows=6, exits=(1, 2), depth=4, seed=0) -> LossInputs:
    generator = torch.Generator().manual_seed(seed)

    def side():
        out = {dim: torch.randn(rows, dim, generator=generator) for dim in DIMS}
        out |= {(layer, dim): torch.randn(rows, dim, generator=generator) for layer in exits for dim in DIMS}
        return out

    return LossInputs(queries=side(), documents=side())


def _direct_loss(inputs: LossInputs, layer_weights: dict, depth: int, temperature: float) -> torch.Tensor:
    """sum over (exit, dim) of w_exit * CrossEntropy(cos(q, d) / t, diagonal), written out."""
    total = torch.zeros(())
    for layer in (1, 2, depth):
        for dim in DIMS:
            key = dim if layer == depth else (layer, dim)
            q = F.normalize(inputs.queries[key], dim=-1)
            d = F.normalize(inputs.documents[key], dim=-1)
            logits = q @ d.T / temperature
            term = -torch.log_softmax(logits, dim=1).diagonal().mean()
            total = total + layer_weights.get(layer, 1.0) * term
    return total


def test_the_loss_is_the_weighted_sum_over_exits_and_dims_of_a_direct_loop():
    weights = {1: 0.5, 4: 2.0}
    loss = NestedLayers(MatryoshkaInfoNCE(temperature=0.5), layer_weights=weights)
    loss.check_layers([1, 2], depth=4)
    inputs = _random_inputs()
    terms = loss.terms(inputs)
    assert set(terms) == {"info_nce", "info_nce_L1", "info_nce_L2"}
    assert torch.allclose(sum(terms.values()), _direct_loss(inputs, weights, 4, 0.5), atol=1e-5)
    mean = NestedLayers(MatryoshkaInfoNCE(temperature=0.5), layer_weights=weights, reduction="mean")
    mean.check_layers([1, 2], depth=4)
    expected = _direct_loss(inputs, weights, 4, 0.5) / (0.5 + 1.0 + 2.0)
    assert torch.allclose(mean(inputs), expected, atol=1e-5)


def test_documents_without_exits_are_read_at_full_depth():
    loss = NestedLayers(MatryoshkaInfoNCE(temperature=0.5))
    loss.check_layers([1, 2], depth=4)
    inputs = _random_inputs()
    inputs.documents = {dim: inputs.documents[dim] for dim in DIMS}
    at_exit = LossInputs(
        queries={dim: inputs.queries[(1, dim)] for dim in DIMS}, documents=dict(inputs.documents)
    )
    assert torch.allclose(loss.terms(inputs)["info_nce_L1"], MatryoshkaInfoNCE(temperature=0.5)(at_exit))


def test_sampling_draws_k_earlier_exits_per_step_the_same_on_every_replica():
    first, second = (NestedLayers(MatryoshkaInfoNCE(), sample=1, seed=3) for _ in range(2))
    for loss in (first, second):
        loss.check_layers([1, 2, 3], depth=4)
    draws = [first.exits_this_step([1, 2, 3]) for _ in range(30)]
    assert draws == [second.exits_this_step([1, 2, 3]) for _ in range(30)]  # seed + draw count
    assert all(len(chosen) == 2 and chosen[-1] is None for chosen in draws)  # full depth always
    assert {chosen[0] for chosen in draws} == {1, 2, 3}
    assert int(first.draws) == 30  # a buffer: checkpointed, a resumed run continues the sequence


def test_exit_weights_of_zero_are_not_trained():
    loss = NestedLayers(MatryoshkaInfoNCE(), layer_weights={1: 0, 2: 0})
    loss.check_layers([1, 2], depth=4)
    assert set(loss.terms(_random_inputs())) == {"info_nce"}


def test_gradcache_with_exits_gives_the_plain_steps_gradients(deep_tiny_text_model):
    datamodule = StreamingPairDataModule(str(deep_tiny_text_model))
    batch = datamodule.batches.training_batch(text_rows(6))
    results = []
    for chunk in (None, 2):
        model = _model(deep_tiny_text_model, chunk=chunk)
        model.zero_grad()
        loss = model.training_loss(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss, grads), (chunked_loss, chunked_grads) = results
    assert torch.allclose(loss, chunked_loss, atol=1e-5)
    assert grads.keys() == chunked_grads.keys()
    for name, gradient in grads.items():
        assert torch.allclose(chunked_grads[name], gradient, atol=1e-5), name
    # The early layers receive gradient from the exits as well as through the later layers.
    first = "text_encoder.model.layers.0.mlp.down_proj.weight"
    assert grads[first].abs().max() > 1e-6


def test_an_exported_exit_loaded_with_from_pretrained_embeds_as_the_exit(deep_tiny_text_model, tmp_path):
    model = _model(deep_tiny_text_model).eval()
    texts = [row["query"] for row in text_rows(7)]
    batch = StreamingPairDataModule(str(deep_tiny_text_model)).tokenize_documents(texts)
    with torch.no_grad():
        in_training = model.embed_documents({"document": batch})
    model.export_text_encoder(tmp_path / "L2", num_layers=2)
    exported = AutoModel.from_pretrained(tmp_path / "L2")
    assert exported.config.num_hidden_layers == 2 and len(exported.layers) == 2
    pooled = _alone(tmp_path / "L2", texts)
    for dim in DIMS:
        difference = (F.normalize(pooled[:, :dim], dim=-1) - in_training[(2, dim)]).abs().max()
        assert difference < 1e-5, f"d{dim}: {difference:.2e}"
    with pytest.raises(ConfigError, match="not one of the trained depths"):
        model.export_text_encoder(tmp_path / "L3", num_layers=3)


@pytest.mark.parametrize(
    "layers, message",
    [
        ([2, 1], "sorted ascending"),
        ([1, 1, 2], "duplicates"),
        ([1, 9], "deeper than the text model's 4 layers"),
        ([0, 2], "positive layer counts"),
    ],
)
def test_bad_exits_are_refused_naming_the_key(layers, message):
    with pytest.raises(ConfigError, match=rf"model\.matryoshka_layers.*{message}"):
        validate_matryoshka_layers(layers, depth=4)


def test_the_full_depth_may_be_listed_and_is_not_an_extra_exit():
    assert validate_matryoshka_layers([1, 2, 4], depth=4) == [1, 2]


def test_a_model_with_exits_refuses_a_loss_that_ignores_them(deep_tiny_text_model):
    with pytest.raises(ConfigError, match="model.matryoshka_layers.*NestedLayers"):
        _model(deep_tiny_text_model, loss=MatryoshkaInfoNCE())
    with pytest.raises(ConfigError, match=r"model.loss.layer_weights names layers \[3\]"):
        _model(deep_tiny_text_model, loss=NestedLayers(MatryoshkaInfoNCE(), layer_weights={3: 1.0}))


def test_late_fusion_exits_on_the_query_path_with_cached_prompt_states(tiny_text_model, tiny_speech_model):
    """Queries exit early (from the one pass, the prompt's cached keys and values standing in for
    it), documents stay at full depth, and the loss at an exit scores the exit's queries against them."""
    from speech_inputs import query_batch, sample_clips

    from lightning_modules import LateFusion

    def late_fusion(cache: bool) -> LateFusion:
        torch.manual_seed(0)
        return LateFusion(
            text_encoder={"pretrained_model_name_or_path": str(tiny_text_model)},
            speech_encoder={"pretrained_model_name_or_path": str(tiny_speech_model)},
            adapter={"conv_channels": 16, "kernel_size": 5, "stride": 2},
            matryoshka_dims=[32, 256],
            matryoshka_layers=[1, 2],
            loss=NestedLayers(MatryoshkaInfoNCE(temperature=1.0)),
            cache_prompt_states=cache,
        ).eval()

    batch = query_batch(tiny_text_model, tiny_speech_model, sample_clips(), ["document_retrieval"] * 3)
    cached, uncached = late_fusion(True), late_fusion(False)
    with torch.no_grad():
        queries, reference = cached.embed_queries(batch), uncached.embed_queries(batch)
    assert set(queries) == {32, 256, (1, 32), (1, 256)} and cached.matryoshka_layers == [1, 2]
    for key, value in reference.items():
        assert torch.allclose(queries[key], value, atol=1e-5), key
    assert not torch.allclose(queries[(1, 256)], queries[256], atol=1e-3)
    documents = {dim: F.normalize(torch.randn(3, dim), dim=-1) for dim in (32, 256)}
    terms = cached.loss.terms(LossInputs(queries=queries, documents=documents))
    at_exit = LossInputs(queries={dim: queries[(1, dim)] for dim in (32, 256)}, documents=documents)
    assert torch.allclose(terms["info_nce_L1"], MatryoshkaInfoNCE(temperature=1.0)(at_exit))
