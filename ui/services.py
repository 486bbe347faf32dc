"""What the tabs share: the server's services (base model choice, generator, GPU lock, session folders) and one
browser session's state."""

from __future__ import annotations

import functools
import html
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from personalization.artifacts import ArtifactError
from personalization.device import BUNDLED_MINI_MODEL, SD15_HUB_ID, memory_refusal
from personalization.families import SDXL, SDXL_HUB_ID
from personalization.generation import GenerationRequest, Generator
from personalization.images import SubjectImages
from personalization.jobs import CARD_BYTES, SessionCleaner, TrainingJob, Workspace, zero_gpu_generation_seconds
from ui.fields import UserError
from ui.zerogpu import gpu, on_zero_gpu

ROOT = Path(__file__).resolve().parent.parent
ON_SPACE = bool(os.environ.get("SPACE_ID"))
Draw = list[tuple[GenerationRequest, bool]]  # requests, each drawn personalized (True) or with the plain base model


def default_work_root() -> Path:
    return Path(os.environ.get("PERSONALIZATION_WORKDIR", Path(tempfile.gettempdir()) / "personalization-sessions"))


@dataclass
class Session:
    """One browser session: its workspace, the images it prepared, its running job and the Hub folders it loaded."""

    workspace: Workspace
    subject: SubjectImages | None = None
    resolution: int | None = None
    subject_files: list[Path] = field(default_factory=list)
    job: TrainingJob | None = None
    hub_folders: dict[str, str] = field(default_factory=dict)


@dataclass
class Services:
    """What the tabs share: the base model choice, the generator (one base in memory) and :attr:`draw`, the one way
    handlers use it, the hardware name, the lock that lets one training at a time have the GPU, and the root of the
    session folders."""

    default_base: str
    generator: Generator
    hardware: str
    work_root: Path = field(default_factory=default_work_root)
    gpu_bytes: int | None = field(default_factory=lambda: training_gpu_bytes())  # None: no GPU to train on
    gpu_lock: threading.Lock = field(default_factory=threading.Lock)
    # A Space runs for weeks: idle session folders go as new sessions arrive, not only at start.
    cleaner: SessionCleaner = field(default_factory=lambda: SessionCleaner(max_age_hours=24.0, interval_s=600.0))
    draw: Callable[[Path, str, Draw], list[list[Image.Image]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Decorated here, before the app launches: the spaces package registers its GPU functions at launch.
        self.draw = gpu(duration=draw_seconds)(self._draw)
        self._draw_lock = threading.Lock()

    def _draw(self, folder: Path, base_model: str, requests: Draw) -> list[list[Image.Image]]:
        """A handler's images in one GPU call: the artifact at ``folder`` applied on ``base_model``, then each request
        drawn. Only the images come back (on ZeroGPU this runs in a worker; its generator's state stays there)."""
        try:
            with self._draw_lock:  # no other handler swaps the artifact between the apply and the images
                self.generator.apply(folder, base_model=base_model)
                return [self.generator.generate(request, personalized=personal) for request, personal in requests]
        except (ArtifactError, ValueError, OSError) as error:  # said as one sentence, also from a ZeroGPU worker
            raise UserError(str(error).splitlines()[0][:300]) from None

    def warm_up(self) -> None:
        """On ZeroGPU, build the default base pipeline now, at start-up: the server's "cuda" is the spaces package's
        stand-in, which hands the weights to each GPU call's worker, so no call spends its GPU time loading them."""
        if on_zero_gpu():
            self.generator.use_base(self.default_base)

    @property
    def base_choices(self) -> list[str]:
        sdxl = [SDXL_HUB_ID] if self.sdxl_refusal() is None else []
        return list(dict.fromkeys([self.default_base, os.environ.get("BASE_MODEL") or self.default_base,
                                   SD15_HUB_ID, *sdxl, BUNDLED_MINI_MODEL]))

    def sdxl_refusal(self) -> str | None:
        """Why SDXL is not offered on this machine (one sentence saying what would fit), or None where its LoRA fits
        the memory plan (device.memory_refusal). Never on a CPU: a 1024 px SDXL step there takes minutes."""
        if self.gpu_bytes is None:
            return "Stable Diffusion XL needs a GPU with about 24 GB (a LoRA with gradient checkpointing)."
        return memory_refusal(SDXL, self.gpu_bytes, full_unet=False)

    def checked_base(self, base_model: str | None) -> str:
        """The base model a client asked for, if this server offers it.

        Clients can send any string: a server path would train on (or reveal) the server's files, an arbitrary Hub id
        would download gigabytes. Other Hub ids are accepted only where the operator sets ALLOW_ANY_BASE_MODEL=1.
        """
        base = (base_model or "").strip() or self.default_base
        if base in self.base_choices:
            return base
        is_hub_id = base.count("/") == 1 and not base.startswith((".", "/", "~")) and ".." not in base
        if is_hub_id and os.environ.get("ALLOW_ANY_BASE_MODEL") == "1":
            return base
        why = self.sdxl_refusal() if base == SDXL_HUB_ID else None
        raise ValueError(f"base model '{base[:80]}' is not offered here " + (f"({why})" if why else
                                                                            "(choose one from the list)"))

    def session(self, session: Session | None) -> Session:
        """The browser session's state, created (with its own folder) on its first call."""
        if session is not None:
            return session
        self.cleaner.maybe_clean(self.work_root)
        return Session(Workspace(self.work_root))

    def tokenizer(self):
        return bundled_tokenizer()


def draw_seconds(folder: Path, base_model: str, requests: Draw) -> int:
    """The GPU time of a :meth:`Services.draw` call, from its images' count, steps and size."""
    images = sum(request.num_images for request, _ in requests)
    steps = max((request.steps for request, _ in requests), default=1)
    resolution = max((request.resolution or 0 for request, _ in requests), default=0) or None
    return zero_gpu_generation_seconds(images, steps, resolution, base_model)


@functools.cache
def bundled_tokenizer():
    """Read once: the trigger check runs on every keystroke. The bundled tokenizer is CLIP's (SD-1.x's too), so
    checks need no download."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(ROOT / "personalization" / "assets" / "clip_tokenizer")


def training_gpu_bytes() -> int | None:
    """The memory of the GPU trainings run on: ZeroGPU's card (no CUDA in this process there), the local one, or
    None without a GPU."""
    if on_zero_gpu():
        return CARD_BYTES["h200"]
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory


def hardware_name() -> str:
    from personalization.device import choose_placement

    return choose_placement().describe()


def for_display(image: Image.Image, minimum: int = 256) -> Image.Image:
    """Small model outputs (the mini model draws 32 px) blown up with hard pixel edges, so they can be seen."""
    if image.width >= minimum:
        return image
    factor = -(-minimum // image.width)
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def warning(error: BaseException | str) -> str:
    """A message for a Markdown status line: the first line of `error`, escaped."""
    return f"⚠️ {html.escape(str(error).strip().splitlines()[0] if str(error).strip() else 'failed', quote=False)}"
