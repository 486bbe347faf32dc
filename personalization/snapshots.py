"""What the trainer keeps at a checkpoint, and how a killed run resumes.

While a run trains, a hidden folder beside its output folder (``.<name>.resume/``) holds the checkpoints so far
(each one's weights under the artifact's own file names, its samples, and the table of scores,
:mod:`personalization.checkpoints`) and the state of the last one: the weights being trained, the optimizer, the
random generators and the batch order. ``train --resume`` reloads that state and continues; on CPU the result is
bit-identical to a run never interrupted. When the run ends, the checkpoints move into the artifact folder and the
hidden folder goes.

Storage per checkpoint: the embedding row (kilobytes), the LoRA (megabytes), or a float16 U-Net (1.7 GB on SD-1.5).
Full U-Nets larger than :data:`FULL_UNET_KEEP_ALL_BYTES` are kept only for the recommended step, the last step and
an explicit ``keep_step``; the resume state holds one float32 copy of what trains plus its AdamW moments.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from PIL import Image

from . import artifacts
from .checkpoints import Checkpoint, CheckpointTable, write_table

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

# Full U-Nets up to this size (float16) are kept at every checkpoint: the mini model's is 25 MB, SD-1.5's 1.7 GB.
FULL_UNET_KEEP_ALL_BYTES = 512 * 2**20

Render = Callable[[Sequence[str], Sequence[int]], list[Image.Image]]


class Scorer(Protocol):
    """Scores the model as it stands; :meth:`prepare` reads the base model once, before training.

    A scorer may also say at how many denoising steps its probes are rendered (``probe_steps``, see
    :func:`personalization.trainer.probe_steps`); without it they take the samples' steps.
    """

    name: str
    drift_tolerance: float

    def prepare(self, render_base: Render) -> None: ...

    def score(self, render: Render) -> Any: ...  # an object with .as_dict() holding "fidelity" and "drift"


@dataclass
class TrainedWeights:
    """What a run has trained so far, as the artifact stores it (None: not trained by this run)."""

    trigger_token: str
    vector: torch.Tensor | dict[str, torch.Tensor] | None = None  # SDXL: one row per text encoder, by key
    lora_layers: dict[str, torch.Tensor] | None = None
    lora_metadata: dict[str, Any] | None = None
    unet: UNet2DConditionModel | None = None
    text_encoder: CLIPTextModel | None = None


def save_weights(folder: Path, weights: TrainedWeights) -> None:
    """Write ``weights`` under the artifact's file names, with the web-UI copies; the models are left as they are."""
    if weights.vector is not None:
        artifacts.save_embedding(folder, weights.trigger_token, weights.vector)
    if weights.lora_layers is not None:
        artifacts.save_lora(folder, weights.lora_layers, weights.lora_metadata or {})
    if weights.unet is not None:
        artifacts.save_unet_copy(folder, weights.unet)
    if weights.text_encoder is not None:
        artifacts.save_text_encoder_copy(folder, weights.text_encoder)
    artifacts.save_webui_copies(folder, weights.trigger_token, weights.vector, weights.lora_layers)


def resume_dir(output_dir: Path) -> Path:
    return output_dir.parent / artifacts.RESUME_NAME.format(name=output_dir.name)


def fingerprint(config: dict[str, Any], images: Iterable[Image.Image]) -> str:
    """What must match for a run to be resumed: every setting that changes training, and the photos' pixels."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in config.items() if k != "keep_step"}, sort_keys=True,
                                       default=str).encode())
    for image in images:
        digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass
class ResumeState:
    """A run as it stood after global step ``step`` (a checkpoint), enough to continue it exactly.

    ``stage_params``: the current stage's trainable tensors, in the order the stage lists them (empty at a stage's
    end); ``trigger_rows``: the trigger's embedding row in each text encoder as earlier stages left it.
    """

    fingerprint: str
    step: int
    training_s: float
    rng: torch.Tensor
    trigger_rows: list[torch.Tensor] = field(default_factory=list)
    stage_params: list[torch.Tensor] = field(default_factory=list)
    optimizer: dict[str, Any] | None = None
    generator: torch.Tensor | None = None
    batch_order: torch.Tensor | None = None
    batch_cursor: int = 0
    loss: float | None = None
    stage_summaries: list[dict[str, Any]] = field(default_factory=list)  # the stages finished before ``step``


def save_resume_state(folder: Path, state: ResumeState) -> None:
    """Write the state atomically: a kill mid-write leaves the previous checkpoint's."""
    path = folder / artifacts.RESUME_STATE_FILE
    staging = path.with_name(f".{path.name}.partial")
    # Field by field, not dataclasses.asdict: that deep-copies every tensor (the weights and both AdamW moments)
    # before they are written, for the same bytes on disk.
    torch.save({entry.name: getattr(state, entry.name) for entry in fields(state)}, staging)
    staging.replace(path)


def load_resume_state(folder: Path) -> ResumeState | None:
    path = folder / artifacts.RESUME_STATE_FILE
    if not path.is_file():
        return None
    try:
        values = torch.load(path, map_location="cpu", weights_only=True)
        return ResumeState(**values)
    except Exception as error:  # a damaged file names itself; the run can still start over
        raise artifacts.ArtifactError(f"{folder.name}/{path.name} is damaged ({error}); start the run again "
                                      "with --overwrite") from None


class Snapshotter:
    """Takes the run's checkpoints into ``<resume dir>/checkpoints``: weights, samples, scores, table."""

    def __init__(self, folder: Path, schedule: dict[int, str], scorer: Scorer | None, keep_step: str,
                 table: CheckpointTable | None = None, prunes_weights: bool = False) -> None:
        self.folder, self.schedule, self.scorer, self.keep_step = folder, schedule, scorer, keep_step
        self.prunes_weights = prunes_weights
        self.table = table or CheckpointTable([], scorer.name if scorer else None,
                                              scorer.drift_tolerance if scorer else None)
        self.folder.mkdir(parents=True, exist_ok=True)

    def due(self, step: int) -> bool:
        return step in self.schedule

    def take(self, step: int, weights: TrainedWeights, samples: Iterable[Image.Image], render: Render | None,
             training_s: float) -> Checkpoint:
        """Save the checkpoint of ``step``, score it, and rewrite the table; return its row."""
        with artifacts.staged_replace(self.folder / artifacts.CHECKPOINT_NAME.format(step=step)) as staging:
            save_weights(staging, weights)
            artifacts.save_samples(staging, samples)
        scores: dict[str, float] = {}
        started = time.perf_counter()
        if self.scorer is not None and render is not None:
            scores = {name: float(value) for name, value in self.scorer.score(render).as_dict().items()}
        point = Checkpoint(step, self.schedule[step], True, round(training_s, 3),
                           round(time.perf_counter() - started, 3), scores)
        self.table.checkpoints = [c for c in self.table.checkpoints if c.step != step] + [point]
        self.table.checkpoints.sort(key=lambda c: c.step)
        self._prune(step)
        write_table(self.folder, self.table)
        return point

    def forget_after(self, step: int) -> None:
        """Drop checkpoints later than ``step`` (written after the resume state a run continues from)."""
        for point in [c for c in self.table.checkpoints if c.step > step]:
            shutil.rmtree(self.folder / artifacts.CHECKPOINT_NAME.format(step=point.step), ignore_errors=True)
        self.table.checkpoints = [c for c in self.table.checkpoints if c.step <= step]
        write_table(self.folder, self.table)

    def _prune(self, latest: int) -> None:
        """Large full U-Nets: keep the weights of the recommended, the latest and an explicit keep_step only."""
        if not self.prunes_weights:
            return
        keep = {latest, self.table.recommended_step}
        if self.keep_step.isdigit():
            keep.add(int(self.keep_step))
        for point in self.table.checkpoints:
            unet = self.folder / artifacts.CHECKPOINT_NAME.format(step=point.step) / artifacts.UNET_DIR
            if point.weights and point.step not in keep and unet.is_dir():
                shutil.rmtree(unet)
                point.weights = False  # what is left (the trigger row alone) is not that step's model


def pick_step(folder: Path | str, step: str | int) -> int:
    """Make checkpoint ``step`` (a number, ``best`` or ``last``) the one the artifact folder holds at its top level
    (what generation loads and a push uploads); return the step. The folder is replaced in one rename, hard links
    keeping it cheap however large the weights; the card and the summary name the new step."""
    from .checkpoints import read_table

    folder = Path(folder)
    artifacts.read_artifact(folder)
    table = read_table(folder)
    if table is None:
        raise artifacts.ArtifactError(f"{folder.name}: written without checkpoints; there is no other step to pick")
    table.kept_step = table.resolve(step)
    replaced = {artifacts.CARD_FILE, artifacts.CONFIG_FILE, artifacts.SUMMARY_FILE}
    replaced |= {entry.name for entry in artifacts.checkpoint_entries(folder)}
    config = json.loads((folder / artifacts.CONFIG_FILE).read_text(encoding="utf-8"))
    summary = json.loads((folder / artifacts.SUMMARY_FILE).read_text(encoding="utf-8"))
    config["keep_step"] = str(table.kept_step)
    with artifacts.staged_replace(folder) as staging:
        for entry in folder.iterdir():
            if entry.name not in replaced:
                artifacts.link_tree(entry, staging / entry.name)
        lay_out_kept_step(staging, table, config, summary)
    return table.kept_step


def lay_out_kept_step(staging: Path, table: CheckpointTable, config: dict[str, Any],
                      summary: dict[str, Any]) -> list[str]:
    """Finish a staged artifact folder whose ``checkpoints/`` is in place: the kept step's weights and samples at the
    top level, the table, the config, the summary (kept and recommended step, whether U-Net weights are kept) and
    the card. What the end of a run and :func:`pick_step` share; returns the sample names."""
    from .config import TrainingConfig
    from .families import family_by_key
    from .model_card import write_model_card

    kept = staging / artifacts.CHECKPOINTS_DIR / artifacts.CHECKPOINT_NAME.format(step=table.kept_step)
    for entry in artifacts.checkpoint_entries(kept):
        artifacts.link_tree(entry, staging / entry.name)
    write_table(staging / artifacts.CHECKPOINTS_DIR, table)
    settings = TrainingConfig.from_dict(config)
    summary.update(kept_step=table.kept_step, recommended_step=table.recommended_step,
                   kept_unet=artifacts.holds_unet_weights(staging) or not settings.trains_unet)
    names = artifacts.sample_names(staging)
    artifacts.save_config(staging, config)
    artifacts.save_summary(staging, summary)
    write_model_card(staging, settings, summary, names, family=family_by_key(summary.get("family")))
    return names
