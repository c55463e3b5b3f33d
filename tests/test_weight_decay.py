"""Weight decay groups: matrices decay, vectors do not; a one-group checkpoint resumes regrouped."""

from __future__ import annotations

import pytest
import torch
from trainers import quiet_cpu_trainer

from lightning_modules import DualEncoder, TextOnly
from lightning_modules.components.text_encoder import TextEncoderConfig
from lightning_modules.schedules import WarmupCosine
from lightning_modules.weight_decay import parameter_groups, regroup_single_group_state


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


def test_a_checkpoint_with_one_group_resumes_with_each_weights_state(tiny_text_model):
    torch.manual_seed(0)
    model = TextOnly(TextEncoderConfig(str(tiny_text_model)), matryoshka_dims=[32, 256])  # all train
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The layout before the groups: every trainable weight in one group, three steps taken.
    old = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.01)
    old_schedule = WarmupCosine(old, warmup_steps=2, total_steps=10)
    for _ in range(3):
        for p in trainable:
            p.grad = torch.randn_like(p)
        old.step()
        old_schedule.step()
    checkpoint = {"optimizer_states": [old.state_dict()], "lr_schedulers": [old_schedule.state_dict()]}

    new = torch.optim.AdamW(parameter_groups(model), lr=1e-3, weight_decay=0.01)
    new_schedule = WarmupCosine(new, warmup_steps=2, total_steps=10)
    with pytest.raises(ValueError, match="different number of parameter groups"):
        new.load_state_dict(checkpoint["optimizer_states"][0])  # why the rewrite is needed
    regroup_single_group_state(checkpoint, model)
    new.load_state_dict(checkpoint["optimizer_states"][0])
    new_schedule.load_state_dict(checkpoint["lr_schedulers"][0])

    assert [group["weight_decay"] for group in new.param_groups] == [0.01, 0.0]
    for p in trainable:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(new.state[p][key], old.state[p][key])
    for _ in range(2):  # the schedule goes on for both groups as it would have for the one
        new_schedule.step()
        old_schedule.step()
        assert [group["lr"] for group in new.param_groups] == [old.param_groups[0]["lr"]] * 2


def test_fit_resumes_a_checkpoint_written_with_one_group(tmp_path, tiny_text_model, corpus_dir, monkeypatch):
    from lightning.pytorch.callbacks import ModelCheckpoint

    import lightning_modules.base as base
    from datamodules.pairs import StreamingPairDataModule

    rows = (corpus_dir / "train.jsonl").read_text().splitlines()[:48]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(rows) + "\n")

    def fit(max_steps: int, ckpt_path=None) -> TextOnly:
        model = TextOnly(
            TextEncoderConfig(str(tiny_text_model)),
            matryoshka_dims=[32, 256],
            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01),
            lr_scheduler=lambda optimizer: WarmupCosine(optimizer, warmup_steps=1, total_steps=4),
        )
        data = StreamingPairDataModule(
            str(tiny_text_model),
            train_data=str(train),
            batch_size=4,
            max_query_length=32,
            max_document_length=48,
        )
        every_step = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1, save_top_k=-1)
        trainer = quiet_cpu_trainer(
            max_steps=max_steps,
            default_root_dir=tmp_path,
            limit_val_batches=0,
            callbacks=[every_step],
        )
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model

    with monkeypatch.context() as patch:  # the layout before the groups
        patch.setattr(
            base, "parameter_groups", lambda module: [p for p in module.parameters() if p.requires_grad]
        )
        fit(2)
    old = torch.load(tmp_path / "checkpoints" / "epoch=0-step=2.ckpt", weights_only=True)
    assert len(old["optimizer_states"][0]["param_groups"]) == 1
    model = fit(3, tmp_path / "checkpoints" / "epoch=0-step=2.ckpt")
    optimizer = model.trainer.optimizers[0]
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]
    assert all(int(state["step"]) == 3 for state in optimizer.state.values())  # 2 restored + 1


def test_only_fit_regroups_a_saved_optimizer_state(tiny_text_model):
    """validate / test / predict / load_from_checkpoint never load the optimizer: an old state
    that no longer fits the model must not stop them."""
    from errors import ConfigError

    model = TextOnly(TextEncoderConfig(str(tiny_text_model)), matryoshka_dims=[32, 256])
    trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    stale = {"state": {}, "param_groups": [{"params": list(range(len(trainable) + 2)), "weight_decay": 0.01}]}
    checkpoint = {"state_dict": trainable, "optimizer_states": [stale]}
    model.on_load_checkpoint(checkpoint)  # no trainer fitting: the optimizer state is left alone
    with pytest.raises(ConfigError, match="optimizer holds"):
        regroup_single_group_state(checkpoint, model)  # what a resumed fit does with it
