"""Discrete units: nearest-centroid assignment, pooling, run collapsing, the fitted codebook and
padding invariance, each against a direct computation or a hand-made sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from speech_inputs import sample_clips
from transformers import AutoFeatureExtractor

from datamodules.audio import pad_waveforms
from lightning_modules.components.speech_encoder import SpeechEncoder, SpeechEncoderConfig
from lightning_modules.components.unit_tokenizer import (
    PAD_UNIT,
    UnitCodebook,
    UnitSettings,
    collapse_runs,
    fit_codebook,
    pool_frames,
    sample_frames,
)


def test_assignment_equals_brute_force_nearest_centroid():
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(3, 17, 8, generator=generator)
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[1, 11:] = 0
    centroids = torch.randn(32, 8, generator=generator)
    units = UnitCodebook(centroids, UnitSettings(layer=1)).assign(frames, mask)
    for b in range(3):
        for t in range(17):
            if not mask[b, t]:
                assert units[b, t] == PAD_UNIT
                continue
            distances = [float(((frames[b, t] - c) ** 2).sum()) for c in centroids]
            assert units[b, t] == int(np.argmin(distances)), (b, t)


def test_pooling_averages_real_frames_of_each_window():
    frames = torch.tensor([[1.0, 3.0, 5.0, 7.0, 9.0], [2.0, 4.0, 6.0, 100.0, 100.0]])[..., None]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    pooled, pooled_mask = pool_frames(frames, mask, 2)
    assert pooled[..., 0].tolist() == [[2.0, 6.0, 9.0], [3.0, 6.0, 0.0]]  # padding never enters a mean
    assert pooled_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    same, same_mask = pool_frames(frames, mask, 1)
    assert same is frames and same_mask is mask
    with pytest.raises(ValueError, match="pool"):
        pool_frames(frames, mask, 0)


def test_runs_collapse_to_one_unit_each():
    units = torch.tensor([[1, 1, 2, 2, 2, 1, 7], [5, 5, 5, 3, PAD_UNIT, PAD_UNIT, PAD_UNIT]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]])  # row 0's last unit is padding
    collapsed, collapsed_mask = collapse_runs(units, mask)
    assert collapsed.tolist() == [[1, 2, 1], [5, 3, PAD_UNIT]]
    assert collapsed_mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def _mixture(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 5, size=(16, 6))
    return (means[rng.integers(0, 16, 3000)] + rng.normal(0, 0.5, size=(3000, 6))).astype(np.float32)


def _within_cluster_error(frames: np.ndarray, codebook: UnitCodebook) -> float:
    tensor = torch.from_numpy(frames)
    units = codebook.assign(tensor[None], torch.ones(1, len(frames), dtype=torch.long))[0]
    return float(((tensor - codebook.centroids[units]) ** 2).sum(dim=1).mean())


def test_the_fitted_codebook_beats_random_centroids():
    frames = _mixture()
    settings = UnitSettings(layer=6, pool=2)
    fitted = fit_codebook(frames, 16, settings, seed=0)
    rng = np.random.default_rng(1)
    random_frames = UnitCodebook(frames[rng.choice(len(frames), 16, replace=False)], settings)
    random_normal = UnitCodebook(rng.normal(0, 5, size=(16, 6)), settings)
    error = _within_cluster_error(frames, fitted)
    assert error < 0.5 * _within_cluster_error(frames, random_frames)
    assert error < 0.5 * _within_cluster_error(frames, random_normal)
    assert error < 2 * 6 * 0.5**2  # near the mixture's own noise (6 dims of variance 0.25)
    with pytest.raises(ValueError, match="frames cannot fit"):
        fit_codebook(frames[:10], 16, settings)


def test_sampled_frames_are_real_frames_only():
    frames = torch.arange(2 * 5 * 2, dtype=torch.float).reshape(2, 5, 2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    everything = sample_frames([(frames, mask)], limit=100)
    assert len(everything) == 8 and {tuple(row) for row in everything} == {
        tuple(row) for row in frames[mask.bool()].tolist()
    }
    some = sample_frames([(frames, mask)] * 3, limit=5, seed=0)
    assert len(some) == 5 and all(
        tuple(row) in {tuple(r) for r in everything.tolist()} for row in some.tolist()
    )


def test_codebook_files_round_trip(tmp_path):
    codebook = UnitCodebook(
        np.arange(12, dtype=np.float32).reshape(4, 3), UnitSettings(layer=3, pool=2, collapse_runs=True)
    )
    loaded = UnitCodebook.load(codebook.save(tmp_path / "units"))
    assert torch.equal(loaded.centroids, codebook.centroids) and loaded.settings == codebook.settings
    (tmp_path / "units" / "units.json").write_text(
        '{"layer": 3, "pool": 2, "collapse_runs": true, "size": 5}'
    )
    with pytest.raises(ValueError, match="5 units"):
        UnitCodebook.load(tmp_path / "units")


def test_a_clips_units_are_the_same_alone_and_batched(tiny_speech_model):
    """Real frames of the demo's speech tower: the first clip, alone and padded beside longer ones."""
    encoder = SpeechEncoder(SpeechEncoderConfig(str(tiny_speech_model))).eval()
    extractor = AutoFeatureExtractor.from_pretrained(tiny_speech_model)
    clips = sample_clips()
    layer = 1

    def frames(batch_clips):
        with torch.no_grad():
            states = encoder(**pad_waveforms(extractor, batch_clips))
        return states.hidden_states[encoder.layers.index(layer)], states.frame_mask

    batched_frames, batched_mask = frames(clips)
    codebook = fit_codebook(
        sample_frames([(batched_frames, batched_mask)], 400), 8, UnitSettings(layer, 2, True)
    )
    alone, alone_mask = codebook.units(*frames(clips[:1]))
    batched, batched_units_mask = codebook.units(batched_frames, batched_mask)
    n = int(alone_mask.sum())
    assert n > 3 and int(batched_units_mask[0].sum()) == n
    assert torch.equal(batched[0, :n], alone[0, :n])
