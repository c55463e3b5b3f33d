"""n-shot classification after ``validate`` / ``test`` (``callbacks.few_shot`` has the method).

    python cli.py validate --config configs/demo/late_fusion.yaml --ckpt_path CKPT \
        --few_shot.shots=[0,1,2,4,8,16]

For each classification set (``data.init_args.classification_sets``, or ``few_shot.sets``), the
labelled examples come from its ``few_shot.train_split`` qrels and the scored queries are the ones
the stage evaluates. Logged: a terminal table per score, TensorBoard scalars
``<stage>/<set>/few_shot/<score>/n<n>/d<dim>`` (mean over draws; ``<score>_std`` the spread), a
figure of macro and weighted F1 against n with one line per dim, and every draw's scores in
``<run>/few_shot/<set>.json``. The model's weights are restored after every draw and nothing is
written to a checkpoint.
"""

from __future__ import annotations

import json
import logging

from lightning.pytorch import LightningModule, Trainer

from callbacks.after_evaluation import AfterEvaluation
from callbacks.few_shot import (
    FewShotData,
    FewShotSettings,
    check_shots,
    few_shot_scores,
    few_shot_table,
    score_vs_shots_figure,
    summary,
)
from errors import ConfigError, DataError

log = logging.getLogger(__name__)


class FewShotClassification(AfterEvaluation):
    """SetFit-style n-shot classification of every classification set, once, after validate/test."""

    key = "few_shot"

    def __init__(
        self,
        shots: list[int] | None = None,
        draws: int = 5,
        seed: int = 0,
        contrastive: bool = True,
        iterations: int = 20,
        epochs: int = 1,
        pair_batch_size: int = 16,
        learning_rate: float = 1e-4,
        train_split: str = "train",
        sets: list[str] | None = None,
    ):
        """
        Args:
            shots: Examples per class to evaluate, e.g. [0, 1, 2, 4, 8, 16] (0: zero-shot, the
                nearest class text). None: off.
            draws: Seeded draws of the examples per n > 0 (scores: mean and spread over them).
            seed: Seed of draw 0 (draw k uses seed + k): draws, pairs and heads.
            contrastive: SetFit's stage 1 (pair fine-tuning of the trainable part, undone after
                each draw) before the logistic-regression head; false: the head alone.
            iterations: SetFit's num_iterations: 2 x iterations pairs per example.
            epochs: Passes over the pairs in stage 1.
            pair_batch_size: Pairs per stage-1 step.
            learning_rate: Stage-1 AdamW learning rate.
            train_split: The qrels split the labelled examples come from.
            sets: Classification sets to evaluate (None: every one in data.classification_sets).
        """
        self.shots = shots
        self.settings = None
        if shots is not None:
            self.settings = FewShotSettings(
                shots, draws, seed, contrastive, iterations, epochs, pair_batch_size, learning_rate
            )
        self.train_split = train_split
        self.sets = sets
        self.last_results: dict[str, dict] = {}
        self._train_sets: dict = {}

    @property
    def enabled(self) -> bool:
        return self.settings is not None

    def set_names(self, trainer: Trainer) -> list[str]:
        known = list(trainer.datamodule.hparams.classification_sets or {})
        if self.sets is None:
            if not known:
                raise ConfigError(
                    "few_shot: the recipe has no data.classification_sets to classify; name one with "
                    "--data.init_args.classification_sets='{NAME: BEIR_DIR}' (with a train split)."
                )
            return known
        unknown = [name for name in self.sets if name not in known]
        if unknown:
            raise ConfigError(f"few_shot.sets names {unknown}, not in data.classification_sets ({known}).")
        return list(self.sets)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.enabled and stage in ("validate", "test"):
            # The datamodule is set up (Lightning sets it up before the callbacks): every set's
            # labelled examples are read and checked now, before the evaluation runs.
            self._train_sets = {
                name: self._checked_train_set(trainer, name) for name in self.set_names(trainer)
            }

    def _checked_train_set(self, trainer: Trainer, name: str):
        data_module = trainer.datamodule
        try:
            train = data_module.load_eval_set(name, self.train_split)
        except (DataError, FileNotFoundError, ConfigError) as error:
            raise DataError(
                f"few_shot: classification set {name!r} has no usable {self.train_split!r} split "
                f"(qrels/{self.train_split}.tsv naming its labelled examples): {error}"
            ) from error
        evaluated = data_module.eval_sets[name]
        if [row["id"] for row in train.corpus] != [row["id"] for row in evaluated.corpus]:
            raise DataError(f"few_shot: set {name!r}: the {self.train_split} split's classes differ.")
        check_shots(self._data(name, train, evaluated, embedder=None), self.settings)
        return train

    @staticmethod
    def _data(name: str, train, evaluated, embedder) -> FewShotData:
        return FewShotData(
            name=name,
            train_labels=train.gold_labels(),
            test_labels=evaluated.gold_labels(),
            class_names={i: row["id"] for i, row in enumerate(evaluated.corpus)},
            embed_train=lambda positions: embedder.queries(train, positions),
            embed_test=lambda: embedder.queries(evaluated),
            embed_classes=lambda: embedder.corpus(evaluated),
        )

    def run(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        embedder = self.embedder(trainer, pl_module)
        eval_sets = trainer.datamodule.eval_sets
        jobs = [
            self._data(name, train, eval_sets[name], embedder) for name, train in self._train_sets.items()
        ]
        writer, step = self.tensorboard(trainer), trainer.global_step
        for data in jobs:
            log.info(
                "few_shot: %s, n in %s, %d draws, %s",
                data.name,
                self.settings.shots,
                self.settings.draws,
                "stage 1 (pair fine-tuning) + head" if self.settings.contrastive else "head only",
            )
            results = few_shot_scores(pl_module, data, self.settings)
            flat = summary(results)
            self.last_results[data.name] = flat
            for score in ("macro_f1", "weighted_f1", "accuracy"):
                log.info("\n%s", few_shot_table(f"{stage} {data.name} few-shot", flat, score))
            path = self.output_dir(trainer, "few_shot") / f"{data.name}.json"
            path.write_text(json.dumps(self._record(results, flat), indent=1))
            if writer is not None:
                for tag, value in flat.items():
                    writer.add_scalar(f"{stage}/{data.name}/few_shot/{tag}", value, step)
                for score in ("macro_f1", "weighted_f1"):
                    figure = score_vs_shots_figure(flat, score, f"{data.name}: {score} against n")
                    writer.add_figure(f"{stage}/{data.name}/few_shot_{score}_vs_n", figure, step, close=True)
                writer.flush()

    def _record(self, results: dict, flat: dict) -> dict:
        settings = dict(vars(self.settings), train_split=self.train_split)
        draws = {
            str(n): [{str(dim): s for dim, s in draw.items()} for draw in per_n]
            for n, per_n in results.items()
        }
        return {"settings": settings, "summary": flat, "draws": draws}
