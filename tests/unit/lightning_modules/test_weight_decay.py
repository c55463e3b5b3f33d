"""Weight decay groups: matrices decay, vectors do not."""

from __future__ import annotations

import torch

from lightning_modules import DualEncoder
from lightning_modules.weight_decay import parameter_groups


def test_an_optimizer_step_decays_matrices_and_leaves_vectors_alone(tiny_text_model, tiny_speech_model):
    torch.manual_seed(0)
    model = DualEncoder(
        text_encoder={"pretrained_model_name_or_path": str(tiny_text_model)},
        speech_encoder={"pretrained_model_name_or_path": str(tiny_speech_model), "freeze": False},
        matryoshka_dims=[32, 256],
    )
    names = {id(p): name for name, p in model.named_parameters()}
    groups = parameter_groups(model)
    grouped = [names[id(p)] for group in groups for p in group["params"]]
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)  # each trainable weight in exactly one group
    undecayed = {names[id(p)] for p in groups[1]["params"]}
    # The mixing logits, the pooling query, norm gains and biases are vectors.
    for expected in ("layer_logits", "pooling.query", "layer_norm.weight", ".bias"):
        assert any(expected in name for name in undecayed), expected

    model.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=0.1, weight_decay=0.5)
    optimizer = model.configure_optimizers()  # as the CLI's optimizer config builds it
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)  # Adam's update is 0: only the decay moves a weight
    optimizer.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            factor = 1.0 if name in undecayed else 1 - 0.1 * 0.5
            assert torch.allclose(p.detach(), before[name] * factor, atol=1e-7, rtol=0), name
