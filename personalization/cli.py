"""Command line: ``python -m personalization train|generate|evaluate|push ...``.

Bad input ends with one line on stderr and a non-zero exit code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .config import GENERATION_DEFAULTS, ConfigError, ConfigField, TrainingConfig, config_fields
from .progress import ProgressEvent, TrainingCancelled

# Words that switch off a field whose None means "off" (FieldInfo.none_is_off), besides 0.
OFF_WORDS = ("none",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m personalization",
        description="Teach a text-to-image diffusion model a new subject from a few photos.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train on a folder of subject photos and write an artifact folder")
    train.add_argument("--images", required=True, type=Path, help="folder of 1-50 photos of the subject")
    train.add_argument("--out", required=True, type=Path, help="artifact folder to write (what gets pushed)")
    train.add_argument("--config", type=Path, help="a training_config.json to start from; options override it")
    train.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    train.add_argument("--resume", action="store_true",
                       help="continue the run killed while writing --out from its last checkpoint")
    add_config_options(train)

    generate = commands.add_parser("generate", help="generate images with an artifact folder")
    generate.add_argument("--artifact", required=True, help="artifact folder (or Hub repo id)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--out", required=True, type=Path, help="image file; several images get _1, _2 ...")
    generate.add_argument("--negative-prompt", default=GENERATION_DEFAULTS.negative_prompt)
    generate.add_argument("--seed", type=int, default=GENERATION_DEFAULTS.seed)
    generate.add_argument("--steps", type=int, default=GENERATION_DEFAULTS.steps)
    generate.add_argument("--guidance", type=float, default=GENERATION_DEFAULTS.guidance_scale)
    generate.add_argument("--lora-scale", type=float, default=GENERATION_DEFAULTS.lora_scale)
    generate.add_argument("--num-images", type=int, default=GENERATION_DEFAULTS.num_images)
    generate.add_argument("--base-model", help="override the base model recorded in the artifact")
    generate.add_argument("--token", help="Hugging Face token for private repos (default: $HF_TOKEN)")

    evaluate = commands.add_parser(
        "evaluate", help="score an artifact: CLIP-I, CLIP-T, DINO and drift (mini world: the analytic checker)")
    evaluate.add_argument("--artifact", required=True, type=Path, help="artifact folder")
    evaluate.add_argument("--references", required=True, type=Path, help="folder of the subject's real photos")
    evaluate.add_argument("--prompts", choices=("object", "live"), default="object",
                          help="DreamBooth prompt list: objects or live subjects")
    evaluate.add_argument("--seeds", type=int, default=4, help="images per prompt")
    evaluate.add_argument("--steps", type=int, default=GENERATION_DEFAULTS.steps)
    evaluate.add_argument("--guidance", type=float, default=GENERATION_DEFAULTS.guidance_scale)
    evaluate.add_argument("--max-prompts", type=int, help="only the first N prompts of the list")
    evaluate.add_argument("--base-model", help="override the base model recorded in the artifact")
    evaluate.add_argument("--clip-model", default=None, help="CLIP model id or folder")
    evaluate.add_argument("--dino-model", default=None, help="DINO ViT-S/16 model id or folder")
    evaluate.add_argument("--out", type=Path, help="write the report as JSON")

    push = commands.add_parser("push", help="push an artifact folder to a Hugging Face model repo (private unless "
                                            "--public)")
    push.add_argument("--artifact", required=True, type=Path, help="artifact folder written by train")
    push.add_argument("--repo", required=True, help="repo name (under the token's account) or namespace/name")
    push.add_argument("--public", action="store_true", help="make the repo public (default: private)")
    push.add_argument("--token", help="Hugging Face token with write access (default: $HF_TOKEN)")
    push.add_argument("--include-checkpoints", action="store_true",
                      help="also push checkpoints/ (every checkpoint's weights and samples)")

    pick = commands.add_parser("pick", help="make another checkpoint of a run the one its folder holds (what "
                                            "generate loads and push uploads); prints the checkpoint table")
    pick.add_argument("--artifact", required=True, type=Path, help="artifact folder written by train")
    pick.add_argument("--step", default=None, help="best (the recommended step), last or a step number; "
                                                   "without it, only print the table")
    return parser


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per config field that has a flag (:class:`~personalization.config.FieldInfo`). An option that
    is not given leaves no attribute, so a --config file's value stays; booleans also get a --no- form."""
    for spec in config_fields():
        flag = spec.info.flag
        if flag is None:
            continue
        help_text = spec.info.help
        if spec.name == "class_noun":
            help_text += " (required unless --config)"
        options: dict = {"dest": spec.name, "default": argparse.SUPPRESS, "help": help_text}
        if spec.kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif spec.kind is list:
            options |= {"action": "append", "metavar": _metavar(flag)}
        elif spec.choices:
            options["choices"] = spec.choices
        else:
            options |= {"type": _parse_value(spec), "metavar": _metavar(flag)}
        if spec.kind is not bool and spec.default not in (None, dataclasses.MISSING, []):
            options["help"] += f" (default: {spec.default})"
        parser.add_argument(flag, **options)


def _metavar(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_").upper()


def _parse_value(spec: ConfigField) -> Callable[[str], object]:
    kind = spec.kind
    if not spec.info.none_is_off:
        return kind

    def parse(text: str) -> object:
        if text.strip().lower() in OFF_WORDS:
            return None
        value = kind(text)
        return None if value == 0 else value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid ... value" message
    return parse


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """The validated config the options describe (a --config file first, then the options on top)."""
    values = TrainingConfig.from_json_file(args.config).to_dict() if args.config else {}
    given = vars(args)
    values |= {spec.name: given[spec.name] for spec in config_fields() if spec.name in given}
    if not values.get("class_noun"):
        raise ConfigError("--class-noun is required (what the subject is, e.g. dog)")
    return TrainingConfig.from_dict(values).validate()


def run_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .trainer import train

    config = config_from_args(args)
    subject_files = subject_files_said(args.images)
    bar: tqdm | None = None

    def show(event: ProgressEvent) -> None:
        nonlocal bar
        if event.total_steps == 0:
            return
        if bar is None:
            bar = tqdm(total=event.total_steps, unit="step", dynamic_ncols=True, mininterval=0.5, disable=None)
        bar.set_description(event.stage)
        if event.loss is not None:
            bar.set_postfix(loss=f"{event.loss:.4f}")
        bar.update(event.step - bar.n)

    try:
        result = train(config, subject_files, args.out, progress=show, overwrite=args.overwrite, resume=args.resume)
    except KeyboardInterrupt:
        _say_if_resumable(args.out)
        raise
    finally:
        if bar is not None:
            bar.close()
    for note in result.notes:
        print(f"note: {note}")
    times = ", ".join(f"{s.name} {s.steps} steps {s.seconds:.1f} s" for s in result.stages)
    print(f"trained {result.config.method} on {result.hardware}: {times}")
    _print_checkpoints(result.output_dir)
    print(f"wrote {result.output_dir} (trigger: {result.config.instance_prompt()})")
    example = shlex.quote(result.config.context_prompts()[0])
    print(f"try: python -m personalization generate --artifact {shlex.quote(str(result.output_dir))} "
          f"--prompt {example} --out sample.png")
    return 0


def _say_if_resumable(out: Path) -> None:
    from .artifacts import RESUME_STATE_FILE
    from .snapshots import resume_dir

    if (resume_dir(out.resolve()) / RESUME_STATE_FILE).is_file():
        print("note: the run reached a checkpoint; add --resume to the same command to continue it", file=sys.stderr)


def _print_checkpoints(folder: Path) -> None:
    from .checkpoints import RULE, read_table

    table = read_table(folder)
    if table is None:
        return
    print(table.markdown())
    scored = f"scored by the {table.scorer}; recommended: {RULE}" if table.scorer else "not scored"
    print(f"checkpoints {scored}")
    print(f"the folder holds step {table.kept_step} (python -m personalization pick --artifact "
          f"{shlex.quote(str(folder))} --step N switches)")


def run_pick(args: argparse.Namespace) -> int:
    from .snapshots import pick_step

    if args.step is not None:
        pick_step(args.artifact, args.step)
    _print_checkpoints(args.artifact)
    return 0


def subject_files_said(images: Path) -> list[Path]:
    """The files train opens; each skipped one is noted now, before the long run, and so only once."""
    from .images import scan_subject_files

    files, skipped = scan_subject_files(images)
    for item in skipped:
        print(f"note: {item}")
    return files


def run_generate(args: argparse.Namespace) -> int:
    from .generation import GenerationRequest, Generator

    folder = Path(args.artifact)
    if not folder.is_dir():
        if "/" not in args.artifact or args.artifact.startswith((".", "/", "~")):
            raise FileNotFoundError(f"{args.artifact}: no such artifact folder")
        from .hub import download_repo, resolve_token

        folder = download_repo(args.artifact, resolve_token(args.token))
    generator = Generator()
    info = generator.apply(folder, base_model=args.base_model)
    request = GenerationRequest(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                                steps=args.steps, guidance_scale=args.guidance, lora_scale=args.lora_scale,
                                num_images=args.num_images, resolution=info.config.get("resolution"))
    images = generator.generate(request)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        path = args.out if index == 0 else args.out.with_name(f"{args.out.stem}_{index}{args.out.suffix}")
        image.save(path)
        print(f"wrote {path}")
    return 0


def run_push(args: argparse.Namespace) -> int:
    """Push an artifact folder; the token (from --token or $HF_TOKEN) is never printed or written."""
    from .hub import HubError, push_artifact, resolve_token

    token = resolve_token(args.token)
    if token is None:
        raise HubError("A Hugging Face token is needed: pass --token or set HF_TOKEN (a token with write access).")
    visibility = "public" if args.public else "private"
    print(f"pushing {args.artifact} to {args.repo} ({visibility}) ...", flush=True)
    url = push_artifact(args.artifact, args.repo, token, private=not args.public,
                        include_checkpoints=args.include_checkpoints)
    print(url)
    return 0


def quiet_libraries() -> None:
    """Library chatter (load bars, torchvision notices) would bury the one line that matters."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    from .artifacts import read_artifact
    from .config import is_mini_world_model
    from .generation import Generator
    from .images import load_subject_images

    info = read_artifact(args.artifact)
    base = args.base_model or info.base_model
    resolution = int(info.config.get("resolution") or 512)
    loaded = load_subject_images(args.references, resolution)
    for note in loaded.notes:  # skipped files (an example's subject.json among them) and first-frame notes
        print(f"note: {note}")
    references = loaded.images
    generator = Generator()
    if is_mini_world_model(base):
        from .mini_world.scoring import score_personalization

        subject_file = Path(args.references) / "subject.json"
        colors = json.loads(subject_file.read_text()).get("colors", []) if subject_file.is_file() else []
        scores = score_personalization(generator, args.artifact, references, colors, seeds=args.seeds,
                                       steps=args.steps, guidance_scale=args.guidance, base_model=base).as_dict()
        print("| " + " | ".join(scores) + " |")
        print("|" + "---|" * len(scores))
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in scores.values()) + " |")
        report_json = json.dumps(scores, indent=2)
    else:
        from .evaluation import CLIP_MODEL_ID, DINO_MODEL_ID, FeatureModels, evaluate_artifact

        models = FeatureModels(args.clip_model or CLIP_MODEL_ID, args.dino_model or DINO_MODEL_ID)
        report = evaluate_artifact(args.artifact, references, prompt_kind=args.prompts, seeds=args.seeds,
                                   steps=args.steps, guidance_scale=args.guidance, base_model=base, models=models,
                                   generator=generator, max_prompts=args.max_prompts)
        print(report.table())
        report_json = report.to_json()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report_json + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a Space stop, ``kill``) raised like Ctrl-C: Python's default SIGTERM exit skips every cleanup."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated`, so staging folders are removed as after Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def raise_terminated(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        # None: the previous handler was not set from Python; the default is the closest to restore.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        quiet_libraries()
    try:
        with sigterm_as_interrupt():
            if args.command == "train":
                return run_train(args)
            if args.command == "evaluate":
                return run_evaluate(args)
            if args.command == "push":
                return run_push(args)
            if args.command == "pick":
                return run_pick(args)
            return run_generate(args)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM as Terminated
        return _interrupted(interrupt, args.debug)
    except TrainingCancelled as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # every failure ends as one readable line unless --debug
        if args.debug:
            traceback.print_exc()
        else:
            print(f"error: {_one_line(error)}", file=sys.stderr)
        return 1


def _interrupted(interrupt: KeyboardInterrupt, debug: bool) -> int:
    """Say in one line that the run stopped as asked; return the shell's code for the signal (128 + its number)."""
    if not debug:
        # Code the interrupt cut off halfway (a progress bar stopped inside its constructor) complains from __del__
        # once the interrupt's frames are freed: a traceback after a deliberate stop. Free them now, unheard.
        hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
        try:
            traceback.clear_frames(interrupt.__traceback__)
            gc.collect()
        finally:
            sys.unraisablehook = hook
    if isinstance(interrupt, Terminated):
        print("error: interrupted (SIGTERM); nothing was written", file=sys.stderr)
        return 143
    print("error: interrupted; nothing was written", file=sys.stderr)
    return 130


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    message = text[0] if text else type(error).__name__
    known = ("ConfigError", "ImageError", "TriggerError", "ArtifactError", "HubError", "FileNotFoundError",
             "CheckpointError")
    if type(error).__name__ not in known:
        message = f"{type(error).__name__}: {message}"
    return message + (" (run with --debug for details)" if type(error).__name__ not in known else "")


__all__ = ["build_parser", "config_from_args", "main"]
