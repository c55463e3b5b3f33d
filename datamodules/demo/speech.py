"""Spoken queries for the demo: the query language rendered as audio, by code.

Every word of the query language has its own acoustic pattern: a chord of three tones picked
from a fixed grid (a stand-in for a word's spectral shape), held for a time that grows with
the word's length. Each utterance gets its own speaker: a scale on every frequency, a pitch
tone, tempo, loudness and background noise. Only query-language words are spoken; no text of
the document side reaches the audio.

Why chords and not letter-by-letter phones: the demo's speech tower is a random-init w2v-BERT,
not a pre-trained one. A pre-trained encoder already tells words apart; a random one only passes
on spectra. Word patterns readable from the spectrum leave the demo's adapter the same job it
has on real data (map speech-encoder states into the LLM), not learning speech recognition.

Written as a ``datasets``-loadable folder (parquet shards with an ``Audio`` column holding OGG
bytes, plus the transcription and the document; every training query recorded by several
voices) and a BEIR-style eval set whose queries carry audio files.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.demo.corpus import (
    DemoCorpusConfig,
    DemoExample,
    DemoLanguagePair,
    generate_demo_corpus,
    write_demo_eval_set,
)

TONES_PER_WORD = 3


@dataclass(frozen=True)
class DemoSpeechConfig:
    """How the demo's spoken queries sound and how they are stored."""

    seed: int = 0
    """Seed of every speaker and noise draw."""
    sampling_rate: int = 8000
    """Stored rate; the loader resamples to the speech model's 16 kHz, as it would for real data."""
    seconds_per_letter: float = 0.045
    """A word lasts this long per letter of its transcription, at tempo 1."""
    tone_grid: tuple[float, float, int] = (250.0, 3500.0, 11)
    """Lowest tone, highest tone (Hz, under the 4 kHz Nyquist limit of 8 kHz audio) and how many
    tones, evenly spaced in log frequency (11: 30 % apart); every word is a chord of three of them.
    Tones this far apart, with the narrow speaker scale and SNR below, let the adapter tell words
    apart within the demo's budget: nDCG@10 d256 at step 240 of the demo late fusion 0.432, vs
    0.244 with 14 tones 20 % apart, scale 0.95-1.05 and SNR 12-30 dB (same text stage, recipe)."""
    frequency_scale: tuple[float, float] = (0.99, 1.01)
    """Range of the speaker's scale on every frequency (a vocal-tract stand-in; the pitch tone,
    tempo, loudness and noise carry most of the speaker variation)."""
    pitch_hz: tuple[float, float] = (90.0, 220.0)
    """Range of the speaker's fundamental frequency (a low tone under the vowels)."""
    tempo: tuple[float, float] = (0.85, 1.15)
    """Range of the speaking-rate factor on durations (above 1 is slower)."""
    snr_db: tuple[float, float] = (20.0, 30.0)
    """Range of the signal-to-noise ratio of the white background noise."""
    voices_per_pair: int = 3
    """Speakers who record each training query (rows ``<id>-v<k>``): like real read-speech corpora,
    and the adapter meets each query in several voices instead of memorising one recording."""
    audio_format: str = "ogg"
    """Container of the stored clips: ``ogg`` (Vorbis, lossy, ~3x smaller) or ``flac``."""
    train_shards: int = 4
    """Parquet shards of the training set (lets ranks and workers split it by shard)."""


def chord_table(words: list[str], config: DemoSpeechConfig) -> dict[str, tuple[float, ...]]:
    """A distinct three-tone chord for every word (the same for every speaker)."""
    low, high, count = config.tone_grid
    chords = list(itertools.combinations(np.geomspace(low, high, num=count).tolist(), TONES_PER_WORD))
    if len(chords) < len(words):
        raise ValueError(f"{len(words)} words but only {len(chords)} distinct chords.")
    random.Random(config.seed).shuffle(chords)
    return dict(zip(words, chords, strict=False))


class DemoVoice:
    """Renders query-language text for one random speaker."""

    def __init__(
        self, config: DemoSpeechConfig, chords: dict[str, tuple[float, ...]], rng: np.random.Generator
    ):
        self.config = config
        self.chords = chords
        self.rng = rng
        self.scale = rng.uniform(*config.frequency_scale)
        self.pitch = rng.uniform(*config.pitch_hz)
        self.tempo = rng.uniform(*config.tempo)
        self.gain = rng.uniform(0.3, 0.9)

    def _word(self, word: str) -> np.ndarray:
        rate = self.config.sampling_rate
        t = np.arange(int(len(word) * self.config.seconds_per_letter * self.tempo * rate)) / rate
        frequencies = [self.pitch] + [f * self.scale for f in self.chords[word]]
        weights = [0.4, 1.0, 0.8, 0.6]
        phases = self.rng.uniform(0, 2 * np.pi, size=len(frequencies))
        wave = sum(
            w * np.sin(2 * np.pi * f * t + p) for f, w, p in zip(frequencies, weights, phases, strict=True)
        )
        ramp = min(len(t) // 4, int(0.02 * rate))  # 20 ms fade in and out: no clicks
        envelope = np.ones(len(t))
        envelope[:ramp] = np.linspace(0, 1, ramp)
        envelope[len(t) - ramp :] = np.linspace(1, 0, ramp)
        return wave * envelope

    def _silence(self, low: float, high: float) -> np.ndarray:
        return np.zeros(int(self.rng.uniform(low, high) * self.config.sampling_rate))

    def say(self, words: list[str]) -> np.ndarray:
        pieces = [self._silence(0.05, 0.15)]
        for word in words:
            pieces.append(self._word(word))
            pieces.append(self._silence(0.03, 0.08))
        pieces.append(self._silence(0.05, 0.15))
        signal = np.concatenate(pieces)
        signal = self.gain * signal / np.abs(signal).max()
        noise_power = np.mean(signal**2) / 10 ** (self.rng.uniform(*self.config.snr_db) / 10)
        signal = signal + self.rng.normal(0, np.sqrt(noise_power), size=signal.shape)
        return np.clip(signal, -1, 1).astype(np.float32)


AUDIO_FORMATS = {"ogg": ("OGG", "VORBIS"), "flac": ("FLAC", "PCM_16")}


def encoded_audio(signal: np.ndarray, sampling_rate: int, audio_format: str = "flac") -> bytes:
    """The clip as the bytes of an ``ogg`` or ``flac`` file."""
    import soundfile

    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"audio_format={audio_format!r}; choose one of {sorted(AUDIO_FORMATS)}.")
    container, subtype = AUDIO_FORMATS[audio_format]
    buffer = io.BytesIO()
    soundfile.write(buffer, signal, sampling_rate, format=container, subtype=subtype)
    return buffer.getvalue()


def _audio_table(rows: list[dict]):
    """A pyarrow table whose ``audio`` column is typed as ``datasets.Audio``, like a hub dataset."""
    import pyarrow as pa
    from datasets import Audio, Features, Value

    features = Features(
        {
            "id": Value("string"),
            "task": Value("string"),
            "query": Value("string"),
            "document": Value("string"),
            "audio": Audio(),
        }
    )
    audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            **{name: [row[name] for row in rows] for name in ("id", "task", "query", "document")},
            "audio": pa.array([row["audio"] for row in rows], type=audio_type),
        }
    )
    metadata = {"huggingface": json.dumps({"info": {"features": features.to_dict()}})}
    return table.replace_schema_metadata(metadata)


def _spoken(row_id: str, example: DemoExample, voice: DemoVoice) -> dict:
    config = voice.config
    audio = encoded_audio(voice.say(example.query_words), config.sampling_rate, config.audio_format)
    return {"bytes": audio, "path": f"{row_id}.{config.audio_format}"}


def _recordings(train: list[DemoExample], config: DemoSpeechConfig, rng: np.random.Generator):
    """``(row id, example)`` for every voice of every training pair, in random order."""
    if config.voices_per_pair == 1:
        recordings = [(example.id, example) for example in train]
    else:
        recordings = [(f"{e.id}-v{k}", e) for e in train for k in range(config.voices_per_pair)]
    return [recordings[i] for i in rng.permutation(len(recordings))]


def _write_train_shard(
    path: Path, recordings: list, config: DemoSpeechConfig, chords: dict, seed: list[int]
) -> None:
    """One parquet shard; its voices come from its own seeded generator (shards render in parallel)."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows = [
        {
            "id": row_id,
            "task": example.task,
            "query": example.query,
            "document": example.document,
            "audio": _spoken(row_id, example, DemoVoice(config, chords, rng)),
        }
        for row_id, example in recordings
    ]
    pq.write_table(_audio_table(rows), path)


def write_demo_speech_corpus(
    root: Path, corpus_config: DemoCorpusConfig | None = None, config: DemoSpeechConfig | None = None
) -> Path:
    """Writes ``train/`` (parquet shards) and ``eval/demo/`` (BEIR + audio/) under root."""
    from concurrent.futures import ProcessPoolExecutor

    corpus_config = corpus_config or DemoCorpusConfig()
    config = config or DemoSpeechConfig()
    train, evaluation, distractors = generate_demo_corpus(corpus_config)
    rng = np.random.default_rng(config.seed)
    language = DemoLanguagePair(corpus_config)
    chords = chord_table(language.query_vocabulary + language.query_fillers, config)

    train_dir = root / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    recordings = _recordings(train, config, rng)
    shards = np.array_split(np.arange(len(recordings)), config.train_shards)
    # Rendering and encoding ~18k clips is the slow part of the demo's first run: one process per core.
    with ProcessPoolExecutor(max_workers=max(1, min(len(shards), os.cpu_count() or 1))) as pool:
        jobs = [
            pool.submit(
                _write_train_shard,
                train_dir / f"train-{number:05d}-of-{len(shards):05d}.parquet",
                [recordings[i] for i in indices],
                config,
                chords,
                [config.seed, number],
            )
            for number, indices in enumerate(shards)
        ]
        for job in jobs:
            job.result()  # re-raises a worker's error here

    eval_root = root / "eval" / "demo"
    (eval_root / "audio").mkdir(parents=True, exist_ok=True)
    audio_paths = {}
    for example in evaluation:
        spoken = _spoken(example.id, example, DemoVoice(config, chords, rng))
        audio_paths[example.id] = {"audio": f"audio/{spoken['path']}"}
        (eval_root / audio_paths[example.id]["audio"]).write_bytes(spoken["bytes"])
    write_demo_eval_set(eval_root, evaluation, distractors, query_extras=audio_paths)
    return root
