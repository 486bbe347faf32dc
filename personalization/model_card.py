"""The model card (README.md of an artifact folder), built with huggingface_hub's ModelCard, never by hand-made YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from . import artifacts
from .config import GENERATION_DEFAULTS, TrainingConfig
from .device import BUNDLED_MINI_MODEL, SD15_HUB_ID
from .families import SD15, SDXL_HUB_ID, Family
from .methods import LEARNED_TOKEN_HUB_TAG

LICENSES = {
    SD15_HUB_ID: "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "stabilityai/stable-diffusion-2-base": "openrail++",
    "stabilityai/stable-diffusion-2": "openrail++",
    SDXL_HUB_ID: "openrail++",
}

# Written into a local card's snippet; replaced by the real repo id in the copy that is pushed.
REPO_PLACEHOLDER = "YOUR_NAME/THIS_REPO"


def is_hub_id(base_model: str) -> bool:
    return base_model.count("/") == 1 and not base_model.startswith(("local:", "bundled:", "/", "."))


def diffusers_snippet(config: TrainingConfig, repo_id: str, base_for_code: str, family: Family = SD15,
                      with_unet: bool = True) -> str:
    """Python that loads this repo with plain diffusers calls, one per part, and generates one image.
    ``with_unet`` False: the kept checkpoint is two-stage's stage 1, the trigger alone (no LoRA, no U-Net)."""
    pipeline = family.pipeline_class
    full_unet, lora = _full_unet(config) and with_unet, config.uses_lora and with_unet
    lines = [
        "import torch",
        f"from diffusers import {pipeline}" + (", UNet2DConditionModel" if full_unet else ""),
        "",
        'device = "cuda" if torch.cuda.is_available() else "cpu"',
        'dtype = torch.float16 if device == "cuda" else torch.float32',
    ]
    if family.embedding_keys and config.learns_token:
        lines[2:2] = ["from huggingface_hub import hf_hub_download", "from safetensors.torch import load_file"]
    if family.fp16_fix_vae:  # SDXL: say what happens to its VAE in fp16, and the faster option
        lines += ["# The base's VAE overflows in fp16: diffusers decodes with it upcast to fp32. Faster: pass "
                  f'vae=AutoencoderKL.from_pretrained("{family.fp16_fix_vae}", dtype=dtype)']
    if full_unet:
        lines.append(f'unet = UNet2DConditionModel.from_pretrained("{repo_id}", subfolder="unet", dtype=dtype)')
        lines.append(f'pipe = {pipeline}.from_pretrained("{base_for_code}", unet=unet, dtype=dtype)')
    else:
        lines.append(f'pipe = {pipeline}.from_pretrained("{base_for_code}", dtype=dtype)')
    if full_unet and config.train_text_encoder:  # the trainer saves the text encoder with a full U-Net
        lines.insert(2, "from transformers import CLIPTextModel")
        lines.append(f'pipe.text_encoder = CLIPTextModel.from_pretrained("{repo_id}", subfolder="text_encoder",'
                     " dtype=dtype)")
    lines.append("pipe = pipe.to(device)")
    if config.learns_token:
        lines += _embedding_lines(config, repo_id, family)
    if lora:
        lines.append(f'pipe.load_lora_weights("{repo_id}")')
    lines.append(f'image = pipe("{config.context_prompts()[0]}", num_inference_steps={GENERATION_DEFAULTS.steps},'
                 f" guidance_scale={config.guidance_scale:g}).images[0]")
    lines.append('image.save("sample.png")')
    return "\n".join(lines)


def _embedding_lines(config: TrainingConfig, repo_id: str, family: Family) -> list[str]:
    """One ``load_textual_inversion`` of the repo; for SDXL one per text encoder, each naming its encoder and
    tokenizer and the file's tensor for it."""
    if not family.embedding_keys:
        return [f'pipe.load_textual_inversion("{repo_id}")']
    lines = [f'embeddings = load_file(hf_hub_download("{repo_id}", "{artifacts.SDXL_EMBEDDINGS_FILE}"))']
    for key, (tokenizer, encoder, _) in zip(family.embedding_keys, family.encoders, strict=True):
        lines.append(f'pipe.load_textual_inversion(embeddings["{key}"], token="{config.trigger_token}", '
                     f"text_encoder=pipe.{encoder}, tokenizer=pipe.{tokenizer})")
    return lines


def _full_unet(config: TrainingConfig) -> bool:
    return config.trains_unet and not config.uses_lora


def build_model_card(
    config: TrainingConfig, summary: dict[str, Any], sample_names: list[str], repo_id: str = REPO_PLACEHOLDER,
    family: Family = SD15,
) -> ModelCard:
    """The card for an artifact folder; ``config.base_model`` must already be portable (no local paths).
    ``family``: the base model's (:mod:`personalization.families`), which the portable name may no longer tell."""
    base = config.base_model or ""
    hub_base = base if is_hub_id(base) else None
    spec = config.method_spec  # the method's wording, citation and tags
    tags = ["text-to-image", "diffusers", *family.hub_tags, "template:sd-lora", *spec.hub_tags, "personalization"]
    if config.uses_lora:
        tags.insert(3, "lora")
    if config.learns_token:
        tags.insert(3, LEARNED_TOKEN_HUB_TAG)
    widget = [{"text": _sample_prompt(config, index), "output": {"url": f"{artifacts.SAMPLES_DIR}/{name}"}}
              for index, name in enumerate(sample_names)]
    data = ModelCardData(
        base_model=hub_base,
        base_model_relation="adapter" if hub_base and (config.uses_lora or not config.trains_unet) else
        ("finetune" if hub_base else None),
        library_name="diffusers",
        license=LICENSES.get(base, "creativeml-openrail-m" if base == BUNDLED_MINI_MODEL else None),
        tags=tags,
        instance_prompt=config.instance_prompt(),
        widget=widget or None,
    )
    stages = "\n".join(f"| {s['name']} | {s['steps']} | {s['seconds']:.1f} s | {s['final_loss']} |"
                       for s in summary.get("stages", []))
    if hub_base:
        base_text = f"[{hub_base}](https://huggingface.co/{hub_base})"
        base_for_code = hub_base
    elif base == BUNDLED_MINI_MODEL:
        base_text = "the mini shapes model bundled with the personalization engine"
        base_for_code = "PATH/TO/personalization/assets/mini_model"
    else:
        base_text = f"a local base model ({base})"
        base_for_code = "PATH/TO/BASE_MODEL"
    webui_files = []
    if config.learns_token:
        webui_files.append(f"`{artifacts.webui_embedding_file(config.trigger_token)}` (embedding; in AUTOMATIC1111 "
                           "its file name is the trigger)")
    if config.uses_lora and summary.get("kept_unet", True):
        webui_files.append(f"`{artifacts.webui_lora_file(config.trigger_token)}` (LoRA in kohya naming)")
    webui = ("## AUTOMATIC1111 / ComfyUI\n\nAlso in this repo: " + " and ".join(webui_files) + ".\n") if webui_files \
        else ""
    seconds = summary.get("seconds_training", 0)
    samples = "\n".join(f"![sample {i}]({artifacts.SAMPLES_DIR}/{name})" for i, name in enumerate(sample_names))
    body = f"""
# {config.trigger_token} {config.class_noun}

A personalized text-to-image model: it knows one specific **{config.class_noun}**, called up with the trigger
`{config.trigger_token}` used as an adjective: **`{config.instance_prompt()}`**.

- Method: {spec.card_name}{f" (stage 2: {config.stage2_mode})" if spec.chooses_stage2_mode else ""}
- Base model: {base_text}
- Resolution: {config.resolution} px, seed {config.seed}
- Trained on: {summary.get("hardware", "unknown hardware")}, {seconds:.0f} s of training{_kept_step_line(summary)}

| stage | steps | time | final loss |
|---|---|---|---|
{stages}

## Use it with diffusers

```python
{diffusers_snippet(config, repo_id, base_for_code, family, with_unet=summary.get("kept_unet", True))}
```

{webui}
## Samples

{samples or "(no samples were rendered)"}

## License

This model inherits the license of its base model
({data.license or "see the base model's card"}); use it according to that license's restrictions.
"""
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body)


def _sample_prompt(config: TrainingConfig, index: int) -> str:
    prompts = config.sample_prompts()
    return prompts[index % len(prompts)]


def _kept_step_line(summary: dict[str, Any]) -> str:
    """Which checkpoint these weights are (the run kept several, personalization.checkpoints)."""
    kept, recommended = summary.get("kept_step"), summary.get("recommended_step")
    if kept is None:
        return ""
    total = sum(stage.get("steps", 0) for stage in summary.get("stages", []))
    note = " (the recommended one)" if kept == recommended else (
        f" (recommended: step {recommended})" if recommended is not None else "")
    if not summary.get("kept_unet", True):
        note += ", the end of stage 1: the trigger embedding alone"
    return f"\n- Weights: the checkpoint at step {kept} of {total}{note}"


def write_model_card(folder: Path, config: TrainingConfig, summary: dict[str, Any], sample_names: list[str],
                     repo_id: str = REPO_PLACEHOLDER, family: Family = SD15) -> Path:
    return artifacts.save_card(folder, str(build_model_card(config, summary, sample_names, repo_id, family)))


def card_for_repo(folder: Path, repo_id: str) -> bytes:
    """The folder's card with its snippet naming `repo_id`: what is pushed there. The local card is not touched."""
    return artifacts.read_card(folder).replace(REPO_PLACEHOLDER, repo_id).encode("utf-8")
