"""Every place the models reach into transformers' private API, with the reason.

transformers offers no public way to do these; keeping them here makes an upgrade one file to
check, and ``tests/unit/lightning_modules/test_transformers_internals.py`` fails by name when one
of them moves.
"""

from __future__ import annotations

import inspect

import torch


def attention_implementation(model) -> str:
    """The attention kernel the model runs (eager, sdpa, flash): cached prompt states computed under
    one kernel are not reused under another."""
    return model.config._attn_implementation


def speech_frame_lengths(model, input_lengths: torch.Tensor) -> torch.Tensor:
    """Hidden-state frames a speech encoder makes of clips of these input lengths (samples or
    filterbank frames): the frame mask of a batch of clips of different lengths. wav2vec2-style
    models may end in an adapter that shortens only the last output; the hidden states read here
    come before it."""
    lengths = model._get_feat_extract_output_lengths
    if "add_adapter" in inspect.signature(lengths).parameters:
        return lengths(input_lengths, add_adapter=False).to(torch.long)
    return lengths(input_lengths).to(torch.long)
