"""Which trainable weights get weight decay: matrices and kernels, not vectors.

Decay pulls a weight toward 0. That regularizes a projection or a convolution kernel, but a
LayerNorm gain pulled toward 0 (rather than 1) shrinks the features it scales, a bias has nothing
to regularize, and the layer-mixing logits pulled toward 0 are pulled toward the plain mean of the
layers. So, as the paper's stack does (transformers' Trainer, under sentence-transformers, leaves
biases and LayerNorm weights undecayed), every weight with fewer than two non-singleton
dimensions (biases, norm gains, ``layer_logits``, the attention-pooling query) goes in a second
parameter group with ``weight_decay: 0``; the first keeps the optimizer's configured decay.
"""

from __future__ import annotations

from torch import nn


def is_decayed(parameter: nn.Parameter) -> bool:
    return sum(size > 1 for size in parameter.shape) >= 2


def parameter_groups(module: nn.Module) -> list[dict]:
    """The trainable parameters as optimizer groups: the decayed ones, then the others (decay 0);
    an empty group is left out. Within a group, ``module.parameters()`` order."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if is_decayed(p)]},
        {"params": [p for p in trainable if not is_decayed(p)], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]
