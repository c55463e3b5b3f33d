"""Cutting passages into 3-30 s segments at pauses, checked against brute force over every cut set."""

import itertools

import pytest

from datamodules.curation.segments import cut_passage, passages, segment


def brute_force_kept(regions, low, high):
    """The most seconds any choice of kept runs of consecutive regions keeps (every cut set)."""
    n, best = len(regions), 0.0
    for cuts in itertools.product([False, True], repeat=n - 1):
        runs, start = [], 0
        for i, cut in enumerate(cuts, start=1):
            if cut:
                runs.append((start, i))
                start = i
        runs.append((start, n))
        spans = [regions[b - 1][1] - regions[a][0] for a, b in runs]
        best = max(best, sum(s for s in spans if low <= s <= high))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_cut_keeps_as_much_as_brute_force_and_stays_in_window(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    regions, t = [], 0.0
    for _ in range(int(rng.integers(2, 10))):
        t += float(rng.uniform(0.1, 0.9))
        length = float(rng.uniform(0.3, 12.0))
        regions.append((t, t + length))
        t += length
    pieces = cut_passage(regions, 3.0, 30.0)
    kept = [p for p in pieces if p.kept]
    assert all(3.0 <= p.seconds <= 30.0 for p in kept)
    assert sum(p.seconds for p in kept) == pytest.approx(brute_force_kept(regions, 3.0, 30.0))
    # Cuts fall between regions only: every boundary is a region's start or end.
    edges = {e for region in regions for e in region}
    assert all(p.start in edges and p.end in edges for p in pieces)


def test_greedy_remainder_is_avoided():
    # 20 s + 9 s + 4 s with short pauses: greedy filling to 30 s would keep 29.x s and drop 4 s;
    # the cut keeps everything in two segments.
    regions = [(0.0, 20.0), (20.3, 29.3), (29.6, 33.6)]
    pieces = cut_passage(regions, 3.0, 30.0)
    assert all(p.kept for p in pieces) and len(pieces) == 2


def test_long_pause_always_ends_a_segment():
    regions = [(0.0, 2.0), (2.5, 4.0), (6.0, 9.0)]
    assert [len(p) for p in passages(regions, 1.0)] == [2, 1]
    pieces = segment(regions, 3.0, 30.0, max_pause=1.0)
    assert [(p.start, p.end, p.kept) for p in pieces] == [(0.0, 4.0, True), (6.0, 9.0, True)]
