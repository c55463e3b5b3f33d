"""Command line: ``python cli.py {fit,validate,test,predict} --config configs/...yaml``."""

from __future__ import annotations

import logging
import sys

import torch.distributed
from jsonargparse import DefaultHelpFormatter, set_parsing_settings
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.checkpoint_files import require_whole, resolve_checkpoint
from callbacks.few_shot_evaluation import FewShotClassification
from callbacks.preemption import PreemptionCheckpoint
from callbacks.prompt_matrix import PromptTaskMatrix
from callbacks.retrieval import RetrievalEvaluator
from callbacks.tensorboard_run import continue_tensorboard_run, discard_refused_run
from callbacks.write_embeddings import WriteEmbeddings
from datamodules.demo.assets import register_resolver
from datamodules.pairs import StreamingPairDataModule
from errors import ConfigError, InputError
from lightning_modules.components.unknown_keys import unknown_key_message

# Printed after `python cli.py fit --help`, which lists --data and --model as one option each.
KEYS_EPILOG = """\
Every data and model option, with its meaning and default:
  python cli.py {subcommand} --data.help datamodules.StreamingPairDataModule
  python cli.py {subcommand} --model.help lightning_modules.LateFusion  (or TextOnly, DualEncoder)
  python cli.py {subcommand} --data.help datamodules.StreamingPairDataModule --data.prompts.help  (or .audio)
They print --data.KEY and --model.KEY; recipes and the README write --data.init_args.KEY and
--model.init_args.KEY. Both forms work: --data.batch_size=32 is --data.init_args.batch_size=32.
A recipe's every value, the keys cli.py adds included:
  python cli.py {subcommand} --config configs/demo/late_fusion.yaml --print_config
"""


class _HelpFormatter(DefaultHelpFormatter):
    # Keeps the epilog's lines (argparse would join its commands into one paragraph).
    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class EmbeddingArgumentParser(LightningArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        # A misspelt key: one line with the nearest valid keys, instead of ~50 lines of usage.
        # Only where the parse ends: a nested parser's error is one union branch's, caught above.
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        keys = [action.dest for action in parser._actions if action.dest not in ("help", "config")]
        explained = unknown_key_message(message, keys)
        if explained is not None and "by its index" in explained and "monitor" in explained:
            explained += " The best checkpoint's metric has its own key: --best_checkpoint.monitor=..."
        if explained is not None:
            raise ConfigError(explained) from ex
        super().error(message, ex)


# The callbacks every run has, each under its own top-level key (`--best_checkpoint.monitor=...`),
# in this order: the first ModelCheckpoint is Lightning's `trainer.checkpoint_callback`, which
# ExportTextEncoder exports as "best" and PreemptionCheckpoint writes beside.
RUN_CALLBACKS = {
    "evaluator": RetrievalEvaluator,
    "write_embeddings": WriteEmbeddings,
    "preemption": PreemptionCheckpoint,
    "best_checkpoint": ModelCheckpoint,
    "last_checkpoint": ModelCheckpoint,
    # Off unless configured; after validate / test: `--few_shot.shots=[0,1,2,4,8,16]`,
    # `--prompt_matrix.tasks=all`.
    "few_shot": FewShotClassification,
    "prompt_matrix": PromptTaskMatrix,
}

# Their arguments and the logger's, as defaults a recipe or the command line overrides. ${...} is
# resolved after every --config and override is merged, so every folder follows
# trainer.default_root_dir, and --print_config shows the resolved paths. The interpolations are
# relative to the key's own section (`..` = one section up), as jsonargparse rewrites a config
# file's: the whole config sits under the subcommand's key (fit.trainer...) when they resolve.
RUN_DEFAULTS = {
    "trainer.logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {
            "save_dir": "${...default_root_dir}",
            "name": "tensorboard",
            "default_hp_metric": False,
        },
    },
    # Analyses of the same embeddings (no second encoding): effective rank per dim for queries
    # and documents, and index size / search latency per dim (float32, float16).
    "evaluator.analyses": [
        {"class_path": "callbacks.effective_rank.EffectiveRank"},
        {"class_path": "callbacks.cost.CostPerDimension"},
    ],
    # `predict`: the eval sets' embeddings, one .npy per side and dim, with their ids.
    "write_embeddings.dirpath": "${..trainer.default_root_dir}/embeddings",
    # The best model by best_checkpoint.monitor (every logged metric is higher-better). `auto`: the
    # first eval set's nDCG@10 at the largest dim (val/<first eval set>/ndcg@10/d<largest dim>),
    # chosen at fit start from data.eval_sets and model.matryoshka_dims (callbacks/monitors.py);
    # a tag names another (`--best_checkpoint.monitor=val/fr2en/recall@10/d256`), checked then.
    "best_checkpoint.monitor": "auto",
    "best_checkpoint.dirpath": "${..trainer.default_root_dir}/checkpoints",
    "best_checkpoint.filename": "best-{step}",
    "best_checkpoint.mode": "max",
    # The newest state after every validation, for `fit --ckpt_path last` (Lightning's own
    # save_last writes only when the monitored metric improved). PreemptionCheckpoint writes
    # last-preempted.ckpt in the same folder (the first ModelCheckpoint's), found by the same glob.
    "last_checkpoint.dirpath": "${..trainer.default_root_dir}/checkpoints",
    "last_checkpoint.filename": "last",
    "last_checkpoint.enable_version_counter": False,
}


SUBCOMMANDS = ("fit", "validate", "test", "predict")


class EmbeddingCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # One recipe names its text model once: the datamodule tokenizes with that model's tokenizer.
        parser.link_arguments(
            "model.init_args.text_encoder.pretrained_model_name_or_path", "data.init_args.tokenizer"
        )
        for key, callback in RUN_CALLBACKS.items():
            parser.add_lightning_class_args(callback, key)
        parser.set_defaults(RUN_DEFAULTS)

    # LightningCLI runs `self.<subcommand>` when it exists: each resolves --ckpt_path last first,
    # to the newest checkpoint that loads (a named file was checked in _parse_ckpt_path).
    # A command refused at start (a bad monitor, missing data) leaves no TensorBoard folder behind.
    def fit(self, **kwargs) -> None:
        kwargs = self._with_checkpoint(kwargs)
        # A resumed fit logs on in its run's TensorBoard folder, which the loggers open before
        # Lightning reads the checkpoint.
        continue_tensorboard_run(self.trainer, kwargs["ckpt_path"])
        with discard_refused_run(self.trainer, trains=True):
            self.trainer.fit(**kwargs)

    def validate(self, **kwargs) -> None:
        with discard_refused_run(self.trainer, trains=False):
            self.trainer.validate(**self._with_checkpoint(kwargs))

    def test(self, **kwargs) -> None:
        with discard_refused_run(self.trainer, trains=False):
            self.trainer.test(**self._with_checkpoint(kwargs))

    def predict(self, **kwargs) -> None:
        with discard_refused_run(self.trainer, trains=False):
            self.trainer.predict(**self._with_checkpoint(kwargs))

    def _with_checkpoint(self, kwargs: dict) -> dict:
        if kwargs.get("ckpt_path") != "last":
            return kwargs
        return {**kwargs, "ckpt_path": resolve_checkpoint(self.trainer, "last")}

    def _parse_ckpt_path(self) -> None:
        # LightningCLI unpickles a named checkpoint's hyperparameters before anything else runs:
        # a named file is checked once, here (reading it whole), before that.
        subcommand = self.config.get("subcommand")
        if subcommand:
            require_whole(self.config[subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()


def cli_main(args: list[str] | None = None, run: bool = True) -> EmbeddingCLI:
    """Entry point; tests call it with an argument list (``run=False`` only instantiates)."""
    register_resolver()
    # Lets a config file write ${trainer.max_steps} from its own root (the subcommand's).
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    return EmbeddingCLI(
        # Any LightningModule: the embedders (MatryoshkaEmbedder) and the ASR the pipelined baseline trains.
        LightningModule,
        StreamingPairDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_class=EmbeddingArgumentParser,
        # 'omegaconf+' resolves ${...} after all --config files and overrides are merged, so a
        # recipe can refer to keys set in a shared base file or on the command line.
        parser_kwargs={
            "parser_mode": "omegaconf+",
            **{name: {"epilog": KEYS_EPILOG.format(subcommand=name)} for name in SUBCOMMANDS},
        },
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def find_input_error(error: BaseException) -> InputError | None:
    """The InputError behind an exception (jsonargparse wraps errors raised while instantiating)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, InputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


# The project's own packages: their INFO messages are meant for the user (eval set sizes, the
# document cache's fill, where embeddings were written, demo assets being built).
PROJECT_LOGGERS = ("callbacks", "datamodules", "lightning_modules")


class _RankPrefix(logging.Filter):
    """Prefixes ``[rank N]`` under DDP, since every rank prints its own lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, distributed = torch.distributed.get_rank(), True
        else:
            # Before the process group starts, a DDP child knows its rank from the launcher's
            # environment (Lightning reads it at import); rank 0 is the launching process.
            rank, distributed = getattr(rank_zero_only, "rank", 0), False
        record.rank = f"[rank {rank}] " if distributed or rank > 0 else ""
        return True


def configure_logging() -> None:
    """Shows the project's INFO messages, and other libraries' warnings, with the logger's name.

    Without a handler Python prints WARNING and above only, so the project's INFO lines never
    reached the terminal. Other libraries stay at WARNING; Lightning and transformers keep their
    own handlers and formats.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(rank)s%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_RankPrefix())
    logging.basicConfig(handlers=[handler])
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


def main() -> None:
    configure_logging()
    try:
        cli_main()
    except Exception as error:
        input_error = find_input_error(error)
        if input_error is None:
            raise
        # The message names the key or row and the fix; a traceback from deep inside adds nothing.
        sys.exit(f"error: {input_error}")


if __name__ == "__main__":
    main()
