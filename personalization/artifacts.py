"""The artifact folder: exactly what is pushed to the Hub, loadable with plain diffusers (the file table in
README.md#loading-a-pushed-model-with-plain-diffusers).

This module owns the file names and the atomic write of the folder, and clears what a killed write left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import instance_phrase

EMBEDDINGS_FILE = "learned_embeds.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"
UNET_DIR = "unet"
TEXT_ENCODER_DIR = "text_encoder"
CONFIG_FILE = "training_config.json"
SUMMARY_FILE = "training_summary.json"
SAMPLES_DIR = "samples"
CARD_FILE = "README.md"

# Hidden names beside a folder NAME during its write; both carry the writer's process id, so a later run can tell a
# killed write's debris from a write in progress: .NAME.partial-<pid>-<random> (staging), .NAME.old-<pid> (the earlier
# result, moved aside for the moment between the two renames).
_STAGING_PATTERN = r"\.{name}\.partial-(\d+)-[0-9a-z_]+"
_BACKUP_PATTERN = r"\.{name}\.old-(\d+)"
_ANY_HIDDEN = re.compile(r"\.(?P<name>.+?)\.(?:partial-\d+-[0-9a-z_]+|old-\d+)")
# This process's staging and backup folders now in use. Its own PID proves nothing: a killed run's PID is often
# reused by the next one (a restarted container numbers its processes the same way).
_IN_USE: set[Path] = set()


class ArtifactError(ValueError):
    """The folder is not an artifact this engine (or plain diffusers) can load."""


@dataclass(frozen=True)
class ArtifactInfo:
    """What a folder holds and how to use it, read from its training_config.json and its files."""

    folder: Path
    base_model: str
    method: str
    trigger_token: str
    class_noun: str
    instance_prompt: str
    has_embeddings: bool
    has_lora: bool
    has_unet: bool
    has_text_encoder: bool
    config: dict[str, Any]

    @property
    def sample_files(self) -> list[Path]:
        folder = self.folder / SAMPLES_DIR
        return sorted(folder.glob("*.png")) if folder.is_dir() else []


def save_embedding(folder: Path, trigger_token: str, vector: torch.Tensor) -> Path:
    """Write ``learned_embeds.safetensors`` with one key, the trigger, so ``load_textual_inversion(dir)`` needs no
    ``token=`` argument. The vector is stored as float32 [num_vectors, hidden]."""
    tensor = vector.detach().to("cpu", torch.float32).reshape(-1, vector.shape[-1]).contiguous()
    path = folder / EMBEDDINGS_FILE
    save_file({trigger_token: tensor}, str(path))
    return path


def webui_name(trigger_token: str) -> str:
    """A file-name stem from the trigger (never from a path): ``<my-dog>`` -> ``my-dog``."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", trigger_token).strip("-_")
    return stem or "subject"


def save_webui_copies(folder: Path, trigger_token: str, vector: torch.Tensor | None,
                      unet_lora_layers: dict[str, torch.Tensor] | None) -> list[Path]:
    """Copies for AUTOMATIC1111 / ComfyUI users: the embedding as ``<name>_emb.safetensors`` ({"emb_params": ...})
    and the LoRA in kohya naming as ``<name>_lora_kohya.safetensors``. Diffusers ignores both files."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft

    stem = webui_name(trigger_token)
    written = []
    if vector is not None:
        tensor = vector.detach().to("cpu", torch.float32).reshape(-1, vector.shape[-1]).contiguous()
        path = folder / f"{stem}_emb.safetensors"
        save_file({"emb_params": tensor}, str(path))
        written.append(path)
    if unet_lora_layers:
        peft_layers = convert_unet_state_dict_to_peft(dict(unet_lora_layers))
        kohya = convert_state_dict_to_kohya({f"unet.{key}": value for key, value in peft_layers.items()})
        path = folder / f"{stem}_lora_kohya.safetensors"
        save_file({key: value.contiguous() for key, value in kohya.items()}, str(path))
        written.append(path)
    return written


def load_embedding(folder: Path) -> tuple[str, torch.Tensor]:
    tensors = load_file(str(Path(folder) / EMBEDDINGS_FILE))
    if len(tensors) != 1:
        raise ArtifactError(f"{EMBEDDINGS_FILE} must hold exactly one trigger, found {len(tensors)}")
    (token, vector), = tensors.items()
    return token, vector


def write_json(path: Path, values: dict[str, Any]) -> None:
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_artifact(folder: Path | str) -> ArtifactInfo:
    """Describe an artifact folder or raise :class:`ArtifactError` naming what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        recover_output_dir(folder)  # a run killed between its two renames left the earlier result aside
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such artifact folder")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ArtifactError(f"{folder.name}: no {CONFIG_FILE}; is this a folder written by this engine?")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{folder.name}/{CONFIG_FILE} is not valid JSON ({error})") from None
    has_embeddings = (folder / EMBEDDINGS_FILE).is_file()
    has_lora = (folder / LORA_FILE).is_file()
    has_unet = (folder / UNET_DIR / "config.json").is_file()
    has_text_encoder = (folder / TEXT_ENCODER_DIR / "config.json").is_file()
    if not (has_embeddings or has_lora or has_unet or has_text_encoder):
        raise ArtifactError(f"{folder.name}: holds no weights ({EMBEDDINGS_FILE}, {LORA_FILE} or {UNET_DIR}/)")
    trigger = str(config.get("trigger_token") or "")
    noun = str(config.get("class_noun") or "")
    instance_prompt = instance_phrase(trigger, noun, str(config.get("subject_type") or "object"))
    return ArtifactInfo(
        folder=folder,
        base_model=str(config.get("base_model") or ""),
        method=str(config.get("method") or ""),
        trigger_token=trigger,
        class_noun=noun,
        instance_prompt=instance_prompt,
        has_embeddings=has_embeddings,
        has_lora=has_lora,
        has_unet=has_unet,
        has_text_encoder=has_text_encoder,
        config=config,
    )


def prepare_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse, before any training, to replace an existing non-empty folder unless asked to.

    Even with ``overwrite`` only an earlier artifact (a folder holding training_config.json) is replaced: pointing
    ``--out`` at a folder of photos, or at a home folder, must never delete it.
    """
    output_dir = Path(output_dir)
    recover_output_dir(output_dir)  # the refusals below judge the folder as the last finished run left it
    if output_dir.exists() and not output_dir.is_dir():
        raise ArtifactError(f"{output_dir}: exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise ArtifactError(f"{output_dir}: folder exists and is not empty (choose another --out or --overwrite)")
        if not (output_dir / CONFIG_FILE).is_file():
            raise ArtifactError(
                f"{output_dir}: not an earlier result of this engine (no {CONFIG_FILE}); --overwrite only replaces "
                "those, choose an empty or new folder"
            )
    parent = output_dir.resolve().parent
    if parent.exists() and not os.access(parent, os.W_OK):
        raise ArtifactError(f"{parent}: no permission to write there")


@contextlib.contextmanager
def atomic_output_dir(output_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``output_dir``; on success it replaces ``output_dir``.

    A crash or cancel removes the temporary folder and leaves ``output_dir`` as it was (see :func:`staged_replace`).
    """
    output_dir = Path(output_dir).resolve()  # "." and "out/.." have no usable name of their own
    prepare_output_dir(output_dir, overwrite)
    with staged_replace(output_dir) as staging:
        yield staging


@contextlib.contextmanager
def staged_replace(target: Path | str) -> Iterator[Path]:
    """Yield a new hidden staging folder beside ``target``; when the block ends without error it replaces ``target``.

    No refusals here (that is :func:`prepare_output_dir`). An error or interrupt anywhere leaves ``target`` as it was,
    or the new one once the second rename is done; a kill leaves only names :func:`recover_output_dir` clears.
    """
    target = Path(target).resolve()
    recover_output_dir(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_name(target)
    backup = target.with_name(f".{target.name}.old-{os.getpid()}")
    claimed = {staging, backup}
    _IN_USE.update(claimed)  # before the folder exists, so another thread's cleanup never sees it unclaimed
    try:
        os.mkdir(staging, 0o700)
        try:
            yield staging
            _swap(staging, target, backup)
        except BaseException:
            _undo(staging, target, backup)
            raise
    finally:
        _IN_USE.difference_update(claimed)


@contextlib.contextmanager
def scratch_beside(target: Path | str) -> Iterator[Path]:
    """Yield a new hidden scratch folder beside ``target`` (same file system, so hard links work), removed when the
    block ends; named like a staging folder, so what a kill leaves is cleared by :func:`recover_output_dir`."""
    target = Path(target).resolve()
    scratch = _staging_name(target)
    _IN_USE.add(scratch)
    try:
        os.mkdir(scratch, 0o700)
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        _IN_USE.discard(scratch)


def _staging_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")


def _swap(staging: Path, target: Path, backup: Path) -> None:
    # Two renames: a folder cannot replace a non-empty folder in one. Between them the earlier result exists only as
    # the backup, which _undo (an interrupt) or recover_output_dir (a kill) puts back.
    if os.path.lexists(target):
        os.replace(target, backup)
    os.replace(staging, target)
    shutil.rmtree(backup, ignore_errors=True)


def _undo(staging: Path, target: Path, backup: Path) -> None:
    swapped = not staging.exists()  # the second rename turned the staging folder into target
    shutil.rmtree(staging, ignore_errors=True)
    if not backup.is_dir():
        return
    if swapped:
        shutil.rmtree(backup, ignore_errors=True)
    elif not os.path.lexists(target):
        os.replace(backup, target)


def recover_output_dir(output_dir: Path | str) -> int:
    """Clear what killed writes of ``output_dir`` left beside it; return how many folders were removed or restored.

    Only folders named ``.NAME.partial-<pid>-*`` or ``.NAME.old-<pid>`` whose process is gone are touched: staging
    folders are removed; a backup is renamed back to ``output_dir`` if that is missing (the kill came between the two
    renames, so the earlier result is restored), otherwise it is removed (the new result was already in place).
    """
    output_dir = Path(output_dir).resolve()
    return _recover(output_dir.parent, output_dir.name)


def clean_stale_staging(parent: Path | str) -> int:
    """:func:`recover_output_dir` for every folder of ``parent`` (one level) with hidden staging or backup names
    beside it, e.g. the app's session folders; return how many folders were removed or restored."""
    parent = Path(parent)
    if not parent.is_dir():
        return 0
    names = {match["name"] for entry in parent.iterdir() if (match := _ANY_HIDDEN.fullmatch(entry.name))}
    return sum(_recover(parent, name) for name in sorted(names))


def _recover(parent: Path, name: str) -> int:
    if not name or not parent.is_dir():
        return 0
    stagings = _stale(parent, _STAGING_PATTERN.format(name=re.escape(name)))
    for folder in stagings:
        shutil.rmtree(folder, ignore_errors=True)
    backups = sorted(_stale(parent, _BACKUP_PATTERN.format(name=re.escape(name))), key=lambda p: p.stat().st_mtime)
    restored = 0
    if backups and not os.path.lexists(parent / name):
        with contextlib.suppress(FileNotFoundError):  # another process restored it first
            os.replace(backups.pop(), parent / name)
            restored = 1
    for folder in backups:
        shutil.rmtree(folder, ignore_errors=True)
    return len(stagings) + restored + len(backups)


def _stale(parent: Path, pattern: str) -> list[Path]:
    """Folders of ``parent`` named by ``pattern`` (group 1: the owner's PID) whose owner is gone."""
    found = []
    for entry in parent.iterdir():
        match = re.fullmatch(pattern, entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _owner_alive(entry, int(match[1])):
            found.append(entry)
    return found


def _owner_alive(folder: Path, pid: int) -> bool:
    if pid == os.getpid():
        return folder.resolve() in _IN_USE
    return process_alive(pid)


def process_alive(pid: int) -> bool:
    """Whether process `pid` may still be running: only a definite "no such process" says it is gone."""
    if os.name == "nt":  # there os.kill ends the process instead of probing it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process, or no PID at all: not ours to judge, leave it
        return True
    return True
    return True
