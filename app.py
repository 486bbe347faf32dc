"""The Gradio app: Upload, Train, Generate and Hub tabs wired to the `personalization` engine.

It only assembles the page: each tab is built by a small factory that receives the services it needs. Training,
generation and Hub transfer live in the engine; this file never touches a tensor.
"""

from __future__ import annotations

import contextlib
import functools
import html
import json
import math
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Library notices at import time (e.g. "requires torchvision, falling back") would bury the app's own messages.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import gradio as gr
from PIL import Image

from personalization import hub
from personalization.artifacts import ArtifactError, ArtifactInfo, read_artifact
from personalization.config import PRESETS, ConfigError, TrainingConfig, is_mini_world_model
from personalization.device import (
    BUNDLED_MINI_MODEL,
    MINI_MODEL_DIR,
    SD15_HUB_ID,
    default_base_model,
    portable_base_model,
    resolve_base_model_path,
)
from personalization.generation import GenerationRequest, Generator
from personalization.images import ImageError, SubjectImages, sort_subject_images
from personalization.jobs import SessionCleaner, TrainingJob, Workspace, describe_failure, estimate_seconds
from personalization.progress import CancelFlag, ProgressEvent, format_seconds
from personalization.tokens import check_trigger, strip_trigger, suggest_trigger

ROOT = Path(__file__).resolve().parent
EXAMPLES_DIR = ROOT / "examples"
WORK_ROOT = Path(os.environ.get("PERSONALIZATION_WORKDIR", Path(tempfile.gettempdir()) / "personalization-sessions"))
ON_SPACE = bool(os.environ.get("SPACE_ID"))
SESSION_CLEANER = SessionCleaner(max_age_hours=24.0, interval_s=600.0)
ZERO_GPU = bool(os.environ.get("SPACES_ZERO_GPU"))
KNOWN_RESOLUTIONS = {SD15_HUB_ID: 512}
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
METHOD_LABELS = {
    "two_stage": "Two-stage (recommended)",
    "textual_inversion": "Textual Inversion",
    "dreambooth": "DreamBooth",
    "dreambooth_lora": "DreamBooth-LoRA",
}


# ---- form fields -----------------------------------------------------------------------------------------------------
class UserError(gr.Error):
    """A user's (or an API client's) mistake, shown as one sentence: not a crash, so never logged with a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(message, print_exception=False)


class _Checked:
    """A Gradio input that checks what a client sends before Gradio converts it.

    The API is public and a client need not be the page: a value the field cannot take (text in a number, NaN, a
    choice not offered, a huge string) becomes one sentence naming the field, instead of Gradio's generic error and a
    traceback in the server log.
    """

    label: str | None
    elem_id: str | None

    def get_block_name(self) -> str:  # the page and the API docs know the component by Gradio's own name
        return next(c for c in type(self).__mro__ if c.__module__.startswith("gradio.")).__name__.lower()

    get_block_class = get_block_name

    def preprocess(self, payload: Any) -> Any:
        field_name = self.label or self.elem_id or "a field"
        reason = self.refusal(payload)
        if reason is None:
            try:
                return super().preprocess(payload)  # type: ignore[misc]
            except Exception as error:  # whatever Gradio refuses, the client gets one sentence
                reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else "cannot be read"
        raise UserError(f"{field_name}: {reason}.")

    def refusal(self, payload: Any) -> str | None:
        """Why `payload` cannot be this field's value, or None."""
        return None


def _number_refusal(value: Any, *, whole: bool, minimum: float | None, maximum: float | None) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number, got {str(value)[:40]!r}"
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if whole and value != int(value):
        return f"must be a whole number, got {value}"
    if minimum is not None and value < minimum:
        return f"must be at least {minimum:g}, got {value:g}"
    if maximum is not None and value > maximum:
        return f"must be at most {maximum:g}, got {value:g}"
    return None


@contextlib.contextmanager
def _no_stub_files() -> Iterator[None]:
    """Gradio writes a `.pyi` stub beside the module of every component subclass when the class is created: a write
    into the app's folder at import, which fails where that folder is read-only. Stubs only help editors."""
    from gradio import component_meta

    write_stub = component_meta.create_or_modify_pyi
    component_meta.create_or_modify_pyi = lambda *args, **kwargs: None
    try:
        yield
    finally:
        component_meta.create_or_modify_pyi = write_stub


with _no_stub_files():
    class FormNumber(_Checked, gr.Number):
        def refusal(self, payload: Any) -> str | None:
            if payload is None:
                return None  # an empty box: the engine's default
            return _number_refusal(payload, whole=self.precision == 0, minimum=self.minimum, maximum=self.maximum)


    class FormSlider(_Checked, gr.Slider):
        def refusal(self, payload: Any) -> str | None:
            whole = float(self.step).is_integer() and float(self.minimum).is_integer()
            return _number_refusal(payload, whole=whole, minimum=self.minimum, maximum=self.maximum)


    class FormText(_Checked, gr.Textbox):
        """Text with a length cap (names, tokens): a megabyte of text is refused, not processed. The cap is a class
        attribute: Gradio rebuilds a component from its constructor's arguments when a handler updates it."""

        max_chars = 500

        def refusal(self, payload: Any) -> str | None:
            if payload is None:
                return None
            if not isinstance(payload, str):
                return f"must be text, got {type(payload).__name__}"
            if len(payload) > self.max_chars:
                return f"is too long ({len(payload)} characters, at most {self.max_chars})"
            return None

    class WordText(FormText):  # a class noun, a trigger
        max_chars = 100

    class PromptText(FormText):
        max_chars = 2000

    class FormCheckbox(_Checked, gr.Checkbox):
        def refusal(self, payload: Any) -> str | None:
            if isinstance(payload, bool) or payload is None:
                return None
            return f"must be true or false, got {str(payload)[:40]!r}"


    class _Choice(_Checked):
        choices: list[tuple[str, Any]]
        allow_custom_value: bool = False

        def refusal(self, payload: Any) -> str | None:
            if payload is None:
                return None
            offered = [value for _, value in self.choices]
            if payload in offered:
                return None
            if self.allow_custom_value and isinstance(payload, str) and len(payload) <= 300:
                return None  # checked against what the session owns by the handler
            listed = ", ".join(str(value) for value in offered[:8]) or "none yet"
            return f"{str(payload)[:80]!r} is not one of the choices ({listed})"


    class FormRadio(_Choice, gr.Radio):
        pass


    class FormDropdown(_Choice, gr.Dropdown):
        pass


    class FormFiles(_Checked, gr.File):
        pass


class CheckedBlocks(gr.Blocks):
    """gr.Blocks where the checks Gradio makes before a component sees a value (is this a file the user uploaded?
    does the payload have the shape of the field's data model?) also answer in one sentence naming the field."""

    async def preprocess_data(self, block_fn: Any, inputs: list[Any], state: Any, explicit_call: bool = False) -> Any:
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except gr.Error:
            raise
        except ValueError as error:  # InvalidPathError, or pydantic's ValidationError of a file list's shape
            files = [block for block in block_fn.inputs if isinstance(block, gr.File)]
            if not files:
                raise
            details = error.errors() if callable(getattr(error, "errors", None)) else None
            reason = details[0]["msg"] if details else "not a file uploaded to this app"
            field_name = files[0].label or "a file field"
            raise UserError(f"{field_name}: {reason.rstrip('.')}.") from None


# ---- services --------------------------------------------------------------------------------------------------------
@dataclass
class Services:
    """What the tabs share: the base model choice, the generator (one base in memory), the hardware name."""

    default_base: str
    generator: Generator
    hardware: str
    gpu_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_choices(self) -> list[str]:
        return list(dict.fromkeys([self.default_base, os.environ.get("BASE_MODEL") or self.default_base,
                                   SD15_HUB_ID, BUNDLED_MINI_MODEL]))

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
        raise ValueError(f"base model '{base[:80]}' is not offered here (choose one from the list)")

    def tokenizer(self):
        return bundled_tokenizer()


@dataclass
class Session:
    """One browser session: its workspace, the images it prepared, its running job and the Hub folders it loaded."""

    workspace: Workspace
    subject: SubjectImages | None = None
    resolution: int | None = None
    subject_files: list[Path] = field(default_factory=list)
    job: TrainingJob | None = None
    hub_folders: dict[str, str] = field(default_factory=dict)


@functools.cache
def bundled_tokenizer():
    """Read once: the trigger check runs on every keystroke. The bundled tokenizer is CLIP's (SD-1.x's too), so
    checks need no download."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(ROOT / "personalization" / "assets" / "clip_tokenizer")


def get_session(session: Session | None) -> Session:
    if session is not None:
        return session
    SESSION_CLEANER.maybe_clean(WORK_ROOT)  # a Space runs for weeks: idle sessions go as new ones arrive
    return Session(Workspace(WORK_ROOT))


def resolution_for(base_model: str) -> int:
    if base_model in KNOWN_RESOLUTIONS:
        return KNOWN_RESOLUTIONS[base_model]
    from personalization.trainer import default_resolution

    try:
        return default_resolution(resolve_base_model_path(base_model))
    except Exception:  # an id we cannot read offline: SD-1.x's size is the safe guess
        return 512


def hardware_name() -> str:
    from personalization.device import choose_placement

    return choose_placement().describe()


def for_display(image: Image.Image, minimum: int = 256) -> Image.Image:
    """Small model outputs (the mini model draws 32 px) blown up with hard pixel edges, so they can be seen."""
    if image.width >= minimum:
        return image
    factor = -(-minimum // image.width)
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


# ---- Upload tab ------------------------------------------------------------------------------------------------------
def example_subjects() -> dict[str, Path]:
    return {p.name.replace("_", " "): p for p in sorted(EXAMPLES_DIR.glob("*")) if (p / "subject.json").is_file()}


def prepare_images(files: list[str] | None, base_model: str, session: Session | None):
    """Check and square the uploaded files; show the kept ones and list the refused ones with their reason."""
    session = get_session(session)
    paths = [Path(f if isinstance(f, str) else f.name) for f in (files or [])]
    resolution = resolution_for(base_model)
    kept, rejected = sort_subject_images(paths, resolution)
    session.subject = kept if len(kept) else None
    session.resolution = resolution
    left_out = {r.name for r in rejected} | {skipped.name for skipped in kept.skipped}
    session.subject_files = [p for p in paths if p.name not in left_out]
    lines = [f"**{len(kept)} image(s) ready** at {resolution}×{resolution} px."]
    lines += [f"- refused `{html.escape(r.name)}`: {html.escape(r.reason)}" for r in rejected]
    lines += [f"- note: {html.escape(n)}" for n in kept.notes]
    if not paths:
        lines = ["Upload 3–10 photos of your subject (or pick an example)."]
    gallery = [(for_display(image), name) for image, name in zip(kept.images, kept.names, strict=True)]
    return gallery, "\n".join(lines), session


def load_example(name: str, base_model: str, session: Session | None):
    folder = example_subjects().get(name)
    if folder is None:
        return [], "Unknown example.", gr.update(), gr.update(), session
    files = sorted(str(p) for p in folder.glob("*.png"))
    info = json.loads((folder / "subject.json").read_text())
    gallery, message, session = prepare_images(files, base_model, session)
    return gallery, message, info.get("class_noun", ""), files, session


def check_trigger_text(services: Services, trigger: str, method: str) -> str:
    if not trigger.strip():
        return "A trigger is suggested from the class noun when left empty."
    identifier = method in ("dreambooth", "dreambooth_lora")
    check = check_trigger(services.tokenizer(), trigger, allow_existing_word=identifier)
    if check.ok:
        return f"✅ {html.escape(check.message)}"
    hint = f" Try `{check.suggestion}`." if check.suggestion else ""
    return f"⚠️ {html.escape(check.message)}.{hint}"


def build_upload_tab(services: Services, session: gr.State,
                     base_model: gr.Dropdown) -> dict[str, gr.components.Component]:
    with gr.Row():
        with gr.Column(scale=3):
            files = FormFiles(label="Photos of your subject", file_count="multiple",  # any file: each is judged
                            elem_id="subject-files")
            examples = list(example_subjects())
            with gr.Row():
                example = FormDropdown(examples, label="…or an example subject", value=None, elem_id="example")
            status = gr.Markdown("Upload 3–10 photos of your subject (or pick an example).", elem_id="upload-status")
        with gr.Column(scale=4):
            gallery = gr.Gallery(label="Prepared images (what training sees)", columns=5, height=260,
                                 elem_id="prepared-gallery")
    with gr.Row():
        subject_type = FormRadio(list(PRESETS), value="object", label="Subject type (preset)")
        class_noun = WordText(label="Class noun", placeholder="dog, backpack, star…",
                              elem_id="class-noun")
        with gr.Column():
            trigger = WordText(label="Trigger word", placeholder="<my-dog> (empty: suggested)",
                               elem_id="trigger")
            trigger_status = gr.Markdown("", elem_id="trigger-status")
            suggest = gr.Button("Suggest a trigger", size="sm")

    def prepare(files_value: list[str] | None, base: str, session_value: Session | None):
        try:
            base = services.checked_base(base)
        except ValueError as error:
            return [], f"⚠️ {html.escape(str(error))}", session_value
        return prepare_images(files_value, base, session_value)

    def example_subject(name: str, base: str, session_value: Session | None):
        try:
            base = services.checked_base(base)
        except ValueError as error:
            return [], f"⚠️ {html.escape(str(error))}", gr.update(), gr.update(), session_value
        return load_example(name, base, session_value)

    files.change(prepare, [files, base_model, session], [gallery, status, session], api_name="prepare_images")
    example.change(example_subject, [example, base_model, session], [gallery, status, class_noun, files, session],
                   api_name="load_example")
    suggest.click(lambda noun: suggest_trigger(services.tokenizer(), noun or "subject"), class_noun, trigger,
                  api_name="suggest_trigger")
    return {"files": files, "class_noun": class_noun, "trigger": trigger, "trigger_status": trigger_status,
            "subject_type": subject_type, "gallery": gallery}


# ---- Train tab -------------------------------------------------------------------------------------------------------
FORM_FIELDS = ("stage1_steps", "stage1_learning_rate", "stage2_steps", "stage2_learning_rate", "lora_rank",
               "max_batch_size", "seed", "class_images", "preview_interval")


def preset_values(subject_type: str, method: str, stage2_mode: str, base_model: str) -> list[Any]:
    """The form's numbers for a preset and method, from the engine's own defaults."""
    config = TrainingConfig(class_noun="subject", subject_type=subject_type, method=method, stage2_mode=stage2_mode,
                            base_model=base_model).resolved()
    preview = 50 if is_mini_world_model(base_model) else 100
    return [config.stage1_steps, config.stage1_learning_rate, config.stage2_steps, config.stage2_learning_rate,
            config.lora_rank, config.max_batch_size, config.seed, config.class_images, preview]


def form_to_config(values: dict[str, Any], session: Session) -> TrainingConfig:
    """The validated config a form describes; raises ConfigError naming the field."""
    numbers = {name: values[name] for name in FORM_FIELDS}
    for name in ("stage1_steps", "stage2_steps", "lora_rank", "max_batch_size", "seed", "class_images",
                 "preview_interval"):
        numbers[name] = int(numbers[name]) if numbers[name] is not None else None
    return TrainingConfig(
        class_noun=(values["class_noun"] or "").strip(), method=values["method"], stage2_mode=values["stage2_mode"],
        subject_type=values["subject_type"], base_model=values["base_model"],
        trigger_token=(values["trigger"] or "").strip() or None, resolution=session.resolution,
        prior_preservation=bool(values["prior_preservation"]) and values["method"].startswith("dreambooth"),
        train_text_encoder=bool(values["train_text_encoder"]) and values["method"] == "dreambooth",
        gradient_checkpointing=bool(values["gradient_checkpointing"]), use_8bit_adam=bool(values["use_8bit_adam"]),
        compile_unet=bool(values["compile_unet"]),
        **numbers,
    ).resolved()


def progress_html(event: ProgressEvent | None, message: str = "") -> str:
    if event is None:
        return f"<div class='run-status'>{html.escape(message)}</div>"
    percent = 100 * event.fraction
    loss = "" if event.loss is None else f" · loss {event.loss:.4f}"
    eta = "" if event.eta_s is None else f" · ETA {format_seconds(event.eta_s)}"
    return (f"<div class='run-status'><div class='bar'><div style='width:{percent:.1f}%'></div></div>"
            f"<b>{html.escape(event.stage)}</b> step {event.stage_step}/{event.stage_total}{loss}{eta} · "
            f"elapsed {format_seconds(event.elapsed_s)} · total {event.step}/{event.total_steps}</div>")


def build_train_tab(services: Services, session: gr.State, base_model: gr.Dropdown,
                    upload: dict[str, gr.components.Component]):
    with gr.Row():
        method = FormRadio([(label, key) for key, label in METHOD_LABELS.items()], value="two_stage", label="Method")
        default_mode = TrainingConfig(class_noun="subject", base_model=services.default_base).default_stage2_mode()
        stage2_mode = FormRadio(["lora", "full"], value=default_mode, label="Stage 2 (two-stage): LoRA or full U-Net")
    defaults = preset_values("object", "two_stage", default_mode, services.default_base)
    with gr.Accordion("Hyperparameters (prefilled by the preset)", open=False):
        with gr.Row():
            stage1_steps = FormNumber(defaults[0], label="Stage 1 / TI steps", precision=0, minimum=0)
            stage1_lr = FormNumber(defaults[1], label="Stage 1 / TI learning rate")
            stage2_steps = FormNumber(defaults[2], label="U-Net steps", precision=0, minimum=0)
            stage2_lr = FormNumber(defaults[3], label="U-Net learning rate")
        with gr.Row():
            lora_rank = FormNumber(defaults[4], label="LoRA rank", precision=0, minimum=1)
            batch = FormNumber(defaults[5], label="Images per step", precision=0, minimum=1)
            seed = FormNumber(defaults[6], label="Seed", precision=0, minimum=0)
            preview_interval = FormNumber(defaults[8], label="Preview every N steps (0: off)", precision=0, minimum=0)
        with gr.Row():
            prior = FormCheckbox(False, label="DreamBooth: prior preservation (class images)")
            class_images = FormNumber(defaults[7], label="Class images", precision=0, minimum=1)
            text_encoder = FormCheckbox(False, label="DreamBooth: train the text encoder")
            checkpointing = FormCheckbox(False,
                                         label="Gradient checkpointing (less memory; on by itself on small GPUs)")
            adam8 = FormCheckbox(False, label="8-bit Adam (less memory; on by itself on small GPUs)")
            compile_unet = FormCheckbox(False, label="Compile the U-Net (GPU: faster steps after a warm-up)")
    estimate = gr.Markdown(elem_id="estimate")
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="start-training")
        cancel = gr.Button("Cancel", variant="stop", elem_id="cancel-training")
    status = gr.HTML(progress_html(None, "Not started."), elem_id="train-progress")
    with gr.Row():
        preview = gr.Image(label="Preview (fixed seed)", height=256, interactive=False, elem_id="train-preview")
        result = gr.Markdown(elem_id="train-result")

    form = {"class_noun": upload["class_noun"], "trigger": upload["trigger"], "subject_type": upload["subject_type"],
            "method": method, "stage2_mode": stage2_mode, "base_model": base_model, "stage1_steps": stage1_steps,
            "stage1_learning_rate": stage1_lr, "stage2_steps": stage2_steps, "stage2_learning_rate": stage2_lr,
            "lora_rank": lora_rank, "max_batch_size": batch, "seed": seed, "class_images": class_images,
            "preview_interval": preview_interval, "prior_preservation": prior, "train_text_encoder": text_encoder,
            "gradient_checkpointing": checkpointing, "use_8bit_adam": adam8, "compile_unet": compile_unet}
    by_component = {component: name for name, component in form.items()}
    numbers = [stage1_steps, stage1_lr, stage2_steps, stage2_lr, lora_rank, batch, seed, class_images,
               preview_interval]

    def named(data: dict) -> dict[str, Any]:
        return {by_component[c]: v for c, v in data.items() if c in by_component}

    def show_estimate(data: dict) -> str:
        values, session_value = named(data), data.get(session)
        try:
            config = form_to_config({**values, "class_noun": values["class_noun"] or "subject"},
                                    get_session(session_value))
        except (ConfigError, ValueError, TypeError) as error:
            return f"⚠️ {html.escape(str(error))}"
        seconds = estimate_seconds(config, services.hardware, config.base_model or services.default_base)
        return (f"Estimated time on **{html.escape(services.hardware)}**: about **{format_seconds(seconds)}** "
                f"({config.stage1_steps} + {config.stage2_steps} steps).")

    def start_training(session_value: Session | None, **values: Any):
        """The form comes as named values (the `/train` API takes them by name: class_noun, stage1_steps, …).

        The session is changed in place and not returned: under ZeroGPU this runs in a forked worker whose results
        are pickled back, and a session holding a running job cannot be pickled.
        """
        if session_value is None or session_value.subject is None or not len(session_value.subject):
            yield progress_html(None, "Upload subject images first (Upload tab)."), None, ""
            return
        if session_value.job is not None and session_value.job.state != "ended":
            yield progress_html(None, "A training is already running in this session."), None, ""
            return
        try:
            values["base_model"] = services.checked_base(values.get("base_model"))
            resolution = resolution_for(values["base_model"])
            if resolution != session_value.resolution:
                # The base model changed after the upload: prepare the same files again at its resolution.
                kept, _rejected = sort_subject_images(session_value.subject_files, resolution)
                if not len(kept):
                    raise ImageError(f"none of the uploaded images can be used at {resolution} px")
                session_value.subject, session_value.resolution = kept, resolution
            config = form_to_config(values, session_value)
        except (ConfigError, ImageError, ValueError, TypeError) as error:
            yield progress_html(None, f"Invalid settings: {error}"), None, ""
            return
        output = session_value.workspace.new_run_dir(f"{config.method}-{config.class_noun}")
        cancel_flag = CancelFlag(session_value.workspace.cancel_file)
        cancel_flag.reset()
        job = TrainingJob(config, session_value.subject, output, cancel_flag=cancel_flag)
        session_value.job = job  # visible to Cancel from now on, while it waits for the GPU too
        with session_value.workspace.in_use():
            yield from run_when_gpu_free(job)
        cancel_flag.reset()
        if not job.started:  # cancelled while waiting for the GPU
            yield progress_html(None, "Cancelled before it started; nothing was trained or written."), None, ""
            return
        if job.error is not None:
            yield progress_html(None, describe_failure(job.error)), None, ""
            return
        yield progress_html(None, "Done."), gr.skip(), trained_message(job)

    def run_when_gpu_free(job: TrainingJob) -> Iterator[tuple[str, Any, str]]:
        """One training per GPU: wait for it here, where Cancel can still stop the run before it starts."""
        while not services.gpu_lock.acquire(timeout=0.5):
            if job.cancel_flag.cancelled:
                return
            yield progress_html(None, "Waiting for the GPU: another training is running…"), None, ""
        try:
            if job.cancel_flag.cancelled:
                return
            yield progress_html(None, "Loading the base model…"), None, ""
            job.start()
            try:
                for event in job.events():
                    preview = gr.skip() if event.preview is None else for_display(event.preview)
                    yield progress_html(event), preview, ""
            finally:
                # A closed browser tab closes this generator: stop the run before the GPU lock is released.
                if job.state == "running":
                    job.cancel()
                job.wait()
        finally:
            services.gpu_lock.release()

    def trained_message(job: TrainingJob) -> str:
        info = read_artifact(job.output_dir)
        seconds = job.result.seconds_training if job.result is not None else 0.0
        message = (f"✅ Trained **{METHOD_LABELS[job.config.method]}** in {format_seconds(seconds)}. "
                   f"Use **`{info.instance_prompt}`** in your prompts.\n\nSaved as run `{job.output_dir.name}` — "
                   "open the Generate tab to try it, the Hub tab to push it.")
        notes = [note for note in job.result.notes if note not in job.subject_images.notes] if job.result else []
        if notes:  # the upload's own notes were shown on the Upload tab
            message += "\n\n" + "\n".join(f"- note: {note}" for note in notes)
        return message

    def cancel_training(session_value: Session | None) -> str:
        job = session_value.job if session_value is not None else None
        if (job is None or job.state == "ended") and session_value is not None and session_value.workspace.busy:
            # The run lives in another process (ZeroGPU's worker), which watches the session's cancel file.
            CancelFlag(session_value.workspace.cancel_file).cancel()
            return progress_html(None, "Cancelling… (stops at the next step; nothing will be written)")
        if job is None or job.state == "ended":
            return progress_html(None, "Nothing is running or waiting in this session.")
        waiting = job.state == "waiting"
        job.cancel()  # also touches the session's cancel file, which a ZeroGPU worker sees
        if waiting:
            return progress_html(None, "Cancelled before it started; nothing was trained or written.")
        return progress_html(None, "Cancelling… (stops at the next step; nothing will be written)")

    preset_inputs = [upload["subject_type"], method, stage2_mode, base_model]
    base_model.change(lambda base: TrainingConfig(class_noun="subject", base_model=base).default_stage2_mode(),
                      base_model, stage2_mode, queue=False, api_visibility="undocumented")
    for control in (upload["subject_type"], method, stage2_mode):
        control.change(lambda *v: preset_values(*v), preset_inputs, numbers, queue=False, api_visibility="undocumented")
    for control in [*numbers, method, stage2_mode, prior, base_model, upload["subject_type"]]:
        control.change(show_estimate, {*form.values(), session}, estimate, queue=False, api_visibility="undocumented")
    upload["trigger"].change(lambda t, m: check_trigger_text(services, t, m), [upload["trigger"], method],
                             upload["trigger_status"], queue=False, api_visibility="undocumented")
    def gpu_seconds(session_value: Session | None, **values: Any) -> int:
        """ZeroGPU time to ask for: the estimate plus half again, within what ZeroGPU allows."""
        try:
            config = form_to_config(values, get_session(session_value))
            estimate = estimate_seconds(config, "NVIDIA H200", config.base_model or services.default_base)
        except (ConfigError, ValueError, TypeError):
            return 60
        return int(min(max(60, estimate * 1.5 + 30), 1500))

    train_function = start_training
    if ZERO_GPU:
        import spaces  # present on ZeroGPU Spaces only

        train_function = spaces.GPU(duration=gpu_seconds)(start_training)
    # No queue limit: each run waits for the GPU in start_training, where Cancel can still stop it.
    run_event = start.click(train_function, [session], [status, preview, result], inputs_kwargs=form,
                            api_name="train", concurrency_limit=None)
    cancel.click(cancel_training, session, status, api_name="cancel", queue=False)
    return {"run_event": run_event, "estimate": estimate, "show_estimate": show_estimate,
            "estimate_inputs": {*form.values(), session}}


# ---- Generate tab ----------------------------------------------------------------------------------------------------
def run_choices(session: Session | None) -> list[tuple[str, str]]:
    if session is None:
        return []
    choices = [(f"{info.folder.name} — {info.instance_prompt}", info.folder.name) for info in session.workspace.runs()]
    choices += [(f"Hub: {repo}", f"hub:{repo}") for repo in session.hub_folders]
    return choices


def resolve_source(session: Session, choice: str) -> Path:
    """A dropdown value to a folder this session owns (values from a client are never trusted as paths)."""
    if choice.startswith("hub:"):
        folder = session.hub_folders.get(choice[4:])
        if folder is None:
            raise ArtifactError(f"{choice[4:]} was not loaded in this session")
        return Path(folder)
    folder = session.workspace.folder / Path(choice).name
    if not folder.is_dir():
        raise ArtifactError(f"no run named {Path(choice).name} in this session")
    return folder


def base_for(info: ArtifactInfo, selected: str | None) -> str | None:
    """The base model to apply an artifact on: None (its recorded Hub id or the bundled model), or the Base model
    dropdown's choice when the artifact was trained on a local folder, which only records `local:<folder name>`."""
    recorded = info.base_model
    if not recorded.startswith("local:"):
        return None if recorded else selected or None
    if selected and portable_base_model(selected) == recorded:
        return selected
    raise ArtifactError(f"{info.folder.name} was trained on a local base model ({recorded.removeprefix('local:')}): "
                        "choose that folder as the Base model to use it")


def build_generate_tab(services: Services, session: gr.State, base_dropdown: gr.Dropdown):
    with gr.Row():
        # Custom values let API clients name a run they just trained (the choices refresh only in the browser);
        # resolve_source() checks every value against this session's own runs.
        source = FormDropdown([], label="Model: a run of this session or a loaded Hub repo", elem_id="source",
                             allow_custom_value=True)
        refresh = gr.Button("↻ Refresh", size="sm")
    with gr.Row():
        repo_id = FormText(label="…or a Hub repo id", placeholder="user/my-dog", elem_id="hub-repo-id")
        hub_token = FormText(label="Token (private repos)", type="password")
        load_repo = gr.Button("Load from the Hub")
    load_status = gr.Markdown(elem_id="load-status")
    prompt = PromptText(label="Prompt", lines=2, elem_id="prompt")
    negative = PromptText(label="Negative prompt", value="")
    with gr.Row():
        seed = FormNumber(0, label="Seed", precision=0, minimum=0)
        steps = FormSlider(1, 100, 25, step=1, label="Steps")
        guidance = FormSlider(0, 15, 5.0, step=0.5, label="Guidance")
        lora_scale = FormSlider(0, 1.5, 1.0, step=0.05, label="LoRA scale")
        count = FormSlider(1, 4, 2, step=1, label="Images")
    go = gr.Button("Generate", variant="primary", elem_id="generate")
    with gr.Row():
        base_gallery = gr.Gallery(label="Base model (same seed, trigger removed)", columns=2, elem_id="base-gallery")
        personal_gallery = gr.Gallery(label="Personalized", columns=2, elem_id="personal-gallery")

    def refresh_choices(session_value: Session | None):
        choices = run_choices(session_value)
        return gr.update(choices=choices, value=choices[0][1] if choices else None)

    def choose(session_value: Session | None, choice: str | None) -> str:
        if session_value is None or not choice:
            return ""
        try:
            info = read_artifact(resolve_source(session_value, choice))
        except ArtifactError as error:
            return str(error)
        return f"{info.instance_prompt} on the beach"

    def load_from_hub(repo: str, token: str, session_value: Session | None, oauth_token: gr.OAuthToken | None = None):
        session_value = get_session(session_value)
        repo = (repo or "").strip()
        if not HUB_REPO_ID.fullmatch(repo):
            return "Give a repo id like `user/name`.", gr.update(), session_value
        token_value = hub.resolve_token(token or (oauth_token.token if oauth_token else None))
        try:
            # Files fetched with a token stay in this session's folder (removed with it), never the server's shared
            # cache; download_repo also asks the Hub about this token before serving anything cached.
            cache = session_value.workspace.hub_cache if token_value else None
            folder = hub.download_repo(repo, token_value, cache_dir=cache)
            read_artifact(folder)
        except (hub.HubError, ArtifactError) as error:
            return f"⚠️ {html.escape(str(error), quote=False)}", gr.update(), session_value
        session_value.hub_folders[repo] = str(folder)
        choices = run_choices(session_value)
        return f"Loaded `{repo}`.", gr.update(choices=choices, value=f"hub:{repo}"), session_value

    def generate(choice: str | None, prompt_text: str, negative_text: str, seed_value: float, steps_value: float,
                 guidance_value: float, scale: float, images: float, base_model: str | None,
                 session_value: Session | None):
        if session_value is None or not choice:
            raise UserError("Train a model or load one from the Hub first.")
        try:
            request = GenerationRequest(prompt=prompt_text, negative_prompt=negative_text, seed=int(seed_value or 0),
                                        steps=int(steps_value), guidance_scale=float(guidance_value),
                                        lora_scale=float(scale), num_images=int(images))
            request.validate()
            folder = resolve_source(session_value, choice)
            with services.gpu_lock if ZERO_GPU else contextlib.nullcontext():
                base = base_for(read_artifact(folder), services.checked_base(base_model))
                info = services.generator.apply(folder, base_model=base)
                request.resolution = info.config.get("resolution")
                personal = services.generator.generate(request)
                base = services.generator.generate(request, personalized=False)
        except (ArtifactError, ValueError, OSError) as error:
            raise UserError(str(error).splitlines()[0][:300]) from None
        base_prompt = strip_trigger(prompt_text, info.trigger_token)
        return ([(for_display(im), f"base · {base_prompt}") for im in base],
                [(for_display(im), f"seed {request.seed + i}") for i, im in enumerate(personal)])

    refresh.click(refresh_choices, session, source, queue=False, api_visibility="undocumented")
    source.change(choose, [session, source], prompt, queue=False, api_visibility="undocumented")
    load_repo.click(load_from_hub, [repo_id, hub_token, session], [load_status, source, session],
                    api_name="load_from_hub")
    go.click(generate, [source, prompt, negative, seed, steps, guidance, lora_scale, count, base_dropdown, session],
             [base_gallery, personal_gallery], api_name="generate", concurrency_limit=1, concurrency_id="generate")
    return {"source": source, "refresh": refresh_choices, "prompt": prompt}


# ---- Hub tab ---------------------------------------------------------------------------------------------------------
def build_hub_tab(services: Services, session: gr.State):
    gr.Markdown("Push a trained run to your Hugging Face account. Private by default; the token is used for this "
                "push only and is never stored or shown.")
    with gr.Row():
        if ON_SPACE:
            gr.LoginButton()
        token = FormText(label="Hugging Face write token (or sign in / set HF_TOKEN)",
                         type="password",
                         elem_id="hub-token")
    with gr.Row():
        run = FormDropdown([], label="Run to push", elem_id="push-run", allow_custom_value=True)  # see `source`
        repo_name = FormText(label="Repo name", elem_id="repo-name")
        private = FormCheckbox(True, label="Private")
    push = gr.Button("Push to the Hub", variant="primary", elem_id="push")
    status = gr.Markdown(elem_id="push-status")

    def choose_run(session_value: Session | None, choice: str | None) -> str:
        if session_value is None or not choice or choice.startswith("hub:"):
            return ""
        try:
            info = read_artifact(resolve_source(session_value, choice))
        except ArtifactError:
            return ""
        return hub.slugify_repo_name(f"{info.class_noun}-{info.trigger_token}-{info.method}")

    def do_push(choice: str | None, name: str, token_text: str, is_private: bool, session_value: Session | None,
                oauth_token: gr.OAuthToken | None = None) -> Iterator[str]:
        if session_value is None or not choice or choice.startswith("hub:"):
            yield "⚠️ Choose a run of this session to push."
            return
        token_value = hub.resolve_token(token_text or (oauth_token.token if oauth_token else None))
        if token_value is None:
            yield "⚠️ No token: sign in with Hugging Face, paste a write token, or set HF_TOKEN."
            return
        try:
            folder = resolve_source(session_value, choice)
            name = (name or "").strip() or folder.name
            yield f"⏳ Pushing `{html.escape(name)}` to the Hub… (a failing connection is retried for up to ~30 s)"
            url = hub.push_artifact(folder, name, token_value, private=bool(is_private))
        except hub.HubError as error:
            yield f"⚠️ {html.escape(str(error), quote=False)}"  # the message says that the local run is kept
            return
        except (ArtifactError, OSError) as error:
            yield f"⚠️ {html.escape(str(error), quote=False)} (your local run is kept; you can retry)"
            return
        yield f"✅ Pushed to [{url}]({url}) ({'private' if is_private else 'public'})."

    run.change(choose_run, [session, run], repo_name, queue=False, api_visibility="undocumented")
    push.click(do_push, [run, repo_name, token, private, session], status, api_name="push")
    return {"run": run}


# ---- page ------------------------------------------------------------------------------------------------------------
CSS = """
.run-status .bar {height: 10px; background: #e5e7eb; border-radius: 5px; margin-bottom: 6px; overflow: hidden}
.run-status .bar div {height: 100%; background: linear-gradient(90deg, #6366f1, #ec4899)}
"""


def banner(services: Services) -> str:
    lines = []
    if services.default_base == BUNDLED_MINI_MODEL and not (MINI_MODEL_DIR / "model_index.json").is_file():
        lines.append("⚠️ The bundled mini model is missing from this copy (personalization/assets/mini_model): "
                     "choose another base model, or run scripts/train_mini_model.py.")
    elif services.default_base == BUNDLED_MINI_MODEL:
        lines.append("Running on **CPU with the bundled mini model** (a small shapes world, 32 px): try the example "
                     "subjects. To personalize Stable Diffusion 1.5 with your photos, **duplicate this Space onto a "
                     "GPU** (A10G or better).")
    if ON_SPACE and not os.environ.get("OAUTH_CLIENT_ID"):
        lines.append("Hub login is not configured on this Space (`hf_oauth: true`): paste a token to push.")
    return "\n\n".join(lines)


def build_app(services: Services | None = None) -> gr.Blocks:
    services = services or Services(default_base=os.environ.get("BASE_MODEL") or default_base_model(),
                                    generator=Generator(), hardware=hardware_name())
    SESSION_CLEANER.maybe_clean(WORK_ROOT, now=True)
    with CheckedBlocks(title="Personalize a diffusion model") as demo:
        session = gr.State(None)
        gr.Markdown("# Personalize a text-to-image model\nUpload a few photos of one subject, train, generate it "
                    "anywhere, push it to the Hub. Method: two-stage personalization (Zeng et al., 2024).")
        notice = banner(services)
        if notice:
            with gr.Row():
                gr.Markdown(notice, elem_id="banner")
                if ON_SPACE:
                    gr.DuplicateButton(size="sm")
        base_model = FormDropdown(services.base_choices, value=services.default_base, label="Base model",
                                 allow_custom_value=os.environ.get("ALLOW_ANY_BASE_MODEL") == "1",
                                 elem_id="base-model")
        gr.Markdown(f"Hardware: **{html.escape(services.hardware)}**")
        with gr.Tabs():
            with gr.Tab("1 · Upload", id="upload"):
                upload = build_upload_tab(services, session, base_model)
            with gr.Tab("2 · Train", id="train"):
                train = build_train_tab(services, session, base_model, upload)
            with gr.Tab("3 · Generate", id="generate") as generate_tab:
                generate = build_generate_tab(services, session, base_model)
            with gr.Tab("4 · Hub", id="hub") as hub_tab:
                hub_parts = build_hub_tab(services, session)
        train["run_event"].then(generate["refresh"], session, generate["source"], api_visibility="undocumented")
        train["run_event"].then(generate["refresh"], session, hub_parts["run"], api_visibility="undocumented")
        hidden = {"queue": False, "api_visibility": "undocumented"}
        generate_tab.select(generate["refresh"], session, generate["source"], **hidden)
        hub_tab.select(generate["refresh"], session, hub_parts["run"], **hidden)
        demo.load(train["show_estimate"], train["estimate_inputs"], train["estimate"],
                  api_visibility="undocumented")
    return demo


# Gradio's run history (on by default) keeps every call's inputs in the browser's localStorage and shows them at
# /gradio_api/runs: the push and load tokens would sit there in clear text.
LAUNCH_OPTIONS: dict[str, Any] = {"run_history": False, "css": CSS}


def main() -> None:
    demo = build_app()
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), **LAUNCH_OPTIONS)


if __name__ == "__main__":
    main()
