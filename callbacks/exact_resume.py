"""A resumed run is the same run: each rank's random generators and data position come back.

Lightning restores weights, optimizer, loops and rank 0's data position, but not the random
generators (dropout, LoRA dropout, SpecAugment) and not the other ranks' positions, while every
rank reads its own shards and stands elsewhere in them. Rank 0 writes the checkpoint, so both are
gathered from every rank when it is saved (one collective) and each rank takes its own back.
"""

from __future__ import annotations

import logging

from lightning.pytorch import Callback

import collectives
from callbacks.lightning_internals import fit_loop_state
from callbacks.random_state import collect_random_states, restore_random_states

log = logging.getLogger(__name__)


class ExactResume(Callback):
    """Saves every rank's random states and data position; a resumed fit restores this rank's."""

    def __init__(self):
        self._states_to_restore: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        per_rank = collectives.gather_objects(
            (collect_random_states(), fit_loop_state(checkpoint).get("combined_loader"))
        )
        checkpoint["rng_states_per_rank"] = [states for states, _ in per_rank]
        checkpoint["loader_states_per_rank"] = [position for _, position in per_rank]

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if trainer.state.fn != "fit":  # only a resumed fit reads positions and draws on
            return
        world, rank = collectives.world_size(), collectives.rank()
        positions = checkpoint.get("loader_states_per_rank")
        loop_state = fit_loop_state(checkpoint)
        if positions and "combined_loader" in loop_state:
            if len(positions) == world:
                loop_state["combined_loader"] = positions[rank]  # read by Lightning's loop restore, next
            elif rank == 0:
                log.warning(
                    "The checkpoint holds the data positions of %d ranks, this run has %d: the training "
                    "stream is split differently now, so every rank starts from rank 0's position (rows "
                    "may be seen twice or skipped).",
                    len(positions),
                    world,
                )
        states = checkpoint.get("rng_states_per_rank") or []
        if len(states) == world:
            self._states_to_restore = states[rank]
        elif states:
            log.warning(
                "The checkpoint holds random states of %d ranks, this run has %d: not restoring them "
                "(dropout draws will differ from the original run).",
                len(states),
                world,
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        # Restored just before the first resumed step: loading and loop set-up may draw numbers.
        if self._states_to_restore is not None:
            restore_random_states(self._states_to_restore)
            self._states_to_restore = None
