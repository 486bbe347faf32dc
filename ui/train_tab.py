"""The Train tab: method, stage-2 mode, the hyperparameter form (generated from the config's field metadata and
prefilled by the preset), the time estimate, Start / Cancel and the streamed progress."""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from personalization.artifacts import ArtifactError, read_artifact
from personalization.config import TrainingConfig
from personalization.generation import GenerationRequest
from personalization.jobs import TrainingJob, estimate_seconds
from personalization.methods import DEFAULT_METHOD, method_spec
from personalization.progress import format_seconds
from personalization.tokens import strip_trigger
from ui.checkpoints_view import checkpoint_view, pick
from ui.fields import FormDropdown, FormRadio, UserError
from ui.resume_panel import build_resume_panel
from ui.services import Services, Session, for_display
from ui.train_form import build_form, method_choices, wire_form
from ui.training import INVALID, TrainingRuns, form_to_config, progress_html


def estimate_text(services: Services, values: dict[str, Any], session: Session | None) -> str:
    try:
        config = form_to_config({**values, "class_noun": values["class_noun"] or "subject"},
                                session.resolution if session else None)
    except INVALID as error:
        return f"⚠️ {html.escape(str(error))}"
    seconds = estimate_seconds(config, services.hardware, config.base_model or services.default_base)
    return (f"Estimated time on **{html.escape(services.hardware)}**: about **{format_seconds(seconds)}** "
            f"({config.stage1_steps} + {config.stage2_steps} steps).")


def trained_samples(services: Services, session: Session | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The finished run's samples (the subject in new places, as its card shows them) and, beside them, the base
    model for the same prompts and seeds, so what training changed is seen at once; or nothing."""
    job = session.job if session is not None else None
    if job is None or job.result is None:
        return gr.update(value=None, visible=False), gr.update(value=None, visible=False)
    files = read_artifact(job.output_dir).sample_files
    prompts = job.config.sample_prompts()
    drawn = [prompts[index % len(prompts)] for index in range(len(files))]  # sample i: prompt i cycling, seed + i
    samples = [(str(path), prompt) for path, prompt in zip(files, drawn, strict=True)]
    try:
        base = base_images(services, job, drawn)
    except (ArtifactError, ValueError, OSError, UserError):  # the samples still show; the comparison is a bonus
        base = []
    return gr.update(value=base, visible=bool(base)), gr.update(value=samples, visible=bool(samples))


def base_images(services: Services, job: TrainingJob, prompts: list[str]) -> list[tuple[Any, str]]:
    """The base model's image for each sample's prompt and seed (the trigger left out, as on the Generate tab)."""
    config = job.config
    info = read_artifact(job.output_dir)
    requests = [GenerationRequest(prompt=prompt, seed=config.seed + index, steps=config.sample_steps,
                                  guidance_scale=config.guidance_scale, resolution=config.resolution)
                for index, prompt in enumerate(prompts)]
    drawn = services.draw(job.output_dir, config.base_model, [(request, False) for request in requests])
    return [(for_display(images[0]), f"base · {strip_trigger(request.prompt, info.trigger_token)}")
            for images, request in zip(drawn, requests, strict=True)]


def build_checkpoints() -> dict[str, Any]:
    """The finished run's checkpoints (ui.checkpoints_view): hidden until a run ends."""
    summary = gr.HTML(visible=False, elem_id="checkpoint-summary")
    grid = gr.Gallery(label="The same sample at every checkpoint", columns=6, height=180, visible=False,
                      elem_id="checkpoint-grid")
    with gr.Row():
        # The steps differ per run: the handler checks the value against the run's own checkpoints.
        picker = FormDropdown([], label="Step the run keeps (what Generate and Hub use)", allow_custom_value=True,
                              visible=False, elem_id="step-picker")
        pick_button = gr.Button("Use this step", visible=False, elem_id="pick-step")
    message = gr.Markdown(elem_id="pick-message")
    return {"summary": summary, "grid": grid, "picker": picker, "pick": pick_button, "message": message}


def build_train_tab(services: Services, session: gr.State, base_model: gr.Dropdown, upload: dict[str, Any],
                    tabs: gr.Tabs, stored: gr.BrowserState) -> dict[str, Any]:
    """``tabs``: the page's tabs; ``stored``: where the page keeps a run's resume code (ui.resume_panel)."""
    runs = TrainingRuns(services)
    resume = build_resume_panel(services, tabs, stored)  # first: after a server restart, what the page offers
    with gr.Row():
        method = FormRadio(method_choices(), value=DEFAULT_METHOD, label="Method")
        default_mode = TrainingConfig(class_noun="subject", base_model=services.default_base).default_stage2_mode()
        stage2_mode = FormRadio(["lora", "full"], value=default_mode, label="Stage 2 (two-stage): LoRA or full U-Net",
                                visible=method_spec(DEFAULT_METHOD).chooses_stage2_mode)
    widgets = build_form(default_mode, services.default_base)
    estimate = gr.Markdown(elem_id="estimate")
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="start-training")
        cancel = gr.Button("Cancel", variant="stop", elem_id="cancel-training")
    status = gr.HTML(progress_html(None, "Not started."), elem_id="train-progress")
    with gr.Row():
        preview = gr.Image(label="Preview (fixed seed)", height=256, interactive=False, elem_id="train-preview")
        result = gr.Markdown(elem_id="train-result")
    base_samples = gr.Gallery(label="Base model: same prompts and seeds, trigger removed", columns=4, height=200,
                              visible=False, elem_id="train-base-samples")
    samples = gr.Gallery(label="Your subject in new places (the samples its model card shows)", columns=4,
                         height=200, visible=False, elem_id="train-samples")
    checkpoints = build_checkpoints()
    form = {"class_noun": upload["class_noun"], "trigger": upload["trigger"], "subject_type": upload["subject_type"],
            "method": method, "stage2_mode": stage2_mode, "base_model": base_model, **widgets}
    names = {component: name for name, component in form.items()}

    def show_estimate(data: dict) -> str:
        values = {names[component]: value for component, value in data.items() if component in names}
        return estimate_text(services, values, data.get(session))

    def start_training(session_value: Session | None, **values: Any):
        """The form comes as named values: the `/train` API takes them by name (class_noun, stage1_steps, …)."""
        yield from runs.start(session_value, values)

    def resume_training(session_value: Session | None, code: str):
        """A new page after a server restart has no session yet: it gets one, which adopts the run."""
        session_value = services.session(session_value)
        for update in runs.resume(session_value, code):
            yield *update, session_value

    wire_form(services, upload, base_model, method, stage2_mode, widgets)
    for control in [*widgets.values(), method, stage2_mode, base_model, upload["subject_type"]]:
        control.change(show_estimate, {*form.values(), session}, estimate, queue=False, api_visibility="undocumented")
    # No queue limit: each run waits for the GPU in TrainingRuns.start, where Cancel can still stop it. The handler
    # runs in the server; only the training itself is a GPU call (TrainingRuns.train_on_gpu).
    # The run's resume code goes to this browser's storage (and to an API client, as the call's fourth value).
    run = {"fn": start_training, "inputs": [session], "outputs": [status, preview, result, resume["stored"]],
           "inputs_kwargs": form, "concurrency_limit": None}
    run_event = start.click(**run, api_name="train")
    resume_event = resume["resume"].click(resume_training, [session, resume["code"]],
                                          [status, preview, result, resume["stored"], session], api_name="resume",
                                          concurrency_limit=None)
    def show_samples(session_value: Session | None):
        return trained_samples(services, session_value)

    checkpoint_outputs = [checkpoints["summary"], checkpoints["grid"], checkpoints["picker"], checkpoints["pick"]]

    def show_results(event: Any) -> None:
        """After a run (or a picked step): its samples beside the base model's, then its checkpoints."""
        shown = event.then(show_samples, session, [base_samples, samples], api_visibility="undocumented")
        shown.then(checkpoint_view, session, checkpoint_outputs, api_visibility="undocumented")

    for event in (run_event, resume_event):
        show_results(event)
        # A run that failed after a checkpoint is offered at once; a finished run's code is dropped.
        event.then(**resume["restore"], api_visibility="undocumented").then(**resume["forget"])
    picked = checkpoints["pick"].click(pick, [session, checkpoints["picker"]], checkpoints["message"],
                                       api_name="pick_step")
    show_results(picked)
    cancel.click(runs.cancel, session, status, api_name="cancel", queue=False)
    return {"run_event": run_event, "resume_event": resume_event, "run": run, "samples": [base_samples, samples],
            "show_results": show_results, "restore": resume["restore"], "forget": resume["forget"],
            "estimate": estimate, "show_estimate": show_estimate, "estimate_inputs": {*form.values(), session}}


