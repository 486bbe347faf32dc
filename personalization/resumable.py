"""Runs a restarted app can resume, each reachable only with the secret key issued when it started.

The app's runs live in the browser session's own workspace folder (:class:`personalization.jobs.Workspace`), and
after a server restart the user's new session has a new one. So when a run starts, the app issues a random key
(:func:`new_key`, 256 bits) and gives it to that user only; here only the key's SHA-256 is kept, as the name of a
hidden record folder in the run's workspace (``.resumable-<digest>/``: the run's settings and its prepared photos).
Whoever sends the key finds the record by the digest of what they sent, never by a path or folder name they send,
and :func:`adopt_run` moves the record and the trainer's resume folder into their own workspace, where the run
continues with ``train(..., resume=True)``.

Records live in the workspace folder, so they go with it (the app removes folders idle for a day); :func:`settle`
removes one when its run ends with nothing left to resume (finished, or cancelled). A workspace that a live process
holds (:meth:`Workspace.in_use`) is training: its run is not adopted, so no run trains twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from . import artifacts
from .config import ResolvedConfig, TrainingConfig
from .images import SubjectImages
from .jobs import folder_in_use
from .snapshots import resume_dir

KEY_BYTES = 32
KEY_LENGTH = 43  # secrets.token_urlsafe(32): 32 bytes in unpadded URL-safe base64
KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{43}")
RECORD_PREFIX = ".resumable-"
RECORD_FILE = "run.json"
PHOTOS_DIR = "photos"

UNKNOWN = ("No interrupted run has this resume code (it finished, was discarded, or its folder was removed after a "
           "day unused).")
LIVE = "The session this run belongs to is training right now; resume the run once that training has stopped."
LIVE_DISCARD = "The session this run belongs to is training right now; discard the run once that training has stopped."
NOT_STARTED = "This run stopped before its first checkpoint, so there is nothing to resume; start it again."

CARRIED_PREFIX = "resume-state-"  # + pid: the trainer's state inside the record while the record moves it
# Finding a record, checking its workspace and moving it are one step for the threads of this process (reentrant:
# adopting and discarding find the run first); a rename is atomic, so another process that found the record too
# finds nothing to move.
_MOVING = threading.RLock()


class ResumeError(ValueError):
    """A resume code that cannot be used, said in one sentence."""


def new_key() -> str:
    return secrets.token_urlsafe(KEY_BYTES)


def key_refusal(value: object) -> str | None:
    """Why ``value`` cannot be a resume code (a phrase for "<field>: <phrase>."), or None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "is empty (paste the code shown when the run started)"
    if not isinstance(value, str):
        return f"must be text, got {type(value).__name__}"
    if not KEY_PATTERN.fullmatch(value.strip()):
        return f"is not a resume code (a resume code is {KEY_LENGTH} letters, digits, '-' and '_')"
    return None


def check_key(value: object) -> str:
    """The key in ``value`` (surrounding spaces dropped), or ResumeError saying what is wrong with it."""
    reason = key_refusal(value)
    if reason is not None:
        raise ResumeError(f"The resume code {reason}.")
    assert isinstance(value, str)
    return value.strip()


def key_digest(key: str) -> str:
    return hashlib.sha256(check_key(key).encode()).hexdigest()


@dataclass(frozen=True)
class ResumableRun:
    """A run's record: where it is, what it trains and on which photos."""

    record: Path
    run_name: str
    config: dict[str, Any]
    photo_names: list[str]
    notes: list[str]

    @property
    def workspace(self) -> Path:
        return self.record.parent

    @property
    def output_dir(self) -> Path:
        return self.workspace / self.run_name

    @property
    def live(self) -> bool:
        """Whether a live process holds the run's workspace (:meth:`Workspace.in_use`): a training is on there."""
        return folder_in_use(self.workspace)

    @property
    def resumable(self) -> bool:
        """Whether the run reached a checkpoint and has not ended since (the trainer's resume state is there)."""
        return (resume_dir(self.output_dir) / artifacts.RESUME_STATE_FILE).is_file()

    def training_config(self) -> ResolvedConfig:
        return ResolvedConfig.from_dict(self.config)

    def subject_images(self) -> SubjectImages:
        """The photos as the run was started on them (prepared, lossless): the resume checks their pixels."""
        images = []
        for index in range(len(self.photo_names)):
            with Image.open(self.record / PHOTOS_DIR / f"{index:03d}.png") as image:
                images.append(image.copy())
        return SubjectImages(images, list(self.photo_names), list(self.notes))

    def stopped_at(self) -> int | None:
        """The step of the checkpoint the run continues from; None when its state cannot be read."""
        import torch

        try:  # memory-mapped: the weights and moments (gigabytes on SD) are not read for one number
            state = torch.load(resume_dir(self.output_dir) / artifacts.RESUME_STATE_FILE, map_location="cpu",
                               weights_only=True, mmap=True)
            return int(state["step"])
        except Exception:
            return None

    def total_steps(self) -> int:
        from .recipes import recipe_for

        return recipe_for(self.training_config()).total_steps

    def describe(self) -> str:
        """One line naming the run and where it stopped."""
        from .methods import method_spec

        config = self.training_config()
        step = self.stopped_at()
        where = f"step {step} of {self.total_steps()}" if step is not None else "its last checkpoint"
        return (f"{method_spec(config.method).label} on {len(self.photo_names)} photo(s) of a {config.class_noun} "
                f"(run {self.run_name}), stopped at {where}.")


def record_run(workspace: Path, key: str, config: TrainingConfig, images: SubjectImages,
               output_dir: Path) -> Path:
    """Record a run that starts training into ``output_dir`` (a folder of ``workspace``), findable with ``key``."""
    if Path(output_dir).parent.resolve() != Path(workspace).resolve():
        raise ValueError(f"{output_dir} is not a run folder of the workspace {workspace}")
    record = Path(workspace) / f"{RECORD_PREFIX}{key_digest(key)}"
    values = {"run": Path(output_dir).name, "config": config.to_dict(), "photos": list(images.names),
              "notes": list(images.notes)}
    with artifacts.staged_replace(record) as staging:
        (staging / PHOTOS_DIR).mkdir()
        for index, image in enumerate(images.images):
            image.save(staging / PHOTOS_DIR / f"{index:03d}.png")
        (staging / RECORD_FILE).write_text(json.dumps(values), encoding="utf-8")
    return record


def read_record(record: Path, *, check_config: bool = True) -> ResumableRun:
    """The run of ``record``, or ResumeError. ``check_config``: also refuse settings this version cannot train
    (records outlive the server, and a restart is often a new version): describing or resuming the run needs them."""
    try:
        values = json.loads((record / RECORD_FILE).read_text(encoding="utf-8"))
        run_name = values["run"]
        if not isinstance(run_name, str) or run_name != Path(run_name).name or run_name.startswith("."):
            raise ValueError(f"not a run folder name: {run_name!r}")
        run = ResumableRun(record, run_name, dict(values["config"]), list(values["photos"]),
                           list(values.get("notes", [])))
    except (OSError, ValueError, KeyError, TypeError) as error:
        # An OSError's text names the file: the server's folders and the owner's session, not the caller's business.
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)[:120]
        raise ResumeError(f"The record of this run cannot be read ({reason}).") from None
    if check_config:
        try:
            run.training_config()
        except (ValueError, TypeError) as error:  # ConfigError: an unknown field, a method no longer offered
            reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
            raise ResumeError(f"This run was recorded by another version of this app and cannot be resumed here "
                              f"({reason}).") from None
    return run


def find_run(root: Path, key: str, *, check_config: bool = True) -> ResumableRun:
    """The run recorded under ``key`` in any workspace of ``root``, or ResumeError (:data:`UNKNOWN`)."""
    name = f"{RECORD_PREFIX}{key_digest(key)}"
    root = Path(root)
    with _MOVING:
        for workspace in sorted(root.iterdir()) if root.is_dir() else []:
            record = workspace / name
            if record.is_dir() and not record.is_symlink():
                _unpack(record, stale_only=True)
                return read_record(record, check_config=check_config)
    raise ResumeError(UNKNOWN)


def _unpack(record: Path, *, stale_only: bool) -> None:
    """Put the trainer's state that ``record`` carries (see :func:`adopt_run`) back beside its run. ``stale_only``:
    only a state whose mover is gone (a kill mid-move); called holding :data:`_MOVING`, so none of this process's
    moves is under way, and this process's own PID (maybe the killed server's, reused) counts as gone."""
    for carried in record.glob(f"{CARRIED_PREFIX}*"):
        pid = carried.name.removeprefix(CARRIED_PREFIX)
        if stale_only and pid.isdigit() and int(pid) != os.getpid() and artifacts.process_alive(int(pid)):
            continue  # another server process is moving this run right now
        try:
            target = resume_dir(record.parent / read_record(record, check_config=False).run_name)
        except ResumeError:
            return
        if not target.exists():
            with contextlib.suppress(FileNotFoundError):  # another process put it back first
                os.rename(carried, target)


def adopt_run(root: Path, key: str, workspace: Path) -> ResumableRun:
    """Move the run recorded under ``key`` (its record and the trainer's resume folder) into ``workspace``, which
    the caller holds with :meth:`Workspace.in_use` until the run has ended, so no other caller adopts it meanwhile.

    Refused (ResumeError) when no run has that key, when the run's workspace is in use by a live process (training
    there now), or when the run never reached a checkpoint."""
    workspace = Path(workspace)
    with _MOVING:
        run = find_run(root, key)
        here = run.workspace.resolve() == workspace.resolve()
        if not here and run.live:
            raise ResumeError(LIVE)
        if not run.resumable:
            raise ResumeError(NOT_STARTED)
        if here:
            return run
        target = workspace / run.run_name
        if target.exists() or resume_dir(target).exists():
            raise ResumeError(f"This session already holds a run named {run.run_name}.")
        # The state rides inside the record, so one rename moves both: a kill between two moves of their own would
        # leave the record here and its state there (found by find_run as a run with nothing to resume).
        carried = run.record / f"{CARRIED_PREFIX}{os.getpid()}"
        try:
            os.rename(resume_dir(run.output_dir), carried)
        except FileNotFoundError:  # another server process on the same folder took it first
            raise ResumeError(LIVE) from None
        moved = workspace / run.record.name
        os.rename(run.record, moved)
        _unpack(moved, stale_only=False)
        return read_record(moved)


def discard_run(root: Path, key: str) -> ResumableRun:
    """Remove the run recorded under ``key``: its checkpoints, its resume state and its record. Refused
    (ResumeError) when no run has that key, or while its workspace is in use by a live process."""
    with _MOVING:
        run = find_run(root, key, check_config=False)  # a run this version cannot resume can still be discarded
        if run.live:
            raise ResumeError(LIVE_DISCARD)
        _remove(resume_dir(run.output_dir))
        _remove(run.record)
        return run


def forget_earlier_runs(workspace: Path) -> int:
    """Remove the records and resume states of the runs in ``workspace``, before a new run starts there; returns
    how many. The page keeps one resume code per session, the newest run's, so only a client that kept older codes
    could resume these; without this a session whose runs keep failing piles up states (a full SD-1.5 U-Net's is
    about 10 GB) on a disk shared by strangers until the folder expires. The caller holds ``workspace``."""
    removed = 0
    with _MOVING:
        for record in sorted(Path(workspace).glob(f"{RECORD_PREFIX}*")):
            if not record.is_dir() or record.is_symlink():
                continue
            with contextlib.suppress(ResumeError):  # an unreadable record still goes
                _remove(resume_dir(Path(workspace) / read_record(record, check_config=False).run_name))
            _remove(record)
            removed += 1
    return removed


def _remove(folder: Path) -> None:
    """Remove ``folder`` as one rename: a kill mid-removal leaves a hidden staging folder, which the workspace's
    cleaning clears (artifacts.clean_stale_staging), never a half record whose code finds a run it cannot read."""
    with artifacts.scratch_beside(folder) as trash, contextlib.suppress(FileNotFoundError):
        os.rename(folder, trash / folder.name)


def settle(record: Path) -> bool:
    """After a run of ``record`` ended: keep the record while the run can still be resumed (a crash after a
    checkpoint), else remove it. Returns whether it was kept."""
    if not Path(record).is_dir():
        return False
    try:
        if read_record(record, check_config=False).resumable:
            return True
    except ResumeError:
        pass
    _remove(record)
    return False
