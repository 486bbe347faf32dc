import itertools

from personalization.progress import CancelFlag, ProgressEvent, TrainingCancelled, format_seconds


def test_cancel_file_reaches_a_flag_in_another_process_view(tmp_path):
    """A flag built on a signal file reads as cancelled once any process touches that file."""
    signal = tmp_path / "session" / ".cancel-requested"
    worker_view, server_view = CancelFlag(signal), CancelFlag(signal)
    assert not worker_view.cancelled
    server_view.cancel()
    assert worker_view.cancelled
    try:
        worker_view.raise_if_cancelled()
    except TrainingCancelled as error:
        assert "no model was written" in str(error)
    else:
        raise AssertionError("a cancelled flag must raise")
    worker_view.reset()
    assert not signal.exists() and not CancelFlag(signal).cancelled


def test_event_description_and_times():
    event = ProgressEvent("stage 1", 120, 700, 120, 400, 0.1321, 30.0, 41.0)
    assert event.describe() == "stage 1 120/400 · loss 0.1321 · ETA 0:41"
    assert abs(event.fraction - 120 / 700) < 1e-9
    assert format_seconds(3725) == "1:02:05" and format_seconds(-3) == "0:00"


def run_script(clock, stages):
    """Feed the clock a scripted run: per stage, the seconds each step took; return (stage, step, eta) per step."""
    from itertools import count

    now, seen = 0.0, []
    for stage, durations in enumerate(stages):
        for step, seconds in zip(count(1), durations, strict=False):
            now += seconds
            seen.append((stage, step, clock.step_done(stage, step, now)))
    return seen


def test_the_first_eta_is_the_estimate_even_after_a_slow_warm_up():
    """Step 1 carries the model's warm-up: the old rate-from-the-start ETA read 11:33 for a run estimated at 0:58."""
    from personalization.progress import EtaClock

    clock = EtaClock([(400, 0.06), (300, 0.10)], tail_s=1.2)
    estimate = clock.remaining_s()
    assert estimate == 400 * 0.06 + 300 * 0.10 + 1.2
    seen = run_script(clock, [[8.0, 3.0] + [0.06] * 16])
    first = seen[0][2]
    assert estimate / 2 <= first <= estimate and first == 399 * 0.06 + 300 * 0.10 + 1.2
    assert all(estimate / 2 <= eta <= estimate for _, _, eta in seen)  # the warm-up steps never inflate it


def test_the_eta_follows_measured_steps_and_does_not_jump_at_a_stage_change():
    from personalization.progress import EtaClock

    clock = EtaClock([(100, 0.06), (50, 0.10)], tail_s=1.0)
    # This machine runs every step at twice the estimate.
    seen = run_script(clock, [[2.0] + [0.12] * 99, [3.0] + [0.20] * 49])
    by_step = {(stage, step): eta for stage, step, eta in seen}
    assert abs(by_step[(0, 50)] - (50 * 0.12 + 50 * 0.20 + 1.0)) < 1e-9  # measured rate, carried to stage 2
    last_of_stage1, first_of_stage2 = by_step[(0, 100)], by_step[(1, 1)]
    assert abs(last_of_stage1 - (50 * 0.20 + 1.0)) < 1e-9
    assert first_of_stage2 <= last_of_stage1  # a slow first step of the new stage does not push the ETA up
    assert abs(by_step[(1, 10)] - (40 * 0.20 + 1.0)) < 1e-9
    etas = [eta for stage, step, eta in seen if (stage, step) >= (0, 3)]  # once the first rate is measured
    assert all(later <= earlier + 1e-9 for earlier, later in itertools.pairwise(etas))
