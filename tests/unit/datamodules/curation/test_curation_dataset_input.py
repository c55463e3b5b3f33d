"""`--input datasets:NAME`: recordings stored in a `datasets` dataset (here a local parquet dataset
folder, read by the same `load_dataset` call as a hub name) are curated as the same recordings in
a folder are, clip for clip; a row that is not audio is counted and named by its id; a second run
skips them all."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
from spoken_recordings import ESPEAK, RATE, build_recording, sentence

from datamodules.curation import CurationConfig, curate
from errors import ConfigError, InputError

pytestmark = pytest.mark.skipif(ESPEAK is None, reason="needs espeak-ng (apt install espeak-ng)")


def _clips(output) -> list[dict]:
    return sorted(
        (row for shard in (output / "shards").glob("*.parquet") for row in pq.read_table(shard).to_pylist()),
        key=lambda row: row["id"],
    )


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two recordings in a folder, and a dataset holding their bytes (one with its file name, one
    without) and a third row that is not audio."""
    from datasets import Audio, Features, Value

    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("sources")
    folder = root / "folder"
    folder.mkdir()
    for name, count in (("a", 3), ("b", 2)):
        texts = [("en", sentence(rng, "en", int(rng.integers(12, 25)))) for _ in range(count)]
        audio, _ = build_recording(rng, texts, list(rng.uniform(1.5, 3.0, count + 1)), -55)
        soundfile.write(folder / f"{name}.flac", audio, RATE)
    audio = [
        {"bytes": (folder / "a.flac").read_bytes(), "path": "a.flac"},
        {"bytes": (folder / "b.flac").read_bytes(), "path": None},  # its format read from the bytes
        {"bytes": b"RIFF but not audio", "path": None},
    ]
    # Written with pyarrow, typed as a hub dataset's Audio column (datasets' own encoder needs torchcodec).
    features = Features({"name": Value("string"), "audio": Audio()})
    table = pa.table(
        {
            "name": ["a", "b", "broken"],
            "audio": pa.array(audio, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        }
    )
    metadata = {"huggingface": json.dumps({"info": {"features": features.to_dict()}})}
    (root / "dataset").mkdir()
    pq.write_table(table.replace_schema_metadata(metadata), root / "dataset" / "train.parquet")
    return folder, root / "dataset"


def test_a_dataset_is_curated_as_the_same_recordings_in_a_folder(sources, tmp_path):
    folder, dataset = sources
    from_folder = curate(CurationConfig(input=str(folder), output=str(tmp_path / "folder"), progress=False))
    config = CurationConfig(
        input=f"datasets:{dataset}", output=str(tmp_path / "dataset"), input_id_column="name", progress=False
    )
    from_dataset = curate(config)

    clips = _clips(tmp_path / "dataset")
    assert clips and clips == _clips(tmp_path / "folder")  # same sources, cuts, scores and audio bytes
    assert {clip["source"] for clip in clips} == {"a.flac", "b.flac"}
    for key in ("hours_in", "hours_kept", "segments_kept", "segments_dropped"):
        assert from_dataset[key] == from_folder[key]
    assert from_dataset["recordings_skipped"] == {"undecodable": 1}
    assert [entry["source"] for entry in from_dataset["skipped_files"]] == ["broken.audio"]

    again = curate(config)
    assert again["this_run"] == {"recordings_processed": 0, "recordings_already_done": 3}
    assert _clips(tmp_path / "dataset") == clips


def test_a_missing_column_or_a_repeated_id_is_named(sources, tmp_path):
    from datasets import Dataset

    _, dataset = sources
    common = {"input": f"datasets:{dataset}", "output": str(tmp_path / "out"), "progress": False}
    with pytest.raises(ConfigError, match=r"curation.input_audio_column='speech': .* no such column"):
        curate(CurationConfig(**common, input_audio_column="speech"))
    with pytest.raises(ConfigError, match=r"curation.input_id_column='speaker': .* no such column"):
        curate(CurationConfig(**common, input_id_column="speaker"))
    twice = tmp_path / "twice"
    twice.mkdir()
    cells = [{"bytes": b"x", "path": None}] * 2
    Dataset.from_dict({"name": ["take 1", "take 1"], "audio": cells}).to_parquet(str(twice / "train.parquet"))
    common["input"] = f"datasets:{twice}"
    with pytest.raises(InputError, match=r"rows 0 and 1 both name their recording 'take_1'"):
        curate(CurationConfig(**common, input_id_column="name"))
    with pytest.raises(InputError, match=r"could not be opened .* curation.input_split \(now 'dev'\)"):
        curate(CurationConfig(**common, input_split="dev"))


def test_an_already_decoded_cell_is_written_without_loss():
    """A cell some pipeline decoded upstream ({array, sampling_rate}) is written as a float wav."""
    from datamodules.curation.dataset_input import _recording_bytes

    samples = np.random.default_rng(0).uniform(-1, 1, 8000).astype(np.float32)
    data, suffix = _recording_bytes({"array": samples, "sampling_rate": 8000}, "decoded")
    written, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert suffix == ".wav" and rate == 8000
    np.testing.assert_array_equal(written, samples)
