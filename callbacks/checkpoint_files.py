"""Checkpoint files that are never seen half-written, and a ``last`` that resolves to one that loads.

Lightning writes a checkpoint through an fsspec transaction: a temporary file in ``$TMPDIR``,
moved into place when done. When ``$TMPDIR`` is on another file system than the checkpoint
folder (node-local scratch on most clusters), that move is a copy into the destination,
truncated first: a kill during the copy leaves ``last.ckpt`` empty or cut short, and
``--ckpt_path last`` then picks it. ``AtomicCheckpointIO`` writes into a temporary file in the
destination folder itself, flushes it to disk and renames it over the destination (atomic on
POSIX file systems), so the old file or the whole new one is there, never part of one.

``resolve_checkpoint`` is what ``cli.py`` asks before ``fit`` / ``validate`` / ``test`` /
``predict``: ``last`` becomes the newest ``last*.ckpt`` that is whole (else the newest whole
checkpoint in the same folders, with a warning naming the unreadable one), and an explicit
path to an unreadable file is refused with a message naming it and the whole ones beside it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from pathlib import Path

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.lightning_internals import last_checkpoints_of
from callbacks.preemption import PreemptionCheckpoint
from errors import DataError

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


def _local_path(path) -> Path | None:
    """The path on this machine's file system, or None for a remote one (s3://, gs://, ...)."""
    try:
        fs, local = url_to_fs(str(path))
    except (ValueError, ImportError):  # a protocol fsspec does not know, or whose package is missing
        return None
    return Path(local) if isinstance(fs, LocalFileSystem) else None


def _sync_folder(folder: Path) -> None:
    """Makes a rename inside ``folder`` survive a power loss (the folder's entry list is data too)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders; the rename itself is still atomic
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_atomically(save, destination: Path) -> None:
    """Calls ``save(file)`` on a temporary file beside ``destination``, then renames it into place.

    The temporary name (``.<name>.<random>.partial``) matches no ``*.ckpt`` pattern, so neither
    Lightning's ``last`` lookup nor ``resolve_checkpoint`` ever considers a file being written.
    A kill leaves that file behind; the next write to the same destination removes it.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    for stale in destination.parent.glob(f".{destination.name}.*{PARTIAL_SUFFIX}"):
        stale.unlink(missing_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        dir=destination.parent, prefix=f".{destination.name}.", suffix=PARTIAL_SUFFIX
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            save(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _sync_folder(destination.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, writing local files through ``write_atomically`` (remote ones as before)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        local = _local_path(path)
        if local is None or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        import torch

        write_atomically(lambda handle: torch.save(checkpoint, handle), local)


class AtomicCheckpoints(Callback):
    """Puts ``AtomicCheckpointIO`` in place of Lightning's default IO (every model adds this itself).

    A checkpoint IO the user configured (``trainer.plugins``: async, a cloud store) is kept as is.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()


# ----- which checkpoint to load --------------------------------------------------------------


def checkpoint_problem(path) -> str | None:
    """Why the file at ``path`` is not a whole checkpoint, or None when it is.

    ``torch.save`` writes a zip archive whose index is at its end and whose every member carries
    a CRC-32: a file cut short has no index, a damaged one fails a checksum. This reads the
    file once and unpickles nothing. Remote paths are not checked (None).
    """
    local = _local_path(path)
    if local is None:
        return None
    if not local.is_file():
        return "no such file"
    size = local.stat().st_size
    if size == 0:
        return "empty (0 bytes; a write was cut off)"
    if not zipfile.is_zipfile(local):
        return f"not a whole checkpoint ({size} bytes, no archive index at the end: cut off while written)"
    try:
        with zipfile.ZipFile(local) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "a zip archive, but not one torch.save wrote (no data.pkl)"
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError) as error:
        return f"unreadable ({error})"
    if damaged is not None:
        return f"damaged ({damaged} fails its checksum)"
    return None


def _checkpoint_folders(trainer: Trainer) -> list[Path]:
    folders = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            folders.append(Path(callback.dirpath))
    for callback in trainer.callbacks:
        if isinstance(callback, PreemptionCheckpoint):
            folders.append(Path(callback.checkpoint_path(trainer)).parent)
    return list(dict.fromkeys(folders))


def _last_candidates(trainer: Trainer) -> set[Path]:
    """What Lightning's ``ckpt_path="last"`` chooses from: ``last*.ckpt`` in the checkpoint folders."""
    found = {Path(path) for path in _lightning_last_candidates(trainer)}
    for folder in _checkpoint_folders(trainer):
        found |= {path for path in folder.glob("last*.ckpt") if path.is_file()}
    return found


def _lightning_last_candidates(trainer: Trainer) -> set[str]:
    # A ModelCheckpoint without a dirpath resolves its folder from the logger; Lightning knows how.
    candidates: set[str] = set()
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and not callback.dirpath:
            candidates |= last_checkpoints_of(callback, trainer)
    return candidates


def _newest_first(paths) -> list[Path]:
    return sorted(paths, key=lambda path: path.stat().st_mtime, reverse=True)


def _whole_ones(paths: list[Path]) -> list[Path]:
    return [path for path in paths if checkpoint_problem(path) is None]


def resolve_checkpoint(trainer: Trainer, ckpt_path):
    """The checkpoint ``fit`` / ``validate`` / ``test`` / ``predict`` should load for ``ckpt_path``.

    ``"last"``: the newest ``last*.ckpt`` if it is whole; if it is not, a warning names it and
    the newest whole checkpoint in the checkpoint folders (any name) is used; None when there
    is none at all (Lightning then starts fresh, as it does for a first run). A file path is
    returned if whole and refused with a DataError otherwise. Other values (``"best"``, None,
    remote paths) pass through unchanged for Lightning to resolve.
    """
    if ckpt_path == "last":
        return _resolve_last(trainer)
    require_whole(ckpt_path)
    return ckpt_path


def require_whole(ckpt_path) -> None:
    """A DataError naming a local checkpoint file and the whole ones beside it, unless it is whole.

    Names Lightning resolves itself (``"last"``, ``"best"``, ...), None and remote paths pass.
    """
    special = ckpt_path in ("last", "best", "hpc") or str(ckpt_path).startswith("registry")
    if ckpt_path is None or special or _local_path(ckpt_path) is None:
        return
    problem = checkpoint_problem(ckpt_path)
    if problem is not None:
        folder = Path(ckpt_path).parent
        whole = _whole_ones(_newest_first(p for p in folder.glob("*.ckpt") if p.is_file()))
        hint = f" Whole checkpoints beside it, newest first: {', '.join(map(str, whole))}." if whole else ""
        raise DataError(f"ckpt_path={ckpt_path}: cannot load this checkpoint: {problem}.{hint}")


def _resolve_last(trainer: Trainer):
    lasts = _newest_first(_last_candidates(trainer))
    if not lasts:
        return "last"  # Lightning warns that there is nothing to resume and starts fresh
    newest = lasts[0]
    problem = checkpoint_problem(newest)
    if problem is None:
        return str(newest)
    others = {path for folder in _checkpoint_folders(trainer) for path in folder.glob("*.ckpt")}
    others |= set(lasts)
    whole = _whole_ones(_newest_first(path for path in others if path.is_file() and path != newest))
    if not whole:
        raise DataError(
            f"ckpt_path=last: the newest checkpoint, {newest}, cannot be loaded ({problem}), and no "
            "other checkpoint in its folder is whole. Start afresh without --ckpt_path, or name a "
            "checkpoint saved elsewhere."
        )
    log.warning(
        "ckpt_path=last: the newest checkpoint, %s, cannot be loaded (%s); resuming from %s, the "
        "newest whole one.",
        newest,
        problem,
        whole[0],
    )
    return str(whole[0])
