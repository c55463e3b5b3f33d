"""Curated shards train: long espeak-ng recordings -> curation -> each clip joined with a document
(here the text it speaks, as a transcription and as the document) -> the late-fusion demo recipe
streams them with no skipped row (every clip is 3-30 s, inside the recipe's 0.5-30 s, and has a
document and a transcription, so README's rules predict none)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
from demo_recipes import ROOT
from spoken_recordings import ESPEAK, RATE, build_recording, sentence

from callbacks.training_guards import BatchGuard
from cli import cli_main
from datamodules.curation import CurationConfig, curate
from datamodules.curation.join import join_documents

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(ESPEAK is None, reason="needs espeak-ng (apt install espeak-ng)"),
]
STEPS, BATCH = 6, 8


def test_curated_clips_joined_with_documents_train_late_fusion(demo_dir, tmp_path, capsys):
    rng = np.random.default_rng(5)
    (tmp_path / "raw").mkdir()
    truth = []
    for number in range(2):
        voices = ["en", "fr"] * 8
        texts = [(v, sentence(rng, v, int(rng.integers(10, 25)))) for v in voices]
        audio, utterances = build_recording(rng, texts, list(rng.uniform(1.5, 3.0, len(texts) + 1)), -55)
        soundfile.write(tmp_path / "raw" / f"show{number}.flac", audio, RATE)
        truth += [(f"show{number}.flac", u) for u in utterances]
    manifest = curate(
        CurationConfig(input=str(tmp_path / "raw"), output=str(tmp_path / "curated"), progress=False)
    )
    pairs = []
    for shard in (tmp_path / "curated" / "shards").glob("*.parquet"):
        for clip in pq.read_table(shard, columns=["id", "source", "start", "end"]).to_pylist():
            spoken = [
                u for s, u in truth if s == clip["source"] and u.start < clip["end"] and u.end > clip["start"]
            ]
            pairs.append({"id": clip["id"], "document": spoken[0].text, "query": spoken[0].text})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    joined = join_documents(tmp_path / "curated" / "shards", tmp_path / "pairs.jsonl", tmp_path / "train")
    assert joined == {"rows_in": manifest["segments_kept"], "rows_out": len(pairs), "without_document": 0}

    cli = cli_main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "demo" / "late_fusion.yaml"),
            f"--trainer.max_steps={STEPS}",
            f"--trainer.val_check_interval={STEPS}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            f"--data.init_args.train_data={tmp_path / 'train'}",
            f"--data.init_args.batch_size={BATCH}",
            "--model.init_args.lr_scheduler.init_args.warmup_steps=1",
        ]
    )
    guard = next(c for c in cli.trainer.callbacks if isinstance(c, BatchGuard))
    print(f"{len(pairs)} curated pairs, {STEPS} steps of {BATCH}: {guard.skipped_rows} rows skipped")
    assert cli.trainer.global_step == STEPS
    assert guard.skipped_rows == 0, dict(guard.skips_by_kind)
