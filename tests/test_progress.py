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
