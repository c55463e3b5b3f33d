"""How many texts their token limit cuts, so a too-small ``max_document_length`` shows in the log.

Texts longer than ``data.max_document_length`` / ``data.max_query_length`` tokens are cut to the
limit, never dropped. Each eval set is measured once when it is loaded, the training stream as
its batches are taken; one line reports the share cut and the longest text seen, as a warning
when a share is above ``data.truncation_warning_share``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass
class TruncationCount:
    """Texts of one kind measured against their token limit: how many, how many were cut, the longest."""

    what: str
    """The texts, as the report names them (``documents``, ``query texts``)."""
    setting: str
    """The key of the limit (``data.max_document_length``)."""
    limit: int
    """Most tokens a text keeps, special tokens included."""
    rows: int = 0
    cut: int = 0
    longest: int = 0
    """Tokens of the longest text seen, before truncation."""

    def add(self, lengths: Iterable[int]) -> None:
        """Counts texts of these lengths (in tokens, before truncation)."""
        lengths = list(lengths)
        self.add_counts(len(lengths), sum(length > self.limit for length in lengths), max(lengths, default=0))

    def add_counts(self, rows: int, cut: int, longest: int) -> None:
        self.rows += rows
        self.cut += cut
        self.longest = max(self.longest, longest)

    @property
    def share(self) -> float:
        return self.cut / self.rows if self.rows else 0.0

    def describe(self) -> str:
        return (
            f"{self.cut} of {self.rows} {self.what} ({100 * self.share:.1f} %) cut to "
            f"{self.setting}={self.limit} tokens (longest {self.longest})"
        )


def report_truncation(
    where: str,
    counts: Sequence[TruncationCount],
    warning_share: float | None,
    logger: logging.Logger,
    warn: bool = True,
) -> bool:
    """Logs one line for ``where`` (an eval set, the training stream): each count with texts in it.

    A warning, naming the fix, when some share is above ``warning_share`` (None: never) and
    ``warn``; otherwise info. Returns whether some share is above it.
    """
    measured = [count for count in counts if count.rows]
    if not measured:
        return False
    line = f"{where}: " + "; ".join(count.describe() for count in measured)
    over = [count for count in measured if warning_share is not None and count.share > warning_share]
    if over and warn:
        raise_keys = " / ".join(dict.fromkeys(count.setting for count in over))
        logger.warning(
            "%s. Above data.truncation_warning_share=%g: the model sees only the first tokens of these "
            "texts (they are cut, never dropped); raise %s to keep more of them.",
            line,
            warning_share,
            raise_keys,
        )
    else:
        logger.info("%s.", line)
    return bool(over)
