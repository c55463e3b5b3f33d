"""Evaluation at every validation/test: collects the eval embeddings, gathers them, logs the scores.

The LightningModule's ``validation_step`` embeds each eval batch once (every dim from one pass)
and returns the embeddings with their positions; this callback puts them back in row order per
eval set and side, has ``callbacks.evaluation.Evaluator`` score them (metrics per Matryoshka dim,
then every analysis on the same embeddings, so nothing is encoded twice), and logs one scalar
per (eval set, metric, dim), e.g. ``val/demo/ndcg@10/d256``. The assembled embeddings stay
available as ``last_embeddings``.

With a TensorBoard logger it also writes a custom-scalars layout (one chart per eval set and
metric, every dim on it), image summaries each validation (the metrics and costs against the
dim; each analysis's figures) and, at the end of fit, the hyperparameters with the final metrics.

Under DDP each rank encodes its share of every eval set (Lightning's distributed sampler); the
shares are gathered on rank 0, which scores the full set once and broadcasts the numbers, so
every rank logs (and ModelCheckpoint monitors) the same values. ``last_embeddings`` is filled
on rank 0 only.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from callbacks.analysis import EmbeddingAnalysis
from callbacks.dashboards import custom_scalars_layout, write_hparams_summary
from callbacks.eval_outputs import (
    TRANSCRIPTS,
    add_eval_output,
    assemble,
    assemble_transcripts,
    chunks_of_all_ranks,
)
from callbacks.evaluation import TRANSCRIPTION_METRICS, Evaluator, transcription_scores
from callbacks.exit_grid import cheapest_cell, exit_grid, exit_grid_figure, grid_table
from callbacks.lightning_internals import tensorboard_hparams
from callbacks.monitors import AUTO, automatic_monitor, unknown_monitor
from callbacks.score_table import by_metric, headline, score_table
from callbacks.tensorboard_run import tensorboard_loggers
from errors import ConfigError

log = logging.getLogger(__name__)


class RetrievalEvaluator(Callback):
    """Logs ``{stage}/{eval_set}/{metric}@{k}/d{dim}`` for every eval set of the datamodule."""

    def __init__(
        self,
        ks: Sequence[int] = (5, 10),
        query_chunk_size: int = 1024,
        document_chunk_size: int = 16384,
        analyses: list[EmbeddingAnalysis] | None = None,
        dashboards: bool = True,
        keep_share: float = 0.9,
    ):
        """
        Args:
            ks: Cut-offs of nDCG, Recall and MRR.
            query_chunk_size: Queries scored at once (memory ~ query_chunk x document_chunk floats).
            document_chunk_size: Documents scored at once.
            analyses: Further analyses of the same embeddings (e.g. callbacks.effective_rank.EffectiveRank,
                callbacks.cost.CostPerDimension).
            dashboards: With a TensorBoard logger: the custom-scalars layout, image summaries, and
                the hyperparameters with the final metrics.
            keep_share: With early exits (model.matryoshka_layers), the log names the cheapest
                (exit, dim) cell keeping this share of the best cell's headline score.
        """
        if not 0 < keep_share <= 1:
            raise ConfigError(f"RetrievalEvaluator.keep_share must be in (0, 1], got {keep_share}.")
        self.keep_share = keep_share
        self.evaluator = Evaluator(ks, query_chunk_size, document_chunk_size, analyses)
        self.dashboards = dashboards
        self._chunks: dict[tuple[str, str], list] = defaultdict(list)
        self._layout_written = False
        self.last_embeddings: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
        self.last_metrics: dict[str, float] = {}
        # Per eval set, its own metrics (not the analyses'), for the terminal summary.
        self.last_scores: dict[str, dict[str, float]] = {}
        # Per eval set, CER and WER of a model that transcribes its queries.
        self.last_transcription_scores: dict[str, dict[str, float]] = {}

    @property
    def ks(self) -> tuple[int, ...]:
        return self.evaluator.ks

    @property
    def analyses(self) -> list[EmbeddingAnalysis]:
        return self.evaluator.analyses

    # ----- the monitor at setup, checks at the start of fit -----------------------------------
    @staticmethod
    def _watchers(trainer: Trainer) -> list[ModelCheckpoint | EarlyStopping]:
        return [c for c in trainer.callbacks if isinstance(c, (ModelCheckpoint, EarlyStopping)) and c.monitor]

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # `monitor: auto` becomes the run's own tag once the datamodule has loaded its eval sets,
        # before a resumed fit restores the checkpoints' state (keyed by their monitor).
        automatic = [c for c in self._watchers(trainer) if c.monitor == AUTO]
        if not automatic:
            return
        eval_sets = getattr(trainer.datamodule, "eval_sets", None) or {}
        kinds = {name: eval_set.kind for name, eval_set in eval_sets.items()}
        dims = getattr(pl_module, "matryoshka_dims", None)
        monitor = automatic_monitor(self.evaluator, kinds, dims or [])
        if dims is None and kinds and hasattr(pl_module, "transcribe"):  # a speech recognizer
            monitor = f"val/{next(iter(kinds))}/cer"  # lower is better: its recipe sets mode: min
        for callback in automatic:
            callback.monitor = monitor
        if monitor is not None and stage == "fit":
            log.info(
                "%s.monitor: auto = %s (the first eval set, the largest dim; "
                "--best_checkpoint.monitor=val/<eval set>/<metric>/d<dim> names another)",
                type(automatic[0]).__name__,
                monitor,
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        data = trainer.datamodule
        eval_sets = getattr(data, "eval_sets", None)
        if eval_sets is None:
            return
        if not eval_sets:
            if trainer.checkpoint_callbacks and trainer.check_val_every_n_epoch is None:
                log.warning(
                    "No eval sets (data.eval_sets): no validation runs, so the ModelCheckpoints, which "
                    "save after a validation (check_val_every_n_epoch: null, as in the recipes), write "
                    "nothing (a preemption checkpoint still is)."
                )
            return
        watchers = self._watchers(trainer)
        dims = list(getattr(pl_module, "matryoshka_dims", []))
        exits = list(getattr(pl_module, "matryoshka_layers", []))[:-1]  # the last is the full depth
        transcribes = hasattr(pl_module, "transcribe")
        for callback in watchers:
            problem = self.unknown_monitor(callback.monitor, eval_sets, dims, transcribes, exits)
            if problem:
                raise ConfigError(f"{type(callback).__name__}.monitor={callback.monitor!r}: {problem}")
        selecting = [c.monitor for c in watchers if c.monitor.startswith("val/")]
        if selecting and getattr(data, "selects_on_the_test_split", False):
            log.warning(
                "%s is scored on the qrels split that `test` reports (data.eval_split=%r): a checkpoint "
                "selected on it overstates its test scores. Set data.val_split to a dev split "
                "(qrels/dev.tsv), or data.val_split=%r to say this is intended.",
                selecting[0],
                data.hparams.eval_split,
                data.hparams.eval_split,
            )

    def unknown_monitor(
        self,
        monitor: str,
        eval_sets: dict,
        dims: Sequence[int],
        transcribes: bool = False,
        exits: Sequence[int] = (),
    ) -> str | None:
        """Why ``monitor`` (``val/<eval set>/<metric>/d<dim>``, ``.../L<layer>/d<dim>`` at one of
        the model's early ``exits``, or ``val/<eval set>/cer`` of a model that transcribes) will
        never be logged, or None."""
        kinds = {name: eval_set.kind for name, eval_set in eval_sets.items()}
        parts = monitor.split("/")
        if len(parts) == 3 and parts[0] == "val" and parts[2] in TRANSCRIPTION_METRICS and parts[1] in kinds:
            return None if transcribes else "this model writes no transcripts to score."
        return unknown_monitor(monitor, self.evaluator, kinds, dims, exits)

    # ----- collection ---------------------------------------------------------------------
    def _reset(self, *args) -> None:
        self._chunks = defaultdict(list)

    on_validation_epoch_start = _reset
    on_test_epoch_start = _reset

    def _collect(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        add_eval_output(self._chunks, outputs)

    on_validation_batch_end = _collect
    on_test_batch_end = _collect

    # ----- scoring and logging --------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluate(trainer, pl_module, "test")

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.last_embeddings, self.last_metrics, self.last_scores = {}, {}, {}
        self.last_transcription_scores = {}
        chunks = chunks_of_all_ranks(trainer, self._chunks)
        if chunks is not None:
            self._score(trainer, chunks, stage)
            self._summarize(trainer, stage)
            if self.dashboards and not self._layout_written and stage == "val":
                self._write_layout(trainer)
        if trainer.world_size > 1:
            self.last_metrics = trainer.strategy.broadcast(self.last_metrics, src=0)
        for tag, value in self.last_metrics.items():
            # Identical on every rank after the broadcast; sync_dist keeps Lightning's DDP check quiet.
            pl_module.log(tag, value, add_dataloader_idx=False, batch_size=1, sync_dist=True)
        self._chunks = defaultdict(list)

    def _score(self, trainer: Trainer, chunks: dict[tuple[str, str], list], stage: str) -> None:
        eval_sets = getattr(trainer.datamodule, "eval_sets", {}) if trainer.datamodule is not None else {}
        # None: a model that embeds nothing (a speech recognizer), scored on its transcripts alone.
        dims = getattr(trainer.lightning_module, "matryoshka_dims", None)
        transcripts = {}
        for name, eval_set in eval_sets.items():
            texts = assemble_transcripts(chunks.get((name, TRANSCRIPTS), []), len(eval_set.queries))
            if texts is not None:
                transcripts[name] = texts
            if dims is None:
                continue
            if not eval_set.queries or not eval_set.corpus:
                side = "queries" if not eval_set.queries else "documents"
                log.warning(
                    "eval set %s has no usable %s (see the warning at setup): no metrics.", name, side
                )
                continue
            queries = assemble(chunks.get((name, "queries"), []), len(eval_set.queries), dims)
            corpus = assemble(chunks.get((name, "corpus"), []), len(eval_set.corpus), dims)
            if queries is None or corpus is None:
                log.warning(
                    "eval set %s was not fully encoded (limit_%s_batches?): no metrics this time.",
                    name,
                    stage,
                )
                continue
            self.last_embeddings[name] = {"queries": queries, "corpus": corpus}
        results = self.evaluator.evaluate(eval_sets, self.last_embeddings, transcripts)
        for name in transcripts.keys() - results.keys():  # transcribed, not embedded
            results[name] = transcription_scores(eval_sets[name], transcripts[name])
        for name, scores in results.items():
            own = self.evaluator.own_metric_names(eval_sets[name].kind, dims or []) - {
                "num_queries_evaluated"
            }
            self.last_scores[name] = {tag: value for tag, value in scores.items() if tag in own}
            self.last_metrics |= {f"{stage}/{name}/{tag}": value for tag, value in scores.items()}
            if name in transcripts:
                self.last_transcription_scores[name] = {
                    m: scores[m] for m in TRANSCRIPTION_METRICS if m in scores
                }
            if self.dashboards and stage == "val" and dims is not None:
                self._write_figures(trainer, eval_sets[name], scores)
            self._report_exit_grid(trainer, eval_sets[name], scores, stage)

    def _summarize(self, trainer: Trainer, stage: str) -> None:
        """The scores in the terminal: a line per eval set while fitting, a table per set otherwise."""
        fitting = trainer.state.fn == "fit"
        for name, scores in self.last_transcription_scores.items():
            numbers = " | ".join(f"{metric} {value:.3f}" for metric, value in scores.items())
            log.info("%s at step %d, %s transcripts: %s", stage, trainer.global_step, name, numbers)
        for name, scores in self.last_scores.items():
            if not scores:
                continue
            if fitting:
                table = by_metric(scores)
                metric = self.evaluator.headline_metric(trainer.datamodule.eval_sets[name].kind)
                metric = metric if metric in table else next(iter(table))
                log.info(headline(f"{stage} at step {trainer.global_step}, {name}", metric, table[metric]))
            else:
                log.info("\n%s", score_table(f"{stage} {name}", scores))

    def _report_exit_grid(self, trainer: Trainer, eval_set, scores: dict[str, float], stage: str) -> None:
        """With early exits: the (exit x dim) table and its cheapest cell in the log, the heatmap."""
        layers = getattr(trainer.lightning_module, "matryoshka_layers", None)
        if not layers or len(layers) < 2:
            return
        depth, metric = layers[-1], self.evaluator.headline_metric(eval_set.kind)
        grid = exit_grid(scores, metric, depth)
        if len(grid) < 2:
            return
        rows = len(eval_set.corpus)
        best, cheapest = cheapest_cell(grid, depth, rows, self.keep_share)
        title = f"{stage} {eval_set.name} {metric} at step {trainer.global_step}"
        log.info(
            "\n%s\nbest cell %s\ncheapest cell keeping %.0f%% of it: %s",
            grid_table(title, grid, depth, rows),
            best.describe(depth),
            100 * self.keep_share,
            cheapest.describe(depth),
        )
        logger = self._tensorboard(trainer)
        if self.dashboards and logger is not None:
            figure = exit_grid_figure(grid, depth, metric, title)
            logger.experiment.add_figure(
                f"{stage}/{eval_set.name}/exit_grid", figure, global_step=trainer.global_step, close=True
            )

    # ----- TensorBoard dashboards -----------------------------------------------------------
    def _tensorboard(self, trainer: Trainer) -> TensorBoardLogger | None:
        return next(iter(tensorboard_loggers(trainer)), None)

    def _write_figures(self, trainer: Trainer, eval_set, scores: dict[str, float]) -> None:
        logger = self._tensorboard(trainer)
        if logger is None:
            return
        title = f"{eval_set.name}, step {trainer.global_step}"
        for key, figure in self.evaluator.figures(eval_set, scores, title).items():
            logger.experiment.add_figure(
                f"val/{eval_set.name}/{key}", figure, global_step=trainer.global_step, close=True
            )

    def _write_layout(self, trainer: Trainer) -> None:
        logger = self._tensorboard(trainer)
        if logger is not None and self.last_metrics:
            logger.experiment.add_custom_scalars(custom_scalars_layout(self.last_metrics))
            self._layout_written = True

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The hparams tab: this run's settings next to its final numbers, comparable across runs.
        if not self.dashboards or not self.last_metrics:
            return
        final = [tag for tag in self.last_metrics if tag.startswith("val/")]
        for logger in tensorboard_loggers(trainer):
            params = tensorboard_hparams(logger, pl_module.hparams)
            write_hparams_summary(logger.experiment, params, final, trainer.global_step)
