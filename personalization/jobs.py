"""Running a training in the background for an interactive front end: progress as a stream, cancel, friendly errors.

Also the per-session workspaces (each browser session trains into its own folder; old folders are removed) and the
time estimate shown before a run starts. No gradio here: the app turns these into widgets.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import queue
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .artifacts import ArtifactError, ArtifactInfo, clean_stale_staging, process_alive, read_artifact
from .config import GENERATION_DEFAULTS, ConfigError, TrainingConfig, is_mini_world_model
from .device import SD15_HUB_ID, plan_memory
from .families import SD15, SDXL, SDXL_HUB_ID, Family, FamilyError
from .images import ImageError, SubjectImages, sort_subject_images
from .progress import CancelFlag, ProgressEvent, TrainingCancelled
from .tokens import TriggerError

# Measured or estimated seconds per step for SD-1.5 at 512 px and for the mini model on CPU.
# GPU rows: the H200's embedding and LoRA steps are this repository's benchmark (bs4 cached, bf16,
# benchmarks/results/speed-sd15-random-a-2026-11-27-h200.json), its full step (fused AdamW) and sample image a team
# measurement (docs/measurements.md#h200-step-costs); other GPUs are the H200 row scaled by their bf16/fp16
# throughput relative to it (A100 ~0.4x, A10G ~0.16x, T4 ~0.08x, L4 ~0.15x): estimates until measured there.
STEP_SECONDS = {
    # hardware: (embedding step, U-Net full step, U-Net LoRA step, sample image)
    "h200": (0.131, 0.098, 0.165, 1.06),
    "h100": (0.152, 0.115, 0.190, 1.25),
    "a100": (0.325, 0.250, 0.410, 2.7),
    "a10g": (0.81, 0.65, 1.02, 6.5),
    "l4": (0.87, 0.70, 1.07, 7.0),
    "t4": (1.62, 1.40, 2.04, 13.0),
    # Measured on a 2-core CPU (2 threads, speed.py --model mini): two-stage full 400 + 300 steps 59 s, LoRA 43 s.
    "cpu-mini": (0.06, 0.10, 0.08, 0.3),
    # SD-1.5 on a CPU (one full 512 px step ~45 s, docs/measurements.md#sd-15-on-a-cpu): possible, never sensible.
    "cpu": (40.0, 45.0, 45.0, 60.0),
}
# Gradient checkpointing recomputes the forward pass in the backward one: measured 2.2x per full-U-Net step on an
# H200 (launch-bound at batch 1, docs/measurements.md#gradient-checkpointing); on compute-bound cards the extra
# forward is about a third of a step.
CHECKPOINTING_SLOWDOWN = {"h200": 2.2, "h100": 2.2}
DEFAULT_CHECKPOINTING_SLOWDOWN = 1.35
# Memory of each card as torch reports it, so the estimate can apply the trainer's own memory plan
# (device.plan_memory): e.g. a full SD-1.5 U-Net on a T4 trains with gradient checkpointing.
CARD_BYTES = {"h200": 150_110_011_392, "h100": 85_045_395_456, "a100": 42_297_524_224, "a10g": 23_609_475_072,
              "l4": 23_580_639_232, "t4": 15_835_660_288}
MODEL_LOAD_SECONDS = {"cpu-mini": 3.0}
IN_USE_PREFIX = ".in-use-"  # + pid: a session folder holding such a file of a live process is never cleaned
# This process's in-use markers now held, by name. A marker carrying this process's PID proves nothing by itself: a
# killed server's PID is often the restarted one's (a container numbers its processes the same way).
_HELD_MARKERS: set[str] = set()
DEFAULT_LOAD_SECONDS = 25.0


def hardware_key(device_name: str, base_model: str) -> str:
    """Which row of :data:`STEP_SECONDS` describes this device (unknown GPUs count as A10G)."""
    name = device_name.lower()
    if name.startswith("cpu"):
        return "cpu-mini" if is_mini_world_model(base_model) else "cpu"
    for key in ("h200", "h100", "a100", "a10g", "l4", "t4"):
        if key in name:
            return key
    return "a10g"


@dataclass(frozen=True)
class RunEstimate:
    """Where a run's time goes, in seconds: loading, class images, a step of each kind of stage, the samples."""

    load_s: float
    class_images_s: float
    embedding_step_s: float  # a trigger-embedding step (textual inversion, two-stage stage 1)
    unet_step_s: float  # a U-Net step (two-stage stage 2, DreamBooth), with the class batch when there is one
    stage1_steps: int
    stage2_steps: int
    samples_s: float

    @property
    def total_s(self) -> float:
        return (self.load_s + self.class_images_s + self.stage1_steps * self.embedding_step_s
                + self.stage2_steps * self.unet_step_s + self.samples_s)

    def step_s(self, trains_embedding: bool) -> float:
        return self.embedding_step_s if trains_embedding else self.unet_step_s


def estimate_run(config: TrainingConfig, device_name: str, base_model: str) -> RunEstimate:
    """The parts of a run's wall time, from per-step costs (see :data:`STEP_SECONDS`)."""
    config = config.resolved()
    key = hardware_key(device_name, base_model)
    embed, full, lora, image = STEP_SECONDS[key]
    unet_step = lora if config.uses_lora else full
    family = base_family(base_model)
    plan = plan_memory(int(family.memory.unet_parameters), CARD_BYTES.get(key), full_unet=not config.uses_lora,
                       gradient_checkpointing=config.gradient_checkpointing, use_8bit_adam=config.use_8bit_adam,
                       bitsandbytes_available=True, family=family)
    if plan.gradient_checkpointing:
        unet_step *= CHECKPOINTING_SLOWDOWN.get(key, DEFAULT_CHECKPOINTING_SLOWDOWN)
    if config.prior_preservation:
        unet_step *= 1.6  # instance + class batch
    # Steps scale with pixels; SD-1.5's own 512 px is the reference (other bases on a CPU are costed as SD-1.5), and
    # with the family's U-Net (SDXL's costs more at the same pixel count).
    scale = (config.resolution / 512) ** 2 if key != "cpu-mini" and config.resolution else 1.0
    scale *= family.step_cost if key != "cpu-mini" else 1.0
    return RunEstimate(
        load_s=MODEL_LOAD_SECONDS.get(key, DEFAULT_LOAD_SECONDS),
        class_images_s=config.class_images * image * scale if config.prior_preservation else 0.0,
        embedding_step_s=embed * scale, unet_step_s=unet_step * scale,
        stage1_steps=config.stage1_steps, stage2_steps=config.stage2_steps,
        samples_s=checkpoint_image_cost(config) * image * scale,
    )


def _checkpoint_counts(config: TrainingConfig) -> tuple[int, int]:
    """(samples, scoring probes) a run renders besides training. Probes are counted where they are scored on the
    mini world (other bases are scored only where CLIP and DINO are at hand, which the estimate cannot know)."""
    from .checkpoints import checkpoint_steps

    count = len(checkpoint_steps([config.stage1_steps, config.stage2_steps], config.checkpoints))
    probes = 0
    if config.score_checkpoints and config.on_mini_world:
        from .mini_world.scoring import MiniWorldScorer

        per_checkpoint, base = MiniWorldScorer.default_image_counts()
        probes = count * per_checkpoint + base
    return count * config.sample_count, probes


def checkpoint_images(config: TrainingConfig) -> int:
    """Images a run renders besides training: every checkpoint's samples and, where they are scored on the mini
    world, its probes."""
    return sum(_checkpoint_counts(config))


def checkpoint_image_cost(config: TrainingConfig) -> float:
    """:func:`checkpoint_images` in sample images' worth of denoising: a mini-world probe takes
    ``MiniWorldScorer.DEFAULT_PROBE_STEPS`` steps (at most the samples' own), a sample ``sample_steps``."""
    samples, probes = _checkpoint_counts(config)
    if not probes:
        return float(samples)
    from .mini_world.scoring import MiniWorldScorer

    steps = min(MiniWorldScorer.DEFAULT_PROBE_STEPS, config.sample_steps)
    return samples + probes * steps / config.sample_steps


def estimate_seconds(config: TrainingConfig, device_name: str, base_model: str) -> float:
    """Rough wall time of a run (load, class images, stages, samples) from per-step costs."""
    return estimate_run(config, device_name, base_model).total_s


def describe_failure(error: BaseException) -> str:
    """One readable sentence, with what to try, for any failure of a run."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, TrainingCancelled):
        return "Training was cancelled; nothing was written."
    if isinstance(error, ConfigError | ImageError | TriggerError | ArtifactError | FamilyError):
        return text
    if "out of memory" in text.lower() or type(error).__name__ == "OutOfMemoryError":
        return ("The GPU ran out of memory. Try LoRA instead of the full U-Net, turn on gradient checkpointing and "
                "8-bit Adam, or lower the batch size or the resolution.")
    if isinstance(error, FloatingPointError):
        return text
    if isinstance(error, OSError) and ("repos" in text or "huggingface" in text.lower() or "connect" in text.lower()):
        return f"The base model could not be loaded ({text[:160]}). Check the model id and the network."
    return f"Training failed: {type(error).__name__}: {text[:200]}"


@dataclass
class TrainingJob:
    """One training in a background thread. Iterate :meth:`events` to follow it; :meth:`cancel` to stop it."""

    config: TrainingConfig
    subject_images: SubjectImages
    output_dir: Path
    cancel_flag: CancelFlag = field(default_factory=CancelFlag)
    resume: bool = False  # continue the run killed while writing output_dir from its last checkpoint
    error: BaseException | None = None
    result: object | None = None
    _events: queue.Queue = field(default_factory=queue.Queue)
    _thread: threading.Thread | None = None
    _elsewhere: bool = False  # run by another job, maybe in another process (ZeroGPU's worker): see run_elsewhere

    def start(self) -> TrainingJob:
        from .trainer import train  # importing jobs stays light for the UI

        def work() -> None:
            try:
                self.result = train(self.config, self.subject_images, self.output_dir, progress=self._events.put,
                                    cancel=self.cancel_flag, resume=self.resume)
            except BaseException as error:  # reported to the UI, never raised in the worker thread
                self.error = error
            finally:
                self._events.put(None)

        self._thread = threading.Thread(target=work, name="training", daemon=True)
        self._thread.start()
        return self

    def run_elsewhere(self, stream: Iterator[tuple]) -> Iterator[ProgressEvent]:
        """Follow a run of this job done elsewhere: ``stream`` is :func:`run_streamed` of its config, images, folder
        and cancel file, maybe in another process whose yields are pickled back (ZeroGPU's GPU worker). Its events
        are passed on; its outcome becomes this job's. Cancel works through the cancel file; closing this iterator
        (a closed browser tab) cancels the run and closes ``stream``."""
        self._elsewhere = True
        try:
            for kind, *value in stream:
                if kind == "event":
                    yield value[0]
                else:
                    self.result, self.error = value
        except Exception as error:  # the call itself failed (ZeroGPU: no GPU granted, the worker died)
            self.error = error
        finally:
            if self.state == "running":
                self.cancel_flag.cancel()
                self.error = TrainingCancelled("training was cancelled; no model was written")
            stream.close()

    def cancel(self) -> None:
        self.cancel_flag.cancel()
        if not self.started and self.error is None:  # never started: it ends here
            self.error = TrainingCancelled("training was cancelled before it started; nothing was trained")

    @property
    def started(self) -> bool:
        return self._thread is not None or self._elsewhere

    @property
    def state(self) -> str:
        """"waiting" (created, not started: e.g. queued for the GPU), "running" or "ended"."""
        if self.result is not None or self.error is not None:
            return "ended"
        return "running" if self.started else "waiting"

    def events(self, poll_seconds: float = 0.25) -> Iterator[ProgressEvent]:
        """Progress events until the run ends; only the newest of a burst is kept, plus every preview."""
        while True:
            try:
                event = self._events.get(timeout=poll_seconds)
            except queue.Empty:
                continue
            if event is None:
                return
            while True:  # drain: a slow UI should show the latest step, not lag behind
                try:
                    newer = self._events.get_nowait()
                except queue.Empty:
                    break
                if newer is None:
                    self._events.put(None)
                    break
                if event.preview is not None and newer.preview is None:
                    newer.preview = event.preview
                event = newer
            yield event

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def failure_message(self) -> str | None:
        return None if self.error is None else describe_failure(self.error)


def run_streamed(config: TrainingConfig, subject_images: SubjectImages, output_dir: Path,
                 cancel_file: Path, resume: bool = False) -> Iterator[tuple]:
    """One training where the GPU is, as a stream of picklable values: ("event", ProgressEvent) while it runs, then
    ("end", result, error). On ZeroGPU this runs in a forked worker and each value is pickled back to the server, so
    nothing here may rely on changing the server's objects; cancelling goes through ``cancel_file``. Closed early, it
    cancels the run and waits for it to stop. ``resume``: continue the killed run of ``output_dir`` (the trainer's
    resume), e.g. one a restarted app adopted (:mod:`personalization.resumable`)."""
    job = TrainingJob(config, subject_images, output_dir, cancel_flag=CancelFlag(cancel_file), resume=resume)
    job.start()
    try:
        yield from (("event", event) for event in job.events())
    finally:
        if job.state == "running":
            job.cancel()
        job.wait()
    yield "end", job.result, portable_error(job.error)


def portable_error(error: BaseException | None) -> BaseException | None:
    """``error`` if it survives pickling (a ZeroGPU worker hands it back pickled), else a RuntimeError saying what
    it was, so :func:`describe_failure` still has its message."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


class Workspace:
    """A browser session's own folder of runs under a shared root; folders untouched for ``max_age_hours`` go."""

    def __init__(self, root: Path, session_id: str | None = None) -> None:
        self.root = Path(root)
        self.session_id = session_id or uuid.uuid4().hex[:12]
        self.folder = self.root / self.session_id
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def hub_cache(self) -> Path:
        """Where this session's downloads made with a token go: removed with the session, never shared."""
        return self.folder / ".hub-cache"

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Mark the folder as busy (a run in progress) for the cleaning of every process, until the block ends."""
        marker = self.folder / f"{IN_USE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        _HELD_MARKERS.add(marker.name)
        marker.touch()
        try:
            yield
        finally:
            marker.unlink(missing_ok=True)
            _HELD_MARKERS.discard(marker.name)

    @property
    def busy(self) -> bool:
        """Whether a run of this session is in progress in any live process (see :meth:`in_use`)."""
        return folder_in_use(self.folder)

    @property
    def cancel_file(self) -> Path:
        """Touching this file cancels the session's running training, from any process."""
        return self.folder / ".cancel-requested"

    def new_run_dir(self, label: str) -> Path:
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40] or "run"
        return self.folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}-{uuid.uuid4().hex[:4]}"

    def runs(self) -> list[ArtifactInfo]:
        """Completed runs of this session, newest first (partial folders are skipped)."""
        found = []
        for path in sorted(self.folder.iterdir(), reverse=True):
            if path.name.startswith(".") or not path.is_dir():
                continue
            try:
                found.append(read_artifact(path))
            except ArtifactError:
                continue
        return found

    @staticmethod
    def clean_old(root: Path, max_age_hours: float = 24.0) -> int:
        """Remove session folders not modified for ``max_age_hours``, except one whose run is in progress; returns
        how many were removed."""
        root = Path(root)
        if not root.is_dir():
            return 0
        cutoff = time.time() - max_age_hours * 3600
        removed = 0
        for path in root.iterdir():
            if not path.is_dir() or folder_in_use(path):
                continue
            if _newest_mtime(path) < cutoff:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
            else:  # a server killed mid-write leaves half-written runs beside the finished ones
                clean_stale_staging(path)
        return removed


class SessionCleaner:
    """Removes idle session folders at most every ``interval_s``: a Space runs for weeks, and cleaning only at start
    would let a month of uploads and runs pile up. Called on each new session; cheap when it is not yet time."""

    def __init__(self, max_age_hours: float = 24.0, interval_s: float = 600.0) -> None:
        self.max_age_hours, self.interval_s = max_age_hours, interval_s
        self._last = -math.inf
        self._lock = threading.Lock()

    def maybe_clean(self, root: Path, *, now: bool = False) -> int:
        """Clean `root` if ``interval_s`` passed since the last cleaning (or `now`); returns folders removed."""
        with self._lock:
            if not now and time.monotonic() - self._last < self.interval_s:
                return 0
            self._last = time.monotonic()
        return Workspace.clean_old(root, self.max_age_hours)


def folder_in_use(folder: Path) -> bool:
    """Whether a live process holds ``folder`` with :meth:`Workspace.in_use`."""
    for marker in folder.glob(f"{IN_USE_PREFIX}*"):
        pid = marker.name.removeprefix(IN_USE_PREFIX).split("-")[0]
        if not pid.isdigit():
            continue
        if marker.name in _HELD_MARKERS if int(pid) == os.getpid() else process_alive(int(pid)):
            return True
    return False


def _newest_mtime(folder: Path) -> float:
    newest = folder.stat().st_mtime
    for path in folder.rglob("*"):
        try:
            newest = max(newest, path.stat().st_mtime)
        except OSError:
            continue
    return newest


# ---- starting a run from a front end ---------------------------------------------------------------------------------
# Native sizes and families of bases whose configs may not be readable here (no network): read nothing for them.
KNOWN_RESOLUTIONS = {SD15_HUB_ID: 512, SDXL_HUB_ID: 1024}
KNOWN_FAMILIES = {SD15_HUB_ID: SD15, SDXL_HUB_ID: SDXL}
# ZeroGPU runs each call on an H200 slice and allows at most 25 minutes per call.
ZERO_GPU_CARD = "NVIDIA H200"
ZERO_GPU_MAX_SECONDS = 1500


def training_resolution(base_model: str) -> int:
    """The resolution a base model trains at: its native size, read from its configs (no weights loaded)."""
    if base_model in KNOWN_RESOLUTIONS:
        return KNOWN_RESOLUTIONS[base_model]
    from .device import resolve_base_model_path
    from .trainer import default_resolution

    try:
        return default_resolution(resolve_base_model_path(base_model))
    except Exception:  # an id that cannot be read offline: SD-1.x's size is the safe guess
        return 512


def base_family(base_model: str) -> Family:
    """A base model's family, read from its model_index.json (no weights loaded); SD-1.5's for one that cannot be
    read offline, as :func:`training_resolution` guesses SD-1.x's size (the trainer reads it for real)."""
    if base_model in KNOWN_FAMILIES:
        return KNOWN_FAMILIES[base_model]
    from .device import resolve_base_model_path
    from .families import detect_family

    try:
        return detect_family(resolve_base_model_path(base_model))
    except Exception:  # an id that cannot be read offline, or not a pipeline at all (training refuses it)
        return SD15


def subject_at(resolution: int, prepared: SubjectImages | None, prepared_at: int | None,
               files: list[Path]) -> SubjectImages:
    """The subject images at `resolution`: those prepared at upload, or the same files prepared again when the
    base model (and so the resolution) changed since. Raises ImageError when none can be used."""
    if prepared is not None and prepared_at == resolution and len(prepared):
        return prepared
    kept, _refused = sort_subject_images(files, resolution)
    if not len(kept):
        raise ImageError(f"none of the uploaded images can be used at {resolution} px")
    return kept


def zero_gpu_seconds(config: TrainingConfig, base_model: str) -> int:
    """GPU time to ask ZeroGPU for: the estimate plus half again and 30 s, within what ZeroGPU allows."""
    estimate = estimate_seconds(config, ZERO_GPU_CARD, base_model)
    return int(min(max(60, estimate * 1.5 + 30), ZERO_GPU_MAX_SECONDS))


# Applying an artifact in a GPU call: a LoRA or an embedding loads in a second or two, a full U-Net (1.7 GB in fp16)
# in several. The base pipeline is not counted: the Space builds it at start-up, outside GPU time (ui/zerogpu.py).
APPLY_SECONDS = 10.0


def zero_gpu_generation_seconds(image_count: int, steps: int, resolution: int | None, base_model: str) -> int:
    """GPU time to ask ZeroGPU for ``image_count`` images of ``steps`` steps: the sample-image cost of
    :data:`STEP_SECONDS` (a default-steps image) scaled by steps and pixels, and the artifact's load, plus half
    again."""
    key = hardware_key(ZERO_GPU_CARD, base_model)
    scale = (resolution / 512) ** 2 if resolution else 1.0
    per_image = STEP_SECONDS[key][3] * steps / GENERATION_DEFAULTS.steps * scale
    estimate = APPLY_SECONDS + image_count * per_image
    return int(min(max(30, estimate * 1.5), ZERO_GPU_MAX_SECONDS))
