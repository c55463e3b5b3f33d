"""Every YAML in configs/ parses and instantiates (real recipes with tiny stand-ins, no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from callbacks.exit_grid import exit_layers, exit_view
from callbacks.monitors import automatic_monitor
from callbacks.retrieval import RetrievalEvaluator
from cli import cli_main
from lightning_modules import AsrCtc, Pipelined, UnitFusion
from lightning_modules.base import MatryoshkaEmbedder
from lightning_modules.pipelined import text_query_builder

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(
    p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "trainer"
)
# Trainer overlays (configs/trainer/) are not recipes: they are composed after one.
TRAINER_OVERLAYS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs" / "trainer").glob("*.yaml"))


def _stand_ins(
    config: Path,
    wide_model: Path,
    corpus: Path,
    speech_model: Path,
    speech_corpus: Path,
    asr_model: Path | None = None,
    deep_wide_model: Path | None = None,
) -> list[str]:
    """Overrides that swap hub models and data for local tiny ones; demo configs need none."""
    if config.parts[1] == "demo":
        return []
    recipe = (ROOT / config).read_text()
    if "matryoshka_layers:" in recipe:  # exits need depth: 28 narrow layers
        wide_model = deep_wide_model
    if "lightning_modules.AsrCtc" in recipe:  # a speech model to train, no text model
        args = [f"--model.init_args.speech_model={speech_model}", f"--data.init_args.tokenizer={wide_model}"]
    else:
        args = [f"--model.init_args.text_encoder.pretrained_model_name_or_path={wide_model}"]
    if "speech_encoder:" in recipe:
        args.append(f"--model.init_args.speech_encoder.pretrained_model_name_or_path={speech_model}")
    if "asr:" in recipe:
        args.append(f"--model.init_args.asr.pretrained_model_name_or_path={asr_model}")
    if "units:" in recipe:  # 64 units fit in seconds; the recipe's 1024 take 20 s of k-means, same code
        args.append("--model.init_args.units.size=64")
    if "audio:" in recipe:  # spoken queries: the demo's speech corpus
        args.append("--data.init_args.audio.min_duration=0.5")  # the demo's clips are 1-3 s
        train, eval_set = speech_corpus / "train", speech_corpus / "eval" / "demo"
    else:
        train, eval_set = corpus / "train.jsonl", corpus / "eval" / "demo"
    return args + [f"--data.init_args.train_data={train}", f"--data.init_args.eval_sets={{demo: {eval_set}}}"]


class _UniqueKeys(yaml.SafeLoader):
    """A YAML loader that refuses a key written twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        duplicated = sorted({key for key in keys if keys.count(key) > 1}, key=str)
        assert not duplicated, f"keys written twice: {duplicated} (line {node.start_mark.line + 1})"
        return super().construct_mapping(node, deep)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_no_key_is_written_twice(config):
    yaml.load((ROOT / config).read_text(), Loader=_UniqueKeys)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_config_instantiates(
    config,
    wide_tiny_text_model,
    deep_wide_tiny_text_model,
    corpus_dir,
    tiny_speech_model,
    speech_corpus_dir,
    tiny_ctc_asr,
    tmp_path,
    monkeypatch,
):
    monkeypatch.chdir(ROOT)
    models = (wide_tiny_text_model, corpus_dir, tiny_speech_model, speech_corpus_dir)
    stand_ins = _stand_ins(config, *models, asr_model=tiny_ctc_asr, deep_wide_model=deep_wide_tiny_text_model)
    args = ["--config", str(config), *stand_ins]
    args += [f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu"]
    # Batches read in this process: a worker pool left half-read (one batch taken, the workers
    # still filling their shuffle buffers) is shut down when garbage-collected, each worker joined
    # with torch's 5 s timeout, 5-11 s of waiting per recipe paid by whichever later test collects it.
    args.append("--data.init_args.num_workers=0")
    cli = cli_main(args, run=False)
    if isinstance(cli.model, AsrCtc):
        _check_asr_recipe(cli, tmp_path)
        return
    assert isinstance(cli.model, MatryoshkaEmbedder)
    assert cli.model.matryoshka_dims == sorted(cli.model.matryoshka_dims)
    _assert_run_callbacks(cli.trainer, tmp_path)
    evaluation_only = isinstance(cli.model, Pipelined)  # no training data: validate, test, predict
    cli.datamodule.setup("validate" if evaluation_only else "fit")
    assert cli.datamodule.eval_sets, "every recipe evaluates on at least one eval set"
    # `best_checkpoint.monitor: auto` stands for the first eval set's nDCG@10 at the largest dim:
    # val/demo/ndcg@10/d256 in the demos, the tag they named before it was the default.
    (evaluator,) = [c for c in cli.trainer.callbacks if isinstance(c, RetrievalEvaluator)]
    kinds = {name: eval_set.kind for name, eval_set in cli.datamodule.eval_sets.items()}
    monitor = automatic_monitor(evaluator.evaluator, kinds, cli.model.matryoshka_dims)
    assert monitor == f"val/demo/ndcg@10/d{max(cli.model.matryoshka_dims)}"
    if isinstance(cli.model, UnitFusion):  # its tokens come from a codebook fitted on training audio
        cli.model.fit_codebook(cli.datamodule)
    if evaluation_only:  # its transcripts are formatted as the data's text queries; eval queries come first
        cli.model.text_queries = text_query_builder(cli.datamodule)
        batch = next(iter(cli.datamodule.val_dataloader()))
        assert batch["side"] == "queries"
    else:
        batch = next(iter(cli.datamodule.train_dataloader()))
    embeddings = cli.model.embed_queries(batch)
    assert sorted(exit_view(embeddings, None)) == cli.model.matryoshka_dims
    # Recipes with nested layers embed at every listed exit from the one pass, each at every dim.
    exits = getattr(cli.model, "matryoshka_layers", [])[:-1]
    assert exit_layers(embeddings) == exits
    assert set(embeddings) == {*cli.model.matryoshka_dims} | {
        (layer, dim) for layer in exits for dim in cli.model.matryoshka_dims
    }


def _check_asr_recipe(cli, root: Path) -> None:
    """A CTC recipe: the run callbacks (its best checkpoint: the lowest CER), its characters from
    the training transcriptions, a finite loss on a training batch."""
    import torch

    from lightning_modules.asr_ctc import character_vocabulary

    best = cli.trainer.checkpoint_callback
    assert best.monitor in ("auto", "val/demo/cer")  # auto: the first eval set's CER
    _assert_run_callbacks(cli.trainer, root, monitor=(best.monitor, "min"))
    cli.datamodule.setup("fit")
    cli.trainer.datamodule = cli.datamodule
    (evaluator,) = [c for c in cli.trainer.callbacks if isinstance(c, RetrievalEvaluator)]
    evaluator.setup(cli.trainer, cli.model, "fit")
    assert best.monitor == "val/demo/cer"
    cli.model._build(character_vocabulary(cli.datamodule.training_transcriptions()))
    assert cli.model.hparams.vocabulary == list("abdegijkmnopstuwxy")
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert all(batch["transcriptions"])
    assert torch.isfinite(cli.model.training_loss(batch))


def _assert_run_callbacks(trainer, root: Path, monitor: tuple[str, str] = ("auto", "max")) -> None:
    """What cli.py gives every recipe: one of each run callback, best checkpoint first, every
    folder under trainer.default_root_dir, and the TensorBoard logger there too."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from callbacks.preemption import PreemptionCheckpoint
    from callbacks.retrieval import RetrievalEvaluator
    from callbacks.write_embeddings import WriteEmbeddings

    def of_type(cls):
        return [c for c in trainer.callbacks if isinstance(c, cls)]

    (evaluator,) = of_type(RetrievalEvaluator)
    assert len(evaluator.analyses) == 2
    (writer,) = of_type(WriteEmbeddings)
    assert writer.dirpath == root / "embeddings"
    (preemption,) = of_type(PreemptionCheckpoint)
    best, last = of_type(ModelCheckpoint)
    # ExportTextEncoder exports trainer.checkpoint_callback as "best"; preemption writes beside it.
    assert trainer.checkpoint_callback is best
    assert (best.monitor, best.mode) == monitor and best.filename == "best-{step}"
    assert last.monitor is None and last.filename == "last" and not last._enable_version_counter
    assert Path(best.dirpath) == Path(last.dirpath) == root / "checkpoints"
    assert preemption.checkpoint_path(trainer) == root / "checkpoints" / "last-preempted.ckpt"
    (logger,) = trainer.loggers
    assert isinstance(logger, TensorBoardLogger)
    assert Path(logger.save_dir) == root and logger.name == "tensorboard"


@pytest.mark.parametrize("overlay", TRAINER_OVERLAYS, ids=str)
def test_trainer_overlay_composes_with_a_recipe(
    overlay, wide_tiny_text_model, corpus_dir, tmp_path, monkeypatch
):
    from lightning.pytorch.strategies import DDPStrategy

    monkeypatch.chdir(ROOT)
    recipe = Path("configs/text_only.yaml")
    args = ["--config", str(recipe), "--config", str(overlay)]
    args += _stand_ins(recipe, wide_tiny_text_model, corpus_dir, Path(), Path())
    # This machine has no GPU: the overlay's accelerator and device count are swapped for CPU ones.
    args += [f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu", "--trainer.devices=1"]
    cli = cli_main(args, run=False)
    assert isinstance(cli.trainer.strategy, DDPStrategy)
    assert cli.trainer.precision == "bf16-mixed"
    assert cli.model.loss.cross_device_negatives


def test_real_late_fusion_recipe_prints_its_config(monkeypatch, capsys):
    """`python cli.py fit --config configs/late_fusion.yaml --print_config` (README): the GPU
    user's recipe prints with the models it expects, before anything is downloaded."""
    import yaml

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", "configs/late_fusion.yaml", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["precision"] == "bf16-mixed"
    model = printed["model"]["init_args"]
    assert model["speech_encoder"]["pretrained_model_name_or_path"] == "facebook/hubert-base-ls960"
    assert model["text_encoder"]["pretrained_model_name_or_path"] == "runs/text_only/text_encoder"
    assert model["matryoshka_dims"] == [128, 256, 512, 1024]


def test_print_config_shows_the_defaults_every_recipe_gets(demo_dir, monkeypatch, capsys, tmp_path):
    """`fit --config configs/demo/late_fusion.yaml --print_config`: the logger and run callbacks
    that cli.py adds are printed with the recipe, their folders resolved under default_root_dir."""
    import yaml

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", "configs/demo/late_fusion.yaml", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["default_root_dir"] == "runs/demo_late_fusion"
    logger = printed["trainer"]["logger"]
    assert logger["class_path"] == "lightning.pytorch.loggers.TensorBoardLogger"
    assert logger["init_args"]["save_dir"] == "runs/demo_late_fusion"
    assert logger["init_args"]["name"] == "tensorboard"
    analyses = [a["class_path"] for a in printed["evaluator"]["analyses"]]
    assert analyses == ["callbacks.effective_rank.EffectiveRank", "callbacks.cost.CostPerDimension"]
    assert printed["write_embeddings"]["dirpath"] == "runs/demo_late_fusion/embeddings"
    assert "signals" in printed["preemption"]
    best, last = printed["best_checkpoint"], printed["last_checkpoint"]
    assert best["monitor"] == "auto" and best["mode"] == "max"
    assert best["dirpath"] == last["dirpath"] == "runs/demo_late_fusion/checkpoints"
    assert best["filename"] == "best-{step}" and last["filename"] == "last"
    assert last["enable_version_counter"] is False

    # A run folder given on the command line moves every folder with it.
    with pytest.raises(SystemExit):
        cli_main(
            [
                "fit",
                "--config",
                "configs/demo/late_fusion.yaml",
                f"--trainer.default_root_dir={tmp_path}",
                "--best_checkpoint.monitor=val/demo/recall@10/d128",
                "--print_config",
            ]
        )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["logger"]["init_args"]["save_dir"] == str(tmp_path)
    assert printed["last_checkpoint"]["dirpath"] == f"{tmp_path}/checkpoints"
    assert printed["write_embeddings"]["dirpath"] == f"{tmp_path}/embeddings"
    assert printed["best_checkpoint"]["monitor"] == "val/demo/recall@10/d128"
