"""Frozen towers: kept in eval mode, out of the optimizer and out of checkpoints.

A frozen backbone (a text LLM, a speech encoder) is loaded from its own folder at every start, so
checkpoints hold what training changes only: a late-fusion checkpoint is megabytes, not the
gigabytes of the LLM it adapts.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule

from errors import ConfigError


class FrozenTowers(LightningModule):
    """``freeze_tower(name)`` freezes a submodule for good; checkpoints hold trainable weights only."""

    def __init__(self):
        super().__init__()
        self.frozen_towers: list[str] = []
        # Frozen weights are absent from checkpoints, so loading accepts their absence;
        # on_load_checkpoint checks that every trainable weight is there.
        self.strict_loading = False

    def freeze_tower(self, name: str) -> None:
        """Freezes submodule ``name``: no gradients, no optimizer state, eval mode (no dropout) always."""
        getattr(self, name).requires_grad_(False).eval()
        self.frozen_towers.append(name)

    def train(self, mode: bool = True):
        super().train(mode)
        for name in getattr(self, "frozen_towers", ()):
            getattr(self, name).eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        frozen = {name for name, p in self.named_parameters() if not p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        missing = sorted(trainable - set(checkpoint["state_dict"]))
        if missing:
            raise ConfigError(
                f"The checkpoint lacks {len(missing)} trainable weights of {type(self).__name__} "
                f"(e.g. {missing[:3]}): it was written by a different model or freezing config."
            )
