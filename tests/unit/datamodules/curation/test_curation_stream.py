"""Reading in blocks gives what reading whole files gives: the resampled stream, and Silero's
probabilities and regions (silero_vad.get_speech_timestamps on the whole signal is the reference)."""

import types

import numpy as np
import pytest
import soundfile
import torch
from spoken_recordings import ESPEAK, RATE, build_recording, sentence

from datamodules.audio import _resampler
from datamodules.curation import reading, vad
from datamodules.curation.config import CurationConfig


@pytest.mark.parametrize("rate", [22050, 44100, 48000, 8000])
def test_stream_resampler_equals_whole_signal(rate, tmp_path):
    rng = np.random.default_rng(rate)
    signal = rng.standard_normal((int(rate * 7.3), 2)).astype(np.float32) * 0.1
    path = tmp_path / "x.wav"
    soundfile.write(path, signal, rate, subtype="FLOAT")
    info = reading.inspect(path)
    streamed = np.concatenate(list(reading.mono_blocks(info, block_seconds=1.0, rate=16000)))
    whole = _resampler(rate, 16000)(torch.from_numpy(signal.mean(axis=1))).numpy()
    assert streamed.shape == whole.shape
    np.testing.assert_allclose(streamed, whole, atol=2e-6)


@pytest.mark.skipif(ESPEAK is None, reason="needs espeak-ng (apt install espeak-ng)")
def test_streamed_vad_equals_silero_on_the_whole_file(tmp_path):
    from silero_vad import get_speech_timestamps

    rng = np.random.default_rng(0)
    texts = [("en", sentence(rng, "en", 12)), ("fr", sentence(rng, "fr", 9))]
    spoken, _ = build_recording(rng, texts, [1.0, 2.0, 1.5], gap_noise_dbfs=-50)
    audio = _resampler(RATE, 16000)(torch.from_numpy(spoken)).numpy()
    path = tmp_path / "x.wav"
    soundfile.write(path, audio, 16000, subtype="FLOAT")
    model = vad.load_vad()
    config = CurationConfig(input=str(path), output=str(tmp_path / "out"), end_trim_ms=0)
    track = vad.track(model, reading.mono_blocks(reading.inspect(path), block_seconds=1.3, rate=16000))
    assert len(track.probabilities) == int(np.ceil(len(audio) / 512))
    expected = get_speech_timestamps(
        torch.from_numpy(audio),
        model,
        threshold=config.vad_threshold,
        min_speech_duration_ms=config.min_speech_ms,
        min_silence_duration_ms=config.min_silence_ms,
        speech_pad_ms=config.speech_pad_ms,
        max_speech_duration_s=config.max_duration,
    )
    assert expected, "the reference found no speech: the check would be empty"
    assert vad.speech_regions(track, config) == [(r["start"] / 16000, r["end"] / 16000) for r in expected]


def _broken_silero():
    """A silero_vad whose import already set one thread (as the real one does) and whose load fails."""

    def load_silero_vad():
        raise RuntimeError("the packaged weights could not be read")

    module = types.ModuleType("silero_vad")
    module.load_silero_vad = load_silero_vad
    torch.set_num_threads(1)
    return module


@pytest.mark.parametrize("works", [True, False], ids=["loaded", "load-fails"])
def test_loading_the_vad_keeps_the_callers_thread_count(works, monkeypatch):
    """Silero's import sets torch to one thread, process-wide; the caller's count comes back, also
    when the load fails."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        if works:
            assert vad.load_vad() is not None
        else:
            monkeypatch.setattr(vad, "_import_silero", _broken_silero)
            with pytest.raises(RuntimeError, match="packaged weights"):
                vad.load_vad()
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
