"""The private transformers API the models use (components/transformers_internals.py) still works."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from lightning_modules.components.transformers_internals import attention_implementation, speech_frame_lengths


def test_the_attention_kernel_is_read(tiny_text_model):
    model = AutoModel.from_pretrained(tiny_text_model, attn_implementation="eager")
    assert attention_implementation(model) == "eager"


@pytest.mark.parametrize("speech_fixture", ["tiny_speech_model", "layer_norm_hubert"])
def test_frame_lengths_are_the_hidden_states_lengths(request, speech_fixture):
    """Each clip run alone: its hidden states have exactly the predicted number of frames."""
    from transformers import AutoFeatureExtractor

    path = request.getfixturevalue(speech_fixture)
    model = AutoModel.from_pretrained(path).eval()
    extractor = AutoFeatureExtractor.from_pretrained(path)
    for seconds in (0.5, 1.3):
        wave = torch.randn(int(16000 * seconds)).numpy()
        inputs = extractor(wave, sampling_rate=16000, return_tensors="pt")
        features = inputs.get("input_features", inputs.get("input_values"))
        with torch.no_grad():
            frames = model(**inputs).last_hidden_state.shape[1]
        assert int(speech_frame_lengths(model, torch.tensor([features.shape[1]]))[0]) == frames
