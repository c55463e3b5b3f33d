"""The curation pipeline on long recordings of real synthesized speech (espeak-ng) with known
utterance boundaries: boundaries, the duration window, the quality proxy, shards the datamodule
decodes, resume, bad input and the optional stages' errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
from spoken_recordings import ESPEAK, RATE, build_recording, sentence

from datamodules.audio import AudioLoader
from datamodules.curation import CurationConfig, curate
from datamodules.curation.recording import LOW_SNR, TOO_SHORT
from errors import ConfigError

pytestmark = pytest.mark.skipif(ESPEAK is None, reason="needs espeak-ng (apt install espeak-ng)")
TOLERANCE = 0.3


def spoken_texts(rng, count: int) -> list[tuple[str, str]]:
    voices = ["en", "fr"]
    return [(voices[i % 2], sentence(rng, voices[i % 2], int(rng.integers(9, 30)))) for i in range(count)]


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """Two recordings (wav with quiet gaps, flac over a noise floor) and their known utterances:
    3-12 s utterances, one too short to keep, one too long for a single segment."""
    rng = np.random.default_rng(7)
    folder = tmp_path_factory.mktemp("recordings")
    truth = {}
    texts = spoken_texts(rng, 10) + [("en", "river market morning.")] + [("en", sentence(rng, "en", 95))]
    audio, truth["talk/a.wav"] = build_recording(rng, texts, list(rng.uniform(1.5, 4.0, len(texts) + 1)), -55)
    (folder / "talk").mkdir()
    soundfile.write(folder / "talk" / "a.wav", audio, RATE)
    texts = spoken_texts(rng, 10)
    audio, truth["b.flac"] = build_recording(
        rng, texts, list(rng.uniform(1.5, 4.0, 11)), -60, background_dbfs=-45
    )
    soundfile.write(folder / "b.flac", audio, RATE)
    return folder, truth


@pytest.fixture(scope="module")
def curated(recordings, tmp_path_factory):
    folder, truth = recordings
    output = tmp_path_factory.mktemp("curated")
    manifest = curate(CurationConfig(input=str(folder), output=str(output), progress=False))
    return output, manifest


def rows(output: Path) -> list[dict]:
    return [
        row
        for shard in sorted((output / "shards").glob("*.parquet"))
        for row in pq.read_table(shard).to_pylist()
    ]


def test_boundaries_within_tolerance_and_every_clip_in_the_window(recordings, curated):
    _, truth = recordings
    output, manifest = curated
    clips = rows(output)
    by_source = {}
    for clip in clips:
        by_source.setdefault(clip["source"], []).append(clip)
    measured = []
    for source, utterances in truth.items():
        for utterance in utterances:
            if not 3.0 <= utterance.seconds <= 30.0:
                continue
            near = [c for c in by_source[source] if c["start"] < utterance.end and c["end"] > utterance.start]
            errors = [max(abs(c["start"] - utterance.start), abs(c["end"] - utterance.end)) for c in near]
            measured.append(min(errors) if errors else float("inf"))
    within = np.mean(np.array(measured) <= TOLERANCE)
    print(
        f"{len(measured)} utterances, {within:.0%} within {TOLERANCE} s, worst {max(measured):.3f} s, "
        f"median {np.median(measured):.3f} s"
    )
    assert within >= 0.9
    assert all(3.0 <= c["duration"] <= 30.0 for c in clips)
    assert all(3.0 <= c["end"] - c["start"] <= 30.0 for c in clips)
    # The 30+ s utterance is cut at its pauses into clips that fit; the 1 s one is dropped, counted.
    long = truth["talk/a.wav"][-1]
    assert long.seconds > 30
    inside = [
        c for c in by_source["talk/a.wav"] if c["start"] >= long.start - 0.3 and c["end"] <= long.end + 0.3
    ]
    assert len(inside) >= 2
    assert manifest["segments_dropped"][TOO_SHORT] >= 1
    assert manifest["segments_kept"] == len(clips)
    assert manifest["hours_kept"] * 3600 == pytest.approx(sum(c["duration"] for c in clips), abs=0.01)
    assert manifest["quality_method"].startswith("proxy")
    assert manifest["optional_stages"]["diarization"].startswith("skipped")


def test_shards_decode_as_training_audio(curated):
    from datamodules.sources import load_stream

    output, _ = curated
    streamed = list(load_stream(str(output / "shards")))
    assert len(streamed) == len(rows(output)) > 0
    loader = AudioLoader(16000, min_duration=3.0, max_duration=30.0)
    for row in streamed:
        waveform = loader.load(row["audio"], name=row["id"])
        assert len(waveform) / 16000 == pytest.approx(row["duration"], abs=0.002)


def test_rerun_writes_nothing_and_an_interrupted_run_resumes(recordings, curated):
    folder, _ = recordings
    output, first = curated
    before = {p.name: p.stat().st_mtime_ns for p in (output / "shards").iterdir()}
    again = curate(CurationConfig(input=str(folder), output=str(output), progress=False))
    assert again["this_run"] == {"recordings_processed": 0, "recordings_already_done": 2}
    assert {p.name: p.stat().st_mtime_ns for p in (output / "shards").iterdir()} == before
    # A run stopped inside b.flac: its shard half-written, no marker.
    marker = next(p for p in (output / "done").glob("b-*.json"))
    shard = output / "shards" / json.loads(marker.read_text())["shard"]
    marker.unlink()
    shard.rename(output / "shards" / f".{shard.stem}.parquet.partial")
    ids = {c["id"] for c in rows(output)}
    resumed = curate(CurationConfig(input=str(folder), output=str(output), progress=False))
    assert resumed["this_run"] == {"recordings_processed": 1, "recordings_already_done": 1}
    assert resumed["segments_kept"] == first["segments_kept"]
    assert len({c["id"] for c in rows(output)} - ids) == sum(
        1 for c in rows(output) if c["source"] == "b.flac"
    )
    assert not list((output / "shards").glob(".*partial"))


def test_bad_input_is_skipped_or_resampled_and_counted(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "in"
    folder.mkdir()
    audio, _ = build_recording(rng, spoken_texts(rng, 3), [1.5, 2.0, 2.0, 1.5], -55)
    soundfile.write(folder / "whole.wav", audio, RATE, subtype="PCM_16")
    data = (folder / "whole.wav").read_bytes()
    (folder / "cut.wav").write_bytes(data[: len(data) * 2 // 3])  # header promises the whole
    (folder / "notes.wav").write_text("not audio at all\n")
    soundfile.write(folder / "empty.wav", np.zeros((0, 1), np.float32), 16000)
    import torch

    from datamodules.audio import _resampler

    narrow = _resampler(RATE, 8000)(torch.from_numpy(audio)).numpy()
    stereo = np.stack([narrow, 0.8 * narrow], axis=1)
    soundfile.write(folder / "phone.mp3", stereo, 8000, format="MP3")
    soundfile.write(folder / "phone.ogg", stereo, 8000, format="OGG", subtype="VORBIS")
    manifest = curate(CurationConfig(input=str(folder), output=str(tmp_path / "out"), progress=False))
    skipped = {item["source"]: item["kind"] for item in manifest["skipped_files"]}
    assert skipped == {"notes.wav": "undecodable", "empty.wav": "empty (0 s)"}
    assert manifest["recordings_skipped"] == {"undecodable": 1, "empty (0 s)": 1}
    assert [n["source"] for n in manifest["notes"]] == ["cut.wav"]
    clips = rows(tmp_path / "out")
    per_source = {
        s: sum(1 for c in clips if c["source"] == s)
        for s in ("whole.wav", "cut.wav", "phone.mp3", "phone.ogg")
    }
    assert per_source["whole.wav"] == 3 and per_source["phone.mp3"] == 3 and per_source["phone.ogg"] == 3
    assert 1 <= per_source["cut.wav"] < 3
    assert all(soundfile.info(io.BytesIO(c["audio"]["bytes"])).samplerate == 16000 for c in clips)
    strict = curate(
        CurationConfig(
            input=str(folder / "cut.wav"), output=str(tmp_path / "strict"), truncated="skip", progress=False
        )
    )
    assert strict["recordings_skipped"]["truncated"] == 1


def test_snr_proxy_orders_noise_levels_and_filters(tmp_path):
    rng = np.random.default_rng(11)
    texts = spoken_texts(rng, 3)
    gaps = [2.0, 2.5, 2.0, 2.5]
    folder = tmp_path / "in"
    folder.mkdir()
    levels = [-60, -40, -30, -20]
    for level in levels:
        audio, _ = build_recording(np.random.default_rng(0), texts, gaps, -90, background_dbfs=level)
        soundfile.write(folder / f"noise{-level}.wav", np.clip(audio, -1, 1), RATE, subtype="FLOAT")
    curate(CurationConfig(input=str(folder), output=str(tmp_path / "out"), min_snr_db=-100, progress=False))
    clips = rows(tmp_path / "out")
    snr = {
        level: np.mean([c["snr_db"] for c in clips if c["source"] == f"noise{-level}.wav"])
        for level in levels
    }
    print({k: round(v, 1) for k, v in snr.items()})
    assert snr[-60] > snr[-40] > snr[-30] > snr[-20]
    # Each 10 dB more noise takes about 10 dB off the estimate (the reference: the levels mixed in).
    assert snr[-40] - snr[-30] == pytest.approx(10, abs=3)
    assert snr[-30] - snr[-20] == pytest.approx(10, abs=3)
    # With the default threshold (15 dB), the loudest noise's clips are dropped and counted.
    noisiest = [c for c in clips if c["source"] == "noise20.wav"]
    filtered = curate(
        CurationConfig(input=str(folder / "noise20.wav"), output=str(tmp_path / "filtered"), progress=False)
    )
    assert all(c["snr_db"] < 15 for c in noisiest)
    assert filtered["segments_kept"] == 0
    assert filtered["segments_dropped"] == {LOW_SNR: len(noisiest)}


def test_optional_stages_fail_at_start_naming_the_key(tmp_path):
    recording = tmp_path / "x.wav"
    soundfile.write(recording, np.zeros(16000, np.float32), 16000)
    with pytest.raises(ConfigError, match="dnsmos_model"):
        CurationConfig(
            input=str(recording), output=str(tmp_path / "o"), dnsmos_model=str(tmp_path / "missing.onnx")
        )
    not_a_model = tmp_path / "sig_bak_ovr.onnx"
    not_a_model.write_bytes(b"not an onnx model")
    for key in ("dnsmos_model", "separation"):
        config = CurationConfig(
            input=str(recording), output=str(tmp_path / key), progress=False, **{key: str(not_a_model)}
        )
        with pytest.raises(ConfigError, match=f"curation.{key}=.*(onnxruntime|not a loadable ONNX model)"):
            curate(config)
    try:
        import pyannote.audio  # noqa: F401
    except ImportError:
        config = CurationConfig(
            input=str(recording), output=str(tmp_path / "d"), diarization="pyannote/speaker-diarization-3.1"
        )
        with pytest.raises(ConfigError, match="curation.diarization=.*pip install pyannote.audio"):
            curate(config)


def test_command_line(tmp_path, capsys):
    from datamodules.curation.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--min_snr_db" in capsys.readouterr().out
    assert main(["--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 2
    assert "curation.input=" in capsys.readouterr().err


def tiny_ctc_model(folder: Path) -> Path:
    """A random-init wav2vec2 CTC model with a letter vocabulary: a real ASR pipeline, nonsense text."""
    import torch
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    folder.mkdir(parents=True)
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, return_attention_mask=True)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    torch.manual_seed(0)
    config = Wav2Vec2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32, 32),
        conv_stride=(5, 4),
        conv_kernel=(10, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    Wav2Vec2ForCTC(config).save_pretrained(folder)
    return folder


def test_asr_model_writes_each_clips_transcription_as_query(tmp_path):
    from transformers import pipeline

    from datamodules.audio import _resampler

    rng = np.random.default_rng(2)
    audio, _ = build_recording(rng, spoken_texts(rng, 2), [1.5, 2.0, 1.5], -55)
    soundfile.write(tmp_path / "talk.wav", audio, RATE, subtype="FLOAT")
    model = tiny_ctc_model(tmp_path / "asr")
    manifest = curate(
        CurationConfig(
            input=str(tmp_path / "talk.wav"), output=str(tmp_path / "o"), asr_model=str(model), progress=False
        )
    )
    assert manifest["optional_stages"]["transcription"].startswith("ASR model")
    clips = rows(tmp_path / "o")
    assert len(clips) == 2
    # The reference: the same model run by hand on the clip cut from the whole file.
    asr = pipeline("automatic-speech-recognition", model=str(model), device=-1)
    whole, _ = soundfile.read(tmp_path / "talk.wav", dtype="float32")
    for clip in clips:
        span = whole[int(round(clip["start"] * RATE)) : int(round(clip["end"] * RATE))]
        import torch

        speech = _resampler(RATE, 16000)(torch.from_numpy(span)).numpy()
        assert clip["query"] == asr({"raw": speech, "sampling_rate": 16000})["text"].strip() != ""


@pytest.mark.slow
def test_worker_processes_write_what_one_process_writes(recordings, curated, tmp_path):
    folder, _ = recordings
    output, manifest = curated
    parallel = curate(
        CurationConfig(input=str(folder), output=str(tmp_path / "p"), workers=2, progress=False)
    )
    assert parallel["this_run"]["recordings_processed"] == 2
    for key in ("hours_in", "hours_kept", "segments_kept", "segments_dropped"):
        assert parallel[key] == manifest[key]
    strip = ["id", "start", "end", "snr_db", "speech_ratio"]
    assert [{k: c[k] for k in strip} for c in rows(tmp_path / "p")] == [
        {k: c[k] for k in strip} for c in rows(output)
    ]
