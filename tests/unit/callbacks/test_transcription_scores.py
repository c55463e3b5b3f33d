"""CER and WER of transcripts against the eval queries' transcriptions, against a direct edit distance."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from asr_models import edit_distance

from callbacks.eval_outputs import TRANSCRIPTS, add_eval_output, assemble_transcripts
from callbacks.evaluation import Evaluator, transcription_scores
from datamodules.eval_sets import EvalSet

QUERIES = [
    {"id": "q0", "text": "gajaamoo judu xibee"},
    {"id": "q1", "text": "busep"},
    {"id": "q2"},  # no transcription: left out of CER/WER
    {"id": "q3", "text": "suwaaw teteyaap suwaaw"},
]
HYPOTHESES = ["gajamoo judu xibe", "", "anything", "suwaaw teteyap suwaaw ba"]


def test_cer_and_wer_are_edit_distances_over_reference_lengths():
    eval_set = EvalSet("demo", QUERIES, [{"id": "d0", "text": "x"}], {0: {0: 1}})
    scores = transcription_scores(eval_set, HYPOTHESES)
    pairs = [(h, q["text"]) for h, q in zip(HYPOTHESES, QUERIES, strict=True) if "text" in q]
    cer = sum(edit_distance(list(h), list(r)) for h, r in pairs) / sum(len(r) for _, r in pairs)
    wer = sum(edit_distance(h.split(), r.split()) for h, r in pairs) / sum(len(r.split()) for _, r in pairs)
    assert scores["cer"] == pytest.approx(cer, abs=1e-6)
    assert scores["wer"] == pytest.approx(wer, abs=1e-6)
    assert scores["num_queries_transcribed"] == 3
    assert transcription_scores(eval_set, [q.get("text", "") for q in QUERIES])["cer"] == 0.0


def test_evaluator_adds_them_beside_the_retrieval_metrics():
    eval_set = EvalSet(
        "demo", QUERIES, [{"id": f"d{i}", "text": "x"} for i in range(4)], {0: {1: 1}, 3: {0: 1}}
    )
    torch.manual_seed(0)
    queries, corpus = {8: torch.randn(4, 8)}, {8: torch.randn(4, 8)}
    plain = Evaluator(ks=(1,)).score(eval_set, queries, corpus)
    scores = Evaluator(ks=(1,)).score(eval_set, queries, corpus, transcripts=HYPOTHESES)
    assert scores == plain | transcription_scores(eval_set, HYPOTHESES)
    assert "cer" not in plain


def test_transcripts_of_eval_batches_go_back_to_their_rows():
    chunks = defaultdict(list)
    add_eval_output(
        chunks,
        {"eval_set": "demo", "side": "queries", "index": torch.tensor([3, 1]), TRANSCRIPTS: ["d", "b"]},
    )
    assert assemble_transcripts(chunks[("demo", TRANSCRIPTS)], 4) is None  # rows 0 and 2 never came
    add_eval_output(
        chunks,
        {"eval_set": "demo", "side": "queries", "index": torch.tensor([0, 2]), TRANSCRIPTS: ["a", "c"]},
    )
    assert assemble_transcripts(chunks[("demo", TRANSCRIPTS)], 4) == ["a", "b", "c", "d"]
    assert ("demo", "queries") not in chunks  # no embeddings in these outputs: nothing filed as a side
