"""SpecAugment on a training speech tower: in a batch, each clip is masked as it is alone.

HuBERT's forward draws the time mask over the padded length, so spans land in the padding and a
short clip beside a long one often gets none. The encoder draws it per clip with the frame mask;
the reference is the same clip run alone, where the model draws over exactly its own frames.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.tiny_models import save_tiny_hubert
from lightning_modules.components.speech_encoder import SpeechEncoder, SpeechEncoderConfig

MASK_LENGTH, MIN_SPANS, DRAWS = 4, 2, 150
SPEC_AUGMENT = dict(mask_time_prob=0.2, mask_time_length=MASK_LENGTH, mask_time_min_masks=MIN_SPANS)
NORMS = {"group": dict(feat_extract_norm="group", do_stable_layer_norm=False), "layer": {}}


@pytest.fixture(scope="module", params=sorted(NORMS))
def masking_hubert(request, tmp_path_factory):
    """A tiny HuBERT (GroupNorm or LayerNorm feature encoder) that time-masks while training."""
    path = tmp_path_factory.mktemp(f"spec-augment-{request.param}")
    save_tiny_hubert(path, apply_spec_augment=True, **SPEC_AUGMENT, **NORMS[request.param])
    return path


def _training_encoder(path, per_utterance: bool) -> SpeechEncoder:
    return SpeechEncoder(SpeechEncoderConfig(str(path), freeze=False, per_utterance=per_utterance)).train()


def _record_time_masks(encoder: SpeechEncoder) -> list[torch.Tensor]:
    """Every call's masked frames (replaced by the model's masked_spec_embed), ``[B, T]`` bool."""
    model, recorded = encoder.model, []
    original = model._mask_hidden_states

    def recording(hidden_states, *args, **kwargs):
        out = original(hidden_states, *args, **kwargs)
        recorded.append((out == model.masked_spec_embed.to(out.dtype)).all(dim=-1))
        return out

    model._mask_hidden_states = recording
    return recorded


def _clips() -> tuple[torch.Tensor, torch.Tensor]:
    """A short clip (0.3 s) padded beside a long one (1.5 s)."""
    lengths = (4800, 24000)
    values = torch.randn(2, max(lengths))
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    return values * mask, mask


def _masked_share_per_clip(encoder: SpeechEncoder, run) -> tuple[np.ndarray, list[torch.Tensor]]:
    """``run`` DRAWS times: the share of each clip's own frames masked per draw, and the raw masks."""
    recorded = _record_time_masks(encoder)
    values, mask = _clips()
    frames = encoder.frame_lengths(mask.sum(dim=1)).tolist()
    np.random.seed(0)  # transformers draws the spans with numpy
    with torch.no_grad():
        for _ in range(DRAWS):
            run(encoder, values, mask)
    if len(recorded) == 2 * DRAWS:  # clip by clip: one call per clip, [1, T_i] each
        pairs = zip(recorded[0::2], recorded[1::2], strict=True)
        recorded = [_stack_rows([a[0], b[0]], max(frames)) for a, b in pairs]
    shares = np.array([[float(m[row, :n].float().mean()) for row, n in enumerate(frames)] for m in recorded])
    return shares, recorded


def _stack_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    return torch.stack([torch.nn.functional.pad(row, (0, width - len(row))) for row in rows])


def _encode(encoder, values, mask):
    encoder(attention_mask=mask, input_values=values)


def _model_alone(encoder, values, mask):  # transformers' own draw over the padded batch
    encoder.model(values, attention_mask=mask)


def test_a_batched_clip_is_masked_within_its_own_frames_as_when_alone(masking_hubert):
    path = masking_hubert
    batched = _training_encoder(path, per_utterance=False)
    assert batched.runs_clip_by_clip(torch.device("cpu")) is False
    shares, masks = _masked_share_per_clip(batched, _encode)
    frames = batched.frame_lengths(_clips()[1].sum(dim=1)).tolist()
    short = frames[0]
    assert not any(bool(m[0, short:].any()) for m in masks), "a span fell in the padding"
    assert all(int(m[0, :short].sum()) >= MASK_LENGTH for m in masks), "the short clip lost its minimum spans"

    alone, _ = _masked_share_per_clip(_training_encoder(path, per_utterance=True), _encode)
    # Same distribution as each clip alone: mean share per clip within sampling error.
    assert np.abs(shares.mean(axis=0) - alone.mean(axis=0)).max() < 0.04, (shares.mean(0), alone.mean(0))

    # Control: the model's own draw over the padded batch does what the encoder now avoids.
    own, own_masks = _masked_share_per_clip(_training_encoder(path, per_utterance=False), _model_alone)
    assert any(bool(m[0, short:].any()) for m in own_masks)
    assert own[:, 0].mean() < alone[:, 0].mean() - 0.1


def test_no_time_mask_in_eval_mode(masking_hubert):
    encoder = _training_encoder(masking_hubert, per_utterance=False).eval()
    _, masks = _masked_share_per_clip(encoder, _encode)
    assert not any(bool(m.any()) for m in masks)
