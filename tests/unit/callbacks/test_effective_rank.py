"""spectrum_stats against an independent numpy float64 computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from callbacks.effective_rank import spectrum_stats


def _numpy_reference(x: np.ndarray) -> dict:
    x = x.astype(np.float64)
    covariance = np.cov(x, rowvar=False)  # centered, / (n - 1)
    eigenvalues = np.clip(np.sort(np.linalg.eigh(covariance)[0])[::-1], 0, None)
    energy = np.cumsum(eigenvalues) / eigenvalues.sum()
    reference = {"energy": energy}
    for level in (90, 95, 99):
        reference[f"components@{level}"] = int(np.argmax(energy >= level / 100 - 1e-12)) + 1
    # Roy & Vetterli: the singular values of the centered matrix, by an SVD (not the eigenvalues).
    singular_values = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    p = singular_values / singular_values.sum()
    p = p[p > 1e-12]
    reference["entropy_rank"] = float(np.exp(-(p * np.log(p)).sum()))
    return reference


@pytest.mark.parametrize(("samples", "dim"), [(20, 64), (500, 32), (64, 64)], ids=["n<d", "n>d", "n=d"])
def test_matches_a_numpy_float64_reference(samples, dim):
    rng = np.random.default_rng(samples + dim)
    # Anisotropic data (a decaying spectrum), so the energy levels land at different counts.
    x = rng.standard_normal((samples, dim)) * np.geomspace(3.0, 0.01, dim)
    stats = spectrum_stats(torch.tensor(x, dtype=torch.float32))
    reference = _numpy_reference(torch.tensor(x, dtype=torch.float32).double().numpy())
    assert stats["samples"] == samples and stats["dim"] == dim
    assert np.allclose(stats["energy"].numpy(), reference["energy"], atol=1e-6, rtol=0)
    assert abs(stats["entropy_rank"] - reference["entropy_rank"]) < 1e-6 * reference["entropy_rank"]
    for level in (90, 95, 99):
        assert stats[f"components@{level}"] == reference[f"components@{level}"]
        assert stats[f"fraction@{level}"] == reference[f"components@{level}"] / dim
    if samples < dim:  # the covariance has rank at most n - 1
        assert stats["components@99"] <= samples - 1 and stats["entropy_rank"] <= samples - 1


def test_known_spectra():
    rng = np.random.default_rng(0)
    line = np.outer(rng.standard_normal(200), rng.standard_normal(16))  # one direction
    assert spectrum_stats(torch.tensor(line))["entropy_rank"] == pytest.approx(1.0, abs=1e-6)
    isotropic = rng.standard_normal((200_000, 8))
    stats = spectrum_stats(torch.tensor(isotropic))
    assert stats["entropy_rank"] == pytest.approx(8.0, rel=1e-3)
    assert stats["components@90"] == 8  # every direction carries 1/8 of the energy
    # Orthogonal centered columns of norms 2 * sqrt(2) and sqrt(2): singular values 2 : 1, so
    # shares 2/3, 1/3 (covariance eigenvalues 4 : 1 would give shares 0.8, 0.2 and 1.649).
    two_to_one = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    expected = np.exp(-(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3)))  # 1.8899
    assert spectrum_stats(two_to_one)["entropy_rank"] == pytest.approx(expected, abs=1e-9)
    constant = spectrum_stats(torch.ones(10, 4))
    assert constant["entropy_rank"] == 0.0 and constant["components@99"] == 0


def test_rejects_a_single_sample():
    with pytest.raises(ValueError, match="n >= 2"):
        spectrum_stats(torch.zeros(1, 8))
