"""Form fields that check what a client sends, for a public API: a value a field cannot take is one sentence naming
the field, never Gradio's generic error or a traceback in the server log (a user's mistake is not a crash)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import gradio as gr


class UserError(gr.Error):
    """A user's (or an API client's) mistake, shown as one sentence: not a crash, so never logged with a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(message, print_exception=False)


class _Checked:
    """A Gradio input that checks what a client sends before Gradio converts it.

    The API is public and a client need not be the page: a value the field cannot take (text in a number, NaN, a
    choice not offered, a huge string) becomes one sentence naming the field, instead of Gradio's generic error and a
    traceback in the server log.
    """

    label: str | None
    elem_id: str | None

    def get_block_name(self) -> str:  # the page and the API docs know the component by Gradio's own name
        return next(c for c in type(self).__mro__ if c.__module__.startswith("gradio.")).__name__.lower()

    get_block_class = get_block_name

    def preprocess(self, payload: Any) -> Any:
        field_name = self.label or self.elem_id or "a field"
        reason = self.refusal(payload)
        if reason is None:
            try:
                return super().preprocess(payload)  # type: ignore[misc]
            except Exception as error:  # whatever Gradio refuses, the client gets one sentence
                reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else "cannot be read"
        raise UserError(f"{field_name}: {reason}.")

    def refusal(self, payload: Any) -> str | None:
        """Why `payload` cannot be this field's value, or None."""
        return None


def _number_refusal(value: Any, *, whole: bool, minimum: float | None, maximum: float | None) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number, got {str(value)[:40]!r}"
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if whole and value != int(value):
        return f"must be a whole number, got {value}"
    if minimum is not None and value < minimum:
        return f"must be at least {_number(minimum)}, got {_number(value)}"
    if maximum is not None and value > maximum:
        return f"must be at most {_number(maximum)}, got {_number(value)}"
    return None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@contextlib.contextmanager
def _no_stub_files() -> Iterator[None]:
    """Gradio writes a `.pyi` stub beside the module of every component subclass when the class is created: a write
    into the app's folder at import, which fails where that folder is read-only. Stubs only help editors."""
    from gradio import component_meta

    write_stub = component_meta.create_or_modify_pyi
    component_meta.create_or_modify_pyi = lambda *args, **kwargs: None
    try:
        yield
    finally:
        component_meta.create_or_modify_pyi = write_stub


with _no_stub_files():
    class FormNumber(_Checked, gr.Number):
        def refusal(self, payload: Any) -> str | None:
            if payload is None:
                return None  # an empty box: the engine's default
            return _number_refusal(payload, whole=self.precision == 0, minimum=self.minimum, maximum=self.maximum)


    class FormSlider(_Checked, gr.Slider):
        def refusal(self, payload: Any) -> str | None:
            whole = float(self.step).is_integer() and float(self.minimum).is_integer()
            return _number_refusal(payload, whole=whole, minimum=self.minimum, maximum=self.maximum)


    class FormText(_Checked, gr.Textbox):
        """Text with a length cap (names, tokens): a megabyte of text is refused, not processed. The cap is a class
        attribute: Gradio rebuilds a component from its constructor's arguments when a handler updates it."""

        max_chars = 500

        def refusal(self, payload: Any) -> str | None:
            if payload is None:
                return None
            if not isinstance(payload, str):
                return f"must be text, got {type(payload).__name__}"
            if len(payload) > self.max_chars:
                return f"is too long ({len(payload)} characters, at most {self.max_chars})"
            return None

    class WordText(FormText):  # a class noun, a trigger
        max_chars = 100

    class PromptText(FormText):
        max_chars = 2000

    class ResumeCodeText(FormText):
        """A run's resume code: its format is checked before any lookup (the API is public)."""

        max_chars = 100

        def refusal(self, payload: Any) -> str | None:
            from personalization.resumable import key_refusal

            return super().refusal(payload) or key_refusal(payload)

    class FormCheckbox(_Checked, gr.Checkbox):
        def refusal(self, payload: Any) -> str | None:
            if isinstance(payload, bool) or payload is None:
                return None
            return f"must be true or false, got {str(payload)[:40]!r}"


    class _Choice(_Checked):
        choices: list[tuple[str, Any]]
        allow_custom_value: bool = False

        def refusal(self, payload: Any) -> str | None:
            if payload is None:
                return None
            offered = [value for _, value in self.choices]
            if payload in offered:
                return None
            if self.allow_custom_value and isinstance(payload, str) and len(payload) <= 300:
                return None  # checked against what the session owns by the handler
            listed = ", ".join(str(value) for value in offered[:8]) or "none yet"
            return f"{str(payload)[:80]!r} is not one of the choices ({listed})"


    class FormRadio(_Choice, gr.Radio):
        pass


    class FormDropdown(_Choice, gr.Dropdown):
        pass


    class FormFiles(_Checked, gr.File):
        pass


class CheckedBlocks(gr.Blocks):
    """gr.Blocks where the checks Gradio makes before a component sees a value (is this a file the user uploaded?
    does the payload have the shape of the field's data model?) also answer in one sentence naming the field."""

    async def preprocess_data(self, block_fn: Any, inputs: list[Any], state: Any, explicit_call: bool = False) -> Any:
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except gr.Error:
            raise
        except ValueError as error:  # InvalidPathError, or pydantic's ValidationError of a file list's shape
            files = [block for block in block_fn.inputs if isinstance(block, gr.File)]
            if not files:
                raise
            details = error.errors() if callable(getattr(error, "errors", None)) else None
            reason = details[0]["msg"] if details else "not a file uploaded to this app"
            field_name = files[0].label or "a file field"
            raise UserError(f"{field_name}: {reason.rstrip('.')}.") from None
