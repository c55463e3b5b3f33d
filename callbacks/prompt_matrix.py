"""Prompt x task: every eval set scored under every task prompt, after ``validate`` / ``test``.

    python cli.py validate --config configs/demo/late_fusion.yaml --ckpt_path CKPT --prompt_matrix.tasks=all

A model whose queries carry a task prompt (``data.init_args.prompts``) is multitask through it
(the reference paper's Appendix A.2). Each eval set (retrieval and classification) is embedded
again with every query's task replaced by each chosen prompt, and scored with its headline metric
(nDCG@10 for retrieval, accuracy for classification) at the largest dim. A set's own task (the
task most of its queries carry) is its diagonal cell: the matrix shows whether each task scores
best under its own prompt. Logged: the matrix in the terminal, a heatmap image, scalars
``<stage>/<set>/prompt/<task>/<metric>/d<dim>``, and ``<run>/prompt_matrix.json``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence

from lightning.pytorch import LightningModule, Trainer

from callbacks.after_evaluation import AfterEvaluation
from callbacks.eval_set_embeddings import EvalSetEmbedder
from callbacks.evaluation import Evaluator
from callbacks.retrieval import RetrievalEvaluator
from datamodules.eval_sets import EvalSet
from errors import ConfigError

log = logging.getLogger(__name__)


def own_task(eval_set: EvalSet, default_task: str) -> str:
    """The task most of the set's queries carry (``default_task`` for those naming none)."""
    counts = Counter(row.get("task") or default_task for row in eval_set.queries)
    return counts.most_common(1)[0][0]


def under_task(eval_set: EvalSet, task: str) -> EvalSet:
    """The set with every query's task replaced (same rows, same order, same qrels)."""
    return eval_set.with_queries([{**row, "task": task} for row in eval_set.queries])


def prompt_task_matrix(
    embedder: EvalSetEmbedder,
    evaluator: Evaluator,
    eval_sets: Mapping[str, EvalSet],
    tasks: Sequence[str],
    dim: int,
) -> dict[str, dict[str, float]]:
    """``{eval set: {task: headline metric at dim}}``; each set's corpus is embedded once."""
    matrix = {}
    for name, eval_set in eval_sets.items():
        corpus = {dim: embedder.corpus(eval_set)[dim]}
        metric = f"{evaluator.headline_metric(eval_set.kind)}/d{dim}"
        matrix[name] = {}
        for task in tasks:
            variant = under_task(eval_set, task)
            queries = {dim: embedder.queries(variant)[dim]}
            matrix[name][task] = evaluator.metrics(variant, queries, corpus)[metric]
    return matrix


def matrix_table(matrix: Mapping[str, Mapping[str, float]], own: Mapping[str, str], title: str) -> str:
    """Rows: eval sets (their own task in brackets); columns: prompts; the own-task cell starred."""
    tasks = list(next(iter(matrix.values())))
    width = max(len(f"{name} [{own[name]}]") for name in matrix) + 2
    column = max(12, *(len(task) + 2 for task in tasks))
    lines = [title, "".ljust(width) + "".join(task.rjust(column) for task in tasks)]
    for name, row in matrix.items():
        cells = "".join((f"{row[t]:.4f}" + ("*" if t == own[name] else " ")).rjust(column) for t in tasks)
        lines.append(f"{name} [{own[name]}]".ljust(width) + cells)
    lines.append("* the set's own task (its queries' prompt in validation)")
    return "\n".join(lines)


def matrix_figure(matrix: Mapping[str, Mapping[str, float]], own: Mapping[str, str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names, tasks = list(matrix), list(next(iter(matrix.values())))
    values = np.array([[matrix[n][t] for t in tasks] for n in names])
    figure, axes = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 1.2 + 0.6 * len(names)))
    image = axes.imshow(values, cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    axes.set_yticks(range(len(names)), [f"{n} [{own[n]}]" for n in names])
    for i, name in enumerate(names):
        for j, task in enumerate(tasks):
            mark = "*" if task == own[name] else ""
            light = values[i, j] > (values.min() + values.max()) / 2  # dark text on the light cells
            color = "black" if light else "white"
            axes.text(j, i, f"{values[i, j]:.3f}{mark}", ha="center", va="center", color=color, fontsize=8)
    axes.set_xlabel("prompt")
    axes.set_title(title)
    figure.colorbar(image)
    figure.tight_layout()
    return figure


class PromptTaskMatrix(AfterEvaluation):
    """Every eval set under every chosen task prompt, once, after validate/test."""

    key = "prompt_matrix"

    def __init__(self, tasks: list[str] | str | None = None):
        """
        Args:
            tasks: The prompts (task names in data.init_args.prompts.prompts) to score every eval
                set under, or ``all``. None: off.
        """
        self.tasks = tasks
        self.last_matrix: dict[str, dict[str, float]] = {}

    @property
    def enabled(self) -> bool:
        return self.tasks is not None

    def chosen_tasks(self, trainer: Trainer) -> list[str]:
        known = list(trainer.datamodule.prompts.prompts)
        if self.tasks == "all":
            return known
        tasks = [self.tasks] if isinstance(self.tasks, str) else list(self.tasks)
        unknown = [task for task in tasks if task not in known]
        if unknown:
            raise ConfigError(
                f"prompt_matrix.tasks names {unknown}, which have no prompt in "
                f"data.init_args.prompts.prompts (known: {known}, or 'all')."
            )
        return tasks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.enabled and stage != "fit":
            self.chosen_tasks(trainer)  # an unknown name fails before the evaluation, not after

    def run(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        data = trainer.datamodule
        tasks, dim = self.chosen_tasks(trainer), max(pl_module.matryoshka_dims)
        evaluator = next(cb.evaluator for cb in trainer.callbacks if isinstance(cb, RetrievalEvaluator))
        eval_sets = {name: s for name, s in data.eval_sets.items() if s.queries and s.corpus}
        pl_module.eval()
        matrix = prompt_task_matrix(self.embedder(trainer, pl_module), evaluator, eval_sets, tasks, dim)
        own = {name: own_task(s, data.prompts.default_task) for name, s in eval_sets.items()}
        self.last_matrix = matrix
        log.info("\n%s", matrix_table(matrix, own, f"{stage} prompt x task (headline metric, d{dim})"))
        (self.output_dir(trainer, ".") / "prompt_matrix.json").write_text(
            json.dumps({"dim": dim, "own_task": own, "matrix": matrix}, indent=1)
        )
        writer, step = self.tensorboard(trainer), trainer.global_step
        if writer is not None:
            for name, row in matrix.items():
                metric = evaluator.headline_metric(eval_sets[name].kind)
                for task, value in row.items():
                    writer.add_scalar(f"{stage}/{name}/prompt/{task}/{metric}/d{dim}", value, step)
            figure = matrix_figure(matrix, own, f"prompt x task, d{dim}")
            writer.add_figure(f"{stage}/prompt_x_task", figure, step, close=True)
            writer.flush()
