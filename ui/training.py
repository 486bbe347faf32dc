"""A training started from the Train tab: the form read into a config, the wait for the GPU (where Cancel can still
stop it), the streamed progress, and the sentence that ends it. The engine (`personalization.jobs`) runs it: the
training itself in one GPU call (ui/zerogpu.py) that streams its progress back, everything else in the server.

Each run gets a resume code when it starts (`personalization.resumable`), which goes to the user's browser only: after
a server restart, the code adopts the interrupted run into the new session and continues it the same way."""

from __future__ import annotations

import contextlib
import html
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from personalization.artifacts import read_artifact
from personalization.config import ConfigError, ResolvedConfig, TrainingConfig, form_fields
from personalization.device import memory_refusal
from personalization.families import SD15, check_options
from personalization.images import ImageError, SubjectImages
from personalization.jobs import (
    TrainingJob,
    base_family,
    describe_failure,
    run_streamed,
    subject_at,
    training_resolution,
    zero_gpu_seconds,
)
from personalization.progress import CancelFlag, ProgressEvent, format_seconds
from personalization.resumable import (
    ResumableRun,
    ResumeError,
    adopt_run,
    check_key,
    forget_earlier_runs,
    new_key,
    record_run,
    settle,
)
from ui.fields import UserError
from ui.services import Services, Session, for_display
from ui.zerogpu import gpu

Update = tuple[str, Any, str]  # the Train tab's status, preview image and result message
# ... and the run's resume code, which the page keeps in the browser (None: nothing left to resume; gr.skip(): no
# run, the browser's code unchanged)
Outcome = tuple[str, Any, str, Any]
RESUMABLE_NOTE = " The run can be resumed from its last checkpoint (Resume an interrupted run, below)."
INVALID = (ConfigError, ImageError, ValueError, TypeError)


def progress_html(event: ProgressEvent | None, message: str = "") -> str:
    if event is None:
        return f"<div class='run-status'>{html.escape(message)}</div>"
    loss = "" if event.loss is None else f" · loss {event.loss:.4f}"
    eta = "" if event.eta_s is None else f" · ETA {format_seconds(event.eta_s)}"
    return (f"<div class='run-status'><div class='bar'><div style='width:{100 * event.fraction:.1f}%'></div></div>"
            f"<b>{html.escape(event.stage)}</b> step {event.stage_step}/{event.stage_total}{loss}{eta} · "
            f"elapsed {format_seconds(event.elapsed_s)} · total {event.step}/{event.total_steps}</div>")


def form_to_config(values: dict[str, Any], resolution: int | None) -> ResolvedConfig:
    """The validated config a form (or a `/train` call, by field name) describes; raises ConfigError naming the
    field. An empty box takes the method's default."""
    settings = {spec.name: spec.coerce(values[spec.name]) for spec in form_fields() if spec.name in values}
    settings = {name: value for name, value in settings.items() if value is not None}
    return TrainingConfig(
        class_noun=(values.get("class_noun") or "").strip(), method=values["method"],
        stage2_mode=values.get("stage2_mode"), subject_type=values["subject_type"], base_model=values["base_model"],
        trigger_token=(values.get("trigger") or "").strip() or None, resolution=resolution, **settings,
    ).resolved()


def trained_message(job: TrainingJob, method_label: str) -> str:
    info = read_artifact(job.output_dir)
    seconds = job.result.seconds_training if job.result is not None else 0.0
    message = (f"✅ Trained **{method_label}** in {format_seconds(seconds)}. "
               f"Use **`{info.instance_prompt}`** in your prompts.\n\nSaved as run `{job.output_dir.name}` — "
               "open the Generate tab to try it, the Hub tab to push it.")
    notes = [note for note in job.result.notes if note not in job.subject_images.notes] if job.result else []
    if notes:  # the upload's own notes were shown on the Upload tab
        message += "\n\n" + "\n".join(f"- note: {note}" for note in notes)
    return message


def training_seconds(config: TrainingConfig, subject_images: SubjectImages, output_dir: Path,
                     cancel_file: Path, resume: bool = False) -> int:
    """The GPU time of one training call (:func:`personalization.jobs.run_streamed`), from its config."""
    return zero_gpu_seconds(config, config.base_model or "")


def check_memory(services: Services, config: ResolvedConfig) -> None:
    """Refuse, before anything loads, a run of a large family (SDXL) that this GPU cannot hold even with the memory
    options on, in one sentence saying what would fit. SD-1.x bases are left to the trainer's own memory plan."""
    family = base_family(config.base_model or services.default_base)
    if family is SD15:
        return
    refusal = memory_refusal(family, services.gpu_bytes, full_unet=not config.uses_lora)
    if refusal:
        raise ValueError(refusal)


class TrainingRuns:
    """Starts, follows and cancels the trainings of the app's sessions, one per GPU at a time."""

    def __init__(self, services: Services) -> None:
        self.services = services
        # The training, its previews, class images and samples: one GPU call, streaming plain values back.
        self.train_on_gpu = gpu(duration=training_seconds)(run_streamed)

    def start(self, session: Session | None, values: dict[str, Any]) -> Iterator[Outcome]:
        """Runs in the server (the session is changed in place and kept); only the training itself is a GPU call."""
        if session is None or session.subject is None or not len(session.subject):
            yield progress_html(None, "Upload subject images first (Upload tab)."), None, "", gr.skip()
            return
        if session.job is not None and session.job.state != "ended":
            yield progress_html(None, "A training is already running in this session."), None, "", gr.skip()
            return
        try:
            job = self.new_job(session, values)
        except INVALID as error:
            yield progress_html(None, f"Invalid settings: {error}"), None, "", gr.skip()
            return
        key = new_key()
        with session.workspace.in_use():
            forget_earlier_runs(session.workspace.folder)  # the browser's code now becomes this run's
            record = record_run(session.workspace.folder, key, job.config, job.subject_images, job.output_dir)
            yield from self.follow(job, key)
        yield self.outcome(job, record, key)

    def resume(self, session: Session, code: str) -> Iterator[Outcome]:
        """Continue the interrupted run whose resume code is ``code``, adopted into this session's workspace."""
        if session.job is not None and session.job.state != "ended":
            yield progress_html(None, "A training is already running in this session."), None, "", gr.skip()
            return
        # Held before the adoption: whoever else sends the code meanwhile finds the run's new workspace busy.
        with session.workspace.in_use():
            try:
                key = check_key(code)
                run = adopt_run(self.services.work_root, key, session.workspace.folder)
                job = self.resumed_job(session, run)
            except ResumeError as error:
                raise UserError(str(error)) from None
            except INVALID as error:
                raise UserError(f"This run cannot be resumed on this server: {error}") from None
            step = run.stopped_at()
            yield progress_html(None, f"Resuming from the checkpoint at step {step}…"), None, "", key
            yield from self.follow(job, None)
        yield self.outcome(job, run.record, key)

    def resumed_job(self, session: Session, run: ResumableRun) -> TrainingJob:
        config = run.training_config()
        self.services.checked_base(config.base_model)  # the server may no longer offer the run's base model
        check_memory(self.services, config)
        cancel_flag = CancelFlag(session.workspace.cancel_file)
        cancel_flag.reset()
        session.job = TrainingJob(config, run.subject_images(), run.output_dir, cancel_flag=cancel_flag, resume=True)
        return session.job

    def follow(self, job: TrainingJob, key: str | None) -> Iterator[Outcome]:
        """The run's updates; the first carries ``key``, so the browser holds it before training starts."""
        for status, preview, result in self.run_when_gpu_free(job):
            yield status, preview, result, key or gr.skip()
            key = None

    def outcome(self, job: TrainingJob, record: Path, key: str) -> Outcome:
        """The sentence that ends a run; the resume code stays in the browser while the run can still be resumed."""
        job.cancel_flag.reset()
        code = key if settle(record) else None
        if not job.started:  # cancelled while waiting for the GPU
            return progress_html(None, "Cancelled before it started; nothing was trained or written."), None, "", code
        if job.error is not None:
            message = describe_failure(job.error) + (RESUMABLE_NOTE if code else "")
            return progress_html(None, message), None, "", code
        return progress_html(None, "Done."), gr.skip(), trained_message(job, job.config.method_spec.label), None

    def new_job(self, session: Session, values: dict[str, Any]) -> TrainingJob:
        base = self.services.checked_base(values.get("base_model"))
        resolution = training_resolution(base)
        subject = subject_at(resolution, session.subject, session.resolution, session.subject_files)
        session.subject, session.resolution = subject, resolution
        config = form_to_config({**values, "base_model": base}, resolution)
        check_options(base_family(base), config.train_text_encoder)
        check_memory(self.services, config)
        cancel_flag = CancelFlag(session.workspace.cancel_file)
        cancel_flag.reset()
        output = session.workspace.new_run_dir(f"{config.method}-{config.class_noun}")
        session.job = TrainingJob(config, subject, output, cancel_flag=cancel_flag)  # Cancel sees it from now on
        return session.job

    def run_when_gpu_free(self, job: TrainingJob) -> Iterator[Update]:
        """One training per GPU: wait for it here, where Cancel can still stop the run before it starts."""
        lock = self.services.gpu_lock
        while not lock.acquire(timeout=0.5):
            if job.cancel_flag.cancelled:
                return
            yield progress_html(None, "Waiting for the GPU: another training is running…"), None, ""
        try:
            if job.cancel_flag.cancelled:
                return
            yield progress_html(None, "Loading the base model…"), None, ""
            stream = self.train_on_gpu(job.config, job.subject_images, job.output_dir, job.cancel_flag.signal_file,
                                       job.resume)
            # A closed browser tab closes this generator: closing the events cancels the run before the unlock.
            with contextlib.closing(job.run_elsewhere(stream)) as events:
                for event in events:
                    yield progress_html(event), gr.skip() if event.preview is None else for_display(event.preview), ""
        finally:
            lock.release()

    def cancel(self, session: Session | None) -> str:
        job = session.job if session is not None else None
        if (job is None or job.state == "ended") and session is not None and session.workspace.busy:
            # The run lives in another process (ZeroGPU's worker), which watches the session's cancel file.
            CancelFlag(session.workspace.cancel_file).cancel()
            return progress_html(None, "Cancelling… (stops at the next step; nothing will be written)")
        if job is None or job.state == "ended":
            return progress_html(None, "Nothing is running or waiting in this session.")
        waiting = job.state == "waiting"
        job.cancel()  # also touches the session's cancel file, which a ZeroGPU worker sees
        if waiting:
            return progress_html(None, "Cancelled before it started; nothing was trained or written.")
        return progress_html(None, "Cancelling… (stops at the next step; nothing will be written)")
