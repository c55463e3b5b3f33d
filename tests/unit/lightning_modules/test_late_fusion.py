"""Late fusion: sequence splicing, padding invariance, what trains and what is checkpointed."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from speech_inputs import (
    DIMS,
    assert_first_query_embeds_alone_as_batched,
    query_batch,
    sample_clips,
    speech_text_batch,
)
from transformers import AutoTokenizer

from callbacks.training_guards import TrainingSetupCheck, eval_mode_modules
from errors import ConfigError
from lightning_modules import LateFusion
from lightning_modules.components.adapters import ConvDownsampler
from lightning_modules.components.sequences import concat_masked_sequences
from lightning_modules.components.text_encoder import special_token_affixes


def test_concat_masked_sequences_matches_a_row_by_row_reference():
    torch.manual_seed(0)
    prompt = torch.randn(3, 4, 2, requires_grad=True)
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])  # left-padded
    speech = torch.randn(3, 5, 2, requires_grad=True)
    speech_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])  # right-padded
    output, mask = concat_masked_sequences([(prompt, prompt_mask), (speech, speech_mask)])
    rows = [torch.cat([prompt[b][prompt_mask[b].bool()], speech[b][speech_mask[b].bool()]]) for b in range(3)]
    length = max(len(r) for r in rows)
    assert output.shape == (3, length, 2)
    for b, row in enumerate(rows):
        assert torch.equal(output[b, length - len(row) :], row)  # left-padded, contiguous
        assert output[b, : length - len(row)].abs().sum() == 0
        assert mask[b].tolist() == [0] * (length - len(row)) + [1] * len(row)
    output.sum().backward()  # gradient reaches exactly the real elements
    assert torch.equal(prompt.grad[..., 0], prompt_mask.float())
    assert torch.equal(speech.grad[..., 0], speech_mask.float())


def test_downsampler_output_depends_only_on_its_own_frames():
    torch.manual_seed(0)
    conv = ConvDownsampler(input_size=6, channels=4, kernel_size=5, stride=3)
    frames = torch.randn(1, 11, 6)
    alone, alone_mask = conv(frames, torch.ones(1, 11, dtype=torch.long))
    padded = torch.cat([frames, 100 * torch.randn(1, 9, 6)], dim=1)
    batched, batched_mask = conv(padded, torch.tensor([[1] * 11 + [0] * 9]))
    n = int(alone_mask.sum())
    assert n == int(batched_mask.sum()) == (11 + 2 * 2 - 5) // 3 + 1
    assert torch.allclose(batched[0, :n], alone[0, :n], atol=1e-6)


@pytest.mark.parametrize(("kernel_size", "stride", "length"), [(3, 2, 17), (5, 3, 11), (2, 1, 6), (3, 2, 1)])
def test_downsampler_product_on_cpu_equals_the_convolution(kernel_size, stride, length):
    """The CPU path (unfolded windows x weight) against ``F.conv1d`` with the same weights."""
    torch.manual_seed(0)
    conv = ConvDownsampler(input_size=6, channels=4, kernel_size=kernel_size, stride=stride)
    frames = torch.randn(3, length, 6, requires_grad=True)
    reference_frames = frames.detach().clone().requires_grad_(True)
    ours = conv.convolve(frames)
    weight, bias = conv.conv.weight, conv.conv.bias
    reference = torch.nn.functional.conv1d(
        reference_frames.transpose(1, 2), weight, bias, stride=stride, padding=conv.padding
    ).transpose(1, 2)
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, atol=1e-6)
    upstream = torch.randn(reference.shape)
    (weight_grad, bias_grad, frames_grad) = torch.autograd.grad(
        (ours * upstream).sum(), [conv.conv.weight, conv.conv.bias, frames]
    )
    expected = torch.autograd.grad(
        (reference * upstream).sum(), [conv.conv.weight, conv.conv.bias, reference_frames]
    )
    for got, want in zip((weight_grad, bias_grad, frames_grad), expected, strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_special_token_affixes_of_the_demo_tokenizer(tiny_text_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_model)
    assert special_token_affixes(tokenizer) == ([], [tokenizer.convert_tokens_to_ids("<|endoftext|>")])


def _model(text_model, speech_model, **kwargs) -> LateFusion:
    torch.manual_seed(0)
    kwargs.setdefault("adapter", {"conv_channels": 32, "kernel_size": 5, "stride": 2})
    kwargs.setdefault("text_encoder", {"pretrained_model_name_or_path": str(text_model)})
    return LateFusion(
        speech_encoder={"pretrained_model_name_or_path": str(speech_model)},
        matryoshka_dims=DIMS,
        **kwargs,
    )


@pytest.mark.parametrize("speech_fixture", ["tiny_speech_model", "layer_norm_hubert", "group_norm_hubert"])
def test_query_embedding_is_the_same_alone_or_batched_with_longer_clips(
    request, tiny_text_model, speech_fixture
):
    speech_model = request.getfixturevalue(speech_fixture)
    model = _model(tiny_text_model, speech_model).eval()
    assert_first_query_embeds_alone_as_batched(
        model,
        tiny_text_model,
        speech_model,
        ["document_retrieval", "translation_retrieval", "transcription_retrieval"],
    )


def test_only_the_adapter_trains_and_is_checkpointed(tiny_text_model, tiny_speech_model):
    model = _model(tiny_text_model, tiny_speech_model)
    model.train()
    assert not model.text_encoder.training and not model.speech_encoder.model.training
    assert model.adapter.training
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("adapter.") for name in trainable)
    optimizer = model.configure_optimizers()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for name, p in model.named_parameters() if name in trainable}
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == trainable


def test_eval_mode_modules_are_the_frozen_towers_unless_a_trainable_part_is_left_in_eval(
    tiny_text_model, tiny_speech_model, caplog
):
    """Lightning warns "Found N module(s) in eval mode" at every late-fusion fit; the model says
    which: the frozen towers on purpose, or (a warning) a trainable module whose dropout is off."""
    model = _model(tiny_text_model, tiny_speech_model).train()
    trainer = SimpleNamespace(global_rank=0, accumulate_grad_batches=1)  # what the check reads
    eval_names = [name for name, module in model.named_modules() if not module.training]
    towers, others = eval_mode_modules(model)
    assert towers == ["text_encoder", "speech_encoder.model"] and others == []
    # The reference: every eval-mode module lies inside one of the towers, and all their weights are frozen.
    assert all(any(name == t or name.startswith(f"{t}.") for t in towers) for name in eval_names)
    assert not any(p.requires_grad for t in towers for p in model.get_submodule(t).parameters())
    with caplog.at_level(logging.INFO, logger="callbacks.training_guards"):
        TrainingSetupCheck().on_train_start(trainer, model)
    assert f"The {len(eval_names)} modules of the frozen towers {towers}" in caplog.text
    assert "WARNING" not in caplog.text

    model.adapter.eval()  # a trainable part left in eval mode by mistake
    towers, others = eval_mode_modules(model)
    assert towers == ["text_encoder", "speech_encoder.model"]
    assert others == [name for name, module in model.named_modules() if name.startswith("adapter")]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="callbacks.training_guards"):
        TrainingSetupCheck().on_train_start(trainer, model)
    assert f"{len(others)} module(s) in eval mode outside the frozen towers" in caplog.text


def _assert_query_gradients_reach_only_the_adapter(model, text_model, speech_model) -> None:
    """Backpropagates the query embeddings: every adapter weight gets a gradient, nothing else does."""
    model.train()
    batch = query_batch(text_model, speech_model, sample_clips(), ["document_retrieval"] * 3)
    sum(e.sum() for e in model.embed_queries(batch).values()).backward()
    for name, parameter in model.named_parameters():
        if name.startswith("adapter."):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_gradients_reach_the_adapter_through_the_frozen_llm(tiny_text_model, tiny_speech_model):
    model = _model(
        tiny_text_model, tiny_speech_model, adapter={"fusion": "weighted_sum", "conv_channels": 16}
    )
    _assert_query_gradients_reach_only_the_adapter(model, tiny_text_model, tiny_speech_model)


def test_lora_switch_trains_adapters_on_the_llm(tiny_text_model, tiny_speech_model):
    model = LateFusion(
        text_encoder={"pretrained_model_name_or_path": str(tiny_text_model), "lora": {"r": 4, "alpha": 8}},
        speech_encoder={"pretrained_model_name_or_path": str(tiny_speech_model)},
        adapter={"conv_channels": 16},
        matryoshka_dims=DIMS,
    )
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in name for name in trainable)
    assert all(name.startswith("adapter.") or "lora_" in name for name in trainable)
    model.train()
    assert model.text_encoder.training  # LoRA dropout is active while training


def test_alignment_term_adds_the_distance_to_the_transcription_embedding(tiny_text_model, tiny_speech_model):
    from lightning_modules.losses import (
        MatryoshkaInfoNCE,
        TranscriptionAlignment,
        WeightedSum,
        matryoshka_alignment_loss,
        matryoshka_info_nce,
    )

    loss = WeightedSum([MatryoshkaInfoNCE(), TranscriptionAlignment()], [1.0, 0.5])
    model = _model(tiny_text_model, tiny_speech_model, loss=loss).eval()
    batch = speech_text_batch(tiny_text_model, tiny_speech_model)
    batch["document"] = batch["query_text"]  # any text works as documents here
    batch["ids"] = ["a", "b", "c"]
    with torch.no_grad():
        queries = model.embed_queries(batch)
        documents = model.embed_documents(batch)
        targets = {d: torch.nn.functional.normalize(documents[d], dim=-1) for d in DIMS}  # same texts
        expected = matryoshka_info_nce(
            queries, documents, temperature=0.05
        ) + 0.5 * matryoshka_alignment_loss(queries, targets)
        assert torch.allclose(model.training_loss(batch), expected, atol=1e-5)


MIXTURE_ADAPTER = {"conv_channels": 32, "kernel_size": 5, "stride": 2, "output": "token_mixture"}


def test_token_mixture_speech_tokens_are_mixtures_of_the_llm_token_embeddings(
    tiny_text_model, tiny_speech_model
):
    model = _model(tiny_text_model, tiny_speech_model, adapter=MIXTURE_ADAPTER).eval()
    table = model.text_encoder.model.get_input_embeddings().weight
    batch = query_batch(tiny_text_model, tiny_speech_model, sample_clips(), ["document_retrieval"] * 3)
    with torch.no_grad():
        tokens, mask = model.speech_tokens(batch)
        # Reference: the same adapter stages by hand, then softmax over the vocabulary @ the table.
        states = model.speech_encoder(**batch["query_audio"])
        fused = model.adapter.fusion(states.hidden_states)
        frames, reference_mask = model.adapter.downsampler(fused, states.frame_mask)
        logits = model.adapter.projector(frames)
    assert logits.shape[-1] == table.shape[0]  # one weight per vocabulary entry
    assert torch.equal(mask, reference_mask)
    assert torch.allclose(tokens, torch.softmax(logits, dim=-1) @ table, atol=1e-6)
    # The table is the LLM's own frozen weight: not trained, not copied into the adapter.
    assert not table.requires_grad
    assert not any(p is table for p in model.adapter.parameters())
    assert all(not name.startswith("adapter.") or "embed" not in name for name in model.state_dict())


def test_token_mixture_keeps_padding_invariance_and_trains_only_the_adapter(
    tiny_text_model, tiny_speech_model
):
    model = _model(tiny_text_model, tiny_speech_model, adapter=MIXTURE_ADAPTER).eval()
    assert_first_query_embeds_alone_as_batched(
        model, tiny_text_model, tiny_speech_model, ["document_retrieval"] * 3
    )
    _assert_query_gradients_reach_only_the_adapter(model, tiny_text_model, tiny_speech_model)


def test_an_unknown_adapter_output_is_a_config_error(tiny_text_model, tiny_speech_model):
    with pytest.raises(ConfigError, match="adapter.output='tokens' is unknown"):
        _model(tiny_text_model, tiny_speech_model, adapter={"output": "tokens"})


def test_documents_cannot_keep_the_text_models_weights_while_those_weights_train(
    tiny_text_model, tiny_speech_model
):
    # Documents would run on the training weights while the document cache served stale ones.
    with pytest.raises(ConfigError, match="adapt_documents=false .* which train with freeze_text"):
        _model(tiny_text_model, tiny_speech_model, freeze_text_encoder=False, adapt_documents=False)
    lora = {"pretrained_model_name_or_path": str(tiny_text_model), "lora": {"r": 2}}
    model = _model(tiny_text_model, tiny_speech_model, text_encoder=lora, adapt_documents=False)
    assert model.document_tower_frozen


def test_documents_off_the_lora_adapters_embed_as_the_frozen_text_model_does(
    tmp_path, tiny_text_model, tiny_speech_model
):
    """With ``adapt_documents=false`` documents take the text model as a frozen tower runs it:
    adapters off and no dropout, so a training step, the document cache (filled in training mode
    at fit start) and evaluation all see one embedding per document."""
    import json
    import shutil

    from datamodules.text_batches import PromptConfig, TextBatchBuilder

    dropout_model = tmp_path / "tiny-qwen3-with-dropout"
    shutil.copytree(tiny_text_model, dropout_model)
    config = json.loads((dropout_model / "config.json").read_text())
    (dropout_model / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    lora = {"pretrained_model_name_or_path": str(dropout_model), "lora": {"r": 2}}
    model = _model(dropout_model, tiny_speech_model, text_encoder=lora, adapt_documents=False)
    texts = ["saaso mooje bita vérô kani dolo siri", "fèfé lôrôfê tigi bolo mana"]
    builder = TextBatchBuilder(AutoTokenizer.from_pretrained(dropout_model), PromptConfig(), 32, 32, {})
    batch = {"document": builder.documents(texts)}

    model.train()
    with torch.no_grad():
        training = [model.embed_documents(batch) for _ in range(2)]
        assert model.text_encoder.model.training  # the LoRA model trains on
        model.eval()
        evaluation = model.embed_documents(batch)
    for dim in DIMS:
        assert torch.equal(training[0][dim], training[1][dim])
        assert torch.allclose(training[0][dim], evaluation[dim], atol=1e-6, rtol=0)
