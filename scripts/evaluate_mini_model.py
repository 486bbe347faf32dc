"""Measure the bundled mini base model against the issue's bars, and validate the analytic checker.

    python scripts/evaluate_mini_model.py                     # 200 images, held-out prompts, DDIM 25 steps, CFG 5
    python scripts/evaluate_mini_model.py --validate-checker  # + checker accuracy on clean renders / VAE round trips

Held-out prompts are "a photo of a {color} {shape} on a {background} background" for the (shape, color, background)
triples in personalization.mini_world.world.HELD_OUT_COMBOS, which the trainer never shows to the model.
Bars: background >= 95%, object colour >= 90%, shape >= 85%.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import StableDiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from personalization.mini_world import checker, subjects, world  # noqa: E402

BARS = {"background": 0.95, "color": 0.90, "shape": 0.85}


def validate_checker(pipe: StableDiffusionPipeline, n: int, seed: int) -> None:
    """Checker accuracy on clean renders and on the model's VAE round trips, and subject-fidelity separation."""
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, allow_held_out=True) for _ in range(n)]
    clean = [world.render(s, 32) for s in scenes]

    def round_trip(images: list[Image.Image]) -> list[Image.Image]:
        x = torch.from_numpy(np.stack([world.to_array(im) for im in images]).astype(np.float32) / 127.5 - 1)
        with torch.no_grad():
            y = pipe.vae.decode(pipe.vae.encode(x.permute(0, 3, 1, 2)).latent_dist.mean).sample
        arr = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a) for a in arr]

    trips = round_trip(clean)
    psnr = []
    for a, b in zip(clean, trips, strict=True):
        mse = float(((world.to_array(a).astype(np.float32) - world.to_array(b)) ** 2).mean())
        psnr.append(10 * np.log10(255.0**2 / max(mse, 1e-6)))
    print(f"\nChecker validation on {n} random scenes (all combos), VAE PSNR {np.mean(psnr):.2f} dB")
    print(f"{'input':<22}{'background':>12}{'color':>10}{'shape':>10}")
    for name, images in (("clean render", clean), ("VAE round trip", trips)):
        reads = [checker.read_image(im) for im in images]
        acc = [
            np.mean([getattr(r, f) == getattr(s, f) for r, s in zip(reads, scenes, strict=True)])
            for f in ("background", "color", "shape")
        ]
        print(f"{name:<22}{acc[0]:>12.1%}{acc[1]:>10.1%}{acc[2]:>10.1%}")

    print("\nSubjects (shape read / fidelity vs examples/ references: own renders, plain objects of the class)")
    print(f"{'subject':<16}{'input':<16}{'shape':>8}{'own mean':>10}{'own min':>9}{'plain mean':>12}{'plain max':>11}")
    for subj in subjects.SUBJECTS.values():
        refs = subjects.reference_images(subj)
        own = [subjects.sample_subject_image(subj, rng) for _ in range(40)]
        plain = []
        for color in world.COLOR_NAMES:
            for bg in subj.backgrounds[:3]:
                if bg != color:
                    cx, cy, radius = world.sample_placement(rng, subjects.REFERENCE_MIN_RADIUS)
                    plain.append(world.render(world.Scene(subj.class_noun, color, bg, cx, cy, radius), 32))
        for name, own_i, plain_i in (("clean", own, plain), ("VAE round trip", round_trip(own), round_trip(plain))):
            shape_acc = np.mean([checker.read_image(im).shape == subj.class_noun for im in own_i])
            f_own = [checker.subject_fidelity(im, refs) for im in own_i]
            f_plain = [checker.subject_fidelity(im, refs) for im in plain_i]
            print(
                f"{subj.name:<16}{name:<16}{shape_acc:>8.1%}{np.mean(f_own):>10.3f}{min(f_own):>9.3f}"
                f"{np.mean(f_plain):>12.3f}{max(f_plain):>11.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "personalization" / "assets" / "mini_model"))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--guidance-rescale", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-combos", action="store_true", help="evaluate on training triples instead")
    parser.add_argument("--grid", default=None, help="save a PNG grid of the generated images here")
    parser.add_argument("--validate-checker", action="store_true")
    parser.add_argument("--checker-n", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = StableDiffusionPipeline.from_pretrained(args.model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    info_path = Path(args.model) / "training_info.json"
    if info_path.exists():
        import json

        info = json.loads(info_path.read_text())
        print(f"model: step {info['step']}, {info['samples_seen']} samples seen, exported {info['exported_at']}")

    if args.train_combos:
        rng = np.random.default_rng(123)
        train = [c for c in world.all_combos() if not world.is_held_out(*c)]
        combos = [train[i] for i in rng.permutation(len(train))[:50]]
        label = "training"
    else:
        combos = list(world.HELD_OUT_COMBOS)
        label = "held-out"
    t0 = time.time()
    result = checker.evaluate_prompts(
        pipe,
        combos,
        n_images=args.n,
        seed=args.seed,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        guidance_rescale=args.guidance_rescale,
    )
    elapsed = time.time() - t0
    print(
        f"\n{args.n} images, {label} prompts, DDIM {args.steps} steps, CFG {args.guidance}, "
        f"rescale {args.guidance_rescale} ({elapsed:.0f} s)"
    )
    print(f"{'attribute':<12}{'accuracy':>10}{'bar':>8}  ok")
    for key, value in result.as_dict().items():
        bar = BARS.get(key)
        mark = "" if bar is None else ("yes" if value >= bar else "no")
        bar_text = f"{bar:.0%}" if bar is not None else "-"
        print(f"{key:<12}{value:>10.1%}{bar_text:>8}  {mark}")
    confusion: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in result.rows:
        confusion[row["expected"][0]][str(row["read"][0])] += 1
    print("\nshape confusion (expected -> read counts):")
    for shape, reads in sorted(confusion.items()):
        print(f"  {shape:<9}" + ", ".join(f"{k}:{v}" for k, v in sorted(reads.items(), key=lambda kv: -kv[1])))

    if args.grid:
        cols = 20
        rows = (len(result.rows) + cols - 1) // cols
        grid = Image.new("RGB", (cols * 32, rows * 32))
        for i, row in enumerate(result.rows):
            grid.paste(row["image"], ((i % cols) * 32, (i // cols) * 32))
        grid.resize((cols * 64, rows * 64), Image.Resampling.NEAREST).save(args.grid)
        print(f"grid saved to {args.grid}")

    if args.validate_checker:
        validate_checker(pipe, args.checker_n, args.seed)


if __name__ == "__main__":
    main()
