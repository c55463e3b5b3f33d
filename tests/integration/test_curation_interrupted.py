"""A curation run killed part-way (SIGKILL, mid-recording) resumes: the next run curates only the
recordings without a marker and ends with what one uninterrupted run writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
from demo_recipes import ROOT
from spoken_recordings import ESPEAK, RATE, build_recording, sentence

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(ESPEAK is None, reason="needs espeak-ng (apt install espeak-ng)"),
]


def command(source, output) -> list[str]:
    return [
        sys.executable,
        "-m",
        "datamodules.curation",
        "--input",
        str(source),
        "--output",
        str(output),
        "--progress",
        "false",
    ]


def clips(output) -> list[tuple]:
    return sorted(
        (row["id"], row["start"], row["end"])
        for shard in (output / "shards").glob("*.parquet")
        for row in pq.read_table(shard, columns=["id", "start", "end"]).to_pylist()
    )


def test_a_killed_run_resumes_where_it_stopped(tmp_path):
    rng = np.random.default_rng(9)
    source = tmp_path / "raw"
    source.mkdir()
    for number in range(4):
        texts = [(v, sentence(rng, v, int(rng.integers(12, 25)))) for v in ["en", "fr"] * 4]
        audio, _ = build_recording(rng, texts, list(rng.uniform(1.5, 3.0, len(texts) + 1)), -55)
        soundfile.write(source / f"show{number}.wav", audio, RATE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    output = tmp_path / "out"
    run = subprocess.Popen(
        command(source, output), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not list((output / "done").glob("*.json")):  # a missing folder globs to nothing
        assert time.time() < deadline and run.poll() is None, (
            "the run ended before its first recording was done"
        )
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    done_before = len(list((output / "done").glob("*.json")))
    assert 1 <= done_before < 4
    assert not (output / "manifest.json").exists()

    resumed = subprocess.run(
        command(source, output), cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    summary = json.loads(resumed.stdout[resumed.stdout.index("{") :])
    assert summary["this_run"] == {
        "recordings_processed": 4 - done_before,
        "recordings_already_done": done_before,
    }
    assert not list((output / "shards").glob(".*"))

    clean = tmp_path / "clean"
    subprocess.run(command(source, clean), cwd=ROOT, env=env, capture_output=True, check=True)
    assert clips(output) == clips(clean)
    assert json.loads((output / "manifest.json").read_text())["segments_kept"] == len(clips(clean))
