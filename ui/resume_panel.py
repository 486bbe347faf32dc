"""The Train tab's interrupted run: after a server restart the page finds the run whose resume code this browser
keeps (or whose code is pasted), says which run it is and where it stopped, and offers to resume or discard it. The
engine keeps and finds the runs (`personalization.resumable`); the resumed training is `TrainingRuns.resume`."""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from personalization.resumable import NOT_STARTED, ResumableRun, ResumeError, discard_run, find_run, key_refusal
from ui.fields import ResumeCodeText, UserError
from ui.services import Services

STORAGE_KEY = "personalization-resume-code"
# The page carries BrowserState's secret in its config, so the secret hides nothing from the browser's user; the
# browser's per-site storage is what keeps the code from other sites. Fixed, so that a restarted server reads what
# the previous one stored (Gradio's default, a random secret and key, changes with every start).
STORAGE_SECRET = "personalization-resume"
INTRO = ("A run stopped by a server restart or a crash continues from its last checkpoint: this browser keeps the "
         "resume code of its latest run (shown here while it trains); on another device, paste the code.")
NOTHING = (gr.skip(), gr.skip(), gr.skip())
# BrowserState never writes a null value to the browser's storage: a dropped code is removed there by the page.
FORGET_DROPPED = f"(code) => {{ if (!code) localStorage.removeItem({STORAGE_KEY!r}); }}"


def offered(run: ResumableRun) -> str:
    return f"**An interrupted run:** {html.escape(run.describe())}"


def restore(services: Services, stored: Any) -> tuple[Any, ...]:
    """The panel for the code this browser keeps (on page load, and after each run), as updates of the panel, its
    note, the code box, the stored code and the tabs: the run offered on the Train tab when it can be resumed; a
    code whose run is gone is dropped. Quiet: the stored value is whatever the browser sent."""
    if key_refusal(stored) is not None:
        return *NOTHING, (None if stored is not None else gr.skip()), gr.skip()
    try:
        run = find_run(services.work_root, stored)
    except ResumeError:  # finished, discarded, or removed with its folder after a day unused
        return *NOTHING, None, gr.skip()
    if run.live:  # training now, maybe in another tab of this browser
        return *NOTHING, gr.skip(), gr.skip()
    if not run.resumable:
        return gr.update(open=True), html.escape(NOT_STARTED), gr.skip(), None, gr.skip()
    return gr.update(open=True), offered(run), stored, gr.skip(), gr.Tabs(selected="train")


def look_up(services: Services, code: str) -> tuple[Any, str, str, str]:
    """The run of a pasted code, kept by this browser from now on; a code that cannot be resumed is one sentence."""
    try:
        run = find_run(services.work_root, code)
    except ResumeError as error:
        raise UserError(str(error)) from None
    if run.live:
        raise UserError("This run is training right now, in the session that started it or resumed it.")
    if not run.resumable:
        raise UserError(NOT_STARTED)
    return gr.update(open=True), offered(run), code.strip(), code.strip()


def discard(services: Services, code: str) -> tuple[str, str]:
    try:
        run = discard_run(services.work_root, code)
    except ResumeError as error:
        raise UserError(str(error)) from None
    return f"Discarded run {html.escape(run.run_name)}: its checkpoints and resume state are deleted.", ""


def shown_code(services: Services, stored: Any) -> Any:
    """The code box while a run of this browser trains or waits to be resumed; emptied when its run is gone."""
    if stored is None:
        return ""
    if key_refusal(stored) is not None:
        return gr.skip()
    try:
        find_run(services.work_root, stored)
    except ResumeError:
        return ""
    return stored


def browser_store() -> gr.BrowserState:
    """Where the page keeps the resume code of its latest run. Built outside the tabs: a component in a tab not yet
    shown is not mounted, and the page load would read nothing."""
    return gr.BrowserState(None, storage_key=STORAGE_KEY, secret=STORAGE_SECRET)


def build_resume_panel(services: Services, tabs: gr.Tabs, stored: gr.BrowserState) -> dict[str, Any]:
    """The panel's parts and its own events (find, discard); the Train tab wires Resume, which streams a run.
    ``tabs``: the page's tabs, turned to the Train tab when a run is offered (a new page opens on Upload);
    ``stored``: :func:`browser_store`."""
    with gr.Accordion("Resume an interrupted run", open=False, elem_id="resume-panel") as panel:
        note = gr.Markdown(INTRO, elem_id="resume-note")
        code = ResumeCodeText(label="Resume code", max_lines=1, elem_id="resume-code")
        with gr.Row():
            find = gr.Button("Find the run", size="sm", elem_id="find-run")
            resume = gr.Button("Resume the interrupted run", variant="primary", elem_id="resume-run")
            remove = gr.Button("Discard it", variant="stop", elem_id="discard-run")
    shown = [panel, note, code, stored]

    def restore_stored(value: Any) -> tuple[Any, ...]:
        return restore(services, value)

    def look_up_code(value: str) -> tuple[Any, str, str, str]:
        return look_up(services, value)

    def discard_code(value: str) -> tuple[str, str]:
        return discard(services, value)

    def show_code(value: Any) -> Any:
        return shown_code(services, value)

    hidden = {"api_visibility": "undocumented"}
    stored.change(show_code, stored, code, queue=False, **hidden)
    find.click(look_up_code, code, shown, api_name="interrupted_run")
    code.submit(look_up_code, code, shown, **hidden)
    discarded = remove.click(discard_code, code, [note, code], api_name="discard_run")
    restoring = {"fn": restore_stored, "inputs": stored, "outputs": [*shown, tabs]}
    discarded.then(**restoring, **hidden).then(**forgetting(stored))  # the browser forgets a discarded run's code
    return {"stored": stored, "code": code, "resume": resume, "restore": restoring, "forget": forgetting(stored)}


def forgetting(stored: gr.BrowserState) -> dict[str, Any]:
    """A step after :func:`restore`, in the browser: the stored code removed once the page's copy is dropped."""
    return {"fn": None, "inputs": stored, "js": FORGET_DROPPED, "api_visibility": "undocumented"}
