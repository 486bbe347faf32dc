"""A stand-in for the ``spaces`` package with ZeroGPU's semantics, for tests on a CPU (spaces 0.51's are mirrored).

``GPU(duration=...)`` runs each call of the decorated function in a process forked from the server: the arguments
are pickled in, the return value (or each value a generator function yields, streamed as it comes) is pickled back,
and nothing the call changes in its process reaches the server. A ``gr.Error`` raised there is raised again in the
server; any other exception comes back as a ``gr.Error`` naming only its class, as ZeroGPU reports it. Closing a
streaming call (a closed browser tab) sets a stop event that the worker checks after each yield, then closes the
generator. Each call's duration is computed from its arguments, as ZeroGPU does before it grants a GPU, and recorded.

Stricter than ZeroGPU in one way: each call gets a fresh worker (ZeroGPU may reuse an idle one), so a handler that
counts on a worker's leftovers fails here. :meth:`ZeroGpuStandIn.guard` makes model work in the server process fail,
since on ZeroGPU that process has no GPU: every handler that touches a model must do it inside a GPU call.
"""

from __future__ import annotations

import functools
import inspect
import multiprocessing
import os
import pickle
import threading
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import pytest

FORK = multiprocessing.get_context("fork")


@dataclass
class Call:
    function: str
    seconds: int


@dataclass
class ZeroGpuStandIn:
    server_pid: int = field(default_factory=os.getpid)
    calls: list[Call] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)  # model work seen in the server process
    base_log: Path | None = None  # one line per base-model load: "server <base>" or "worker <base>"

    def module(self) -> types.ModuleType:
        """What ``import spaces`` gives while the stand-in is installed."""
        module = types.ModuleType("spaces")
        module.GPU = self.GPU
        return module

    def GPU(self, task: Callable | None = None, *, duration: Any = None, size: str | None = None) -> Any:
        if task is None:
            return functools.partial(self.GPU, duration=duration, size=size)
        wrap = self._streaming if inspect.isgeneratorfunction(task) else self._regular
        return functools.wraps(task)(wrap(task, duration))

    def _record(self, task: Callable, duration: Any, args: tuple, kwargs: dict) -> None:
        seconds = duration(*args, **kwargs) if callable(duration) else duration
        assert isinstance(seconds, int) and 0 < seconds <= 1500, f"{task.__name__}: duration {seconds!r}"
        self.calls.append(Call(task.__name__, seconds))

    def _regular(self, task: Callable, duration: Any) -> Callable:
        def handler(*args: Any, **kwargs: Any) -> Any:
            self._record(task, duration, args, kwargs)
            receiver, sender = FORK.Pipe(duplex=False)
            worker = FORK.Process(target=_run_regular, args=(task, pickle.dumps((args, kwargs)), sender), daemon=True)
            worker.start()
            sender.close()
            try:
                kind, value = _receive(receiver)
            finally:
                receiver.close()
                worker.join()
            if kind == "error":
                raise _server_error(value)
            return value

        return handler

    def _streaming(self, task: Callable, duration: Any) -> Callable:
        def handler(*args: Any, **kwargs: Any) -> Iterator:
            self._record(task, duration, args, kwargs)
            receiver, sender = FORK.Pipe(duplex=False)
            stop = FORK.Event()
            worker = FORK.Process(target=_run_streaming, args=(task, pickle.dumps((args, kwargs)), sender, stop),
                                  daemon=True)
            worker.start()
            sender.close()
            finished = False
            try:
                while True:
                    kind, value = _receive(receiver)
                    if kind == "end":
                        finished = True
                        return
                    if kind == "error":
                        finished = True
                        raise _server_error(value)
                    try:
                        yield value
                    except GeneratorExit:
                        stop.set()
                        raise
            finally:
                if finished:
                    receiver.close()
                    worker.join()
                else:  # the worker runs on to its next yield: keep reading so it never blocks on a full pipe
                    threading.Thread(target=_drain, args=(receiver, worker), daemon=True).start()

        return handler

    def guard(self, monkeypatch: pytest.MonkeyPatch, work_log: Path) -> None:
        """Model work in the server process is recorded in :attr:`outside` and fails; base-model loads in GPU
        workers are appended to ``work_log`` (a file, so the forked workers' loads are seen too)."""
        from diffusers import StableDiffusionPipeline

        from personalization import generation, trainer

        self.base_log = work_log
        def guarded(original: Callable, what: str) -> Callable:
            @functools.wraps(original)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if os.getpid() == self.server_pid:
                    self.outside.append(what)
                    raise AssertionError(f"{what} in the server process, outside a GPU call")
                return original(*args, **kwargs)
            return wrapper

        def logged(original: Callable) -> Callable:
            @functools.wraps(original)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                where = "server" if os.getpid() == self.server_pid else "worker"
                with work_log.open("a") as log:
                    log.write(f"{where} {args[0]}\n")
                return original(*args, **kwargs)
            return wrapper

        monkeypatch.setattr(StableDiffusionPipeline, "__call__",
                            guarded(StableDiffusionPipeline.__call__, "a pipeline call"))
        monkeypatch.setattr(trainer, "train", guarded(trainer.train, "a training"))
        monkeypatch.setattr(generation, "load_base_pipeline", logged(generation.load_base_pipeline))


# ---- in the worker -----------------------------------------------------------------------------------------------
def _run_regular(task: Callable, payload: bytes, sender: Any) -> None:
    args, kwargs = pickle.loads(payload)
    try:
        result = ("ok", task(*args, **kwargs))
    except Exception as error:
        result = ("error", _worker_error(error))
    _send(sender, result)


def _run_streaming(task: Callable, payload: bytes, sender: Any, stop: Any) -> None:
    args, kwargs = pickle.loads(payload)
    try:
        generator = task(*args, **kwargs)
        for value in generator:
            if stop.is_set():
                generator.close()
                break
            if not _send(sender, ("yield", value)):
                return
        sender.send(("end", None))
    except Exception as error:
        _send(sender, ("error", _worker_error(error)))


def _send(sender: Any, message: tuple) -> bool:
    """Pickle ``message`` back; a value that cannot be pickled is sent as the error it is, as ZeroGPU does."""
    try:
        sender.send(message)
        return True
    except (pickle.PicklingError, TypeError, AttributeError) as error:
        sender.send(("error", _worker_error(error)))
        return False


def _worker_error(error: Exception) -> gr.Error | str:
    """A gr.Error travels as itself; of any other exception ZeroGPU passes on its class name (the traceback is
    printed in the worker, as there)."""
    traceback.print_exception(error)
    return gr.Error(error.message) if isinstance(error, gr.Error) else type(error).__name__


# ---- in the server -----------------------------------------------------------------------------------------------
def _receive(receiver: Any) -> tuple[str, Any]:
    try:
        return receiver.recv()
    except EOFError:  # the worker died without a word
        return "error", "GPU task aborted"


def _server_error(value: gr.Error | str) -> gr.Error:
    return value if isinstance(value, gr.Error) else gr.Error(value, title="ZeroGPU worker error")


def _drain(receiver: Any, worker: Any) -> None:
    try:
        while receiver.recv()[0] == "yield":
            pass
    except (EOFError, OSError):
        pass
    receiver.close()
    worker.join()
