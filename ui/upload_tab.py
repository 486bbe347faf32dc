"""The Upload tab: photos (or an example subject) checked and squared as training will see them, the class noun and
the trigger word."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import gradio as gr

from personalization.config import PRESETS
from personalization.images import sort_subject_images
from personalization.jobs import training_resolution
from personalization.tokens import check_trigger, suggest_trigger
from ui.fields import FormDropdown, FormFiles, FormRadio, WordText
from ui.services import ROOT, Services, Session, for_display, warning

EXAMPLES_DIR = ROOT / "examples"
EMPTY = "Upload 3–10 photos of your subject (or pick an example)."


def example_subjects() -> dict[str, Path]:
    return {p.name.replace("_", " "): p for p in sorted(EXAMPLES_DIR.glob("*")) if (p / "subject.json").is_file()}


def prepare_images(files: list[str] | None, base_model: str, session: Session) -> tuple[list, str]:
    """Check and square the uploaded files; show the kept ones and list the refused ones with their reason."""
    paths = [Path(f if isinstance(f, str) else f.name) for f in (files or [])]
    resolution = training_resolution(base_model)
    kept, rejected = sort_subject_images(paths, resolution)
    session.subject = kept if len(kept) else None
    session.resolution = resolution
    left_out = {r.name for r in rejected} | {skipped.name for skipped in kept.skipped}
    session.subject_files = [p for p in paths if p.name not in left_out]
    lines = [f"**{len(kept)} image(s) ready** at {resolution}×{resolution} px."]
    lines += [f"- refused `{html.escape(r.name)}`: {html.escape(r.reason)}" for r in rejected]
    lines += [f"- note: {html.escape(n)}" for n in kept.notes]
    gallery = [(for_display(image), name) for image, name in zip(kept.images, kept.names, strict=True)]
    return gallery, "\n".join(lines) if paths else EMPTY


def check_trigger_text(services: Services, trigger: str, uses_identifier: bool) -> str:
    if not trigger.strip():
        return "A trigger is suggested from the class noun when left empty."
    check = check_trigger(services.tokenizer(), trigger, allow_existing_word=uses_identifier)
    if check.ok:
        return f"✅ {html.escape(check.message)}"
    hint = f" Try `{check.suggestion}`." if check.suggestion else ""
    return f"⚠️ {html.escape(check.message)}.{hint}"


def build_upload_tab(services: Services, session: gr.State, base_model: gr.Dropdown) -> dict[str, Any]:
    with gr.Row():
        with gr.Column(scale=3):
            files = FormFiles(label="Photos of your subject", file_count="multiple",  # any file: each is judged
                              elem_id="subject-files")
            example = FormDropdown(list(example_subjects()), label="…or an example subject", value=None,
                                   elem_id="example")
            status = gr.Markdown(EMPTY, elem_id="upload-status")
        with gr.Column(scale=4):
            gallery = gr.Gallery(label="Prepared images (what training sees)", columns=5, height=260,
                                 elem_id="prepared-gallery")
    with gr.Row():
        subject_type = FormRadio(list(PRESETS), value="object", label="Subject type (preset)")
        class_noun = WordText(label="Class noun", placeholder="dog, backpack, star…", elem_id="class-noun")
        with gr.Column():
            trigger = WordText(label="Trigger word", placeholder="<my-dog> (empty: suggested)", elem_id="trigger")
            trigger_status = gr.Markdown("", elem_id="trigger-status")
            suggest = gr.Button("Suggest a trigger", size="sm")

    def prepare(files_value: list[str] | None, base: str, session_value: Session | None):
        session_value = services.session(session_value)
        try:
            base = services.checked_base(base)
        except ValueError as error:
            return [], warning(error), session_value
        return *prepare_images(files_value, base, session_value), session_value

    def load_example(name: str, base: str, session_value: Session | None):
        if not name:
            return [], EMPTY, gr.skip(), gr.skip(), services.session(session_value)
        folder = example_subjects()[name]  # the field refused names that are not offered
        files = sorted(str(p) for p in folder.glob("*.png"))
        gallery, message, session_value = prepare(files, base, session_value)
        noun = json.loads((folder / "subject.json").read_text()).get("class_noun", "")
        return gallery, message, noun, files, session_value

    files.change(prepare, [files, base_model, session], [gallery, status, session], api_name="prepare_images")
    example.change(load_example, [example, base_model, session], [gallery, status, class_noun, files, session],
                   api_name="load_example")
    suggest.click(lambda noun: suggest_trigger(services.tokenizer(), noun or "subject"), class_noun, trigger,
                  api_name="suggest_trigger")
    return {"files": files, "class_noun": class_noun, "trigger": trigger, "trigger_status": trigger_status,
            "subject_type": subject_type, "gallery": gallery}
