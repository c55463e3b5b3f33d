"""Audio in: decoding every cell form, resampling, bad clips skipped and named, per-clip padding."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from transformers import AutoFeatureExtractor, AutoTokenizer

from datamodules.audio import AudioLoader, AudioSettings, BadAudio, decode_audio, pad_waveforms
from datamodules.pairs import StreamingPairDataModule
from datamodules.speech_batches import SpeechBatchBuilder
from datamodules.text_batches import PromptConfig, TextBatchBuilder
from errors import ConfigError, DataError

RATE = 8000


def _tone(seconds: float, rate: int = RATE, frequency: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def _wav_bytes(signal: np.ndarray, rate: int = RATE, subtype: str = "FLOAT") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, signal, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def test_every_cell_form_decodes_to_the_same_samples(tmp_path):
    signal = _tone(0.5)
    raw = _wav_bytes(signal)
    (tmp_path / "clip.wav").write_bytes(raw)
    forms = [
        raw,
        {"bytes": raw, "path": "ignored.wav"},
        {"bytes": None, "path": str(tmp_path / "clip.wav")},
        "clip.wav",  # relative to base_dir, as in a BEIR folder's queries.jsonl
        {"array": signal, "sampling_rate": RATE},
    ]
    for form in forms:
        samples, rate = decode_audio(form, base_dir=tmp_path)
        assert rate == RATE
        np.testing.assert_allclose(samples[0], signal, atol=1e-7)


def test_loader_downmixes_and_resamples_to_the_model_rate():
    stereo = np.stack([_tone(1.0), np.zeros(RATE, dtype=np.float32)], axis=1)
    loader = AudioLoader(sampling_rate=16000)
    wave = loader.load(_wav_bytes(stereo))
    assert wave.shape == (16000,)
    # Down-mix averages the channels; resampling keeps a 440 Hz tone's amplitude and frequency.
    spectrum = np.abs(np.fft.rfft(wave))
    assert np.argmax(spectrum) == pytest.approx(440, abs=1)
    assert np.abs(wave[2000:-2000]).max() == pytest.approx(0.25, rel=0.02)


@pytest.mark.parametrize("source_rate", [8000, 22050, 44100, 48000])
def test_resampling_equals_torchaudio_functional_resample(source_rate):
    import torchaudio

    signal = _tone(0.7, source_rate, frequency=310.0) + 0.01 * np.random.default_rng(0).standard_normal(
        int(0.7 * source_rate)
    ).astype(np.float32)
    loader = AudioLoader(sampling_rate=16000)
    for _ in range(2):  # the second call reuses the kernel built by the first
        wave = loader.load(_wav_bytes(signal, rate=source_rate))
        reference = torchaudio.functional.resample(torch.from_numpy(signal), source_rate, 16000).numpy()
        assert wave.shape == reference.shape
        assert np.abs(wave - reference).max() < 1e-5


@pytest.mark.parametrize(
    ("cell", "reason"),
    [
        (b"RIFF not really a wav file", "undecodable"),
        (_wav_bytes(np.zeros(0, dtype=np.float32)), "empty"),
        (_wav_bytes(np.zeros(RATE, dtype=np.float32)), "all-zero"),
        (_wav_bytes(np.full(RATE, np.nan, dtype=np.float32)), "NaN"),
        (_wav_bytes(np.full(RATE, np.inf, dtype=np.float32)), "NaN or infinite"),
        (12345, "type int"),
        (None, "no audio"),
        ({"bytes": None, "path": None}, "neither bytes nor path"),
        ({"bytes": b"", "path": "clip.wav"}, r"^empty audio \(0 bytes\)$"),  # was "clip.wav not found"
        (b"", r"^empty audio \(0 bytes\)$"),
        ("missing.wav", "not found"),
        (_wav_bytes(_tone(0.2)), "duration 0.20 s"),
        (_wav_bytes(_tone(3.0)), "duration 3.00 s"),
    ],
    # Named by hand: a float wav's PEAK chunk holds the time it was written, and pytest-xdist's
    # workers must collect the same names.
    ids=[
        "undecodable",
        "empty",
        "all-zero",
        "NaN",
        "infinite",
        "int",
        "None",
        "empty dict",
        "empty bytes with a path",
        "empty bytes",
        "missing file",
        "too short",
        "too long",
    ],
)
def test_bad_audio_is_named(cell, reason):
    with pytest.raises(BadAudio, match=reason):
        AudioLoader(16000, min_duration=0.5, max_duration=2.0).load(cell)


def test_audio_settings_reject_an_empty_duration_window():
    with pytest.raises(ConfigError, match="min_duration < max_duration"):
        AudioSettings(feature_extractor="x", min_duration=30, max_duration=3)


@pytest.mark.parametrize(
    ("speech_fixture", "key", "long_length"),
    [("layer_norm_hubert", "input_values", 16000), ("tiny_speech_model", "input_features", 49)],
)
def test_padding_keeps_each_clip_as_if_alone(request, speech_fixture, key, long_length):
    extractor = AutoFeatureExtractor.from_pretrained(request.getfixturevalue(speech_fixture))
    short, long = _tone(0.3, 16000), _tone(1.0, 16000, frequency=200.0) * 3
    alone = pad_waveforms(extractor, [short])
    batch = pad_waveforms(extractor, [short, long])
    assert set(batch) == {key, "attention_mask"}
    n = alone[key].shape[1]
    assert torch.equal(batch[key][0, :n], alone[key][0])
    assert batch[key][0, n:].abs().max() == 0
    assert batch["attention_mask"].sum(dim=1).tolist() == [n, long_length]


def _speech_builder(text_model, speech_model, min_duration=0.5):
    text = TextBatchBuilder(
        AutoTokenizer.from_pretrained(text_model), PromptConfig(), 64, 64,
        {"query": "query", "document": "document", "task": "task", "id": "id"},
    )  # fmt: skip
    settings = AudioSettings(feature_extractor=str(speech_model), min_duration=min_duration)
    return SpeechBatchBuilder(text, settings, AutoFeatureExtractor.from_pretrained(speech_model))


def test_training_batch_skips_bad_rows_names_them_and_keeps_the_rest(tiny_text_model, tiny_speech_model):
    builder = _speech_builder(tiny_text_model, tiny_speech_model)
    good = _wav_bytes(_tone(1.0))
    rows = [
        {"id": "ok-1", "query": "baki", "document": "fêlo", "audio": {"bytes": good, "path": None}},
        {"id": "corrupt", "query": "baki", "document": "fêlo", "audio": {"bytes": b"junk", "path": None}},
        {"id": "silent", "query": "baki", "document": "fêlo", "audio": _wav_bytes(np.zeros(RATE, "float32"))},
        {"id": "no-doc", "query": "baki", "document": "", "audio": good},
        {"id": "ok-2", "document": "rélo", "audio": good, "task": "translation_retrieval"},
    ]
    batch = builder.training_batch(rows)
    assert batch["ids"] == ["ok-1", "ok-2"]
    assert batch["skipped_ids"] == ["corrupt", "silent", "no-doc"]
    assert "undecodable" in batch["skip_reasons"][0] and "all-zero" in batch["skip_reasons"][1]
    assert batch["query_audio"]["input_features"].shape[:2] == (2, 49)
    assert "query_text" not in batch  # one kept row has no transcription
    # Each row's prompt is its own task's instruction, without the end-of-text token.
    tokenizer = builder.text.tokenizer
    prompts = [
        tokenizer.decode(ids[mask.bool()])
        for ids, mask in zip(batch["prompt"]["input_ids"], batch["prompt"]["attention_mask"], strict=True)
    ]
    assert "French documents" in prompts[0] and "French translation" in prompts[1]
    assert not any(p.endswith("<|endoftext|>") for p in prompts)


def test_a_speech_row_with_an_unknown_task_is_skipped_before_decoding(tiny_text_model, tiny_speech_model):
    builder = _speech_builder(tiny_text_model, tiny_speech_model)
    good = _wav_bytes(_tone(1.0))
    rows = [
        {"id": "asr", "query": "baki", "document": "fêlo", "audio": good, "task": "asr"},
        {"id": "ok", "query": "baki", "document": "rélo", "audio": _wav_bytes(_tone(1.5))},
    ]
    batch = builder.training_batch(rows)
    assert batch["ids"] == ["ok"] and batch["skipped_ids"] == ["asr"]
    assert batch["skip_reasons"] == ["unknown task 'asr' (not in data.prompts)"]
    assert batch["query_audio"]["input_features"].shape[0] == 1 == batch["prompt"]["input_ids"].shape[0]


def test_a_clip_too_short_for_the_speech_model_is_skipped_not_crashing(tiny_text_model, tiny_speech_model):
    # No duration floor: 20 ms (320 samples at 16 kHz) is under w2v-BERT's two filterbank frames.
    builder = _speech_builder(tiny_text_model, tiny_speech_model, min_duration=0.0)
    rows = [
        {"id": "blip", "query": "baki", "document": "fêlo", "audio": _wav_bytes(_tone(0.02))},
        {"id": "ok", "query": "baki", "document": "fêlo", "audio": _wav_bytes(_tone(1.0))},
    ]
    batch = builder.training_batch(rows)
    assert batch["ids"] == ["ok"] and batch["skipped_ids"] == ["blip"]
    assert "320 samples, fewer than the speech model's minimum 560" in batch["skip_reasons"][0]


def test_unusable_eval_queries_are_left_out_counted_and_qrels_follow(
    tiny_text_model, tiny_speech_model, speech_corpus_dir, tmp_path
):
    import shutil

    eval_dir = tmp_path / "eval"
    shutil.copytree(speech_corpus_dir / "eval" / "demo", eval_dir)
    rows = [json.loads(line) for line in (eval_dir / "queries.jsonl").read_text().splitlines()]
    (eval_dir / rows[1]["audio"]).write_bytes(b"corrupt")
    data = StreamingPairDataModule(
        tokenizer=str(tiny_text_model),
        eval_sets={"demo": str(eval_dir)},
        audio=AudioSettings(feature_extractor=str(tiny_speech_model), min_duration=0.5),
        max_query_length=64,
    )
    data.setup("validate")
    eval_set = data.eval_sets["demo"]
    assert len(eval_set.queries) == len(rows) - 1
    assert data.eval_queries_dropped["demo"][0].startswith(f"{rows[1]['_id']}: undecodable")
    corpus_ids = [doc["id"] for doc in eval_set.corpus]
    for position, query in enumerate(eval_set.queries):  # every query still points at doc-<its id>
        assert [corpus_ids[d] for d in eval_set.qrels[position]] == [f"doc-{query['id']}"]
    batch = next(iter(data.val_dataloader()))
    assert batch["query_audio"]["input_features"].shape[0] == len(batch["ids"])


# ----- grouped by length ----------------------------------------------------------------------
def _speech_training_data(text_model, speech_model, corpus, **kwargs) -> StreamingPairDataModule:
    data = StreamingPairDataModule(
        tokenizer=str(text_model),
        train_data=str(corpus / "train"),
        audio=AudioSettings(feature_extractor=str(speech_model), min_duration=0.5),
        **{"batch_size": 8, "shuffle_block_size": 64, "max_query_length": 64, **kwargs},
    )
    data.setup("fit")
    return data


def test_clip_seconds_reads_the_duration_from_the_header(speech_corpus_dir):
    from itertools import islice

    from datamodules.lengths import clip_seconds
    from datamodules.sources import load_stream

    for row in islice(load_stream(str(speech_corpus_dir / "train")), 6):
        samples, rate = decode_audio(row["audio"])
        assert clip_seconds(row, "audio") == pytest.approx(samples.shape[1] / rate)
    assert clip_seconds({"audio": {"bytes": b"corrupt", "path": None}}, "audio") == 0.0


def test_grouped_speech_batches_pad_less_and_resume_at_the_next_batch(
    tiny_text_model, tiny_speech_model, speech_corpus_dir
):
    def waste(batches) -> float:  # padded frames / real frames
        lengths = [b["query_audio"]["attention_mask"].sum(dim=1) for b in batches]
        return float(sum(len(n) * n.max() - n.sum() for n in lengths) / sum(n.sum() for n in lengths))

    plain = _speech_training_data(tiny_text_model, tiny_speech_model, speech_corpus_dir).train_dataloader()
    data = _speech_training_data(tiny_text_model, tiny_speech_model, speech_corpus_dir, group_by_length=True)
    loader = data.train_dataloader()
    iterator, plain_iterator = iter(loader), iter(plain)
    first = [next(iterator) for _ in range(8)]  # one block: 64 rows, 8 batches
    plain_first = [next(plain_iterator) for _ in range(8)]
    assert all(len(b["ids"]) == 8 for b in first)
    assert sorted(i for b in first for i in b["ids"]) == sorted(i for b in plain_first for i in b["ids"])
    assert waste(first) < 0.3 * waste(plain_first), (waste(first), waste(plain_first))

    for batch in first:  # as the training loop marks each batch it takes
        loader.mark_consumed(batch)
    state = loader.state_dict()
    following = [next(iterator)["ids"] for _ in range(3)]
    resumed = data.train_dataloader()
    resumed.load_state_dict(state)
    resumed_iterator = iter(resumed)
    assert [next(resumed_iterator)["ids"] for _ in range(3)] == following


def test_grouping_needs_blocks_of_whole_batches(tiny_text_model, tiny_speech_model, speech_corpus_dir):
    with pytest.raises(ConfigError, match="multiple of data.batch_size=8"):
        _speech_training_data(
            tiny_text_model, tiny_speech_model, speech_corpus_dir, group_by_length=True, shuffle_block_size=60
        )


@pytest.mark.parametrize("written_from", ["data folder", "working directory"])
def test_relative_training_audio_paths_start_at_the_data_files_folder(
    tiny_text_model, tiny_speech_model, tmp_path, monkeypatch, written_from
):
    """As an eval set's paths start at its BEIR folder; a path written from the working directory
    (a script run from the project root) still resolves there."""
    folder = tmp_path / "data"
    (folder / "clips").mkdir(parents=True)
    rows = []
    for i, seconds in enumerate((2.0, 1.0, 2.5, 1.5)):  # not in order: grouping sorts them
        (folder / "clips" / f"{i}.wav").write_bytes(_wav_bytes(_tone(seconds), rate=16000))
        path = f"clips/{i}.wav" if written_from == "data folder" else f"data/clips/{i}.wav"
        rows.append({"id": f"row-{i}", "query": "baki", "document": "fêlo", "audio": path})
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if written_from == "data folder":
        (tmp_path / "elsewhere").mkdir()
        monkeypatch.chdir(tmp_path / "elsewhere")
    else:
        monkeypatch.chdir(tmp_path)
    data = StreamingPairDataModule(
        tokenizer=str(tiny_text_model),
        train_data=str(folder / "train.jsonl"),
        audio=AudioSettings(feature_extractor=str(tiny_speech_model), min_duration=0.5),
        batch_size=4,
        shuffle_block_size=4,
        group_by_length=True,  # reads every clip's duration from its header first
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["skipped_ids"] == []
    # Sorted by the duration read from each header: a row read as 0 s would come first.
    assert sorted(batch["ids"]) == [f"row-{i}" for i in range(4)]
    lengths = batch["query_audio"]["attention_mask"].sum(dim=1).tolist()
    assert lengths == sorted(lengths) or lengths == sorted(lengths, reverse=True)
    if written_from == "working directory":  # an eval set's paths start at its folder only
        with pytest.raises(BadAudio, match="not found"):
            decode_audio(rows[0]["audio"], base_dir=folder)


# ----- audio paths stay inside the data's folder ------------------------------------------------
def _folder_with_paths_out(tmp_path):
    """``data/`` holding one clip and a symlink to a clip outside it; (folder, outside clip)."""
    folder = tmp_path / "data"
    (folder / "clips").mkdir(parents=True)
    (folder / "clips" / "inside.wav").write_bytes(_wav_bytes(_tone(1.0, 16000), rate=16000))
    outside = tmp_path / "outside.wav"
    outside.write_bytes(_wav_bytes(_tone(1.0, 16000), rate=16000))
    (folder / "clips" / "link.wav").symlink_to(outside)
    (folder / "clips" / "alias.wav").symlink_to(folder / "clips" / "inside.wav")  # stays inside
    (tmp_path / "elsewhere").mkdir()  # the working directory, also a start of training paths
    return folder, outside


def _outside(path: str, folder) -> str:
    return (
        f"audio path {path!r} resolves outside {folder} (an absolute path elsewhere, '..' or a "
        "symlink); set data.audio.allow_outside_paths: true to read it"
    )


@pytest.mark.parametrize("kind", ["absolute", "dot-dot", "symlink"])
def test_audio_paths_leading_outside_the_folder_are_refused_unless_allowed(tmp_path, kind):
    folder, outside = _folder_with_paths_out(tmp_path)
    path = {"absolute": str(outside), "dot-dot": "clips/../../outside.wav", "symlink": "clips/link.wav"}[kind]
    for cell in (path, {"bytes": None, "path": path}):
        with pytest.raises(BadAudio) as error:
            AudioLoader(16000).load(cell, base_dir=folder)
        assert str(error.value) == _outside(path, folder)
        assert AudioLoader(16000, allow_outside_paths=True).load(cell, base_dir=folder).shape == (16000,)
    # Paths inside the folder, a symlink to a file in it too, and hub data (no folder) read as before.
    for inside in ("clips/inside.wav", "clips/alias.wav", str(folder / "clips" / "inside.wav")):
        assert AudioLoader(16000).load(inside, base_dir=folder).shape == (16000,)
    assert AudioLoader(16000).load(str(outside)).shape == (16000,)


def test_an_absolute_path_must_lie_in_the_datas_own_folder_not_the_working_directory(tmp_path):
    """Training paths also start at the working directory; an absolute one is held to the data's
    folder alone, or a run started from / would read any file."""
    folder, outside = _folder_with_paths_out(tmp_path)
    working = tmp_path  # holds outside.wav
    assert AudioLoader(16000).load("outside.wav", base_dir=(folder, working)).shape == (16000,)
    with pytest.raises(BadAudio) as error:
        AudioLoader(16000).load(str(outside), base_dir=(folder, working))
    assert str(error.value) == _outside(str(outside), folder)


def _speech_data(text_model, speech_model, **kwargs) -> StreamingPairDataModule:
    settings = {"feature_extractor": str(speech_model), "min_duration": 0.5, **kwargs.pop("audio", {})}
    return StreamingPairDataModule(
        tokenizer=str(text_model),
        audio=AudioSettings(**settings),
        **{"batch_size": 4, "shuffle_block_size": 4, "max_query_length": 64, **kwargs},
    )


def test_training_rows_whose_audio_leads_outside_are_skipped_and_named(
    tiny_text_model, tiny_speech_model, tmp_path, monkeypatch
):
    folder, outside = _folder_with_paths_out(tmp_path)
    monkeypatch.chdir(tmp_path / "elsewhere")
    paths = {"ok": "clips/inside.wav", "abs": str(outside), "up": "../outside.wav", "link": "clips/link.wav"}
    rows = [{"id": key, "query": "baki", "document": "fêlo", "audio": path} for key, path in paths.items()]
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for allowed, kept in ((False, ["ok"]), (True, sorted(paths))):
        data = _speech_data(
            tiny_text_model,
            tiny_speech_model,
            train_data=str(folder / "train.jsonl"),
            audio={"allow_outside_paths": allowed},
            passes=1,
        )
        data.setup("fit")
        (batch,) = list(data.train_dataloader())
        assert sorted(batch["ids"]) == kept
        if not allowed:
            skipped = dict(zip(batch["skipped_ids"], batch["skip_reasons"], strict=True))
            assert skipped == {key: _outside(paths[key], folder) for key in paths if key != "ok"}


def test_a_training_file_whose_every_clip_is_unusable_stops_naming_it(
    tiny_text_model, tiny_speech_model, tmp_path, monkeypatch
):
    folder, _ = _folder_with_paths_out(tmp_path)
    monkeypatch.chdir(tmp_path / "elsewhere")
    rows = [{"id": f"r{i}", "query": "baki", "document": "fêlo", "audio": "../outside.wav"} for i in range(3)]
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = _speech_data(tiny_text_model, tiny_speech_model, train_data=str(train))
    data.setup("fit")
    with pytest.raises(DataError) as error:
        for _ in data.train_dataloader():
            pass
    message = str(error.value)
    assert message.startswith(
        f"data.train_data='{train}': a whole pass over the training data gave no usable row"
    )
    assert _outside("../outside.wav", folder) in message


def test_eval_queries_whose_audio_leads_outside_are_left_out_and_named(
    tiny_text_model, tiny_speech_model, tmp_path
):
    root, outside = _folder_with_paths_out(tmp_path)
    (root / "qrels").mkdir()
    paths = {"ok": "clips/inside.wav", "abs": str(outside), "up": "../outside.wav", "link": "clips/link.wav"}
    queries = [{"_id": key, "text": "baki", "audio": path} for key, path in paths.items()]
    (root / "queries.jsonl").write_text("".join(json.dumps(row) + "\n" for row in queries))
    (root / "corpus.jsonl").write_text(json.dumps({"_id": "d", "text": "fêlo"}) + "\n")
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{k}\td\t1\n" for k in paths)
    )
    data = _speech_data(tiny_text_model, tiny_speech_model, eval_sets={"toy": str(root)})
    data.setup("validate")
    assert [row["id"] for row in data.eval_sets["toy"].queries] == ["ok"]
    assert data.eval_queries_dropped["toy"] == [
        f"{key}: {_outside(paths[key], root)}" for key in ("abs", "up", "link")
    ]


# ----- audio held as bytes, cut-off files ---------------------------------------------------------
def test_undecodable_bytes_are_named_by_their_row_not_a_bytesio_object(tiny_text_model, tiny_speech_model):
    builder = _speech_builder(tiny_text_model, tiny_speech_model)
    good = _wav_bytes(_tone(1.0))
    rows = [
        {"id": "ok", "query": "baki", "document": "fêlo", "audio": good},
        {
            "id": "corrupt",
            "query": "baki",
            "document": "fêlo",
            "audio": {"bytes": b"junk" * 20, "path": None},
        },
    ]
    batch = builder.training_batch(rows)
    assert batch["skipped_ids"] == ["corrupt"]
    (reason,) = batch["skip_reasons"]
    assert reason.startswith("undecodable audio (") and "Error opening bytes of row corrupt: " in reason
    assert "BytesIO" not in reason and " at 0x" not in reason


def _cut_wav(path: Path, promised: float = 3.0, kept: float = 1.2, rate: int = 16000) -> Path:
    """A real WAV of ``promised`` seconds whose bytes are cut after ``kept`` seconds."""
    soundfile.write(path, _tone(promised, rate), rate, subtype="PCM_16")
    raw = path.read_bytes()
    header = len(raw) - int(promised * rate) * 2
    path.write_bytes(raw[: header + int(kept * rate) * 2])
    return path


TRUNCATED = "truncated audio: its header promises 3.00 s, only 1.20 s are there (data.audio.truncated: {})"


def test_a_cut_off_wav_is_detected_and_skipped_or_kept(tmp_path, caplog):
    """libsndfile counts only the frames that are there: the clip decoded silently as 1.2 s."""
    cut = _cut_wav(tmp_path / "cut.wav")
    assert soundfile.info(cut).duration == pytest.approx(1.2)  # what soundfile alone reports
    for cell in (str(cut), cut.read_bytes()):
        with pytest.raises(BadAudio) as error:
            AudioLoader(16000).load(cell)
        assert str(error.value) == TRUNCATED.format("skip")
    keeping = AudioLoader(16000, truncated="keep")
    with caplog.at_level("WARNING", logger="datamodules.audio"):
        assert keeping.load(str(cut), name="q7").shape == (int(1.2 * 16000),)
    assert caplog.messages == [
        f"Kept the audio of row 'q7', {TRUNCATED.format('keep')}; 1 truncated clips kept by this loader"
    ]
    assert keeping.truncated_kept == 1
    whole = tmp_path / "whole.wav"
    soundfile.write(whole, _tone(3.0, 16000), 16000, subtype="PCM_16")
    assert AudioLoader(16000).load(str(whole)).shape == (48000,)
    with pytest.raises(ConfigError, match=r"data.audio.truncated='drop': use one of \['skip', 'keep'\]"):
        AudioSettings(feature_extractor="x", truncated="drop")


@pytest.mark.parametrize("truncated", ["skip", "keep"])
def test_cut_off_clips_follow_the_setting_in_training_and_eval_sets(
    tiny_text_model, tiny_speech_model, tmp_path, truncated
):
    root = tmp_path / "data"
    (root / "qrels").mkdir(parents=True)
    soundfile.write(root / "whole.wav", _tone(3.0, 16000), 16000, subtype="PCM_16")
    _cut_wav(root / "cut.wav")
    clips = {"whole": "whole.wav", "cut": "cut.wav"}
    rows = [{"id": key, "query": "baki", "document": "fêlo", "audio": path} for key, path in clips.items()]
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    queries = [{"_id": key, "text": "baki", "audio": path} for key, path in clips.items()]
    (root / "queries.jsonl").write_text("".join(json.dumps(row) + "\n" for row in queries))
    (root / "corpus.jsonl").write_text(json.dumps({"_id": "d", "text": "fêlo"}) + "\n")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nwhole\td\t1\ncut\td\t1\n")
    data = _speech_data(
        tiny_text_model,
        tiny_speech_model,
        train_data=str(root / "train.jsonl"),
        eval_sets={"toy": str(root)},
        audio={"truncated": truncated},
        passes=1,
    )
    data.setup("fit")
    (batch,) = list(data.train_dataloader())
    evaluated = [row["id"] for row in data.eval_sets["toy"].queries]
    if truncated == "skip":
        assert batch["ids"] == ["whole"] and batch["skipped_ids"] == ["cut"]
        assert batch["skip_reasons"] == [TRUNCATED.format("skip")]
        assert evaluated == ["whole"] and data.eval_queries_dropped["toy"] == [
            f"cut: {TRUNCATED.format('skip')}"
        ]
    else:
        assert sorted(batch["ids"]) == ["cut", "whole"] and batch["skipped_ids"] == []
        assert evaluated == ["whole", "cut"] and data.eval_queries_dropped["toy"] == []


# ----- silence by level ---------------------------------------------------------------------
def _at_peak_dbfs(signal: np.ndarray, dbfs: float) -> np.ndarray:
    """``signal`` scaled so that its largest absolute sample is ``dbfs`` below full scale (1.0)."""
    return (signal * (10 ** (dbfs / 20) / np.abs(signal).max())).astype(np.float32)


def _dither(seconds: float = 1.0) -> np.ndarray:
    """Dithered silence: uniform noise whose peak is 3e-5, that is 20 * log10(3e-5) = -90.46 dBFS."""
    noise = np.random.default_rng(0).uniform(-1, 1, int(seconds * RATE))
    return (noise * (3e-5 / np.abs(noise).max())).astype(np.float32)


def test_a_clip_whose_peak_is_below_the_threshold_is_silent_bad_audio():
    loader = AudioLoader(16000)  # the default threshold, -60 dBFS
    with pytest.raises(BadAudio) as caught:
        loader.load(_wav_bytes(_dither()))
    assert str(caught.value) == "silent: peak -90.5 dBFS below data.audio.silence_threshold_dbfs=-60"
    assert caught.value.kind == "silent"
    # A quiet tone peaking at -50 dBFS is kept; at -40 it is not.
    quiet = _wav_bytes(_at_peak_dbfs(_tone(1.0), -50.0))
    assert loader.load(quiet).shape == (16000,)
    with pytest.raises(
        BadAudio, match=r"^silent: peak -50\.0 dBFS below data\.audio\.silence_threshold_dbfs=-40$"
    ):
        AudioLoader(16000, silence_threshold_dbfs=-40).load(quiet)


def test_the_level_is_that_of_the_mono_down_mix():
    # Two loud channels in opposite phase mix down to nothing: the model would hear silence.
    tone = _tone(1.0)
    with pytest.raises(BadAudio, match="silent: all-zero audio"):
        AudioLoader(16000).load(_wav_bytes(np.stack([tone, -tone], axis=1)))
    # One channel at -50 dBFS and one empty mix down to a peak of -56.0 dBFS (half the amplitude).
    one_sided = np.stack([_at_peak_dbfs(tone, -50.0), np.zeros_like(tone)], axis=1)
    with pytest.raises(BadAudio, match=r"peak -56\.0 dBFS"):
        AudioLoader(16000, silence_threshold_dbfs=-55).load(_wav_bytes(one_sided))


def test_no_silence_threshold_keeps_quiet_clips_and_still_refuses_all_zero_ones():
    loader = AudioLoader(16000, silence_threshold_dbfs=None)
    assert loader.load(_wav_bytes(_dither())).shape == (16000,)
    with pytest.raises(BadAudio, match="^silent: all-zero audio$"):
        loader.load(_wav_bytes(np.zeros(RATE, np.float32)))


@pytest.mark.parametrize("level", [0.5, float("nan")])
def test_a_silence_threshold_above_full_scale_is_refused(level):
    with pytest.raises(ConfigError, match="data.audio.silence_threshold_dbfs"):
        AudioSettings(feature_extractor="x", silence_threshold_dbfs=level)


def test_a_silent_training_row_is_skipped_with_its_level_and_counted_as_silent(
    tiny_text_model, tiny_speech_model
):
    builder = _speech_builder(tiny_text_model, tiny_speech_model)
    rows = [
        {"id": "dither", "query": "baki", "document": "fêlo", "audio": _wav_bytes(_dither())},
        {"id": "zeros", "query": "baki", "document": "fêlo", "audio": _wav_bytes(np.zeros(RATE, "float32"))},
        {"id": "ok", "query": "baki", "document": "fêlo", "audio": _wav_bytes(_tone(1.0))},
    ]
    batch = builder.training_batch(rows)
    assert batch["ids"] == ["ok"] and batch["skipped_ids"] == ["dither", "zeros"]
    assert batch["skip_reasons"] == [
        "silent: peak -90.5 dBFS below data.audio.silence_threshold_dbfs=-60",
        "silent: all-zero audio",
    ]
    assert batch["skip_kinds"] == ["silent", "silent"]


def test_a_silent_eval_query_is_left_out_and_named(
    tiny_text_model, tiny_speech_model, speech_corpus_dir, tmp_path, caplog
):
    import shutil

    eval_dir = tmp_path / "eval"
    shutil.copytree(speech_corpus_dir / "eval" / "demo", eval_dir)
    rows = [json.loads(line) for line in (eval_dir / "queries.jsonl").read_text().splitlines()]
    (eval_dir / rows[2]["audio"]).write_bytes(_wav_bytes(_dither(1.0), rate=16000))
    data = StreamingPairDataModule(
        tokenizer=str(tiny_text_model),
        eval_sets={"demo": str(eval_dir)},
        audio=AudioSettings(feature_extractor=str(tiny_speech_model), min_duration=0.5),
        max_query_length=64,
    )
    with caplog.at_level("WARNING", logger="datamodules"):
        data.setup("validate")
    assert [row["id"] for row in data.eval_sets["demo"].queries] == [
        r["_id"] for r in rows if r is not rows[2]
    ]
    named = f"{rows[2]['_id']}: silent: peak -90.5 dBFS below data.audio.silence_threshold_dbfs=-60"
    assert data.eval_queries_dropped["demo"] == [named]
    assert f"1 of {len(rows)} queries have unusable audio and are left out: [{named!r}]" in caplog.text
