"""The demo late-fusion run's TensorBoard log holds every dashboard piece, from one encoding pass."""

from __future__ import annotations

import pytest
from demo_recipes import ROOT

from callbacks.retrieval import RetrievalEvaluator
from cli import cli_main
from lightning_modules import LateFusion

DIMS = (32, 64, 128, 256)


def _events(run_dir):
    """The run's scalars and images, plus every raw summary tag and plugin name in its event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (main_file,) = run_dir.glob("tensorboard/version_*/events.out.tfevents.*")
    accumulator = EventAccumulator(str(main_file), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    raw_tags, plugins = set(), set()
    for path in run_dir.glob("tensorboard/version_*/**/events.out.tfevents.*"):  # hparams write their own
        for event in EventFileLoader(str(path)).Load():
            raw_tags |= {value.tag for value in event.summary.value}
            plugins |= {value.metadata.plugin_data.plugin_name for value in event.summary.value}
    return accumulator, raw_tags, plugins


@pytest.fixture(scope="module")
def demo_run(demo_dir, tmp_path_factory):
    """The demo late-fusion recipe, 2 steps, counting what validation encodes."""
    encoded = {"queries": 0, "documents": 0}
    original = {name: getattr(LateFusion, name) for name in ("embed_queries", "embed_documents")}

    def counting(name, side):
        def embed(self, batch):
            if self.trainer.validating or self.trainer.sanity_checking:
                encoded[side] += len(batch["ids"])
            return original[name](self, batch)

        return embed

    run_dir = tmp_path_factory.mktemp("dashboards")
    patch = pytest.MonkeyPatch()
    patch.chdir(ROOT)
    patch.setattr(LateFusion, "embed_queries", counting("embed_queries", "queries"))
    patch.setattr(LateFusion, "embed_documents", counting("embed_documents", "documents"))
    try:
        cli = cli_main(
            [
                "fit",
                "--config=configs/demo/late_fusion.yaml",
                f"--trainer.default_root_dir={run_dir}",
                "--trainer.max_steps=2",
                "--trainer.val_check_interval=2",
                "--trainer.enable_progress_bar=false",
                "--model.init_args.lr_scheduler.init_args.warmup_steps=1",
                "--data.init_args.batch_size=8",
            ]
        )
    finally:
        patch.undo()
    return cli, run_dir, encoded


def test_validation_encodes_each_eval_set_exactly_once(demo_run):
    cli, _, encoded = demo_run
    eval_sets = cli.datamodule.eval_sets.values()
    (evaluator,) = [c for c in cli.trainer.callbacks if isinstance(c, RetrievalEvaluator)]
    assert len(evaluator.analyses) == 2  # effective rank and cost ran on the same pass
    assert encoded["queries"] == sum(len(s.queries) for s in eval_sets)  # one validation, one pass
    assert encoded["documents"] == sum(len(s.corpus) for s in eval_sets)


def test_tensorboard_holds_every_dashboard_piece(demo_run):
    _, run_dir, _ = demo_run
    accumulator, raw_tags, plugin_tags = _events(run_dir)
    scalars = set(accumulator.Tags()["scalars"])
    for dim in DIMS:
        assert f"val/demo/ndcg@10/d{dim}" in scalars
        for side in ("queries", "documents"):
            for stat in ("entropy_rank", "components@90", "fraction@95", "components@99"):
                assert f"val/demo/{side}_{stat}/d{dim}" in scalars
        for cost in ("index_bytes_float32", "index_bytes_float16", "query_ms_float32", "query_ms_float16"):
            assert f"val/demo/{cost}/d{dim}" in scalars
        for task in ("keywords", "intents"):
            for metric in ("accuracy", "macro_recall", "macro_f1"):
                assert f"val/{task}/{metric}/d{dim}" in scalars
    assert "val/demo/queries_samples" in scalars and "val/demo/documents_samples" in scalars
    assert "custom_scalars__config__" in raw_tags
    images = set(accumulator.Tags()["images"])
    expected_images = {"val/demo/metrics_vs_dim", "val/demo/energy_curves"}
    expected_images |= {"val/keywords/metrics_vs_dim", "val/intents/metrics_vs_dim"}
    assert expected_images <= images
    assert "hparams" in plugin_tags


def test_custom_scalars_layout_puts_every_dim_of_a_metric_on_one_chart():
    import re

    from callbacks.dashboards import custom_scalars_layout

    tags = [f"val/demo/ndcg@10/d{d}" for d in DIMS] + ["val/demo/queries_samples", "val/kw/accuracy/d32"]
    layout = custom_scalars_layout(tags)
    assert set(layout) == {"val/demo", "val/kw"}
    kind, (pattern,) = layout["val/demo"]["ndcg@10"]
    assert kind == "Multiline"
    assert all(re.fullmatch(pattern, f"val/demo/ndcg@10/d{d}") for d in DIMS)
    assert not re.fullmatch(pattern, "val/demo/ndcg@100/d32")


def test_cost_per_dimension_prices_the_index_and_times_the_search():
    import torch

    from callbacks.cost import CostPerDimension

    embeddings = {
        "queries": {d: torch.randn(30, d) for d in (8, 64)},
        "corpus": {d: torch.randn(500, d) for d in (8, 64)},
    }
    costs = CostPerDimension(repeats=2).analyze(None, embeddings)
    for dim in (8, 64):
        assert costs[f"index_bytes_float32/d{dim}"] == 500 * dim * 4
        assert costs[f"index_bytes_float16/d{dim}"] == 500 * dim * 2
        assert costs[f"query_ms_float32/d{dim}"] > 0 and costs[f"query_ms_float16/d{dim}"] > 0
