"""The checkpoint schedule, the recommendation rule on synthetic score tables, and the table's file."""

from __future__ import annotations

from pathlib import Path

import pytest

from personalization import artifacts
from personalization.checkpoints import (
    Checkpoint,
    CheckpointError,
    CheckpointTable,
    check_keep_step,
    checkpoint_steps,
    read_table,
    recommend,
    write_table,
)


def test_two_stage_checkpoints_the_end_of_stage_one_and_spreads_the_rest_over_stage_two() -> None:
    assert checkpoint_steps([400, 300], 4) == [400, 475, 550, 625, 700]


def test_one_stage_spreads_evenly_and_ends_at_the_last_step() -> None:
    assert checkpoint_steps([800], 4) == [200, 400, 600, 800]
    assert checkpoint_steps([10], 3) == [3, 7, 10]


def test_zero_checkpoints_keeps_the_last_step_only_and_no_more_checkpoints_than_steps() -> None:
    assert checkpoint_steps([400, 300], 0) == [400, 700]
    assert checkpoint_steps([5], 0) == [5]
    assert checkpoint_steps([3], 10) == [1, 2, 3]
    assert checkpoint_steps([0, 6], 2) == [3, 6]  # a stage of 0 steps has no end to checkpoint


def test_keep_step_must_name_a_checkpoint() -> None:
    check_keep_step("best", [3, 6])
    check_keep_step("6", [3, 6])
    with pytest.raises(CheckpointError, match=r"keep_step must be best, last or one of the checkpoint steps 3, 6; "
                                              r"got '5'"):
        check_keep_step("5", [3, 6])


def point(step: int, fidelity: float | None, drift: float | None, weights: bool = True,
          base: float | None = None) -> Checkpoint:
    scores = {} if fidelity is None else {"fidelity": fidelity, "drift": drift}
    if base is not None:
        scores["base_fidelity"] = base
    return Checkpoint(step, "stage", weights, training_s=step / 10, scores=scores)


def test_recommend_takes_the_highest_fidelity_within_the_drift_tolerance() -> None:
    table = [point(100, 0.30, 0.00), point(200, 0.50, 0.10), point(300, 0.60, 0.25), point(400, 0.65, 0.40)]
    assert recommend(table, 0.125) == 200


def test_recommend_prefers_the_earliest_of_equal_fidelities() -> None:
    assert recommend([point(100, 0.5, 0.0), point(200, 0.5, 0.0), point(300, 0.4, 0.0)], 0.1) == 100


def test_recommend_takes_the_least_drift_when_none_is_within_tolerance() -> None:
    assert recommend([point(100, 0.3, 0.5), point(200, 0.6, 0.3), point(300, 0.7, 0.4)], 0.1) == 200


def test_recommend_never_hands_back_a_checkpoint_that_has_not_learned_the_subject():
    """A striped star on the mini model (measured): stage 1's end draws stars like the base model, with no drift;
    every U-Net checkpoint learned the stripes and drew them into plain stars too. The least drift among those that
    learned, not the base model again."""
    table = [point(400, 0.033, 0.0, base=0.026), point(475, 0.209, 0.625, base=0.026),
             point(550, 0.320, 0.625, base=0.026), point(625, 0.410, 0.5, base=0.026),
             point(700, 0.485, 0.75, base=0.026)]
    assert recommend(table, 0.125) == 625
    assert recommend([point(100, 0.03, 0.0, base=0.026), point(200, 0.04, 0.3, base=0.026)], 0.125) == 100


def test_recommend_skips_checkpoints_whose_weights_were_not_kept_and_needs_scores() -> None:
    assert recommend([point(100, 0.3, 0.0), point(200, 0.9, 0.0, weights=False)], 0.1) == 100
    assert recommend([point(100, None, None), point(200, None, None)], 0.1) is None
    assert recommend([point(100, 0.3, 0.0)], None) is None


def test_growing_a_table_moves_the_recommendation_only_to_the_new_checkpoint() -> None:
    """What lets a run keep just the recommended large U-Net: a new checkpoint never revives an older one."""
    import random

    rng = random.Random(0)
    for _ in range(300):
        base = round(rng.random() * 0.3, 1)
        points = [point(step, round(rng.random(), 1), round(rng.random() * 0.3, 2), base=base)
                  for step in range(1, 7)]
        for size in range(2, len(points) + 1):
            before, after = recommend(points[: size - 1], 0.15), recommend(points[:size], 0.15)
            assert after in (before, points[size - 1].step), (points[:size], before, after)


def test_resolve_names_the_kept_step_and_refuses_a_pruned_one() -> None:
    table = CheckpointTable([point(100, 0.3, 0.0), point(200, 0.6, 0.0, weights=False), point(300, 0.5, 0.0)],
                            "checker", 0.1)
    assert table.resolve("best") == 300
    assert table.resolve("last") == 300
    assert table.resolve(100) == table.resolve("100") == 100
    with pytest.raises(CheckpointError, match="step 200: its weights were not kept"):
        table.resolve("200")
    with pytest.raises(CheckpointError, match="step 150 is not a checkpoint of this run"):
        table.resolve(150)


def test_best_without_scores_is_the_last_step() -> None:
    assert CheckpointTable([point(1, None, None), point(2, None, None)], None, None).resolve("best") == 2


def test_the_table_round_trips_through_its_file_and_prints(tmp_path: Path) -> None:
    table = CheckpointTable([point(100, 0.3, 0.0), point(200, 0.6, 0.05)], "checker", 0.1, kept_step=200)
    folder = tmp_path / artifacts.CHECKPOINTS_DIR
    folder.mkdir()
    write_table(folder, table)
    again = read_table(tmp_path)
    assert again is not None and again.to_dict() == table.to_dict()
    assert again.recommended_step == 200
    text = again.markdown()
    assert "| 200 (recommended) (kept) | stage | 0.600 | 0.050 | 20.0 | yes |" in text
    assert read_table(tmp_path / "elsewhere") is None


def test_a_damaged_table_is_named(tmp_path: Path) -> None:
    folder = tmp_path / artifacts.CHECKPOINTS_DIR
    folder.mkdir()
    (folder / artifacts.CHECKPOINTS_FILE).write_text("{not json")
    with pytest.raises(artifacts.ArtifactError, match=r"checkpoints/checkpoints\.json is not valid JSON"):
        read_table(tmp_path)
    (folder / artifacts.CHECKPOINTS_FILE).write_text('{"checkpoints": [{"step": 1}]}')
    with pytest.raises(artifacts.ArtifactError, match=r"checkpoints\.json is damaged"):
        read_table(tmp_path)
