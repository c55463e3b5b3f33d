"""One recording through the pipeline: VAD pass, segments, optional stages, quality, its shard.

Two streaming reads of the file: the VAD pass (blocks at 16 kHz) and, for each candidate segment,
a seek to read just that segment at the source's rate. Peak memory is one block, one segment and
the per-window track (8 bytes per 32 ms), whatever the recording's length.
"""

from __future__ import annotations

import time
from pathlib import Path

from datamodules.audio import BadAudio
from datamodules.curation import quality, reading, segments, vad
from datamodules.curation.shards import (
    ShardWriter,
    flac_bytes,
    marker_path,
    recording_key,
    write_json_atomically,
)

# Reasons a segment is dropped, as the manifest counts them.
TOO_SHORT = "shorter than min_duration"
LOW_SNR = "snr_db below min_snr_db"
CLIPPED = "clipping above max_clipping"
LITTLE_SPEECH = "speech_ratio below min_speech_ratio"
LOW_DNSMOS = "dnsmos_ovrl below dnsmos_threshold"
SEVERAL_SPEAKERS = "main speaker share below min_main_speaker_share"


class Models:
    """What a worker loads once: Silero-VAD and the configured optional stages."""

    def __init__(self, config):
        from datamodules.curation.hooks import Diarizer, Separator, Transcriber

        self.vad = vad.load_vad()
        self.dnsmos = quality.Dnsmos(config.dnsmos_model) if config.dnsmos_model else None
        self.diarizer = Diarizer(config.diarization) if config.diarization else None
        self.separator = Separator(config.separation) if config.separation else None
        self.transcriber = Transcriber(config.asr_model) if config.asr_model else None


def _fingerprint(path: Path) -> dict:
    stat = path.stat()
    return {"bytes": stat.st_size, "modified": stat.st_mtime}


def _drop(stats: dict, reason: str, seconds: float) -> None:
    stats["dropped"][reason] = stats["dropped"].get(reason, 0) + 1
    stats["dropped_seconds"][reason] = stats["dropped_seconds"].get(reason, 0.0) + seconds


def process(relative: str, root: Path, output: Path, config, models: Models) -> dict:
    """Curates one recording, writes its shard then its done marker; returns the marker's content."""
    path = root / relative if relative else root
    key = recording_key(relative or path.name)
    stats = {
        "source": relative or path.name,
        "key": key,
        "file": _fingerprint(path),
        "seconds_in": 0.0,
        "seconds_speech": 0.0,
        "seconds_kept": 0.0,
        "kept": 0,
        "dropped": {},
        "dropped_seconds": {},
        "shard": None,
        "skipped": None,
        "note": None,
    }
    began = time.perf_counter()
    writer = ShardWriter(output / "shards", key, config.rows_per_row_group, with_query=bool(config.asr_model))
    try:
        info = reading.inspect(path)
        stats["seconds_in"] = info.seconds
        stats["input_format"] = f"{info.format} {info.rate} Hz {info.channels} ch"
        if info.truncated:
            promised = info.declared_frames / info.rate
            if config.truncated == "skip":
                raise BadAudio(
                    f"truncated: header promises {promised:.2f} s, {info.seconds:.2f} s there", "truncated"
                )
            stats["note"] = (
                f"truncated: header promises {promised:.2f} s, kept the {info.seconds:.2f} s there"
            )
        track = vad.track(models.vad, reading.mono_blocks(info, config.block_seconds, vad.VAD_RATE))
        regions = vad.speech_regions(track, config)
        stats["seconds_speech"] = sum(end - start for start, end in regions)
        for piece in segments.segment(regions, config.min_duration, config.max_duration, config.max_pause):
            if not piece.kept:
                _drop(stats, TOO_SHORT, piece.seconds)
                continue
            row = _segment_row(info, track, piece, key, stats["source"], config, models)
            if isinstance(row, str):
                _drop(stats, row, piece.seconds)
                continue
            writer.add(row)
            stats["kept"] += 1
            stats["seconds_kept"] += piece.seconds
        stats["shard"] = writer.close()
    except BadAudio as bad:
        writer.abort()
        stats["skipped"] = {"kind": bad.kind, "reason": str(bad)}
        stats["shard"] = None
    except BaseException:
        writer.abort()
        raise
    stats["wall_seconds"] = time.perf_counter() - began
    write_json_atomically(marker_path(output, key), stats)
    return stats


def _segment_row(info, track, piece, key: str, source: str, config, models: Models) -> dict | str:
    """The shard row of a kept segment, or the reason it is dropped."""
    scores: dict = {}
    samples = reading.read_span(info, piece.start, piece.end)
    scores["clipping"] = quality.clipping_ratio(samples)
    proxy = quality.proxy_scores(track, piece.start, piece.end, config.vad_threshold, config.neg_threshold)
    scores.update(snr_db=proxy.snr_db, speech_ratio=proxy.speech_ratio, vad_confidence=proxy.vad_confidence)
    need_16k = models.dnsmos or models.diarizer or models.separator or models.transcriber
    speech_16k = reading.resample(samples, info.rate, vad.VAD_RATE) if need_16k else None
    if models.diarizer is not None:
        speakers, share = models.diarizer.main_speaker_share(speech_16k)
        scores.update(speakers=speakers, main_speaker_share=share)
        if share < config.min_main_speaker_share:
            return SEVERAL_SPEAKERS
    rate = info.rate
    if models.separator is not None:
        speech_16k = models.separator(speech_16k)
        samples, rate = speech_16k, vad.VAD_RATE
    if models.dnsmos is not None:
        scores.update(models.dnsmos(speech_16k))
        if scores["dnsmos_ovrl"] < config.dnsmos_threshold:
            return LOW_DNSMOS
    else:
        if scores["clipping"] > config.max_clipping:
            return CLIPPED
        if proxy.speech_ratio < config.min_speech_ratio:
            return LITTLE_SPEECH
        if proxy.snr_db < config.min_snr_db:
            return LOW_SNR
    if models.transcriber is not None:
        scores["query"] = models.transcriber(speech_16k)
    clip = reading.resample(samples, rate, config.output_sample_rate)
    segment_id = f"{key}-{int(round(piece.start * 1000)):09d}"
    return {
        "id": segment_id,
        "audio": {"bytes": flac_bytes(clip, config.output_sample_rate), "path": f"{segment_id}.flac"},
        "source": source,
        "start": round(piece.start, 3),
        "end": round(piece.end, 3),
        "duration": round(piece.seconds, 3),
        **scores,
    }
