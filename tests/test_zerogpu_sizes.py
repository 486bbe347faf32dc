"""What the ZeroGPU calls ask for and hand back: durations from each call's size, errors that survive pickling."""

from __future__ import annotations

import pickle
import threading

from personalization.device import SD15_HUB_ID
from personalization.jobs import ZERO_GPU_MAX_SECONDS, portable_error, zero_gpu_generation_seconds
from personalization.progress import TrainingCancelled


def test_a_generation_call_asks_for_more_time_with_more_images_steps_and_pixels():
    assert zero_gpu_generation_seconds(2, 25, 512, SD15_HUB_ID) == 30  # the floor: the worker's start, the apply
    base = zero_gpu_generation_seconds(16, 50, 512, SD15_HUB_ID)
    assert 30 < base < 120
    assert zero_gpu_generation_seconds(32, 50, 512, SD15_HUB_ID) > base
    assert zero_gpu_generation_seconds(16, 100, 512, SD15_HUB_ID) > base
    assert zero_gpu_generation_seconds(16, 50, 768, SD15_HUB_ID) > base
    assert zero_gpu_generation_seconds(10_000, 100, 1024, SD15_HUB_ID) == ZERO_GPU_MAX_SECONDS


class Unpicklable(Exception):
    def __init__(self, message: str, lock: threading.Lock) -> None:
        super().__init__(message)
        self.lock = lock


def test_an_error_that_cannot_be_pickled_comes_back_as_its_message():
    error = portable_error(Unpicklable("the GPU caught fire", threading.Lock()))
    assert isinstance(error, RuntimeError) and str(error) == "Unpicklable: the GPU caught fire"
    cancelled = TrainingCancelled("training was cancelled; no model was written")
    assert portable_error(cancelled) is cancelled  # kept as it is: describe_failure tells it by its type
    assert isinstance(pickle.loads(pickle.dumps(cancelled)), TrainingCancelled)
    assert portable_error(None) is None
