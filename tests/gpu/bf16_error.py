"""How far bf16 autocast may move a result from float32: bounds stated from how bf16 rounds.

bf16 keeps 8 significant bits, so rounding one value moves it by at most 2^-9 of itself. Autocast
rounds the two inputs of each matrix product and convolution to bf16 and accumulates in float32,
so one product's output moves by about 2^-8 of itself (``PRODUCT``). Along a path of ``n``
products in sequence the moves are independent and add in quadrature, about 2^-8 * sqrt(n); a
result may move ``TAIL`` times that. The bounds are worked out from the path, before any
measurement: a failure means a real fault (a tensor left in bf16 where float32 was meant, an
overflow, a lost mask), not an unlucky rounding.

Path lengths, in products one after the other (parallel ones, such as q/k/v, count once):
a decoder layer (Qwen3): q, scores, scores x values, output, gate/up, down = 6;
a conformer layer (w2v-BERT): feed-forward 2, attention 4, convolution module 3, feed-forward 2
= 11, plus the feature projection once; the late-fusion adapter: convolution, the projector's
two layers, the token mixture = 4; attention pooling and a Matryoshka head = 4.
"""

from __future__ import annotations

import math

import torch

PRODUCT = 2.0**-8
TAIL = 3.0

DECODER_LAYER, CONFORMER_LAYER, ADAPTER, POOLING_AND_HEAD = 6, 11, 4, 4


def relative_bound(products: int) -> float:
    """The largest relative move of a result ``products`` bf16 products deep."""
    return TAIL * PRODUCT * math.sqrt(products)


def gradient_bound(products: int) -> float:
    """A gradient at temperature 1: the forward's move of the logits (at most twice the
    embeddings', cosines of two moved unit vectors) shifts the softmax that starts the backward,
    and the backward runs through two products per forward one."""
    return 2 * relative_bound(products) + relative_bound(2 * products)


def row_errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per row: |got - want| / |want|, in float32."""
    got, want = got.detach().float(), want.detach().float()
    return (got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-12)


def relative_error(got, want) -> float:
    """|got - want| / |want| over whole tensors or lists of tensors (flattened together)."""
    if isinstance(got, torch.Tensor):
        got, want = [got], [want]
    difference = math.sqrt(
        sum(float((g.float() - w.float()).pow(2).sum()) for g, w in zip(got, want, strict=True))
    )
    return difference / math.sqrt(sum(float(w.float().pow(2).sum()) for w in want))


def autocast(device: torch.device, enabled: bool = True):
    """What ``precision: bf16-mixed`` runs a step under."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
