"""Curation throughput and peak memory against recording length (a script, not a test).

    OMP_NUM_THREADS=1 python benchmarks/curation.py --minutes 5 60

Builds one long recording per length from espeak-ng utterances (22.05 kHz mono FLAC, 1.5-4 s
gaps of noise, a -45 dBFS noise floor under everything), written block by block, then curates each
in a fresh process (one worker) and prints hours of audio per hour of wall time, CPU time and the
process's peak resident memory (ru_maxrss), and the peak's ratio between the longest and shortest.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from spoken_recordings import RATE, noise, sentence, speak  # noqa: E402

CHILD = """
import json, resource, sys, time
from datamodules.curation import CurationConfig, curate
began, cpu = time.perf_counter(), time.process_time()
manifest = curate(CurationConfig(input=sys.argv[1], output=sys.argv[2], progress=False))
print(json.dumps({"wall_s": time.perf_counter() - began, "cpu_s": time.process_time() - cpu,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "hours_in": manifest["hours_in"], "hours_kept": manifest["hours_kept"],
                  "segments_kept": manifest["segments_kept"]}))
"""


def write_recording(path: Path, minutes: float, pool: list[np.ndarray], seed: int) -> None:
    """Utterances from ``pool`` with noise gaps until ``minutes``, written block by block."""
    rng = np.random.default_rng(seed)
    total = int(minutes * 60 * RATE)
    written = 0
    with soundfile.SoundFile(path, "w", RATE, 1, format="FLAC", subtype="PCM_16") as sound:
        while written < total:
            gap = noise(rng, int(rng.uniform(1.5, 4.0) * RATE), -55)
            piece = np.concatenate([gap, pool[int(rng.integers(len(pool)))]])[: total - written]
            sound.write(np.clip(piece + noise(rng, len(piece), -45), -1, 1))
            written += len(piece)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[5, 60])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    pool = [speak(sentence(rng, voice, int(rng.integers(9, 30))), voice) for voice in ["en", "fr"] * 15]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for minutes in args.minutes:
            recording = Path(folder) / f"in{minutes:g}" / "talk.flac"
            recording.parent.mkdir()
            write_recording(recording, minutes, pool, seed=int(minutes))
            out = (
                subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        CHILD,
                        str(recording.parent),
                        str(Path(folder) / f"out{minutes:g}"),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            result = json.loads(out)
            result["audio_hours_per_wall_hour"] = result["hours_in"] * 3600 / result["wall_s"]
            result["audio_hours_per_cpu_hour"] = result["hours_in"] * 3600 / result["cpu_s"]
            results[f"{minutes:g} min"] = result
            print(
                f"{minutes:g} min: "
                + ", ".join(
                    f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
                ),
                flush=True,
            )
    peaks = [r["peak_rss_mb"] for r in results.values()]
    print(f"peak RSS longest / shortest: {peaks[-1] / peaks[0]:.3f} ({time.strftime('%Y-%m-%d')})")


if __name__ == "__main__":
    main()
