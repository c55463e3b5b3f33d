"""Long recordings of real synthesized speech with known utterance boundaries (for curation tests).

Utterances are spoken by Debian's ``espeak-ng`` (a real speech synthesizer, not a model of the
VAD), trimmed to their first and last audible sample, then laid end to end with gaps of known
lengths filled with noise of known levels. The known boundaries are where each utterance was put.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

ESPEAK = shutil.which("espeak-ng")
RATE = 22050  # espeak-ng's own rate
AUDIBLE = 1e-3

WORDS = {
    "en": "river market morning teacher village garden story window evening mountain kitchen "
    "letter bridge harvest journey summer winter doctor family station picture forest ocean "
    "question answer country people number music".split(),
    "fr": "rivière marché matin maître village jardin histoire fenêtre soirée montagne cuisine "
    "lettre pont récolte voyage été hiver médecin famille gare image forêt océan question "
    "réponse pays peuple nombre musique".split(),
}


@dataclass
class Utterance:
    start: float
    end: float
    text: str

    @property
    def seconds(self) -> float:
        return self.end - self.start


def speak(text: str, voice: str = "en", speed: int = 160) -> np.ndarray:
    """espeak-ng's waveform of ``text`` (float32 at 22.05 kHz), trimmed to its audible part."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "utterance.wav"
        subprocess.run([ESPEAK, "-w", str(path), "-v", voice, "-s", str(speed), text], check=True)
        samples, rate = soundfile.read(path, dtype="float32")
    assert rate == RATE
    audible = np.flatnonzero(np.abs(samples) > AUDIBLE)
    return samples[audible[0] : audible[-1] + 1]


def sentence(rng: np.random.Generator, voice: str, words: int) -> str:
    """``words`` random words, a comma every few (short pauses inside the utterance)."""
    chosen = list(rng.choice(WORDS[voice], size=words))
    for i in range(4, len(chosen) - 1, 5):
        chosen[i] += ","
    return " ".join(chosen) + "."


def noise(rng: np.random.Generator, samples: int, dbfs: float) -> np.ndarray:
    """Gaussian noise whose RMS is ``dbfs`` (dB relative to full scale)."""
    return (rng.standard_normal(samples) * 10 ** (dbfs / 20)).astype(np.float32)


def build_recording(
    rng: np.random.Generator,
    texts: list[tuple[str, str]],
    gaps: list[float],
    gap_noise_dbfs: float = -50.0,
    background_dbfs: float | None = None,
) -> tuple[np.ndarray, list[Utterance]]:
    """``texts`` ((voice, text) pairs) spoken in turn, ``gaps`` seconds of noise before each and after
    the last (len(texts) + 1 gaps); ``background_dbfs`` adds noise under everything."""
    assert len(gaps) == len(texts) + 1
    parts, utterances, cursor = [], [], 0
    for (voice, text), gap in zip(texts, gaps, strict=False):
        silence = noise(rng, int(gap * RATE), gap_noise_dbfs)
        speech = speak(text, voice)
        parts += [silence, speech]
        cursor += len(silence)
        utterances.append(Utterance(cursor / RATE, (cursor + len(speech)) / RATE, text))
        cursor += len(speech)
    parts.append(noise(rng, int(gaps[-1] * RATE), gap_noise_dbfs))
    audio = np.concatenate(parts)
    if background_dbfs is not None:
        audio = audio + noise(rng, len(audio), background_dbfs)
    return audio.astype(np.float32), utterances
