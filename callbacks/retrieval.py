"""Evaluation at every validation/test: metrics per eval set and Matryoshka dim, analyses, dashboards.

The LightningModule's ``validation_step`` embeds each eval batch once (every dim from one pass)
and returns the embeddings with their positions; this callback gathers them per eval set and
logs one scalar per (eval set, metric, dim), e.g. ``val/demo/ndcg@10/d256``:
- retrieval sets: the corpus ranked with an exact chunked top-k; nDCG, recall and MRR at k;
- classification sets (keyword spotting, zero-shot intent): each query takes its nearest class
  text; accuracy, macro recall and macro F1;
- then every configured analysis (effective rank, cost per dim, ...) on the same embeddings,
  so nothing is encoded twice. The assembled embeddings stay available as ``last_embeddings``.

With a TensorBoard logger it also writes a custom-scalars layout (one chart per eval set and
metric, every dim on it), image summaries each validation (the metrics and costs against the
dim; each analysis's figures) and, at the end of fit, the hyperparameters with the final metrics.

Under DDP each rank encodes its share of every eval set (Lightning's distributed sampler); the
shares are gathered on rank 0, which scores the full set once and broadcasts the numbers, so
every rank logs (and ModelCheckpoint monitors) the same values. ``last_embeddings`` is filled
on rank 0 only.
"""

from __future__ import annotations

import difflib
import logging
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from callbacks.analysis import EmbeddingAnalysis
from callbacks.metrics import (
    CLASSIFICATION_METRICS,
    RETRIEVAL_MEASURES,
    classification_metrics,
    metrics_from_ranking,
    top_k_search,
)
from callbacks.score_table import by_metric, headline, score_table
from errors import ConfigError

log = logging.getLogger(__name__)


def assemble(
    chunks: list[tuple[torch.Tensor, dict[int, torch.Tensor]]], size: int, dims: Sequence[int]
) -> dict[int, torch.Tensor] | None:
    """Places per-batch embeddings at their positions; None if some position never arrived.

    A side of zero rows is complete: a ``[0, dim]`` tensor per dim (a corpus without queries yet).
    """
    if size == 0:
        return {dim: torch.zeros(0, dim) for dim in dims}
    if not chunks:
        return None
    seen = torch.zeros(size, dtype=torch.bool)
    out: dict[int, torch.Tensor] = {}
    for index, embeddings in chunks:
        seen[index] = True
        for dim, values in embeddings.items():
            if dim not in out:
                out[dim] = torch.zeros(size, values.shape[1], dtype=values.dtype)
            out[dim][index] = values
    return out if bool(seen.all()) else None


def add_eval_output(chunks: dict[tuple[str, str], list], outputs) -> None:
    """Files one eval batch's embeddings (an ``_embed_eval_batch`` output) under (eval set, side)."""
    if isinstance(outputs, dict) and "embeddings" in outputs:
        chunks[(outputs["eval_set"], outputs["side"])].append((outputs["index"], outputs["embeddings"]))


def _resembles(metric: str, names: set[str]) -> bool:
    """Whether ``metric`` looks like a misspelling of one of ``names`` (case, or a letter or two)."""
    lowered = {name.lower() for name in names}
    return metric.lower() in lowered or bool(
        difflib.get_close_matches(metric.lower(), lowered, n=1, cutoff=0.85)
    )


def chunks_of_all_ranks(
    trainer: Trainer, chunks: dict[tuple[str, str], list]
) -> dict[tuple[str, str], list] | None:
    """Every rank's encoded batches, keyed by (eval set, side), on rank 0 (None on the other ranks)."""
    if trainer.world_size == 1:
        return chunks
    shares = [None] * trainer.world_size if trainer.is_global_zero else None
    dist.gather_object(dict(chunks), shares, dst=0)
    if not trainer.is_global_zero:
        return None
    merged = defaultdict(list)
    for share in shares:
        for key, values in share.items():
            merged[key].extend(values)
    return merged


class RetrievalEvaluator(Callback):
    """Logs ``{stage}/{eval_set}/{metric}@{k}/d{dim}`` for every eval set of the datamodule."""

    def __init__(
        self,
        ks: Sequence[int] = (5, 10),
        query_chunk_size: int = 1024,
        document_chunk_size: int = 16384,
        analyses: list[EmbeddingAnalysis] | None = None,
        dashboards: bool = True,
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
        """
        self.ks = tuple(sorted(ks))
        self.query_chunk_size = query_chunk_size
        self.document_chunk_size = document_chunk_size
        self.analyses = list(analyses or [])
        self.dashboards = dashboards
        self._chunks: dict[tuple[str, str], list] = defaultdict(list)
        self._layout_written = False
        self.last_embeddings: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
        self.last_metrics: dict[str, float] = {}
        # Per eval set, its own metrics (not the analyses'), for the terminal summary.
        self.last_scores: dict[str, dict[str, float]] = {}

    # ----- checks at the start of fit ------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A monitor naming a metric no validation logs fails only after the first validation
        # (hours in, at the recipes' val_check_interval); the tags are known now.
        data = trainer.datamodule
        eval_sets = getattr(data, "eval_sets", None)
        if eval_sets is None:
            return
        watchers = [c for c in trainer.callbacks if isinstance(getattr(c, "monitor", None), str)]
        if not eval_sets:
            if trainer.checkpoint_callbacks and trainer.check_val_every_n_epoch is None:
                log.warning(
                    "No eval sets (data.eval_sets): no validation runs, so the ModelCheckpoints, which "
                    "save after a validation (check_val_every_n_epoch: null, as in the recipes), write "
                    "nothing (a preemption checkpoint still is)."
                )
            return
        dims = list(getattr(pl_module, "matryoshka_dims", []))
        for callback in watchers:
            problem = self.unknown_monitor(callback.monitor, eval_sets, dims)
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

    def unknown_monitor(self, monitor: str, eval_sets: dict, dims: Sequence[int]) -> str | None:
        """Why ``monitor`` (``val/<eval set>/<metric>/d<dim>``) will never be logged, or None."""
        parts = monitor.split("/")
        if len(parts) < 3 or parts[0] != "val":
            return None  # not one of this callback's tags (e.g. train/loss)
        name, metric, last = parts[1], "/".join(parts[2:-1]), parts[-1]
        if len(parts) == 3 and last.partition("@")[0] in RETRIEVAL_MEASURES + CLASSIFICATION_METRICS:
            return f"the evaluator logs {last} once per dim: add /d<dim>, e.g. {monitor}/d{max(dims or [0])}."
        if name not in eval_sets:
            return (
                f"no eval set is named {name!r} (eval sets: {sorted(eval_sets)}); rename the set in "
                "data.eval_sets or change the monitor."
            )
        if last.startswith("d") and last[1:].isdigit() and int(last[1:]) not in dims:
            return f"d{last[1:]} is not one of the model's matryoshka_dims {dims}."
        measure, _, cutoff = metric.partition("@")
        if eval_sets[name].kind == "retrieval" and measure in RETRIEVAL_MEASURES:
            if not cutoff.isdigit() or int(cutoff) not in self.ks:
                return f"the evaluator's cut-offs are ks={list(self.ks)}."
        kind, tag = eval_sets[name].kind, "/".join(parts[2:])
        logged = self.metric_names(kind, dims)
        known = logged if logged is not None else self._own_metric_names(kind, dims)
        if tag in known:
            return None
        if logged is None and not _resembles(metric or tag, {n.rsplit("/d", 1)[0] for n in known}):
            return None  # maybe the metric of an analysis that does not list its names
        close = difflib.get_close_matches(tag, sorted(known), n=3)
        hint = f" Did you mean {', '.join(f'val/{name}/{c}' for c in close)}?" if close else ""
        return f"eval set {name!r} ({kind}) logs no {tag!r}.{hint}"

    def _own_metric_names(self, kind: str, dims: Sequence[int]) -> set[str]:
        """What the evaluator itself logs for an eval set of this kind (not its analyses)."""
        if kind == "retrieval":
            names = {
                f"{measure}@{k}/d{dim}" for measure in RETRIEVAL_MEASURES for k in self.ks for dim in dims
            }
        else:
            names = {f"{metric}/d{dim}" for metric in CLASSIFICATION_METRICS for dim in dims}
        return names | {"num_queries_evaluated"}

    def metric_names(self, kind: str, dims: Sequence[int]) -> set[str] | None:
        """Every ``<metric>/d<dim>`` (or ``<metric>``) this evaluator logs for an eval set of this
        kind; None when an analysis does not declare its names (they cannot all be known)."""
        names = self._own_metric_names(kind, dims)
        for analysis in self.analyses:
            declared = analysis.metric_names(list(dims))
            if declared is None:
                return None
            names |= declared
        return names

    # ----- collection ---------------------------------------------------------------------
    def _reset(self, *args) -> None:
        self._chunks = defaultdict(list)

    on_validation_epoch_start = _reset
    on_test_epoch_start = _reset

    def _collect(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        add_eval_output(self._chunks, outputs)

    on_validation_batch_end = _collect
    on_test_batch_end = _collect

    # ----- scoring ------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluate(trainer, pl_module, "test")

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.last_embeddings, self.last_metrics, self.last_scores = {}, {}, {}
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
        for name, eval_set in eval_sets.items():
            if not eval_set.queries or not eval_set.corpus:
                side = "queries" if not eval_set.queries else "documents"
                log.warning(
                    "eval set %s has no usable %s (see the warning at setup): no metrics.", name, side
                )
                continue
            dims = trainer.lightning_module.matryoshka_dims
            queries = assemble(chunks.get((name, "queries"), []), len(eval_set.queries), dims)
            corpus = assemble(chunks.get((name, "corpus"), []), len(eval_set.corpus), dims)
            if queries is None or corpus is None:
                log.warning(
                    "eval set %s was not fully encoded (limit_%s_batches?): no metrics this time.",
                    name,
                    stage,
                )
                continue
            embeddings = {"queries": queries, "corpus": corpus}
            self.last_embeddings[name] = embeddings
            prefix = f"{stage}/{name}/"
            if eval_set.kind == "classification":
                scores = self._classification_scores(eval_set, queries, corpus)
            else:
                scores = self._retrieval_scores(eval_set, queries, corpus)
            self.last_scores[name] = {tag: v for tag, v in scores.items() if tag != "num_queries_evaluated"}
            for analysis in self.analyses:
                scores |= analysis.analyze(eval_set, embeddings)
            self.last_metrics |= {prefix + tag: value for tag, value in scores.items()}
            if self.dashboards and stage == "val":
                self._write_figures(trainer, eval_set, scores)

    def _summarize(self, trainer: Trainer, stage: str) -> None:
        """The scores in the terminal: a line per eval set while fitting, a table per set otherwise."""
        fitting = trainer.state.fn == "fit"
        for name, scores in self.last_scores.items():
            if fitting:
                table = by_metric(scores)
                ndcg = f"ndcg@{max(self.ks)}"
                metric = ndcg if ndcg in table else next(iter(table))
                log.info(headline(f"{stage} at step {trainer.global_step}, {name}", metric, table[metric]))
            else:
                log.info("\n%s", score_table(f"{stage} {name}", scores))

    def _retrieval_scores(self, eval_set, queries, corpus) -> dict[str, float]:
        scores = {}
        for dim in sorted(queries):
            _, ranked = top_k_search(
                queries[dim], corpus[dim], max(self.ks), self.query_chunk_size, self.document_chunk_size
            )
            results = metrics_from_ranking(ranked, eval_set.qrels, self.ks)
            for metric in (f"{m}@{k}" for m in RETRIEVAL_MEASURES for k in self.ks):
                scores[f"{metric}/d{dim}"] = results[metric]
        scores["num_queries_evaluated"] = results["num_queries"]
        return scores

    def _classification_scores(self, eval_set, queries, corpus) -> dict[str, float]:
        gold = eval_set.gold_labels()
        classes = sorted(set(gold))
        scores = {}
        for dim in sorted(queries):
            _, nearest = top_k_search(
                queries[dim], corpus[dim], 1, self.query_chunk_size, self.document_chunk_size
            )
            results = classification_metrics(nearest[:, 0].tolist(), gold, classes)
            scores |= {f"{metric}/d{dim}": value for metric, value in results.items()}
        scores["num_queries_evaluated"] = len(gold)
        return scores

    # ----- TensorBoard dashboards -----------------------------------------------------------
    def _writer(self, trainer: Trainer):
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    def _write_figures(self, trainer: Trainer, eval_set, scores: dict[str, float]) -> None:
        writer = self._writer(trainer)
        if writer is None:
            return
        from callbacks.figures import metric_vs_dimension_figure

        main = ("accuracy", "macro_f1") if eval_set.kind == "classification" else (f"ndcg@{self.ks[-1]}",)
        dims = sorted({int(tag.rsplit("/d", 1)[1]) for tag in scores if tag.startswith(main[0] + "/d")})
        metrics = {m: [scores[f"{m}/d{d}"] for d in dims] for m in main}
        costs = {
            family: [scores[f"{family}/d{d}"] for d in dims]
            for family in sorted({tag.split("/")[0] for tag in scores if tag.startswith("query_ms_")})
        }
        title = f"{eval_set.name}, step {trainer.global_step}"
        figures = {"metrics_vs_dim": metric_vs_dimension_figure(dims, metrics, costs, title)}
        for analysis in self.analyses:
            figures |= analysis.figures(eval_set)
        for key, figure in figures.items():
            writer.add_figure(
                f"val/{eval_set.name}/{key}", figure, global_step=trainer.global_step, close=True
            )

    def _write_layout(self, trainer: Trainer) -> None:
        writer = self._writer(trainer)
        if writer is not None and self.last_metrics:
            writer.add_custom_scalars(custom_scalars_layout(self.last_metrics))
            self._layout_written = True

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The hparams tab: this run's settings next to its final numbers, comparable across runs.
        if not self.dashboards or not self.last_metrics:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                final = [tag for tag in self.last_metrics if tag.startswith("val/")]
                write_hparams_summary(logger, pl_module.hparams, final, trainer.global_step)


def write_hparams_summary(logger, params, metric_tags: Sequence[str], step: int) -> None:
    """The run's row in TensorBoard's HParams tab: its settings, and which scalars are its metrics.

    The tab shows each metric's latest point in the run's own scalars, so only the names are
    written. Lightning's ``log_hyperparams(params, metrics)`` would also log the values again at
    the current step: a second point repeating the last validation (at a preemption, at a step
    that was never validated).
    """
    from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
    from torch.utils.tensorboard.summary import hparams

    flat = logger._sanitize_params(_flatten_dict(_convert_params(params)))
    writer = logger.experiment._get_file_writer()
    for summary in hparams(flat, dict.fromkeys(metric_tags, 0.0)):  # the values are not read
        writer.add_summary(summary, step)


def custom_scalars_layout(tags) -> dict:
    """TensorBoard custom-scalars layout: a category per (stage, eval set), a chart per metric
    holding every dim (``<stage>/<set>/<metric>/d<dim>`` tags, matched by a regex)."""
    import re

    layout: dict[str, dict[str, list]] = {}
    for tag in sorted(tags):
        match = re.fullmatch(r"(?P<stage>[^/]+)/(?P<set>[^/]+)/(?P<metric>.+)/d\d+", tag)
        if match is None:
            continue
        category = f"{match['stage']}/{match['set']}"
        pattern = f"{re.escape(category)}/{re.escape(match['metric'])}/d\\d+"
        layout.setdefault(category, {})[match["metric"]] = ["Multiline", [pattern]]
    return layout
