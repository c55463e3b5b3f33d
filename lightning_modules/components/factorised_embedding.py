"""Nested embedding-table ranks (Matryoshka Embedding Learning, ML-Embed), a plain ``nn.Module``.

The LLM's ``V x H`` token table ``W`` becomes ``A @ B`` with ``A = U S`` (``V x r``) and ``B = Vh``
(``r x H``) from the SVD of ``W``: at ``r = H`` it is ``W`` at float rounding. Any rank ``k <= r``
reads the first ``k`` columns of ``A`` and rows of ``B`` (the best rank-``k`` approximation at
initialisation, Eckart-Young), so one trained table serves every nested rank; a deployment keeps
``V*k + k*H`` numbers instead of ``V*H``. The active rank is state (``rank``), set per training step
by the model (``EmbeddingRanks.draw``) and fixed for evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from errors import ConfigError


@dataclass
class EmbeddingRanks:
    """Factorise the text model's token table and train it at nested ranks."""

    rank: int
    """The factorisation's rank r (at most the hidden size; r = hidden size is lossless)."""
    ranks: list[int] | None = None
    """Nested ranks trained (ascending, each <= rank); None: the powers of two up to rank, and rank."""
    sampling: str = "proportional"
    """'proportional': one rank per step, drawn with probability proportional to it (ML-Embed);
    'uniform': one rank per step, equally likely."""
    eval_rank: int | None = None
    """The rank validation and test embed with (None: rank)."""
    seed: int = 0
    """Seed of the per-step draws (draw at step s uses seed + s: every DDP rank agrees, resumes repeat)."""

    @classmethod
    def coerce(cls, value: EmbeddingRanks | dict | None) -> EmbeddingRanks | None:
        if value is None or isinstance(value, cls):
            return value
        return cls(**dict(value))

    def check(self, hidden_size: int) -> list[int]:
        """The nested ranks, or a ConfigError naming ``text_encoder.embedding_ranks.*``."""
        key = "model.text_encoder.embedding_ranks"
        if not 1 <= self.rank <= hidden_size:
            raise ConfigError(
                f"{key}.rank={self.rank} must be between 1 and the model's hidden size {hidden_size} "
                "(a rank above it adds parameters and no information)."
            )
        ranks = self.ranks
        if ranks is None:
            ranks = [2**i for i in range(self.rank.bit_length()) if 2**i < self.rank] + [self.rank]
        ranks = list(ranks)
        if ranks != sorted(set(ranks)) or ranks[0] < 1 or ranks[-1] > self.rank:
            raise ConfigError(
                f"{key}.ranks={ranks} must be ascending, without duplicates, each between 1 and "
                f"rank={self.rank}."
            )
        if self.sampling not in ("proportional", "uniform"):
            raise ConfigError(f"{key}.sampling={self.sampling!r}: choose 'proportional' or 'uniform'.")
        if self.eval_rank is not None and not 1 <= self.eval_rank <= self.rank:
            raise ConfigError(f"{key}.eval_rank={self.eval_rank} must be between 1 and rank={self.rank}.")
        return ranks

    def draw(self, ranks: Sequence[int], step: int) -> int:
        """The rank trained at ``step``."""
        weights = torch.tensor([float(k) if self.sampling == "proportional" else 1.0 for k in ranks])
        generator = torch.Generator().manual_seed(self.seed + step)
        return ranks[int(torch.multinomial(weights, 1, generator=generator))]


def parameters_at_rank(vocabulary: int, hidden: int, rank: int) -> int:
    """Numbers a table at ``rank`` keeps: ``V*rank + rank*H`` (the dense table: ``V*H``)."""
    return vocabulary * rank + rank * hidden


def rank_savings(vocabulary: int, hidden: int, ranks: Sequence[int]) -> str:
    """One line per rank: the token table's parameters there and what it saves against the dense one."""
    dense = vocabulary * hidden
    lines = [f"token table {vocabulary} x {hidden} = {dense:,} parameters dense; nested ranks:"]
    for rank in ranks:
        kept = parameters_at_rank(vocabulary, hidden, rank)
        lines.append(
            f"  rank {rank:>5}: {kept:>13,} parameters, {dense - kept:>13,} saved ({1 - kept / dense:.1%})"
        )
    return "\n".join(lines)


class FactorisedEmbedding(nn.Module):
    """``embedding(ids) = A[ids, :k] @ B[:k]`` at the active rank ``k``; drop-in for ``nn.Embedding``."""

    def __init__(self, weight: torch.Tensor, rank: int, padding_idx: int | None = None):
        super().__init__()
        u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
        self.left = nn.Parameter((u[:, :rank] * s[:rank]).to(weight.dtype))
        self.right = nn.Parameter(vh[:rank].to(weight.dtype).contiguous())
        self.padding_idx = padding_idx
        self.rank = rank
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.left[:, : self.rank]) @ self.right[: self.rank]

    @property
    def weight(self) -> torch.Tensor:
        """The dense table at the active rank (what ``get_input_embeddings().weight`` readers expect)."""
        return self.left[:, : self.rank] @ self.right[: self.rank]

    def dense(self, rank: int | None = None) -> nn.Embedding:
        """An ``nn.Embedding`` holding the table at ``rank`` (the active one by default)."""
        rank = self.rank if rank is None else rank
        table = (self.left[:, :rank] @ self.right[:rank]).detach()
        return nn.Embedding.from_pretrained(table.clone(), freeze=False, padding_idx=self.padding_idx)

    def factors(self, rank: int) -> dict[str, torch.Tensor]:
        """The two factors cut at ``rank``: ``left [V, rank]`` and ``right [rank, H]``."""
        return {
            "left": self.left[:, :rank].detach().contiguous(),
            "right": self.right[:rank].detach().contiguous(),
        }

    @classmethod
    def from_factors(cls, factors: dict[str, torch.Tensor], padding_idx: int | None = None):
        """The table a deployment loads: the saved factors only (``V*k + k*H`` parameters)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.left = nn.Parameter(factors["left"])
        module.right = nn.Parameter(factors["right"])
        module.padding_idx = padding_idx
        module.rank = factors["left"].shape[1]
        module.num_embeddings, module.embedding_dim = factors["left"].shape[0], factors["right"].shape[1]
        return module
