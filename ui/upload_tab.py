"""The Upload tab: photos (or an example subject) checked and squared as training will see them, the class noun and
the trigger word."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from personalization.config import PRESETS, is_mini_world_model
from personalization.images import sort_subject_images
from personalization.jobs import training_resolution
from personalization.tokens import check_trigger, suggest_trigger
from ui.fields import FormDropdown, FormFiles, FormRadio, WordText
from ui.services import ROOT, Services, Session, for_display, warning

EXAMPLES_DIR = ROOT / "examples"
EMPTY = "Upload 3–10 photos of your subject (or click an example)."
# Said before any upload and again when photos reach the mini model, so nobody is surprised to get shapes back.
MINI_WORLD_NOTE = ("This CPU demo's model is a small world of coloured shapes on plain backgrounds, drawn at 32 px: "
                   "it learns the example subjects, but a photo of your dog comes back as shapes. To personalize "
                   "Stable Diffusion 1.5 with your photos, duplicate this Space onto a GPU.")


def example_subjects() -> dict[str, Path]:
    return {p.name.replace("_", " "): p for p in sorted(EXAMPLES_DIR.glob("*")) if (p / "subject.json").is_file()}


def example_thumbnails() -> list[tuple[Image.Image, str]]:
    """The first photo of each example subject, with its name and class noun, as the gallery shows them."""
    thumbnails = []
    for name, folder in example_subjects().items():
        noun = json.loads((folder / "subject.json").read_text()).get("class_noun", "")
        with Image.open(sorted(folder.glob("*.png"))[0]) as image:
            thumbnails.append((for_display(image.convert("RGB"), 128), f"{name} ({noun})"))
    return thumbnails


def prepare_images(files: list[str] | None, base_model: str, session: Session,
                   own_photos: bool = True) -> tuple[list, str]:
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
    if own_photos and len(kept) and is_mini_world_model(base_model):
        lines.append(f"\nℹ️ {MINI_WORLD_NOTE}")
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
    examples = list(example_subjects())
    with gr.Row():
        with gr.Column(scale=3):
            files = FormFiles(label="Photos of your subject", file_count="multiple",  # any file: each is judged
                              elem_id="subject-files")
            if is_mini_world_model(services.default_base):
                gr.Markdown(f"ℹ️ {MINI_WORLD_NOTE}", elem_id="mini-world-note")
            thumbnails = gr.Gallery(example_thumbnails(), label="…or click an example subject", columns=4,
                                    height=170, allow_preview=False, interactive=False, elem_id="example-gallery")
            # The API's /load_example takes a name; the page uses the thumbnails.
            example = FormDropdown(examples, label="…or an example subject", value=None, visible=False,
                                   elem_id="example")
            status = gr.Markdown(EMPTY, elem_id="upload-status")
            train_now = gr.Button("Train and show me (default settings)", variant="primary", elem_id="train-now")
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

    def prepare(files_value: list[str] | None, base: str, session_value: Session | None, own_photos: bool = True):
        session_value = services.session(session_value)
        try:
            base = services.checked_base(base)
        except ValueError as error:
            return [], warning(error), session_value
        return *prepare_images(files_value, base, session_value, own_photos), session_value

    def load_example(name: str, base: str, session_value: Session | None):
        if not name:
            return [], EMPTY, gr.skip(), gr.skip(), services.session(session_value)
        folder = example_subjects()[name]  # the field refused names that are not offered
        files = sorted(str(p) for p in folder.glob("*.png"))
        gallery, message, session_value = prepare(files, base, session_value, own_photos=False)
        noun = json.loads((folder / "subject.json").read_text()).get("class_noun", "")
        return gallery, message, noun, files, session_value

    def pick_example(base: str, session_value: Session | None, selected: gr.SelectData):
        return load_example(examples[selected.index], base, session_value)

    files.upload(prepare, [files, base_model, session], [gallery, status, session], api_name="prepare_images")
    def remove(files_value: list[str] | None, base: str, session_value: Session | None,
               deleted: gr.DeletedFileData):
        # A photo taken out of the list is out of the training set too (the event may still list it).
        left = [f for f in files_value or [] if f != deleted.file.path]
        return prepare(left, base, session_value)

    hidden = {"api_visibility": "undocumented"}
    files.clear(prepare, [files, base_model, session], [gallery, status, session], **hidden)
    files.delete(remove, [files, base_model, session], [gallery, status, session], **hidden)
    outputs = [gallery, status, class_noun, files, session]
    example.change(load_example, [example, base_model, session], outputs, api_name="load_example")
    thumbnails.select(pick_example, [base_model, session], outputs, api_visibility="undocumented")
    suggest.click(lambda noun: suggest_trigger(services.tokenizer(), noun or "subject"), class_noun, trigger,
                  api_name="suggest_trigger")
    return {"files": files, "class_noun": class_noun, "trigger": trigger, "trigger_status": trigger_status,
            "subject_type": subject_type, "gallery": gallery, "thumbnails": thumbnails, "train_now": train_now}
