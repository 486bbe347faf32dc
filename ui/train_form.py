"""The Train tab's form: one widget per form field of the config (its field metadata gives label, kind and
bounds), prefilled by the preset, showing what the chosen method's spec accepts."""

from __future__ import annotations

from typing import Any

import gradio as gr

from personalization.config import ConfigField, TrainingConfig, form_fields, is_mini_world_model
from personalization.methods import DEFAULT_METHOD, OPTIONS, method_keys, method_spec
from ui.fields import FormCheckbox, FormNumber
from ui.services import Services
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


def wire_form(services: Services, upload: dict[str, Any], base_model: gr.Dropdown, method: gr.Radio,
              stage2_mode: gr.Radio, widgets: dict[str, gr.components.Component]) -> None:
    """The form's own reactions: presets fill the numbers, a method shows what its spec accepts, the trigger is
    checked as it is typed."""
    hidden = {"queue": False, "api_visibility": "undocumented"}
    base_model.change(lambda base: TrainingConfig(class_noun="subject", base_model=base).default_stage2_mode(),
                      base_model, stage2_mode, **hidden)
    numbers = [widgets[spec.name] for spec in NUMBERS]
    for control in (upload["subject_type"], method, stage2_mode):
        control.change(preset_values, [upload["subject_type"], method, stage2_mode, base_model], numbers, **hidden)
    method.change(lambda key: gr.update(visible=method_spec(key).chooses_stage2_mode), method, stage2_mode, **hidden)
    method.change(option_updates, method, [widgets[name] for name in shown_widgets(DEFAULT_METHOD)], **hidden)
    upload["trigger"].change(
        lambda trigger, key: check_trigger_text(services, trigger, method_spec(key).uses_identifier),
        [upload["trigger"], method], upload["trigger_status"], **hidden)
