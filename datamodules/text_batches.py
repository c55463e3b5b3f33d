"""Turns rows into tokenized batches: task prompts, bad-row filtering with ids, eval batches.

Runs inside DataLoader workers, so skipped rows travel with the batch (``skipped_ids``) and are
counted by the training step in the main process; so do the token lengths of the training texts
(``truncation``: per tokenized key, ``(rows, rows cut, longest length)``), which the datamodule
adds up to report how much ``max_query_length`` / ``max_document_length`` cut.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from datamodules.negatives import row_negatives
from errors import ConfigError
from lightning_modules.document_cache import tokenized_document_keys as document_keys

# The paper's instructions, with the languages as fields: {query_language} and
# {document_language} are filled from PromptConfig (Wolof and French by default).
DEFAULT_PROMPTS = {
    "document_retrieval": "Given a {query_language} query, retrieve relevant {document_language} documents",
    "translation_retrieval": "Given a {query_language} query, retrieve its {document_language} translation",
    "transcription_retrieval": "Given a {query_language} query, retrieve its {query_language} transcription",
}
# Qwen3-Embedding's query format; documents get no instruction.
DEFAULT_QUERY_TEMPLATE = "Instruct: {instruction}\nQuery:{query}"


@dataclass
class PromptConfig:
    """Task name -> instruction, and how an instruction and a text query are joined."""

    prompts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PROMPTS))
    """Instruction for each task name found in the data; fields {query_language}, {document_language}."""
    query_language: str = "Wolof"
    """Language of the queries, as the instructions name it (the paper's: Wolof)."""
    document_language: str = "French"
    """Language of the documents, as the instructions name it (the paper's: French)."""
    default_task: str = "document_retrieval"
    """Task of rows (and eval queries) that name none."""
    query_template: str = DEFAULT_QUERY_TEMPLATE
    """Format of a text query; fields {instruction} and {query}. Use '{query}' for no prompt."""

    def __post_init__(self):
        if self.default_task not in self.prompts:
            raise ConfigError(
                f"prompts.default_task={self.default_task!r} has no instruction in prompts.prompts "
                f"(known tasks: {sorted(self.prompts)}); add it or pick a known task."
            )
        for task in self.prompts:
            try:
                self.instruction(task)
            except (KeyError, IndexError, ValueError) as error:
                raise ConfigError(
                    f"prompts.prompts.{task}={self.prompts[task]!r}: its only fields may be "
                    f"{{query_language}} and {{document_language}} (write a literal brace twice: "
                    f"{{{{ }}}}); {type(error).__name__}: {error}"
                ) from error

    def has_instruction(self, task) -> bool:
        """Whether ``task`` (None or empty: ``default_task``) names an instruction."""
        task = task or self.default_task
        return isinstance(task, str) and task in self.prompts

    def instruction(self, task: str | None) -> str:
        if not self.has_instruction(task):
            raise ConfigError(
                f"task {task or self.default_task!r} in the data has no instruction; add it under "
                f"data.prompts.prompts (known tasks: {sorted(self.prompts)})."
            )
        return self.prompts[task or self.default_task].format(
            query_language=self.query_language, document_language=self.document_language
        )

    def format_query(self, text: str, task: str | None) -> str:
        return self.query_template.format(instruction=self.instruction(task), query=text)


def usable_text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


class TextBatchBuilder:
    """Tokenizes text queries (with their task prompt) and documents into padded tensors."""

    def __init__(
        self,
        tokenizer,
        prompts: PromptConfig,
        max_query_length: int,
        max_document_length: int,
        columns: Mapping[str, str],
        num_negatives: int = 0,
        negatives_column: str = "negatives",
    ):
        self.tokenizer = tokenizer
        # Hard negatives per row, read from ``negatives_column`` (already sampled per pass).
        self.num_negatives = num_negatives
        self.negatives_column = negatives_column
        self.prompts = prompts
        self.max_query_length = max_query_length
        self.max_document_length = max_document_length
        self.columns = columns
        self._check_prompts_leave_room()

    def _check_prompts_leave_room(self) -> None:
        """Right truncation would cut the query and keep the prompt: refuse such a config up front."""
        for task in self.prompts.prompts:
            prompt_only = self.prompts.format_query("", task)
            length = len(self.tokenizer(prompt_only)["input_ids"])
            if length >= self.max_query_length // 2:
                raise ConfigError(
                    f"the prompt of task {task!r} alone takes {length} tokens, leaving too little of "
                    f"data.max_query_length={self.max_query_length} for the query; raise max_query_length "
                    "or shorten data.prompts."
                )

    def _tokenize(self, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def token_lengths(self, texts: Sequence[str], chunk: int = 1024) -> list[int]:
        """Each text's length in tokens before truncation, special tokens included (as the limits count)."""
        lengths = []
        for start in range(0, len(texts), chunk):
            encoded = self.tokenizer(list(texts[start : start + chunk]), truncation=False, verbose=False)
            lengths += [len(ids) for ids in encoded["input_ids"]]
        return lengths

    def _measured_tokens(self, texts: Sequence[str], max_length: int) -> tuple[dict, tuple[int, int, int]]:
        """The texts tokenized, and ``(rows, rows cut, longest length before truncation)``; only
        the texts that reached the limit are tokenized again, whole, to tell a cut one from one of
        exactly that length."""
        tokens = self._tokenize(texts, max_length)
        lengths = tokens["attention_mask"].sum(dim=1).tolist()
        at_limit = [i for i, length in enumerate(lengths) if length >= max_length]
        for i, length in zip(at_limit, self.token_lengths([texts[i] for i in at_limit]), strict=True):
            lengths[i] = length
        return tokens, (len(lengths), sum(length > max_length for length in lengths), max(lengths, default=0))

    def format_queries(self, texts: Sequence[str], tasks: Sequence[str | None]) -> list[str]:
        """Each text query with its task's instruction, as it is tokenized."""
        return [self.prompts.format_query(text, task) for text, task in zip(texts, tasks, strict=True)]

    def queries(self, texts: Sequence[str], tasks: Sequence[str | None]) -> dict[str, torch.Tensor]:
        return self._tokenize(self.format_queries(texts, tasks), self.max_query_length)

    def documents(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self._tokenize(texts, self.max_document_length)

    def prompt_tokens(self, tasks: Sequence[str | None]) -> dict[str, torch.Tensor]:
        """Each row's task instruction alone (no special tokens), to be followed by speech frames."""
        texts = [self.prompts.format_query("", task).rstrip() for task in tasks]
        encoded = self.tokenizer(
            texts,
            padding=True,
            add_special_tokens=False,
            truncation=True,
            max_length=self.max_query_length,
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def row_id(self, row: Mapping, position: int) -> str:
        return str(row.get(self.columns["id"], f"<row without id #{position}>"))

    def task_problem(self, row: Mapping) -> str | None:
        """Why a training row's task has no prompt, or None. Such a row is skipped and named like
        any bad row: one mislabelled row must not stop a run (nor stop it again on resume)."""
        task = row.get(self.columns["task"])
        return None if self.prompts.has_instruction(task) else f"unknown task {task!r} (not in data.prompts)"

    def training_batch(self, rows: Sequence[Mapping], query_text_required: bool = True) -> dict:
        """Pairs batch; rows with a missing or empty query/document, or an unknown task, are
        dropped and named with their reason (``skip_reasons``) and its kind (``skip_kinds``).

        With ``query_text_required=False`` (speech queries) a row needs only its document; the
        batch carries ``query_text`` (the transcription) when every kept row has one.
        """
        c = self.columns
        good, skipped, reasons, kinds = [], [], [], []
        for position, row in enumerate(rows):
            if not usable_text(row.get(c["document"])):
                reason = kind = "missing or empty document"
            elif query_text_required and not usable_text(row.get(c["query"])):
                reason = kind = "missing or empty query"
            elif (problem := self.task_problem(row)) is not None:
                reason, kind = problem, "unknown task"
            else:
                good.append(row)
                continue
            skipped.append(self.row_id(row, position))
            reasons.append(reason)
            kinds.append(kind)
        tasks = [row.get(c["task"]) or self.prompts.default_task for row in good]
        batch = {
            "ids": [str(row.get(c["id"], "")) for row in good],
            "tasks": tasks,
            "skipped_ids": skipped,
            "skip_reasons": reasons,
            "skip_kinds": kinds,
        }
        if good:
            texts = {}
            if all(usable_text(row.get(c["query"])) for row in good):
                queries = self.format_queries([row[c["query"]] for row in good], tasks)
                texts["query_text"] = (queries, self.max_query_length)
            documents = [row[c["document"]] for row in good]
            negatives, owners = [], []
            if self.num_negatives:
                negatives, owners, batch["negatives_count"] = row_negatives(
                    good, self.negatives_column, self.num_negatives
                )
            # Negatives are documents: tokenized (and measured) with them, so both share a width
            # and the model embeds them in one pass.
            texts["document"] = (documents + negatives, self.max_document_length)
            batch["truncation"] = {}
            for key, (values, limit) in texts.items():
                batch[key], batch["truncation"][key] = self._measured_tokens(values, limit)
            if negatives:
                joint, rows = batch["document"], len(documents)
                batch["document"] = {key: value[:rows] for key, value in joint.items()}
                batch["negatives"] = {key: value[rows:] for key, value in joint.items()}
                batch["negative_rows"] = torch.tensor(owners, dtype=torch.long)
                batch["negative_keys"] = document_keys(batch["negatives"])
            # Equal for identical documents: InfoNCE does not count a copy of a row's own
            # document as its negative. Hashed here, on the CPU, not in the training step.
            batch["document_keys"] = document_keys(batch["document"])
        return batch

    def eval_batch(self, items: Sequence[tuple[int, Mapping]], eval_set: str, side: str) -> dict:
        """A batch of eval queries or corpus documents, keeping their positions in the eval set."""
        rows = [row for _, row in items]
        batch = {
            "eval_set": eval_set,
            "side": side,
            "index": torch.tensor([position for position, _ in items], dtype=torch.long),
            "ids": [row["id"] for row in rows],
        }
        if side == "corpus":
            batch["document"] = self.documents([row["text"] for row in rows])
        elif all(usable_text(row.get("text")) for row in rows):
            batch["query_text"] = self.queries(
                [row["text"] for row in rows], [row.get("task") for row in rows]
            )
        return batch
