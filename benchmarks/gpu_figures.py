"""The GPU checks' measured errors (``GPU_CHECK_FIGURES`` JSON lines) as one markdown table.

python benchmarks/gpu_figures.py FIGURES.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(lines: list[str]) -> str:
    rows = ["| test | figure | measured | bound | device |", "|---|---|---|---|---|"]
    for line in lines:
        entry = json.loads(line)
        bound = "" if entry["bound"] is None else f"{entry['bound']:.3g}"
        rows.append(
            f"| {entry['test']} | {entry['figure']} | {entry['measured']:.3g} | {bound} | {entry['device']} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    path = Path(sys.argv[1])
    print(table(path.read_text().splitlines()) if path.exists() else "(no figures were recorded)")
