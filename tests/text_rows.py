"""Text pairs at test size, the same for every test that needs a few rows of them."""

from __future__ import annotations

WORDS = "bita saaso mooje vérô fèfé lôrôfê kani dolo siri mana tigi bolo".split()


def text_rows(count: int, start: int = 0) -> list[dict]:
    """``count`` rows of ``id``/``query``/``document``, queries of 1-3 words, documents of 2-5."""
    return [
        {
            "id": f"row{i}",
            "query": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 3)),
            "document": " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(2 + i % 4)),
        }
        for i in range(start, start + count)
    ]
