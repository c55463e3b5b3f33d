"""Evaluator.score against independent references, without Lightning; and scoring what predict
wrote, as README's "Embeddings of a trained model, on disk" does, gives validate's numbers."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from demo_recipes import ROOT
from test_metrics import _pytrec_reference, _random_qrels
from trainers import quiet_cpu_trainer

from callbacks.effective_rank import EffectiveRank
from callbacks.evaluation import Evaluator
from datamodules.eval_sets import EvalSet

DIMS = (8, 32)


def _matryoshka(generator: torch.Generator, rows: int) -> dict[int, torch.Tensor]:
    """Random unit vectors at the largest dim and their normalized prefixes, as a sliced model gives."""
    full = torch.randn(rows, max(DIMS), generator=generator)
    return {dim: torch.nn.functional.normalize(full[:, :dim], dim=-1) for dim in DIMS}


def _rows(prefix: str, count: int) -> list[dict]:
    return [{"id": f"{prefix}{i}", "text": f"{prefix} {i}"} for i in range(count)]


def test_retrieval_scores_agree_with_pytrec_eval_per_dim():
    generator = torch.Generator().manual_seed(3)
    num_queries, num_docs = 40, 200
    qrels = _random_qrels(generator, num_queries, num_docs, graded=True)
    del qrels[num_queries - 1]  # a query without judgments: left out of the means, not counted
    eval_set = EvalSet("random", _rows("q", num_queries), _rows("d", num_docs), qrels)
    queries, corpus = _matryoshka(generator, num_queries), _matryoshka(generator, num_docs)
    # Pull each query towards one relevant document, so the metrics are far from zero.
    for query, docs in qrels.items():
        for dim in DIMS:
            queries[dim][query] = torch.nn.functional.normalize(
                queries[dim][query] + 2 * corpus[dim][next(iter(docs))], dim=-1
            )
    evaluator = Evaluator(ks=(10, 5), query_chunk_size=7, document_chunk_size=33, analyses=[EffectiveRank()])
    scores = evaluator.score(eval_set, queries, corpus)

    for dim in DIMS:
        reference = _pytrec_reference((queries[dim] @ corpus[dim].T).double(), qrels, ks=(5, 10))
        for metric, value in reference.items():
            assert scores[f"{metric}/d{dim}"] == pytest.approx(value, abs=1e-6), (metric, dim)
    assert 0.2 < scores["ndcg@10/d32"] < 0.99
    assert scores["num_queries_evaluated"] == num_queries - 1
    # Then the analyses' numbers on the same embeddings, and nothing the evaluator does not declare.
    analysis = EffectiveRank().analyze(eval_set, {"queries": queries, "corpus": corpus})
    assert {tag: scores[tag] for tag in analysis} == analysis
    assert set(scores) == evaluator.metric_names("retrieval", DIMS)


def test_classification_scores_agree_with_a_direct_computation():
    generator = torch.Generator().manual_seed(5)
    num_queries, num_classes = 90, 4
    classes = _matryoshka(generator, num_classes)
    gold = torch.randint(0, num_classes - 1, (num_queries,), generator=generator)  # class 3: never gold
    noise = _matryoshka(generator, num_queries)
    queries = {dim: classes[dim][gold] + 2.5 * noise[dim] for dim in DIMS}
    queries = {dim: torch.nn.functional.normalize(values, dim=-1) for dim, values in queries.items()}
    qrels = {query: {int(label): 1} for query, label in enumerate(gold)}
    eval_set = EvalSet("intents", _rows("q", num_queries), _rows("c", num_classes), qrels)
    eval_set.kind = "classification"
    evaluator = Evaluator()
    scores = evaluator.score(eval_set, queries, classes)

    truth = gold.numpy()
    for dim in DIMS:
        predicted = (queries[dim] @ classes[dim].T).argmax(dim=1).numpy()
        labels = np.unique(truth)
        hits = np.array([((predicted == c) & (truth == c)).sum() for c in labels])
        recall = hits / np.array([(truth == c).sum() for c in labels])
        precision = hits / np.maximum([(predicted == c).sum() for c in labels], 1)
        f1 = np.where(hits > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
        assert scores[f"accuracy/d{dim}"] == pytest.approx((predicted == truth).mean(), abs=1e-9)
        assert scores[f"macro_recall/d{dim}"] == pytest.approx(recall.mean(), abs=1e-9)
        assert scores[f"macro_f1/d{dim}"] == pytest.approx(f1.mean(), abs=1e-9)
        assert 0.3 < scores[f"accuracy/d{dim}"] < 0.95, scores
    assert scores["num_queries_evaluated"] == num_queries
    assert set(scores) == evaluator.metric_names("classification", DIMS)


def test_embeddings_not_in_the_eval_sets_row_order_are_refused():
    eval_set = EvalSet("small", _rows("q", 3), _rows("d", 5), {0: {1: 1}})
    embeddings = _matryoshka(torch.Generator().manual_seed(0), 4)
    with pytest.raises(ValueError, match="4 queries embeddings at d8 for 3 rows"):
        Evaluator().score(eval_set, embeddings, _matryoshka(torch.Generator(), 5))


@pytest.mark.integration  # a fresh interpreter, to see what it imports
def test_the_evaluation_core_runs_without_lightning():
    """Scoring, analyses, monitor checks, the terminal table and the figures import no Lightning."""
    script = textwrap.dedent(
        """
        import sys
        from types import SimpleNamespace
        import torch
        from callbacks.cost import CostPerDimension
        from callbacks.effective_rank import EffectiveRank
        from callbacks.evaluation import Evaluator
        from callbacks.monitors import unknown_monitor
        from callbacks.score_table import score_table

        eval_set = SimpleNamespace(
            name="demo", kind="retrieval", queries=[{"id": "q"}] * 4, corpus=[{"id": "d"}] * 6,
            qrels={0: {1: 1}, 2: {3: 1}},
        )
        sides = {side: {8: torch.randn(n, 8)} for side, n in (("queries", 4), ("corpus", 6))}
        evaluator = Evaluator(analyses=[EffectiveRank(), CostPerDimension(repeats=1)])
        scores = evaluator.score(eval_set, sides["queries"], sides["corpus"])
        score_table("demo", scores)
        evaluator.figures(eval_set, scores, "demo")
        assert unknown_monitor("val/demo/ndcg@10/d8", evaluator, {"demo": "retrieval"}, [8]) is None
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning"))
        assert not loaded, loaded[:5]
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def _readme_example() -> str:
    """The Python block of README's "Scoring them without a Trainer"."""
    section = (ROOT / "README.md").read_text().split("### Scoring them without a Trainer", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.integration
def test_scoring_what_predict_wrote_gives_validates_numbers(tmp_path, tiny_text_model, corpus_dir):
    """validate's logged numbers, and README's path: predict's files read back and scored with the
    core, for a retrieval set and a classification set, every tag to 1e-6."""
    from callbacks.retrieval import RetrievalEvaluator
    from callbacks.score_table import score_table
    from callbacks.write_embeddings import WriteEmbeddings, read_embeddings
    from datamodules.eval_sets import load_beir_eval_set
    from datamodules.pairs import StreamingPairDataModule
    from lightning_modules import TextOnly
    from lightning_modules.components.text_encoder import TextEncoderConfig

    demo = corpus_dir / "eval" / "demo"
    topics = tmp_path / "topics"  # 5 of the demo documents as class texts, 60 queries in 5 classes
    (topics / "qrels").mkdir(parents=True)
    (topics / "corpus.jsonl").write_text("".join((demo / "corpus.jsonl").read_text().splitlines(True)[:5]))
    (topics / "queries.jsonl").write_text("".join((demo / "queries.jsonl").read_text().splitlines(True)[:60]))
    class_ids = [f"doc-q{i}" for i in range(5)]
    judgments = "".join(f"q{i}\t{class_ids[i % 5]}\t1\n" for i in range(60))
    (topics / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + judgments)

    model = TextOnly(TextEncoderConfig(str(tiny_text_model)), matryoshka_dims=[32, 256])
    data = StreamingPairDataModule(
        str(tiny_text_model),
        eval_sets={"demo": str(demo)},
        classification_sets={"topics": str(topics)},
        eval_batch_size=64,
        max_document_length=48,
    )
    evaluator = RetrievalEvaluator(ks=(5, 10), analyses=[EffectiveRank()])
    output = tmp_path / "embeddings"
    trainer = quiet_cpu_trainer(callbacks=[evaluator, WriteEmbeddings(str(output))])
    trainer.validate(model, data, verbose=False)
    validated = evaluator.last_metrics
    trainer.predict(model, data, return_predictions=False)

    # README's example as written, on this run's files: the table validate printed.
    code = _readme_example().replace("data/demo/corpus/eval/demo", str(demo))
    code = code.replace("runs/demo_text_only/embeddings", str(output))
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(code, namespace)
    assert printed.getvalue() == score_table("demo", evaluator.last_scores["demo"]) + "\n"
    for tag, value in namespace["scores"].items():
        assert value == pytest.approx(validated[f"val/demo/{tag}"], abs=1e-6), tag

    # The same path with the analyses, for both kinds of set: every tag validate logged.
    core = Evaluator(ks=(5, 10), analyses=[EffectiveRank()])
    for name, location, kind in (("demo", demo, "retrieval"), ("topics", topics, "classification")):
        eval_set = load_beir_eval_set(name, str(location))
        eval_set.kind = kind
        eval_set, embeddings = read_embeddings(output, eval_set)
        scores = core.score(eval_set, embeddings["queries"], embeddings["corpus"])
        logged = {tag.removeprefix(f"val/{name}/"): v for tag, v in validated.items() if f"/{name}/" in tag}
        assert set(scores) == set(logged), name
        for tag, value in logged.items():
            assert scores[tag] == pytest.approx(value, abs=1e-6), (name, tag)
        own = {tag: v for tag, v in scores.items() if tag in evaluator.last_scores[name]}
        assert score_table(name, own) == score_table(name, evaluator.last_scores[name])
    assert validated["val/topics/num_queries_evaluated"] == 60
