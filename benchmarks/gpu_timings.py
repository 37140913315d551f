"""The timing sections of benchmarks/gpu.py: inference throughput (3. ``inference``) and the training
step (4. ``train``), eager and compiled, with their peak memory."""
import statistics
import time
from typing import Callable, List

import torch
import torch.nn.functional as F

import timm

from mambavision.inference import optimize_for_inference
from mambavision.ops import set_scan_backend
from mambavision.timing import time_calls

from gpu_report import Recorder, describe_error, free_memory


def measure(fn: Callable[[], object], warmup: int, repeats: int, batch: int, device: torch.device) -> dict:
    """Median / min / max ms per call, images/s and peak memory of ``fn`` after ``warmup`` calls."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    times = time_calls(fn, warmup, repeats, device)
    median = statistics.median(times)
    out = dict(ms=1e3 * median, ms_min=1e3 * min(times), ms_max=1e3 * max(times), img_per_s=batch / median,
               warmup=warmup, repeats=repeats, peak_mem_gib=None)
    if device.type == 'cuda':
        out['peak_mem_gib'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


def build(name: str, device: torch.device, train: bool):
    torch.manual_seed(0)
    with device:
        model = timm.create_model(name)
    return model.train(train).to(memory_format=torch.channels_last)


def inference_fn(model, batch: int, img_size: int, device: torch.device) -> Callable[[], object]:
    x = torch.randn(batch, 3, img_size, img_size, device=device).contiguous(memory_format=torch.channels_last)

    def step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            return model(x)
    return step


def train_fn(model, params, batch: int, img_size: int, device: torch.device) -> Callable[[], object]:
    x = torch.randn(batch, 3, img_size, img_size, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=device.type == 'cuda')

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def first_call(fn: Callable[[], object], device: torch.device) -> dict:
    """Seconds of one call of ``fn`` (the compile, for a fresh torch.compile), synchronised."""
    start = time.perf_counter()
    set_scan_backend('torch')
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return dict(compile_s=time.perf_counter() - start)


def timing_section(rec: Recorder, section: str, names: List[str], backends: List[str], mode: str, s: dict):
    """Rows of ``section`` ('inference' or 'train') for every model x backend.

    ``mode``: 'eager', 'compile' (torch.compile of the model) or, for inference, 'optimize'
    (``optimize_for_inference``: BatchNorm folded, bf16 weights, compiled with inductor's freezing).
    """
    train = section == 'train'
    warmup, repeats = (s['train_warmup'], s['train_repeats']) if train else (s['warmup'], s['repeats'])
    device, batch, img_size = rec.device, s['batch_size'], s['img_size']
    for name in names:
        torch._dynamo.reset()  # the variants share MambaVision.forward: keep their compiled code apart
        base = dict(model=name, mode=mode, batch=batch, img_size=img_size)
        try:
            model = build(name, device, train)
            params = list(model.parameters())
            if mode == 'compile':
                model = torch.compile(model, backend=s['compile_backend'])
            elif mode == 'optimize':
                model = optimize_for_inference(model, torch.bfloat16, compile=True,
                                               compile_options=dict(backend=s['compile_backend']))
            step = (train_fn(model, params, batch, img_size, device) if train
                    else inference_fn(model, batch, img_size, device))
        except Exception as e:  # building the model or its input failed: every backend's row says why
            step, error = None, describe_error(e)
        if mode != 'eager' and step is not None:
            row = rec.run('compile', dict(base, section=section, compile_backend=s['compile_backend']),
                          lambda step=step: first_call(step, device), kind='compile')
            if 'compile_s' not in row:
                error = f"torch.compile did not run: {row.get('error') or row.get('skipped')}"
                step = None
        for backend in backends:
            row = dict(base, backend=backend)
            if step is None:
                rec.add(section, dict(row, error=error))
                continue

            def timed(backend=backend, step=step, params=params):
                set_scan_backend(backend)
                for p in params:  # a failed training step leaves gradients the next step would add to
                    p.grad = None
                return measure(step, warmup, repeats, batch, device)
            rec.run(section, row, timed)
        model = params = step = None
        free_memory(device)
