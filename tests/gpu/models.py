"""The four demo models at test size, and batches for them, on a given device.

As the demo recipes build them (the demo's tiny text and speech towers, LoRA on the late-fusion
LLM, the token-mixture adapter), with LoRA's B started random (at zero most gradients would be
zero), temperature 1 (see ``bf16_error.gradient_bound``) and dropout off: two runs compared must
draw nothing at random, or their difference is not bf16's.
``PATH_PRODUCTS`` is each model's query and document path in products (``bf16_error``).
"""

from __future__ import annotations

import torch
from lightning.fabric.utilities import move_data_to_device
from speech_inputs import DIMS, speech_text_batch
from text_rows import text_rows

from datamodules.pairs import StreamingPairDataModule
from lightning_modules import DualEncoder, LateFusion, TextOnly
from lightning_modules.components.text_encoder import LoraSettings, TextEncoderConfig
from lightning_modules.losses import MatryoshkaInfoNCE, TranscriptionAlignment, WeightedSum

MODELS = ("text_only", "late_fusion", "dual_retrieval", "dual_alignment")

_TEXT = 2 * 6  # the demo LLM: two decoder layers
_SPEECH = 1 + 2 * 11  # the demo speech tower: feature projection, two conformer layers
PATH_PRODUCTS = {
    "text_only": {"queries": _TEXT, "documents": _TEXT},
    "late_fusion": {"queries": _SPEECH + 4 + _TEXT, "documents": _TEXT, "transcriptions": _TEXT},
    "dual_retrieval": {"queries": _SPEECH + 4, "documents": _TEXT},
    "dual_alignment": {"queries": _SPEECH + 4, "transcriptions": _TEXT},
}


def _random_lora_b(model):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return model


def build(name: str, text_model, speech_model, temperature: float = 1.0, **settings):
    """One of ``MODELS`` in float32, training mode; ``settings`` go to the model (e.g. a chunk size)."""
    torch.manual_seed(0)
    info_nce = MatryoshkaInfoNCE(temperature=temperature)
    text = TextEncoderConfig(str(text_model), **settings.pop("text_encoder", {}))
    speech = {"pretrained_model_name_or_path": str(speech_model), "layers": [0, 1, 2]}
    if name == "text_only":
        model = TextOnly(text, matryoshka_dims=DIMS, loss=info_nce, **settings)
    elif name == "late_fusion":
        text.lora = LoraSettings(r=4, dropout=0.0)
        model = LateFusion(
            text,
            speech,
            adapter={
                "fusion": "concat",
                "conv_channels": 64,
                "kernel_size": 7,
                "stride": 4,
                "projector_hidden": 128,
                "output": "token_mixture",
            },
            matryoshka_dims=DIMS,
            loss=WeightedSum([info_nce, TranscriptionAlignment()], [1.0, 1.0]),
            **settings,
        )
    elif name == "dual_retrieval":
        speech["freeze"] = False  # as the demo: the tiny random speech tower trains
        model = DualEncoder(text, speech, matryoshka_dims=DIMS, loss=info_nce, **settings)
    elif name == "dual_alignment":
        speech["freeze"] = False
        model = DualEncoder(text, speech, matryoshka_dims=DIMS, loss=TranscriptionAlignment(), **settings)
    else:
        raise ValueError(name)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):  # the demo speech tower's conformer convolution: 0.1
            module.p = 0.0
    return _random_lora_b(model).train()


def batch(name: str, text_model, speech_model, device: torch.device) -> dict:
    """A training batch the model takes: text pairs, or spoken queries with transcriptions."""
    text = StreamingPairDataModule(str(text_model)).batches
    if name == "text_only":
        return move_data_to_device(text.training_batch(text_rows(8)), device)
    rows = speech_text_batch(text_model, speech_model)
    rows["document"] = text.documents(["kër gi", "ndox mi tàng na", "xale yi dem nañu"])
    rows["ids"] = ["a", "b", "c"]
    return move_data_to_device(rows, device)
