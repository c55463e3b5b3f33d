"""configs/pipelined.yaml with tiny stand-in recognizers of both kinds (CTC and Whisper) and a tiny
text stage: validate logs nDCG per dim and the CER/WER of the transcripts, predict writes them."""

from __future__ import annotations

import json

import pytest
from asr_models import edit_distance, save_tiny_wav2vec2_ctc, save_tiny_whisper
from demo_recipes import ROOT

from cli import cli_main


def recipe_args(asr, text_model, speech_corpus, root, generation=None) -> list[str]:
    args = [
        "--config",
        str(ROOT / "configs" / "pipelined.yaml"),
        f"--model.init_args.text_encoder.pretrained_model_name_or_path={text_model}",
        f"--model.init_args.asr.pretrained_model_name_or_path={asr}",
        f"--model.init_args.document_cache={root / 'cache'}",
        f"--data.init_args.eval_sets={{demo: {speech_corpus / 'eval' / 'demo'}}}",
        "--data.init_args.num_workers=0",
        f"--trainer.default_root_dir={root / 'run'}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32-true",
        "--trainer.enable_progress_bar=false",
    ]
    return args + ([f"--model.init_args.asr.generation={json.dumps(generation)}"] if generation else [])


@pytest.mark.parametrize("kind", ["ctc", "seq2seq"])
def test_the_real_recipe_validates_with_a_tiny_recognizer(
    kind, wide_tiny_text_model, speech_corpus_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    if kind == "ctc":
        asr, generation = save_tiny_wav2vec2_ctc(tmp_path / "asr"), None
    else:
        asr, generation = save_tiny_whisper(tmp_path / "asr"), {"num_beams": 1, "max_new_tokens": 6}
    args = recipe_args(asr, wide_tiny_text_model, speech_corpus_dir, tmp_path, generation)
    cli = cli_main(["validate", *args])
    assert cli.model.asr.kind == kind
    metrics = {tag: float(value) for tag, value in cli.trainer.callback_metrics.items()}
    for dim in (128, 256, 512, 1024):
        assert 0.0 <= metrics[f"val/demo/ndcg@10/d{dim}"] <= 1.0
    assert metrics["val/demo/cer"] > 0 and metrics["val/demo/wer"] > 0  # untrained: wrong, but scored

    if kind == "ctc":  # predict writes the transcripts; their CER, recomputed, is the logged one
        cli_main(["predict", *args])
        path = tmp_path / "run" / "transcripts" / "demo.queries.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert (
            len(rows)
            == len(cli.datamodule.eval_sets["demo"].queries)
            == metrics["val/demo/num_queries_transcribed"]
        )
        edits = sum(edit_distance(list(row["transcript"]), list(row["reference"])) for row in rows)
        assert metrics["val/demo/cer"] == pytest.approx(
            edits / sum(len(row["reference"]) for row in rows), abs=1e-5
        )
        assert (tmp_path / "run" / "embeddings" / "demo" / "queries.d1024.npy").exists()
