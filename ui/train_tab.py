"""The Train tab: method, stage-2 mode, the hyperparameter form (generated from the config's field metadata and
prefilled by the preset), the time estimate, Start / Cancel and the streamed progress."""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from personalization.config import ConfigField, TrainingConfig, form_fields, is_mini_world_model
from personalization.jobs import estimate_seconds, zero_gpu_seconds
from personalization.methods import DEFAULT_METHOD, OPTIONS, method_keys, method_spec
from personalization.progress import format_seconds
from ui.fields import FormCheckbox, FormNumber, FormRadio
from ui.services import ZERO_GPU, Services, Session
from ui.training import INVALID, TrainingRuns, form_to_config, progress_html
from ui.upload_tab import check_trigger_text

# The form's widgets that belong to one of the options only some methods take (methods.OPTIONS): shown for the
# methods whose spec accepts the option. A client that sends one anyway is refused by the config, with its reason.
OPTION_WIDGETS: dict[str, tuple[str, ...]] = {
    "prior_preservation": ("prior_preservation", "class_images"),
    "train_text_encoder": ("train_text_encoder",),
}
NUMBERS = tuple(spec for spec in form_fields() if spec.kind in (int, float))
ROW = 4  # form fields per row


def preset_values(subject_type: str, method: str, stage2_mode: str | None, base_model: str) -> list[Any]:
    """The form's numbers for a preset and method, from the engine's own defaults."""
    config = TrainingConfig(class_noun="subject", subject_type=subject_type, method=method, stage2_mode=stage2_mode,
                            base_model=base_model).resolved()
    preview = 50 if is_mini_world_model(base_model) else 100  # the app shows previews; the CLI's default is none
    return [preview if spec.name == "preview_interval" else getattr(config, spec.name) for spec in NUMBERS]


def method_choices() -> list[tuple[str, str]]:
    """The Method radio's (label, key) pairs: every registered method, named by its spec."""
    return [(method_spec(key).label, key) for key in method_keys()]


def shown_widgets(method: str) -> dict[str, bool]:
    """Which option widgets (OPTION_WIDGETS) the form shows for ``method``: those of the options its spec accepts."""
    spec = method_spec(method)
    return {name: spec.refusal(option) is None for option in OPTIONS for name in OPTION_WIDGETS.get(option, ())}


def option_updates(method: str) -> list[dict[str, Any]]:
    """On a method change: show the option widgets its spec accepts, hide the others and untick a hidden switch,
    so that no option the method refuses stays set where nobody can see it."""
    kinds = {spec.name: spec.kind for spec in form_fields()}
    return [gr.update(visible=True) if shown else
            gr.update(visible=False, value=False) if kinds[name] is bool else gr.update(visible=False)
            for name, shown in shown_widgets(method).items()]


def form_field(spec: ConfigField, value: Any, visible: bool = True) -> gr.components.Component:
    if spec.kind is bool:
        return FormCheckbox(bool(value), label=spec.info.label, visible=visible)
    return FormNumber(value, label=spec.info.label, precision=0 if spec.kind is int else None,
                      minimum=spec.info.minimum, maximum=spec.info.maximum, visible=visible)


def build_form(default_mode: str, default_base: str) -> dict[str, gr.components.Component]:
    """One widget per form field of the config, in the config's order; numbers prefilled for the default method,
    and the option widgets shown as the default method's spec says."""
    numbers = dict(zip((spec.name for spec in NUMBERS),
                       preset_values("object", DEFAULT_METHOD, default_mode, default_base), strict=True))
    shown = shown_widgets(DEFAULT_METHOD)
    widgets = {}
    with gr.Accordion("Hyperparameters (prefilled by the preset)", open=False):
        specs = form_fields()
        for start in range(0, len(specs), ROW):
            with gr.Row():
                for spec in specs[start:start + ROW]:
                    widgets[spec.name] = form_field(spec, numbers.get(spec.name, spec.default),
                                                    shown.get(spec.name, True))
    return widgets


def build_train_tab(services: Services, session: gr.State, base_model: gr.Dropdown,
                    upload: dict[str, Any]) -> dict[str, Any]:
    runs = TrainingRuns(services)
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

    form = {"class_noun": upload["class_noun"], "trigger": upload["trigger"], "subject_type": upload["subject_type"],
            "method": method, "stage2_mode": stage2_mode, "base_model": base_model, **widgets}
    names = {component: name for name, component in form.items()}

    def show_estimate(data: dict) -> str:
        values = {names[component]: value for component, value in data.items() if component in names}
        session_value = data.get(session)
        try:
            config = form_to_config({**values, "class_noun": values["class_noun"] or "subject"},
                                    session_value.resolution if session_value else None)
        except INVALID as error:
            return f"⚠️ {html.escape(str(error))}"
        seconds = estimate_seconds(config, services.hardware, config.base_model or services.default_base)
        return (f"Estimated time on **{html.escape(services.hardware)}**: about **{format_seconds(seconds)}** "
                f"({config.stage1_steps} + {config.stage2_steps} steps).")

    def start_training(session_value: Session | None, **values: Any):
        """The form comes as named values: the `/train` API takes them by name (class_noun, stage1_steps, …)."""
        yield from runs.start(session_value, values)

    def gpu_seconds(session_value: Session | None, **values: Any) -> int:
        try:
            config = form_to_config(values, session_value.resolution if session_value else None)
        except INVALID:
            return 60
        return zero_gpu_seconds(config, config.base_model or services.default_base)

    hidden = {"queue": False, "api_visibility": "undocumented"}
    base_model.change(lambda base: TrainingConfig(class_noun="subject", base_model=base).default_stage2_mode(),
                      base_model, stage2_mode, **hidden)
    numbers = [widgets[spec.name] for spec in NUMBERS]
    for control in (upload["subject_type"], method, stage2_mode):
        control.change(preset_values, [upload["subject_type"], method, stage2_mode, base_model], numbers, **hidden)
    for control in [*widgets.values(), method, stage2_mode, base_model, upload["subject_type"]]:
        control.change(show_estimate, {*form.values(), session}, estimate, **hidden)
    # Which widgets a method shows: the stage-2 mode where its spec lets the config choose it, and the options its
    # spec accepts.
    method.change(lambda key: gr.update(visible=method_spec(key).chooses_stage2_mode), method, stage2_mode, **hidden)
    method.change(option_updates, method, [widgets[name] for name in shown_widgets(DEFAULT_METHOD)], **hidden)
    upload["trigger"].change(
        lambda trigger, key: check_trigger_text(services, trigger, method_spec(key).uses_identifier),
        [upload["trigger"], method], upload["trigger_status"], **hidden)
    train_function = start_training
    if ZERO_GPU:
        import spaces  # present on ZeroGPU Spaces only

        train_function = spaces.GPU(duration=gpu_seconds)(start_training)
    # No queue limit: each run waits for the GPU in TrainingRuns.start, where Cancel can still stop it.
    run_event = start.click(train_function, [session], [status, preview, result], inputs_kwargs=form,
                            api_name="train", concurrency_limit=None)
    cancel.click(runs.cancel, session, status, api_name="cancel", queue=False)
    return {"run_event": run_event, "estimate": estimate, "show_estimate": show_estimate,
            "estimate_inputs": {*form.values(), session}}
