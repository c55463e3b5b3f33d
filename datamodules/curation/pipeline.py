"""The curation run: list recordings, skip those already done, curate the rest in worker
processes (spawn: each loads its own Silero model), show hours processed, write the manifest."""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from datamodules.curation import dataset_input, manifest
from datamodules.curation.config import CurationConfig
from datamodules.curation.recording import Models, process
from datamodules.curation.shards import marker_path, recording_key

log = logging.getLogger(__name__)
_WORKER: dict = {}


def recordings(config: CurationConfig) -> tuple[Path, list[str]]:
    """The input's root and each recording's path relative to it ('' for a single file input)."""
    if config.input_dataset is not None:
        root = Path(config.output).expanduser() / dataset_input.FOLDER
        return root, dataset_input.export_recordings(config, root)
    root = Path(config.input).expanduser()
    if root.is_file():
        return root, [""]
    endings = {f".{e.lower().lstrip('.')}" for e in config.extensions}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in endings)
    return root, [str(p.relative_to(root)) for p in files]


def _done(output: Path, root: Path, relative: str) -> bool:
    """Whether a marker says this recording, unchanged since, was done."""
    path = marker_path(output, recording_key(relative or root.name))
    if not path.exists():
        return False
    marker = json.loads(path.read_text(encoding="utf-8"))
    stat = (root / relative if relative else root).stat()
    if marker["file"] != {"bytes": stat.st_size, "modified": stat.st_mtime}:
        log.warning("%s changed since it was curated: curating it again", marker["source"])
        return False
    return True


def _start_worker(config: CurationConfig) -> None:
    import torch

    torch.set_num_threads(1)  # the parallelism is the worker processes; one thread each
    _WORKER["models"] = Models(config)


def _run(relative: str, root: Path, output: Path, config: CurationConfig) -> dict:
    return process(relative, root, output, config, _WORKER["models"])


def _header_seconds(root: Path, relative: str) -> float:
    """For the progress bar only: a header's length (0 where it cannot be read)."""
    import soundfile

    try:
        info = soundfile.info(str(root / relative if relative else root))
        return info.frames / info.samplerate if info.samplerate else 0.0
    except Exception:  # a bad file is counted when its worker reads it
        return 0.0


def curate(config: CurationConfig) -> dict:
    """Runs the pipeline; returns the manifest (also written to ``<output>/manifest.json``)."""
    from tqdm import tqdm

    output = Path(config.output).expanduser()
    (output / "shards").mkdir(parents=True, exist_ok=True)
    (output / "done").mkdir(parents=True, exist_ok=True)
    root, files = recordings(config)
    todo = [relative for relative in files if not _done(output, root, relative)]
    already = len(files) - len(todo)
    if already:
        log.info("%d of %d recordings already done in %s: skipped", already, len(files), output)
    if todo and config.workers > 1:
        Models(config)  # a misconfigured stage fails here, naming its key, not as a broken worker pool
    total_hours = sum(_header_seconds(root, r) for r in todo) / manifest.HOUR
    # Hours of audio, advanced as each recording finishes; the speed is audio time over wall time.
    bar = tqdm(
        total=total_hours,
        disable=not config.progress or not todo,
        desc="curating",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.3f}/{total:.3f} h of audio "
        "[{elapsed}<{remaining}{postfix}]",
    )
    results = []
    began = time.perf_counter()

    def advance(stats: dict) -> None:
        results.append(stats)
        bar.update(stats["seconds_in"] / manifest.HOUR)
        speed = sum(s["seconds_in"] for s in results) / max(time.perf_counter() - began, 1e-9)
        kept = sum(s["seconds_kept"] for s in results) / manifest.HOUR
        bar.set_postfix_str(f"kept {kept:.3f} h, {speed:.0f}x real time")

    if config.workers == 1 or len(todo) <= 1:
        models = Models(config) if todo else None
        for relative in todo:
            advance(process(relative, root, output, config, models))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            config.workers, mp_context=context, initializer=_start_worker, initargs=(config,)
        ) as pool:
            jobs = [pool.submit(_run, relative, root, output, config) for relative in todo]
            for job in as_completed(jobs):
                advance(job.result())
    bar.close()
    this_run = {"recordings_processed": len(results), "recordings_already_done": already}
    written = manifest.write(output, config, this_run)
    for item in results:
        if item["skipped"]:
            log.warning("Skipped %s: %s", item["source"], item["skipped"]["reason"])
    return written
