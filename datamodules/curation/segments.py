"""Speech regions -> segments of ``min_duration``-``max_duration`` seconds, cut only at pauses.

Regions closer than ``max_pause`` form a passage (one stretch of talk); a passage is cut between
regions, at pauses, into the segments that keep the most of it inside the duration window (a
dynamic programme over the cut points: greedy filling to the maximum would leave a remainder too
short to keep where two halves would both fit). Silero already cuts a region longer than
``max_duration`` at its longest pause, so speech is only cut mid-word where it never pauses.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Piece:
    """A stretch of speech in seconds; ``kept`` False for what cannot fit the window (too short)."""

    start: float
    end: float
    kept: bool

    @property
    def seconds(self) -> float:
        return self.end - self.start


def passages(regions: list[tuple[float, float]], max_pause: float) -> list[list[tuple[float, float]]]:
    """Regions grouped where the pause between them is at most ``max_pause``."""
    groups: list[list[tuple[float, float]]] = []
    for region in regions:
        if groups and region[0] - groups[-1][-1][1] <= max_pause:
            groups[-1].append(region)
        else:
            groups.append([region])
    return groups


def cut_passage(regions: list[tuple[float, float]], min_duration: float, max_duration: float) -> list[Piece]:
    """The segments (and the dropped leftovers) of one passage that keep the most seconds."""
    n = len(regions)
    # best[i]: (seconds kept, -segments) over the first i regions; choice[i]: start of its last piece.
    best: list[tuple[float, int]] = [(0.0, 0)] + [(-1.0, 0)] * n
    choice = [0] * (n + 1)
    keep = [False] * (n + 1)
    for i in range(1, n + 1):
        best[i], choice[i], keep[i] = best[i - 1], i - 1, False  # region i-1 dropped
        for k in range(i - 1, -1, -1):
            span = regions[i - 1][1] - regions[k][0]
            if span > max_duration:
                break
            if span >= min_duration:
                candidate = (best[k][0] + span, best[k][1] - 1)  # ties: fewer, longer segments
                if candidate > best[i]:
                    best[i], choice[i], keep[i] = candidate, k, True
    pieces: list[Piece] = []
    i = n
    while i > 0:
        k = choice[i]
        pieces.append(Piece(regions[k][0], regions[i - 1][1], keep[i]))
        i = k
    pieces.reverse()
    merged: list[Piece] = []  # neighbouring dropped regions are one leftover
    for piece in pieces:
        if merged and not piece.kept and not merged[-1].kept:
            merged[-1].end = piece.end
        else:
            merged.append(piece)
    return merged


def segment(
    regions: list[tuple[float, float]], min_duration: float, max_duration: float, max_pause: float
) -> list[Piece]:
    """Every passage cut into kept segments and dropped leftovers, in time order."""
    return [
        piece
        for passage in passages(regions, max_pause)
        for piece in cut_passage(passage, min_duration, max_duration)
    ]
