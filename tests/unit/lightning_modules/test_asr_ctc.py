"""AsrCtc: its loss against torch's CTC loss on a hand-made batch, its greedy transcripts against an
independent collapse, its characters, and its export read back by the pipelined recognizer."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from errors import ConfigError, DataError
from lightning_modules import AsrCtc
from lightning_modules.asr_ctc import character_vocabulary
from lightning_modules.components.speech_recognizer import SpeechRecognizer, SpeechRecognizerConfig

TINY = {
    "model_type": "wav2vec2-bert",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "feature_projection_input_dim": 160,
    "conv_depthwise_kernel_size": 5,
    "add_adapter": False,
    "mask_time_prob": 0.0,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "feat_proj_dropout": 0.0,
    "layerdrop": 0.0,
}


def hand_made_batch() -> dict:
    """Two clips of 20 and 13 filterbank frames (the second padded), with repeated letters."""
    torch.manual_seed(0)
    features = torch.randn(2, 20, 160)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 13:] = 0
    features[1, 13:] = 0.0
    return {
        "ids": ["a", "b"],
        "query_audio": {"input_features": features, "attention_mask": mask},
        "transcriptions": ["baa ab", "aab"],
    }


def test_loss_is_torch_ctc_loss_on_a_hand_made_batch():
    model = AsrCtc(architecture=TINY, vocabulary=["a", "b"]).eval()
    batch = hand_made_batch()
    loss = model.training_loss(batch)
    # Independently: blank 0, unknown 1, word delimiter 2, then the characters in order.
    ids = {"a": 3, "b": 4, " ": 2}
    targets = [torch.tensor([ids[c] for c in text]) for text in batch["transcriptions"]]
    logits = model.model(**batch["query_audio"]).logits
    expected = F.ctc_loss(
        logits.log_softmax(-1).transpose(0, 1),
        torch.cat(targets),
        input_lengths=torch.tensor([20, 13]),
        target_lengths=torch.tensor([len(t) for t in targets]),
        blank=0,
        reduction="mean",
    )
    assert torch.allclose(loss, expected, atol=1e-5)
    assert loss.requires_grad


def test_transcripts_collapse_the_best_frames_and_ignore_padding():
    model = AsrCtc(architecture=TINY, vocabulary=["a", "b"]).eval()
    with torch.no_grad():
        model.model.lm_head.weight.mul_(30.0)  # random but decisive frame scores
    batch = hand_made_batch()
    transcripts = model.transcribe(batch)
    logits = model.model(**batch["query_audio"]).logits
    assert logits.shape[-1] == 5  # blank, unknown, word delimiter, a, b: nothing else
    tokens = {0: None, 1: "<unk>", 2: " ", 3: "a", 4: "b"}
    expected = []
    for row, length in enumerate([20, 13]):
        best = logits[row, :length].argmax(-1).tolist()
        kept = [tokens[t] for t, _ in itertools.groupby(best) if tokens[t] is not None]
        expected.append(" ".join("".join(kept).split()))
    assert transcripts == expected
    assert any(transcripts)
    # The padded clip, alone, transcribes the same.
    alone = {key: value[1:, :13] for key, value in batch["query_audio"].items()}
    assert model.transcribe({"query_audio": alone}) == transcripts[1:]


def test_characters_of_the_training_transcriptions():
    assert character_vocabulary(["xibee busep", " gaj ", None, "é"]) == sorted(set("xibeebusepgajé"))


def test_export_is_read_back_by_the_pipelined_recognizer(tmp_path):
    """The exported folder loads by name in Pipelined's recognizer, which transcribes as the module does."""
    from transformers import SeamlessM4TFeatureExtractor

    model = AsrCtc(architecture=TINY, vocabulary=list("abdegijkmnopstuwxy")).eval()
    with torch.no_grad():
        model.model.lm_head.weight.mul_(30.0)
    extractor = SeamlessM4TFeatureExtractor(sampling_rate=16000, return_attention_mask=True)  # w2v-BERT's
    model._trainer = SimpleNamespace(
        datamodule=SimpleNamespace(batches=SimpleNamespace(feature_extractor=extractor))
    )
    try:
        model.export(tmp_path)
    finally:
        model._trainer = None
    recognizer = SpeechRecognizer(SpeechRecognizerConfig(str(tmp_path)))
    batch = hand_made_batch()
    assert recognizer.kind == "ctc"
    assert recognizer(batch["query_audio"]) == model.transcribe(batch)


def test_settings_are_checked_at_construction():
    with pytest.raises(ConfigError, match="exactly one"):
        AsrCtc()
    with pytest.raises(ConfigError, match="model_type"):
        AsrCtc(architecture={"hidden_size": 8})


def test_a_batch_without_usable_rows_or_with_a_nan_loss_leaves_the_weights_alone():
    model = AsrCtc(architecture=TINY, vocabulary=["a", "b"])
    model.guard.max_unusable_in_a_row = 2
    empty = {"ids": [], "skipped_ids": ["x"], "skip_reasons": ["undecodable audio"]}
    assert model.training_step(empty, 0) is None  # one process: Lightning skips backward and the step
    with pytest.raises(DataError, match="fewer than 1 usable rows"):
        model.training_step(empty, 1)

    batch = hand_made_batch()
    batch["query_audio"]["input_features"][0, 0, 0] = float("nan")
    assert model.training_step(batch, 2) is None
    assert model.guard.nonfinite_losses == 1
