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

from errors import ConfigError


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


def regroup_single_group_state(checkpoint: dict, module: nn.Module) -> None:
    """Rewrites, in place, a checkpoint written when every trainable weight was in one optimizer
    group (before the groups above) into the groups ``parameter_groups`` builds now: each weight
    keeps its optimizer state (AdamW's moments) and the schedulers get a learning rate per group,
    so a run started before the change resumes as it was (decay off for vectors from now on)."""
    optimizer_states = checkpoint.get("optimizer_states") or []
    trainable = [p for p in module.parameters() if p.requires_grad]
    decayed = [is_decayed(p) for p in trainable]
    if len(optimizer_states) != 1 or all(decayed) or not any(decayed):
        return  # nothing saved, or the new layout is a single group too
    saved = optimizer_states[0]
    if len(saved["param_groups"]) != 1:
        return
    (group,) = saved["param_groups"]
    if len(group["params"]) != len(trainable):
        raise ConfigError(
            f"The checkpoint's optimizer holds {len(group['params'])} weights, {type(module).__name__} "
            f"trains {len(trainable)}: it was written by a different model or freezing config (or before "
            "the speech tower froze the weights its selected layers do not read)."
        )
    # Saved ids follow the one group's order, i.e. module.parameters(); the new ids number the
    # decayed weights first, then the others, each in that same order.
    order = [i for i, d in enumerate(decayed) if d] + [i for i, d in enumerate(decayed) if not d]
    new_id = {group["params"][old]: new for new, old in enumerate(order)}
    saved["state"] = {new_id[key]: value for key, value in saved["state"].items()}
    first, second = order[: sum(decayed)], order[sum(decayed) :]
    saved["param_groups"] = [
        {**group, "params": [new_id[group["params"][i]] for i in first]},
        {**group, "params": [new_id[group["params"][i]] for i in second], "weight_decay": 0.0},
    ]
    for scheduler in checkpoint.get("lr_schedulers") or []:
        for key in ("base_lrs", "_last_lr", "lr_lambdas"):
            if isinstance(scheduler.get(key), list) and len(scheduler[key]) == 1:
                scheduler[key] = scheduler[key] * 2
