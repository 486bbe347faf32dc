"""personalization.methods: one spec per method, and everything that differs between methods read from it.

A fifth method registered here, and nowhere else, is picked up by the config (validation, defaults, resolution), the
recipes, the model card, the CLI's choices and the app's Method radio and option widgets.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import pytest

from personalization import methods
from personalization.cli import add_config_options
from personalization.config import (
    DEFAULT_IDENTIFIER,
    STAGE2_LEARNING_RATES,
    ConfigError,
    ResolvedConfig,
    TrainingConfig,
    config_fields,
)
from personalization.methods import (
    DEFAULT_METHOD,
    LEARNED_TOKEN_HUB_TAG,
    METHODS,
    OPTIONS,
    Method,
    MethodDefaults,
    MethodSpec,
    StagePlan,
    method_keys,
    method_spec,
)
from personalization.model_card import build_model_card
from personalization.recipes import recipe_for

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SUMMARY = {"hardware": "CPU", "seconds_training": 1.0, "stages": []}


# ---- the registry ------------------------------------------------------------------------------------------------
def test_the_method_literal_lists_the_registry_keys_in_order():
    assert typing.get_args(Method) == METHODS == method_keys() == tuple(methods.SPECS)
    assert typing.get_type_hints(TrainingConfig)["method"] == Method
    assert TrainingConfig(class_noun="dog").method == DEFAULT_METHOD == METHODS[0]
    by_name = {spec.name: spec for spec in config_fields()}
    assert by_name["method"].choices == METHODS


def test_each_spec_is_filed_under_its_key_and_says_everything():
    labels = [method_spec(key).label for key in METHODS]
    assert len(set(labels)) == len(labels)
    for key, spec in methods.SPECS.items():
        assert spec.key == key and spec.label and spec.card_name and spec.hub_tags
        assert spec.accepts <= set(OPTIONS) and {option for option, _ in spec.refusals} <= set(OPTIONS) - spec.accepts
        # A method without an embedding stage starts none; one without a U-Net stage trains none.
        assert (spec.defaults.stage1_steps > 0) == spec.learns_token
        assert (spec.defaults.stage2_steps > 0) == spec.trains_unet
    with pytest.raises(dataclasses.FrozenInstanceError):
        method_spec("dreambooth").learns_token = True  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown method 'rm -rf'"):
        method_spec("rm -rf")


def test_the_methods_as_they_are():
    table = {key: (spec.unet, spec.learns_token, sorted(spec.accepts)) for key, spec in methods.SPECS.items()}
    assert table == {
        "two_stage": ("chosen", True, []),
        "textual_inversion": ("none", True, []),
        "dreambooth": ("full", False, ["prior_preservation", "train_text_encoder"]),
        "dreambooth_lora": ("lora", False, ["prior_preservation"]),
    }


@pytest.mark.parametrize("key", METHODS)
def test_every_method_drives_config_recipe_card_and_app_alike(key):
    from ui.train_form import method_choices, shown_widgets

    spec = method_spec(key)
    config = TrainingConfig(class_noun="dog", method=key, base_model=SD15, resolution=512).resolved()
    recipe = recipe_for(config)
    assert config.method_spec is spec and recipe.learns_token == config.learns_token == spec.learns_token
    assert [stage.trainable == "embedding" for stage in recipe.stages][:1] == [spec.learns_token]
    assert config.trains_unet == spec.trains_unet == any(s.trainable != "embedding" for s in recipe.stages)
    assert (config.trigger_token == DEFAULT_IDENTIFIER) == spec.uses_identifier
    card = build_model_card(config, SUMMARY, [])
    assert f"- Method: {spec.card_name}" in card.text
    assert set(spec.hub_tags) <= set(card.data.tags) and (LEARNED_TOKEN_HUB_TAG in card.data.tags) == spec.learns_token
    assert (spec.label, key) in method_choices()
    # The app shows an option exactly where the config takes it.
    shown = shown_widgets(key)
    for option in OPTIONS:
        assert shown[option] == (spec.refusal(option) is None)
        ticked = TrainingConfig(class_noun="dog", method=key, **{option: True})
        if shown[option]:
            ticked.validate()
        else:
            with pytest.raises(ConfigError, match=rf"^{option}"):
                ticked.validate()


# ---- a fifth method, registered here only -------------------------------------------------------------------------
def _fifth_stages(config: ResolvedConfig, prompts: tuple[str, ...]) -> tuple[StagePlan, ...]:
    return (StagePlan("fifth · embedding", "embedding", config.stage1_steps, config.stage1_learning_rate, prompts),
            StagePlan("fifth · U-Net", "unet_full", config.stage2_steps, config.stage2_learning_rate, prompts,
                      prior_preservation=config.prior_preservation))


FIFTH = MethodSpec(
    key="fifth",
    label="Fifth (a test)",
    card_name="A fifth method (Nobody et al. 2099)",
    hub_tags=("fifth-method", "test-only"),
    defaults=MethodDefaults(stage1_steps=11, stage1_learning_rate=1e-3, stage2_steps=22, stage2_learning_rate=None),
    unet="full",
    learns_token=True,
    build_stages=_fifth_stages,
    accepts=frozenset({"prior_preservation"}),
)


@pytest.fixture
def fifth(monkeypatch: pytest.MonkeyPatch) -> MethodSpec:
    monkeypatch.setitem(methods.SPECS, FIFTH.key, FIFTH)
    return FIFTH


def test_a_fifth_method_is_resolved_by_the_config(fifth):
    config = TrainingConfig(class_noun="Dog", method="fifth", base_model=SD15, stage2_mode="lora",
                            subject_type="person").resolved()
    assert config.method_spec is fifth
    # Its defaults, scaled by the subject preset; its fixed U-Net mode wins over the form's stage2_mode.
    assert (config.stage1_steps, config.stage1_learning_rate, config.stage2_steps) == (14, 1e-3, 28)
    assert (config.stage2_mode, config.stage2_learning_rate) == ("full", STAGE2_LEARNING_RATES["full"])
    assert (config.learns_token, config.uses_lora, config.trains_unet) == (True, False, True)
    assert config.trigger_token == "<my-dog>"  # it learns a token: a new one, not an identifier
    assert TrainingConfig(class_noun="dog", method="fifth", prior_preservation=True).validate()
    with pytest.raises(ConfigError, match=r"^train_text_encoder is a DreamBooth option; method 'fifth' keeps"):
        TrainingConfig(class_noun="dog", method="fifth", train_text_encoder=True).validate()
    with pytest.raises(ConfigError, match="stage1_steps must be at least 1 for fifth"):
        TrainingConfig(class_noun="dog", method="fifth", stage1_steps=0).resolved()
    with pytest.raises(ConfigError, match=r"method must be one of two_stage, .*, fifth; got 'sixth'"):
        TrainingConfig(class_noun="dog", method="sixth").validate()  # type: ignore[arg-type]


def test_a_fifth_method_reaches_the_recipe_and_the_card(fifth):
    config = TrainingConfig(class_noun="dog", method="fifth", base_model=SD15, resolution=512,
                            prior_preservation=True).resolved()
    recipe = recipe_for(config)
    assert [stage.name for stage in recipe.stages] == ["fifth · embedding", "fifth · U-Net"]
    assert (recipe.learns_token, recipe.needs_class_images, recipe.total_steps) == (True, True, 33)
    card = build_model_card(config, SUMMARY, [], repo_id="alice/fifth")
    assert "- Method: A fifth method (Nobody et al. 2099)\n" in card.text  # no "(stage 2: …)": the mode is fixed
    assert {"fifth-method", "test-only", LEARNED_TOKEN_HUB_TAG} <= set(card.data.tags)
    assert "lora" not in card.data.tags and card.data.base_model_relation == "finetune"
    assert 'pipe.load_textual_inversion("alice/fifth")' in card.text
    assert 'UNet2DConditionModel.from_pretrained("alice/fifth", subfolder="unet"' in card.text


def test_a_fifth_method_is_offered_by_the_cli(fifth):
    parser = argparse.ArgumentParser()
    add_config_options(parser)
    assert parser.parse_args(["--method", "fifth"]).method == "fifth"


def test_a_fifth_method_is_offered_by_the_app(fifth, tmp_path: Path):
    from ui.train_form import method_choices, option_updates, shown_widgets

    assert method_choices()[-1] == ("Fifth (a test)", "fifth")
    assert shown_widgets("fifth") == {"prior_preservation": True, "class_images": True, "train_text_encoder": False}
    assert option_updates("fifth")[2] == {"__type__": "update", "visible": False, "value": False}
    radio = _component(_build_app(tmp_path), "Method")
    assert ("Fifth (a test)", "fifth") in radio.choices


# ---- the Train tab shows an option only for the methods that take it ------------------------------------------------
def _build_app(tmp_path: Path):
    import app

    services = app.Services(default_base="bundled:mini-shapes", generator=None, hardware="CPU",  # type: ignore
                            work_root=tmp_path / "work")
    return app.build_app(services)


def _component(demo, label: str):
    return next(block for block in demo.blocks.values() if getattr(block, "label", None) == label)


def test_the_train_tab_shows_the_options_of_the_chosen_method(tmp_path: Path):
    from personalization.config import CONFIG_FIELDS

    demo = _build_app(tmp_path)
    labels = {spec.name: spec.info.label for spec in CONFIG_FIELDS}
    method = _component(demo, "Method")
    stage2 = _component(demo, "Stage 2 (two-stage): LoRA or full U-Net")
    options = {name: _component(demo, labels[name]) for name in ("prior_preservation", "class_images",
                                                                 "train_text_encoder")}
    # The default method (two-stage) takes none of them: hidden from the start.
    assert not any(widget.visible for widget in options.values()) and stage2.visible
    on_change = [fn for fn in demo.fns.values() if fn.inputs == [method] and set(fn.outputs) & set(options.values())]
    assert len(on_change) == 1
    (handler,) = on_change
    for key, shown in [("dreambooth", {"prior_preservation", "class_images", "train_text_encoder"}),
                       ("dreambooth_lora", {"prior_preservation", "class_images"}),
                       ("textual_inversion", set()), ("two_stage", set())]:
        updates = dict(zip(handler.outputs, handler.fn(key), strict=True))
        for name, widget in options.items():
            assert updates[widget]["visible"] == (name in shown), (key, name)
            if name not in shown and name != "class_images":  # a hidden switch is also unticked
                assert updates[widget]["value"] is False
    (mode_change,) = [fn for fn in demo.fns.values() if fn.inputs == [method] and fn.outputs == [stage2]]
    assert [mode_change.fn(key)["visible"] for key in METHODS] == [True, False, False, False]
