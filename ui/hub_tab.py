"""The Hub tab: push a run of this session to the Hugging Face Hub (private by default). The engine's
`hub.push_artifact` does the work; the token is used for the call only."""

from __future__ import annotations

import html
from collections.abc import Iterator
from typing import Any

import gradio as gr

from personalization import hub
from personalization.artifacts import ArtifactError, read_artifact
from ui.fields import FormCheckbox, FormDropdown, FormText
from ui.generate_tab import resolve_source
from ui.services import ON_SPACE, Services, Session, warning


def suggested_repo_name(session: Session | None, choice: str | None) -> str:
    if session is None or not choice or choice.startswith("hub:"):
        return ""
    try:
        info = read_artifact(resolve_source(session, choice))
    except ArtifactError:
        return ""
    return hub.slugify_repo_name(f"{info.class_noun}-{info.trigger_token}-{info.method}")


def push(choice: str | None, name: str, token: str, private: bool, session: Session | None,
         oauth_token: gr.OAuthToken | None = None) -> Iterator[str]:
    if session is None or not choice or choice.startswith("hub:"):
        yield "⚠️ Choose a run of this session to push."
        return
    token_value = hub.resolve_token(token or (oauth_token.token if oauth_token else None))
    if token_value is None:
        yield "⚠️ No token: sign in with Hugging Face, paste a write token, or set HF_TOKEN."
        return
    try:
        folder = resolve_source(session, choice)
        name = (name or "").strip() or folder.name
        yield f"⏳ Pushing `{html.escape(name)}` to the Hub… (a failing connection is retried for up to ~30 s)"
        url = hub.push_artifact(folder, name, token_value, private=bool(private))
    except hub.HubError as error:
        yield warning(error)  # the message says when the local run is kept
        return
    except (ArtifactError, OSError) as error:
        yield f"{warning(error)} (your local run is kept; you can retry)"
        return
    yield f"✅ Pushed to [{url}]({url}) ({'private' if private else 'public'})."


def build_hub_tab(services: Services, session: gr.State) -> dict[str, Any]:
    gr.Markdown("Push a trained run to your Hugging Face account. Private by default; the token is used for this "
                "push only and is never stored or shown.")
    with gr.Row():
        if ON_SPACE:
            gr.LoginButton()
        token = FormText(label="Hugging Face write token (or sign in / set HF_TOKEN)", type="password",
                         elem_id="hub-token")
    with gr.Row():
        run = FormDropdown([], label="Run to push", elem_id="push-run", allow_custom_value=True)  # see Generate's
        repo_name = FormText(label="Repo name", elem_id="repo-name")
        private = FormCheckbox(True, label="Private")
    push_button = gr.Button("Push to the Hub", variant="primary", elem_id="push")
    status = gr.Markdown(elem_id="push-status")

    def push_run(choice: str | None, name: str, token_text: str, is_private: bool, session_value: Session | None,
                 oauth_token: gr.OAuthToken | None = None) -> Iterator[str]:
        yield from push(choice, name, token_text, is_private, session_value, oauth_token)  # Gradio fills oauth_token

    run.change(suggested_repo_name, [session, run], repo_name, queue=False, api_visibility="undocumented")
    push_button.click(push_run, [run, repo_name, token, private, session], status, api_name="push")
    return {"run": run}
