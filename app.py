"""The Gradio app: Upload, Train, Generate and Hub tabs wired to the `personalization` engine.

This file only assembles the page; each tab is built by its own module in `ui/`, which receives the services it
needs. Training, generation and Hub transfer live in the engine; nothing here touches a tensor.
"""

from __future__ import annotations

import contextlib
import html
import os
from collections.abc import Iterator
from typing import Any

# Library notices at import time (e.g. "requires torchvision, falling back") would bury the app's own messages.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from ui.zerogpu import on_zero_gpu

if on_zero_gpu():
    import spaces  # noqa: F401  first, as the package asks: it patches torch before anything touches CUDA

import gradio as gr

from personalization.device import BUNDLED_MINI_MODEL, MINI_MODEL_DIR, default_base_model
from personalization.generation import Generator
from ui.fields import CheckedBlocks, FormDropdown
from ui.generate_tab import build_generate_tab
from ui.hub_tab import build_hub_tab
from ui.resume_panel import browser_store
from ui.services import ON_SPACE, Services, hardware_name
from ui.train_tab import build_train_tab
from ui.upload_tab import build_upload_tab

CSS = """
.run-status .bar {height: 10px; background: #e5e7eb; border-radius: 5px; margin-bottom: 6px; overflow: hidden}
.run-status .bar div {height: 100%; background: linear-gradient(90deg, #6366f1, #ec4899)}
"""
# Gradio's run history (on by default) keeps every call's inputs in the browser's localStorage and shows them at
# /gradio_api/runs: the push and load tokens would sit there in clear text.
LAUNCH_OPTIONS: dict[str, Any] = {"run_history": False, "css": CSS}


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


def header(services: Services) -> gr.Dropdown:
    """Title, banner and the Base model choice every tab reads."""
    gr.Markdown("# Personalize a text-to-image model\nUpload a few photos of one subject, train, generate it "
                "anywhere, push it to the Hub. Method: two-stage personalization (Zeng et al., 2024).")
    notice = banner(services)
    if notice:
        with gr.Row():
            gr.Markdown(notice, elem_id="banner")
            if ON_SPACE:
                gr.DuplicateButton(size="sm")
    base_model = FormDropdown(services.base_choices, value=services.default_base, label="Base model",
                              allow_custom_value=os.environ.get("ALLOW_ANY_BASE_MODEL") == "1", elem_id="base-model")
    gr.Markdown(f"Hardware: **{html.escape(services.hardware)}**")
    return base_model


def build_app(services: Services | None = None) -> gr.Blocks:
    services = services or Services(default_base=os.environ.get("BASE_MODEL") or default_base_model(),
                                    generator=Generator(), hardware=hardware_name())
    services.cleaner.maybe_clean(services.work_root, now=True)
    services.warm_up()
    with CheckedBlocks(title="Personalize a diffusion model") as demo:
        session = gr.State(None)
        stored_code = browser_store()
        base_model = header(services)
        with gr.Tabs() as tabs:
            with gr.Tab("1 · Upload", id="upload"):
                upload = build_upload_tab(services, session, base_model)
            with gr.Tab("2 · Train", id="train"):
                train = build_train_tab(services, session, base_model, upload, tabs, stored_code)
            with gr.Tab("3 · Generate", id="generate") as generate_tab:
                generate = build_generate_tab(services, session, base_model)
            with gr.Tab("4 · Hub", id="hub") as hub_tab:
                hub_parts = build_hub_tab(services, session)
        hidden = {"queue": False, "api_visibility": "undocumented"}
        for dropdown, tab in ((generate["source"], generate_tab), (hub_parts["run"], hub_tab)):
            for event in (train["run_event"], train["resume_event"]):
                event.then(generate["refresh"], session, dropdown, api_visibility="undocumented")
            tab.select(generate["refresh"], session, dropdown, **hidden)
        # The first minute: from photos (or a clicked example) straight to the trained subject in new places.
        shown = upload["train_now"].click(lambda: gr.Tabs(selected="train"), None, tabs, **hidden)
        train["show_results"](shown.then(**train["run"], api_visibility="undocumented"))
        demo.load(train["show_estimate"], train["estimate_inputs"], train["estimate"], api_visibility="undocumented")
        # After a server restart: the run this browser was training, offered for resuming.
        demo.load(**train["restore"], api_visibility="undocumented").then(**train["forget"])
    return demo


@contextlib.contextmanager
def served_on_loopback(services: Services, port: int) -> Iterator[str]:
    """The app served from this process on 127.0.0.1:``port`` (the tests, scripts/screenshots.py); yields its URL."""
    demo = build_app(services)
    demo.queue()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **LAUNCH_OPTIONS)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def main() -> None:
    demo = build_app()
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), **LAUNCH_OPTIONS)


if __name__ == "__main__":
    main()
