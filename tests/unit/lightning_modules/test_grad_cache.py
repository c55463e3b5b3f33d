"""GradCache: chunked embedding + full-batch loss + chunk-wise backward gives the full-batch gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from speech_inputs import DIMS, speech_text_batch
from text_rows import text_rows

from datamodules.pairs import StreamingPairDataModule
from datamodules.tiny_models import save_tiny_hubert
from errors import ConfigError
from lightning_modules import DualEncoder, LateFusion, TextOnly
from lightning_modules.components.text_encoder import LoraSettings, TextEncoderConfig
from lightning_modules.document_cache import document_keys
from lightning_modules.grad_cache import chunk_rows, trim_padding
from lightning_modules.losses import LossInputs, MatryoshkaInfoNCE, TranscriptionAlignment, WeightedSum


def _randomize_lora_b(model) -> None:
    # LoRA's B starts at zero, which would make most gradients trivially zero.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)


def _loss_and_gradients(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model.training_loss(batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_same(reference, chunked) -> None:
    (loss, grads), (chunked_loss, chunked_grads) = reference, chunked
    assert torch.allclose(chunked_loss, loss, atol=1e-5, rtol=0)
    trainable = {n for n, p in reference[1].items()}
    assert chunked_grads.keys() == trainable and trainable
    for name, gradient in grads.items():
        assert gradient.abs().max() > 1e-7, f"{name}: zero reference gradient, the test proves nothing"
        assert torch.allclose(chunked_grads[name], gradient, atol=1e-5, rtol=0), (
            f"{name}: max diff {(chunked_grads[name] - gradient).abs().max():.2e}"
        )


def _text_only(text_model, chunk, dropout=0.0) -> TextOnly:
    torch.manual_seed(0)
    model = TextOnly(
        TextEncoderConfig(str(text_model), lora=LoraSettings(r=4, dropout=dropout)),
        matryoshka_dims=[32, 128, 256],
        loss=MatryoshkaInfoNCE(temperature=1.0),
        gradient_chunk_size=chunk,
    )
    _randomize_lora_b(model)
    return model.train()


def test_trim_padding_drops_the_columns_padded_in_every_row():
    right = {
        "input_ids": torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]),
    }
    left = {
        "input_ids": torch.tensor([[0, 0, 5, 6], [0, 0, 0, 7]]),
        "attention_mask": torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]]),
    }
    features = torch.arange(2 * 5 * 3, dtype=torch.float).reshape(2, 5, 3)
    audio = {"input_features": features, "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])}
    batch = {
        "document": right,
        "prompt": left,
        "query_audio": audio,
        "ids": ["a", "b"],
        "other": torch.ones(2, 4),
    }
    trimmed = trim_padding(batch)
    assert trimmed["document"]["input_ids"].tolist() == [[5, 6], [7, 0]]
    assert trimmed["document"]["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert trimmed["prompt"]["input_ids"].tolist() == [[5, 6], [0, 7]]
    assert torch.equal(trimmed["query_audio"]["input_features"], features[:, :3])
    assert trimmed["ids"] == ["a", "b"]
    assert torch.equal(trimmed["other"], batch["other"])  # in no dict with a mask: untouched
    full = {"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.tensor([[1, 1]])}
    assert trim_padding(full)["input_ids"] is full["input_ids"]


def test_a_chunk_of_short_rows_runs_without_the_batch_padding(tiny_text_model):
    """The batch is padded to one long row; the other chunk embeds at its own length, same gradients."""
    rows = text_rows(8)
    rows[7]["document"] = " ".join([rows[7]["document"]] * 12)
    batch = StreamingPairDataModule(str(tiny_text_model)).batches.training_batch(rows)
    padded_length = batch["document"]["input_ids"].shape[1]
    reference = _loss_and_gradients(_text_only(tiny_text_model, None), batch)
    model = _text_only(tiny_text_model, 4)
    lengths, embed_documents = [], model.embed_documents

    def recording_embed_documents(chunk):
        lengths.append(chunk["document"]["input_ids"].shape[1])
        return embed_documents(chunk)

    model.embed_documents = recording_embed_documents
    _assert_same(reference, _loss_and_gradients(model, batch))
    # Each chunk embedded twice (without a graph, then replayed): rows 0-3 short, rows 4-7 long.
    assert sorted(lengths) == sorted(lengths[:2] * 2) and len(lengths) == 4
    assert min(lengths) < padded_length // 3 and max(lengths) == padded_length


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_text_only_chunks_give_the_full_batch_gradients(tiny_text_model, chunk):
    batch = StreamingPairDataModule(str(tiny_text_model)).batches.training_batch(text_rows(10))
    reference = _loss_and_gradients(_text_only(tiny_text_model, None), batch)
    _assert_same(reference, _loss_and_gradients(_text_only(tiny_text_model, chunk), batch))


def test_dropout_masks_are_replayed_in_the_chunked_backward(tiny_text_model):
    """With dropout, the reference embeds the same chunks in the same order, keeping every graph:
    the same draws, so GradCache must give exactly its gradients (a backward that drew new masks
    would not)."""
    batch = StreamingPairDataModule(str(tiny_text_model)).batches.training_batch(text_rows(9))
    reference_model = _text_only(tiny_text_model, None, dropout=0.3)
    reference_model.zero_grad()
    torch.manual_seed(1)
    parts = [reference_model.embed_queries(chunk_rows(batch, s, s + 3, 9)) for s in range(0, 9, 3)]
    parts_d = [reference_model.embed_documents(chunk_rows(batch, s, s + 3, 9)) for s in range(0, 9, 3)]
    queries = {d: torch.cat([p[d] for p in parts]) for d in parts[0]}
    documents = {d: torch.cat([p[d] for p in parts_d]) for d in parts_d[0]}
    loss = reference_model.loss(LossInputs(queries, documents, document_keys=document_keys(batch, queries)))
    loss.backward()
    reference = (
        loss.detach(),
        {n: p.grad.clone() for n, p in reference_model.named_parameters() if p.grad is not None},
    )
    chunked_model = _text_only(tiny_text_model, 3, dropout=0.3)
    torch.manual_seed(1)
    _assert_same(reference, _loss_and_gradients(chunked_model, batch))


def _late_fusion(text_model, speech_model, chunk, **kwargs) -> LateFusion:
    torch.manual_seed(0)
    model = LateFusion(
        TextEncoderConfig(str(text_model), lora=LoraSettings(r=4, dropout=0.0)),
        {"pretrained_model_name_or_path": str(speech_model)},
        matryoshka_dims=DIMS,
        gradient_chunk_size=chunk,
        **kwargs,
    )
    _randomize_lora_b(model)
    return model.train()


@pytest.mark.parametrize(
    "speech_fixture, adapt_documents",
    [("tiny_speech_model", True), ("tiny_speech_model", False), ("layer_norm_hubert", True)],
)
def test_late_fusion_chunks_give_the_full_batch_gradients(
    request, tiny_text_model, speech_fixture, adapt_documents
):
    """Alignment term included; with ``adapt_documents=false`` documents take the frozen path.
    Filterbank (w2v-BERT) and batched waveform (LayerNorm HuBERT) inputs, each chunk trimmed."""
    tiny_speech_model = request.getfixturevalue(speech_fixture)
    batch = speech_text_batch(tiny_text_model, tiny_speech_model)
    text = StreamingPairDataModule(str(tiny_text_model)).batches
    batch["document"] = text.documents(["kër gi", "ndox mi tàng na", "xale yi dem nañu"])
    batch["ids"] = ["a", "b", "c"]
    loss = WeightedSum([MatryoshkaInfoNCE(temperature=1.0), TranscriptionAlignment()], [1.0, 0.5])
    settings = {"loss": loss, "adapt_documents": adapt_documents}
    reference = _loss_and_gradients(_late_fusion(tiny_text_model, tiny_speech_model, None, **settings), batch)
    chunked = _loss_and_gradients(_late_fusion(tiny_text_model, tiny_speech_model, 2, **settings), batch)
    _assert_same(reference, chunked)
    lora_gradients = [g for n, g in reference[1].items() if "lora_" in n]
    assert lora_gradients  # the adapters train through the queries in both settings


def test_dual_encoder_alignment_objective_in_chunks(tiny_text_model, tiny_speech_model):
    batch = speech_text_batch(tiny_text_model, tiny_speech_model)
    batch["ids"] = ["a", "b", "c"]

    def model(chunk):
        torch.manual_seed(0)
        text = TextEncoderConfig(str(tiny_text_model))
        speech = {"pretrained_model_name_or_path": str(tiny_speech_model)}
        return DualEncoder(
            text, speech, loss=TranscriptionAlignment(), matryoshka_dims=DIMS, gradient_chunk_size=chunk
        )

    _assert_same(_loss_and_gradients(model(None), batch), _loss_and_gradients(model(1), batch))


def test_specaugment_masks_of_a_trainable_speech_tower_are_replayed(tiny_text_model, tmp_path):
    """HuBERT draws its SpecAugment time masks with NumPy while training: the chunked backward must
    see the masks the chunked forward drew. Reference: the same chunks embedded in order, with graphs."""
    speech_model = tmp_path / "hubert-specaugment"
    save_tiny_hubert(speech_model, mask_time_prob=0.5, mask_time_length=2, mask_time_min_masks=1)
    batch = speech_text_batch(tiny_text_model, speech_model)
    batch["ids"] = ["a", "b", "c"]

    def model(chunk):
        torch.manual_seed(0)
        speech = {"pretrained_model_name_or_path": str(speech_model), "freeze": False}
        encoder = DualEncoder(
            TextEncoderConfig(str(tiny_text_model)),
            speech,
            loss=TranscriptionAlignment(),
            matryoshka_dims=DIMS,
            gradient_chunk_size=chunk,
        )
        return encoder.train()

    reference_model = model(None)
    np.random.seed(1)
    parts = [reference_model.embed_queries(chunk_rows(batch, s, s + 1, 3)) for s in range(3)]
    queries = {d: torch.cat([p[d] for p in parts]) for d in DIMS}
    loss = reference_model.loss(
        LossInputs(queries, transcriptions=reference_model.embed_transcriptions(batch))
    )
    loss.backward()
    grads = {n: p.grad.clone() for n, p in reference_model.named_parameters() if p.grad is not None}
    np.random.seed(1)
    chunked_loss, chunked_grads = _loss_and_gradients(model(1), batch)
    # Not _assert_same: attention key biases get a zero gradient by construction (softmax shift).
    assert torch.allclose(chunked_loss, loss.detach(), atol=1e-5, rtol=0)
    assert chunked_grads.keys() == grads.keys() and max(g.abs().max() for g in grads.values()) > 1e-3
    for name, gradient in grads.items():
        assert torch.allclose(chunked_grads[name], gradient, atol=1e-5, rtol=0), name
    np.random.seed(2)  # other masks: other gradients, so the masks are really drawn and matter
    assert not torch.allclose(_loss_and_gradients(model(1), batch)[0], loss.detach(), atol=1e-5)


def test_a_chunk_size_below_one_is_refused(tiny_text_model):
    with pytest.raises(ConfigError, match="gradient_chunk_size"):
        _text_only(tiny_text_model, 0)
