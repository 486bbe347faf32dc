"""The Generate tab: a run of this session or a Hub repo, the base model and the personalized one side by side for
the same seed."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import gradio as gr

from personalization import hub
from personalization.artifacts import ArtifactError, ArtifactInfo, read_artifact
from personalization.config import ConfigError, ResolvedConfig
from personalization.device import portable_base_model
from personalization.generation import GenerationRequest
from personalization.tokens import strip_trigger
from ui.fields import FormDropdown, FormNumber, FormSlider, FormText, PromptText, UserError
from ui.services import Services, Session, for_display, warning

HUB_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
DEFAULTS = GenerationRequest(prompt="")


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


def base_for(services: Services, info: ArtifactInfo, selected: str | None) -> str:
    """The base model to apply an artifact on: the one it records, if this server offers it (a downloaded artifact
    may name any path or Hub id), or the Base model dropdown's choice when it was trained on a local folder, which
    only records `local:<folder name>`."""
    recorded = info.base_model
    if not recorded.startswith("local:"):
        return services.checked_base(recorded or selected)
    if selected and portable_base_model(selected) == recorded:
        return services.checked_base(selected)
    raise ArtifactError(f"{info.folder.name} was trained on a local base model ({recorded.removeprefix('local:')}): "
                        "choose that folder as the Base model to use it")


def refresh_choices(session: Session | None) -> dict[str, Any]:
    choices = run_choices(session)
    return gr.update(choices=choices, value=choices[0][1] if choices else None)


def suggested_prompt(session: Session | None, choice: str | None) -> str:
    if session is None or not choice:
        return ""
    try:
        info = read_artifact(resolve_source(session, choice))
    except ArtifactError as error:
        return str(error)
    try:  # a prompt the artifact's base model can draw (a downloaded config may be anything)
        return ResolvedConfig.from_dict(info.config).context_prompts()[0]
    except (ConfigError, TypeError, ValueError):
        return info.instance_prompt


def load_from_hub(services: Services, repo: str, token: str, session: Session | None,
                  oauth_token: gr.OAuthToken | None = None):
    session = services.session(session)
    repo = (repo or "").strip()
    if not HUB_REPO_ID.fullmatch(repo):
        return "Give a repo id like `user/name`.", gr.skip(), session
    token_value = hub.resolve_token(token or (oauth_token.token if oauth_token else None))
    try:
        # Files fetched with a token stay in this session's folder (removed with it), never the server's shared
        # cache; download_repo also asks the Hub about this token before serving anything cached.
        folder = hub.download_repo(repo, token_value, cache_dir=session.workspace.hub_cache if token_value else None)
        read_artifact(folder)
    except (hub.HubError, ArtifactError) as error:
        return warning(error), gr.skip(), session
    session.hub_folders[repo] = str(folder)
    return f"Loaded `{repo}`.", gr.update(choices=run_choices(session), value=f"hub:{repo}"), session


def generate(services: Services, choice: str | None, prompt_text: str, negative_text: str, seed_value: float,
             steps_value: float, guidance_value: float, scale: float, images: float, base_model: str | None,
             session: Session | None):
    """The `/generate` API; its parameter names are public (clients call them by name)."""
    if session is None or not choice:
        raise UserError("Train a model or load one from the Hub first.")
    try:
        request = GenerationRequest(prompt=prompt_text, negative_prompt=negative_text, seed=int(seed_value or 0),
                                    steps=int(steps_value), guidance_scale=float(guidance_value),
                                    lora_scale=float(scale), num_images=int(images)).validate()
        folder = resolve_source(session, choice)
        info = read_artifact(folder)
        base = base_for(services, info, services.checked_base(base_model))
        request.resolution = info.config.get("resolution")
        personal, plain = services.draw(folder, base, [(request, True), (request, False)])  # one GPU call
    except (ArtifactError, ValueError, OSError) as error:
        raise UserError(str(error).splitlines()[0][:300]) from None
    base_prompt = strip_trigger(prompt_text, info.trigger_token)
    return ([(for_display(image), f"base · {base_prompt}") for image in plain],
            [(for_display(image), f"seed {request.seed + index}") for index, image in enumerate(personal)])


def build_generate_tab(services: Services, session: gr.State, base_dropdown: gr.Dropdown) -> dict[str, Any]:
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
    negative = PromptText(label="Negative prompt", value=DEFAULTS.negative_prompt)
    with gr.Row():
        seed = FormNumber(DEFAULTS.seed, label="Seed", precision=0, minimum=0)
        steps = FormSlider(1, 100, DEFAULTS.steps, step=1, label="Steps")
        guidance = FormSlider(0, 15, DEFAULTS.guidance_scale, step=0.5, label="Guidance")
        lora_scale = FormSlider(0, 1.5, DEFAULTS.lora_scale, step=0.05, label="LoRA scale")
        count = FormSlider(1, 4, 2, step=1, label="Images")
    go = gr.Button("Generate", variant="primary", elem_id="generate")
    with gr.Row():
        base_gallery = gr.Gallery(label="Base model (same seed, trigger removed)", columns=2, elem_id="base-gallery")
        personal_gallery = gr.Gallery(label="Personalized", columns=2, elem_id="personal-gallery")

    hidden = {"queue": False, "api_visibility": "undocumented"}
    refresh.click(refresh_choices, session, source, **hidden)
    source.change(suggested_prompt, [session, source], prompt, **hidden)

    def load(repo: str, token: str, session_value: Session | None, oauth_token: gr.OAuthToken | None = None):
        return load_from_hub(services, repo, token, session_value, oauth_token)  # Gradio fills oauth_token by type

    load_repo.click(load, [repo_id, hub_token, session], [load_status, source, session], api_name="load_from_hub")
    go.click(functools.partial(generate, services),
             [source, prompt, negative, seed, steps, guidance, lora_scale, count, base_dropdown, session],
             [base_gallery, personal_gallery], api_name="generate", concurrency_limit=1, concurrency_id="generate")
    return {"source": source, "refresh": refresh_choices, "prompt": prompt}
