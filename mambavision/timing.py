"""Timing of repeated calls, synchronised with the device (used by ``mambavision benchmark`` and benchmarks/)."""
import time
from typing import Callable, Iterable, List, Optional

import torch

__all__ = ['time_calls']


def time_calls(
        fn: Callable[[], object],
        warmup: int,
        repeats: int,
        device: torch.device,
        progress: Optional[Callable[[Iterable[int]], Iterable[int]]] = None,
) -> List[float]:
    """Seconds taken by each of ``repeats`` calls of ``fn()``, after ``warmup`` untimed calls.

    On CUDA each call is bracketed by two events on the current stream and the host
    waits only once, after the last call, so the calls queue as they would in a loop of
    real work; a call's time runs from its start event to its end event on the device
    (host launch time included whenever the device waits for it). Elsewhere each call
    is timed with ``time.perf_counter``. ``progress`` wraps the loop (a ``tqdm``, say).
    """
    device = torch.device(device)
    steps: Iterable[int] = range(warmup + repeats)
    steps = progress(steps) if progress is not None else steps
    if device.type == 'cuda':
        events = []
        torch.cuda.synchronize(device)
        for i in steps:
            if i < warmup:
                fn()
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for i in steps:
        started = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return times
