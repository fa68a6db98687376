"""A training run's directory: the rules for starting or resuming a run in it, and errors while writing it.

A new run never overwrites an existing one (`RunDirectory.prepare` refuses a directory that holds a manifest,
a checkpoint or a stored table part unless resuming); resuming needs the directory and, unless the run died
before its first checkpoint, its checkpoint (a finished run without one has nothing to resume). Before any
work the directory is probed for writability, so an unwritable directory fails at once with nothing changed.
What the run writes into it - tables and manifest through the tracking store, checkpoints through
`experiments.checkpoint` - is written atomically, so a run killed at any moment leaves it readable.

A checkpoint is `checkpoint.pt` (one file: single process and DDP) or, for a sharded model (FSDP2), a directory
`checkpoint-<step>/` (every rank's shards through torch.distributed.checkpoint plus `state.pt`), written as
`.checkpoint-<step>.tmp/` and renamed when complete: every `checkpoint-<step>/` is complete, and a resume takes
the one of the highest step (`latest_checkpoint`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from neural_mechanics.errors import RunStoreError
from neural_mechanics.experiments.distributed import barrier

CHECKPOINT = "checkpoint.pt"
SHARDED_STATE = "state.pt"
"""The file of a sharded checkpoint directory holding everything but the model and optimizer shards."""
_SHARDED_NAME = re.compile(r"checkpoint-(\d+)")
_TABLE_DIRS = ("groups", "layers", "metrics")

#: The note a run directory gets when --resume finds no checkpoint to resume from.
RESTART_NOTE = "resumed without a checkpoint (killed before the first one): restarted from step 0"


def store_error(exc: OSError | RuntimeError, path: Path, doing: str) -> RunStoreError:
    """An OSError (or torch's RuntimeError wrapping one) while writing the run, as a RunStoreError saying what to do."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code == errno.ENOSPC or "No space left" in text:
        return RunStoreError(f"the disk holding {path} is full (while {doing}): {exc}",
                             "free disk space or choose another --run-dir, then run again with --resume; every "
                             "row flushed before this point is intact")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in text or "Read-only" in text:
        return RunStoreError(f"{path} is not writable (while {doing}): {exc}",
                             "make the run directory writable or choose another --run-dir; nothing in it was "
                             "changed")
    return RunStoreError(f"could not write {path} (while {doing}): {exc}",
                         "check the file system and the run directory, then run again with --resume")


def probe_writable(path: Path) -> None:
    """Create and delete a temp file in `path` (created if missing); RunStoreError if the directory is not writable."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".nmech-write-probe-{os.getpid()}"
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise store_error(exc, path, "checking that the run directory is writable") from exc


def manifest_status(path: Path) -> str | None:
    """The `status` of the run in `path` (None when there is no readable manifest)."""
    try:
        return str(json.loads((path / "manifest.json").read_text()).get("status"))
    except (OSError, ValueError, AttributeError):
        return None


def sharded_checkpoint_name(step: int) -> str:
    """The directory name of the sharded checkpoint of optimizer step `step` (sorts by step)."""
    return f"checkpoint-{step:08d}"


def sharded_checkpoints(path: Path) -> list[tuple[int, Path]]:
    """The complete sharded checkpoints in `path` as (step, directory), by increasing step."""
    if not path.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in path.iterdir() if (m := _SHARDED_NAME.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def has_run(path: Path) -> bool:
    """True when `path` holds (part of) a run: a manifest, a checkpoint, or a stored table part."""
    if (path / "manifest.json").exists() or (path / CHECKPOINT).exists() or sharded_checkpoints(path):
        return True
    return any(any(p.name.startswith("part-") for p in (path / t).iterdir())
               for t in _TABLE_DIRS if (path / t).is_dir())


@dataclass(frozen=True)
class RunDirectory:
    """The directory of one run, seen from one rank (rank 0 alone writes to it)."""

    path: Path
    rank: int = 0
    world: int = 1

    @property
    def checkpoint(self) -> Path:
        """The single-file checkpoint (single process, DDP)."""
        return self.path / CHECKPOINT

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint a resume continues from: the sharded one of the highest step, else `checkpoint.pt`,
        else None."""
        sharded = sharded_checkpoints(self.path)
        if sharded:
            return sharded[-1][1]
        return self.checkpoint if self.checkpoint.is_file() else None

    def prepare(self, resume: bool) -> str | None:
        """Check that a run may start (or resume) here, probe writability, remove a half-written checkpoint.

        Returns RESTART_NOTE when resuming a run that has no checkpoint yet (it restarts from step 0), else None.
        RunStoreError when the directory already holds a run (and not resuming), or has nothing to resume. All
        ranks return only after every rank has inspected the directory and before rank 0 writes to it.
        """
        restart_note = None
        if resume and self.latest_checkpoint() is None:
            if not self.path.is_dir():
                raise RunStoreError(f"cannot resume: {self.path} does not exist",
                                    "check --run-dir, or run without --resume to start a new run")
            if manifest_status(self.path) == "finished":
                raise RunStoreError(f"the run in {self.path} has finished and kept no checkpoint, so there is "
                                    "nothing to resume", "start a new run in another --run-dir (set "
                                    "checkpoint_every > 0 to make runs resumable)")
            restart_note = RESTART_NOTE
        if not resume and self.path.is_dir() and has_run(self.path):
            raise RunStoreError(f"{self.path} already holds a run",
                                "pass --resume to continue it, or choose another --run-dir (nothing was overwritten)")
        if self.rank == 0:
            probe_writable(self.path)
            for stale in self.path.glob(f".{CHECKPOINT}.tmp-*"):  # left by a run killed while checkpointing
                stale.unlink(missing_ok=True)
            for stale_dir in self.path.glob(".checkpoint-*.tmp"):  # a sharded checkpoint killed while written
                shutil.rmtree(stale_dir, ignore_errors=True)
        barrier(self.world)  # every rank has inspected the run directory before rank 0 writes to it
        return restart_note
