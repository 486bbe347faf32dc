"""The artifact folder: exactly what is pushed to the Hub, loadable with plain diffusers (the file table in
README.md#loading-a-pushed-model-with-plain-diffusers).

This module owns the file names, every writer and the one reader of the folder (:func:`read_artifact`), and the
atomic write of the folder; it clears what a killed write left behind. The trainer hands it tensors and models, the
model card module hands it the card's text: no other module spells a file name of the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import instance_phrase

if TYPE_CHECKING:  # the models and images only pass through; importing diffusers here would slow every reader
    from diffusers import UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel

EMBEDDINGS_FILE = "learned_embeds.safetensors"
# SDXL learns the trigger in both text encoders: one file, one tensor per encoder under the keys SDXL users already
# load (AUTOMATIC1111's and ComfyUI's SDXL embeddings use the same keys).
SDXL_EMBEDDINGS_FILE = "learned_embeds_sdxl.safetensors"
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")
LORA_FILE = "pytorch_lora_weights.safetensors"
UNET_DIR = "unet"
TEXT_ENCODER_DIR = "text_encoder"
CONFIG_FILE = "training_config.json"
SUMMARY_FILE = "training_summary.json"
SAMPLES_DIR = "samples"
CARD_FILE = "README.md"
SAMPLE_NAME = "sample_{index}.png"
# Checkpoints through the run (personalization.checkpoints): each step's folder holds that step's weights under the
# top level's file names (so plain diffusers loads it the same way) and its samples; kept out of pushes.
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINTS_FILE = "checkpoints.json"
CHECKPOINT_NAME = "step-{step:06d}"
# What a run keeps beside its output folder while it trains: the checkpoints so far and the state to resume from.
RESUME_NAME = ".{name}.resume"
RESUME_STATE_FILE = "resume_state.pt"
# Web-UI copies are named from the trigger (see webui_name): <name>_emb.safetensors, <name>_lora_kohya.safetensors.
WEBUI_EMBEDDING_SUFFIX = "_emb.safetensors"
WEBUI_LORA_SUFFIX = "_lora_kohya.safetensors"

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
    has_sdxl_embeddings: bool = False  # the embeddings are SDXL's two-encoder file (has_embeddings is set too)

    @property
    def sample_files(self) -> list[Path]:
        folder = self.folder / SAMPLES_DIR
        return sorted(folder.glob("*.png")) if folder.is_dir() else []


# ---- writers: what a training run puts in the folder -----------------------------------------------------------------
# A learned trigger: one vector (SD-1.5), or one per text encoder keyed as in SDXL_EMBEDDING_KEYS (SDXL).
TriggerVectors = torch.Tensor | dict[str, torch.Tensor]


def save_embedding(folder: Path, trigger_token: str, vector: TriggerVectors) -> Path:
    """Write ``learned_embeds.safetensors`` with one key, the trigger, so ``load_textual_inversion(dir)`` needs no
    ``token=`` argument; or, for SDXL's two vectors, ``learned_embeds_sdxl.safetensors`` with ``clip_l`` and
    ``clip_g`` (loaded with one ``load_textual_inversion`` call per encoder, as the card shows). Vectors are stored
    as float32 [num_vectors, hidden]."""
    if isinstance(vector, dict):
        path = folder / SDXL_EMBEDDINGS_FILE
        save_file(_sdxl_embedding_tensors(vector), str(path))
        return path
    path = folder / EMBEDDINGS_FILE
    save_file({trigger_token: _embedding_tensor(vector)}, str(path))
    return path


def _sdxl_embedding_tensors(vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if tuple(vectors) != SDXL_EMBEDDING_KEYS:
        raise ValueError(f"SDXL embeddings need the keys {SDXL_EMBEDDING_KEYS}, got {tuple(vectors)}")
    return {key: _embedding_tensor(value) for key, value in vectors.items()}


def _embedding_tensor(vector: torch.Tensor) -> torch.Tensor:
    # float32 whatever the training precision: both loaders cast to the text encoder's dtype themselves.
    return vector.detach().to("cpu", torch.float32).reshape(-1, vector.shape[-1]).contiguous()


def save_lora(folder: Path, unet_lora_layers: dict[str, torch.Tensor], adapter_metadata: dict[str, Any]) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` with diffusers' own writer, so the keys (``unet.`` prefix) and the
    adapter metadata (rank, alpha, target modules) are what ``load_lora_weights(dir)`` expects."""
    from diffusers import StableDiffusionPipeline

    # weight_name spelled out: diffusers' default happens to be the same name today, the Hub repos depend on it.
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=unet_lora_layers, weight_name=LORA_FILE,
                                              unet_lora_adapter_metadata=adapter_metadata)
    return folder / LORA_FILE


def save_unet(folder: Path, unet: UNet2DConditionModel) -> Path:
    """Write ``unet/`` in float16 (``UNet2DConditionModel.from_pretrained(repo, subfolder="unet")``).

    The model is converted in place, not copied: a copy would double the memory of a full U-Net at the end of a run.
    """
    unet.to(torch.float16).save_pretrained(folder / UNET_DIR)
    return folder / UNET_DIR


def save_unet_copy(folder: Path, unet: UNet2DConditionModel) -> Path:
    """Write ``unet/`` in float16 like :func:`save_unet`, leaving the model as it is (a checkpoint mid-run): one
    tensor at a time is converted, so the extra memory is one float16 copy in RAM, never on the GPU."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

    target = folder / UNET_DIR
    target.mkdir()
    unet.save_config(target)
    save_file({name: tensor.detach().to("cpu", torch.float16).contiguous()
               for name, tensor in unet.state_dict().items()},
              str(target / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    return target


def save_text_encoder_copy(folder: Path, text_encoder: CLIPTextModel) -> Path:
    """Write ``text_encoder/`` in float16 like :func:`save_text_encoder`, leaving the model as it is."""
    from transformers.utils import SAFE_WEIGHTS_NAME

    target = folder / TEXT_ENCODER_DIR
    target.mkdir()
    text_encoder.config.save_pretrained(target)
    save_file({name: tensor.detach().to("cpu", torch.float16).contiguous()
               for name, tensor in text_encoder.state_dict().items()},
              str(target / SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
    return target


def checkpoint_entries(checkpoint_dir: Path) -> list[Path]:
    """What a checkpoint folder puts at the artifact's top level when it is the kept step: its weights, their
    web-UI copies and its samples."""
    names = {EMBEDDINGS_FILE, SDXL_EMBEDDINGS_FILE, LORA_FILE, UNET_DIR, TEXT_ENCODER_DIR, SAMPLES_DIR}
    return sorted(path for path in checkpoint_dir.iterdir()
                  if path.name in names or path.name.endswith((WEBUI_EMBEDDING_SUFFIX, WEBUI_LORA_SUFFIX)))


def holds_unet_weights(folder: Path) -> bool:
    """Whether a folder (an artifact or a checkpoint) holds U-Net weights: a LoRA or a full U-Net."""
    return (folder / LORA_FILE).is_file() or (folder / UNET_DIR).is_dir()


def link_tree(source: Path, target: Path) -> None:
    """Hard-link ``source`` (a file or a folder, recursively) to ``target``; copy where links are refused."""
    if source.is_dir():
        target.mkdir()
        for entry in source.iterdir():
            link_tree(entry, target / entry.name)
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def save_text_encoder(folder: Path, text_encoder: CLIPTextModel) -> Path:
    """Write ``text_encoder/`` in float16; like :func:`save_unet`, the model is converted in place."""
    text_encoder.to(torch.float16).save_pretrained(folder / TEXT_ENCODER_DIR)
    return folder / TEXT_ENCODER_DIR


def save_samples(folder: Path, images: Iterable[Image.Image]) -> list[str]:
    """Write ``samples/sample_<i>.png`` as each image arrives (a generator renders the next only after this one is
    on disk); return the file names. No images, no ``samples/`` folder."""
    names = []
    for index, image in enumerate(images):
        if index == 0:
            (folder / SAMPLES_DIR).mkdir()
        name = SAMPLE_NAME.format(index=index)
        image.save(folder / SAMPLES_DIR / name)
        names.append(name)
    return names


def sample_names(folder: Path) -> list[str]:
    """The names of ``samples/sample_<i>.png`` in index order."""
    names, index = [], 0
    while (folder / SAMPLES_DIR / SAMPLE_NAME.format(index=index)).is_file():
        names.append(SAMPLE_NAME.format(index=index))
        index += 1
    return names


def save_config(folder: Path, values: dict[str, Any]) -> Path:
    """Write ``training_config.json``: what :func:`read_artifact` and ``TrainingConfig.from_dict`` read back."""
    return _write_json(folder / CONFIG_FILE, values)


def save_summary(folder: Path, values: dict[str, Any]) -> Path:
    """Write ``training_summary.json``: the run's timings and losses, for the card and the benchmarks."""
    return _write_json(folder / SUMMARY_FILE, values)


def _write_json(path: Path, values: dict[str, Any]) -> Path:
    # Sorted keys and a final newline: two runs with the same settings write the same bytes, which diffs well.
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def save_card(folder: Path, text: str) -> Path:
    """Write ``README.md`` (rendered by :mod:`personalization.model_card`) byte for byte: no newline translation,
    as ``huggingface_hub.ModelCard.save`` does."""
    path = folder / CARD_FILE
    path.write_bytes(text.encode("utf-8"))
    return path


def read_card(folder: Path | str) -> str:
    """The folder's ``README.md``, for the copy of the card that is pushed."""
    return (Path(folder) / CARD_FILE).read_text(encoding="utf-8")


# ---- web-UI copies: files for AUTOMATIC1111 / ComfyUI that diffusers ignores ----------------------------------------
def webui_name(trigger_token: str) -> str:
    """A file-name stem from the trigger (never from a path): ``<my-dog>`` -> ``my-dog``."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", trigger_token).strip("-_")
    return stem or "subject"


def webui_embedding_file(trigger_token: str) -> str:
    """``<name>_emb.safetensors``; in AUTOMATIC1111 an embedding's file name is its trigger word."""
    return webui_name(trigger_token) + WEBUI_EMBEDDING_SUFFIX


def webui_lora_file(trigger_token: str) -> str:
    """``<name>_lora_kohya.safetensors``."""
    return webui_name(trigger_token) + WEBUI_LORA_SUFFIX


def save_webui_copies(folder: Path, trigger_token: str, vector: TriggerVectors | None,
                      unet_lora_layers: dict[str, torch.Tensor] | None) -> list[Path]:
    """Copies for AUTOMATIC1111 / ComfyUI users: the embedding as ``<name>_emb.safetensors`` ({"emb_params": ...};
    for SDXL {"clip_l": ..., "clip_g": ...}, those programs' SDXL convention) and the LoRA in kohya naming as
    ``<name>_lora_kohya.safetensors``. Diffusers ignores both files."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft

    written = []
    if vector is not None:
        path = folder / webui_embedding_file(trigger_token)
        tensors = _sdxl_embedding_tensors(vector) if isinstance(vector, dict) else {
            "emb_params": _embedding_tensor(vector)}
        save_file(tensors, str(path))
        written.append(path)
    if unet_lora_layers:
        peft_layers = convert_unet_state_dict_to_peft(dict(unet_lora_layers))
        kohya = convert_state_dict_to_kohya({f"unet.{key}": value for key, value in peft_layers.items()})
        path = folder / webui_lora_file(trigger_token)
        save_file({key: value.contiguous() for key, value in kohya.items()}, str(path))
        written.append(path)
    return written


# ---- the reader ------------------------------------------------------------------------------------------------------
def read_artifact(folder: Path | str) -> ArtifactInfo:
    """Describe an artifact folder or raise :class:`ArtifactError` naming what is missing or damaged."""
    folder = Path(folder)
    if not folder.is_dir():
        recover_output_dir(folder)  # a run killed between its two renames left the earlier result aside
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such artifact folder")
    config = _read_config(folder)
    has_sdxl_embeddings = (folder / SDXL_EMBEDDINGS_FILE).is_file()
    has_embeddings = (folder / EMBEDDINGS_FILE).is_file() or has_sdxl_embeddings
    has_lora = (folder / LORA_FILE).is_file()
    has_unet = (folder / UNET_DIR / "config.json").is_file()
    has_text_encoder = (folder / TEXT_ENCODER_DIR / "config.json").is_file()
    if not (has_embeddings or has_lora or has_unet or has_text_encoder):
        raise ArtifactError(f"{folder.name}: holds no weights ({EMBEDDINGS_FILE}, {LORA_FILE} or {UNET_DIR}/)")
    if has_sdxl_embeddings and sorted(keys := _safetensors_keys(folder, SDXL_EMBEDDINGS_FILE)) != sorted(
            SDXL_EMBEDDING_KEYS):
        raise ArtifactError(f"{folder.name}/{SDXL_EMBEDDINGS_FILE} must hold {' and '.join(SDXL_EMBEDDING_KEYS)}, "
                            f"found {', '.join(keys) or 'nothing'}")
    if has_embeddings and not has_sdxl_embeddings and len(keys := _safetensors_keys(folder, EMBEDDINGS_FILE)) != 1:
        # load_textual_inversion(dir) without token= only works with one key, and the key is the trigger
        raise ArtifactError(f"{folder.name}/{EMBEDDINGS_FILE} must hold exactly one trigger, found {len(keys)}")
    if has_lora and not _safetensors_keys(folder, LORA_FILE):
        raise ArtifactError(f"{folder.name}/{LORA_FILE} holds no tensors")
    trigger = str(config.get("trigger_token") or "")
    noun = str(config.get("class_noun") or "")
    return ArtifactInfo(
        folder=folder, base_model=str(config.get("base_model") or ""), method=str(config.get("method") or ""),
        trigger_token=trigger, class_noun=noun,
        instance_prompt=instance_phrase(trigger, noun, str(config.get("subject_type") or "object")),
        has_embeddings=has_embeddings, has_lora=has_lora, has_unet=has_unet, has_text_encoder=has_text_encoder,
        config=config, has_sdxl_embeddings=has_sdxl_embeddings,
    )


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(f"{folder.name}: no {CONFIG_FILE}; is this a folder written by this engine?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{folder.name}/{CONFIG_FILE} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{folder.name}/{CONFIG_FILE} is not a JSON object")
    return config


def _safetensors_keys(folder: Path, name: str) -> list[str]:
    """The tensor names of a safetensors file, from its header alone (cheap however large the file). The header
    records every tensor's byte range, so a truncated or foreign file is refused here, not deep inside diffusers."""
    try:
        with safe_open(str(folder / name), framework="pt") as file:
            return list(file.keys())
    except (SafetensorError, OSError) as error:
        raise ArtifactError(f"{folder.name}/{name} is damaged or not a safetensors file ({error})") from None


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
