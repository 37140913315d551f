"""The correctness sections of benchmarks/gpu.py: each scan backend against the sequential reference
(1. ``scan``), and the model on the device against the CPU (2. ``model``)."""
import contextlib
import copy
import math
import statistics
from typing import Callable, Dict, List

import torch

import timm

from mambavision.model import MambaVisionMixer
from mambavision.ops import selective_scan, selective_scan_ref, set_scan_backend

SCAN_TOL = {'y': 1e-4, 'grad': 1e-3}  # max |err| / max |ref|; mamba-ssm's own tests allow more for float32
MODEL_TOL = {'logits': 1e-4, 'grad': 1e-3}  # relative L2 error
# (batch, D, L, N); the last: a detection model's 112 x 112 window, few channels (the segmented Triton scan)
ODD_SCAN_SHAPES = [(3, 37, 1, 8), (3, 101, 97, 8), (1, 161, 197, 8), (2, 785, 1023, 8), (1, 16, 12544, 8)]
SMOKE_SCAN_SHAPES = [(2, 5, 7, 4), (1, 9, 1, 8), (3, 16, 49, 8)]
REF_CPU = 'reference on cpu'  # scan row: the oracle run on the CPU, against itself on the device
CPU_ORACLE_MAX = 160 * 196 ** 2  # channels * tokens^2 up to which the CPU oracle is run (its backward costs that)
GRAD_NAMES = ('du', 'ddelta', 'dA', 'dB', 'dC', 'dD', 'ddelta_bias')


# ----------------------------------------------------------------------------- 1. scan correctness


def scan_shapes(smoke: bool) -> List[tuple]:
    """(batch, channels, tokens, state) of the scans of every registered MambaVision's windowed stages, and odd ones."""
    if smoke:
        return SMOKE_SCAN_SHAPES
    shapes = set()
    for name in timm.list_models('mambavision*'):
        with torch.device('meta'):
            model = timm.create_model(name)
        for stage in model.stages:
            mixer = next((m for m in stage.modules() if isinstance(m, MambaVisionMixer)), None)
            if mixer is not None:
                shapes.add((2, mixer.A_log.shape[0], stage.window_size ** 2, mixer.d_state))
    return sorted(shapes, key=lambda s: (s[2], s[1])) + ODD_SCAN_SHAPES


def scan_inputs(shape: tuple, seed: int):
    """Float32 CPU (u, delta, A, B, C, D, delta_bias) as the mixer makes them, and an output gradient."""
    batch, channels, length, state = shape
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    A = -torch.arange(1., state + 1) * torch.exp(0.3 * r(channels, state))  # around Mamba's init -(1..N)
    inputs = (r(batch, channels, length), r(batch, channels, length) - 1., A, r(batch, state, length),
              r(batch, state, length), r(channels), 0.5 * r(channels))
    return inputs, r(batch, channels, length)


def scan_with_grads(fn: Callable, inputs, dy, device: torch.device) -> list:
    """[y, du, ddelta, dA, dB, dC, dD, ddelta_bias] of ``fn`` on ``device``, back on the CPU."""
    args = [t.to(device, copy=True).requires_grad_() for t in inputs]
    y = fn(*args, delta_softplus=True)
    y.backward(dy.to(device))
    return [t.detach().cpu() for t in [y] + [a.grad for a in args]]


def rel_max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (inf when got has non-finite values; null in the JSON)."""
    if not torch.isfinite(got).all():
        return math.inf
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / (scale if scale > 0 else 1.)


def check_scan(backend: str, shape: tuple, seed: int, device: torch.device, oracle: Dict[tuple, list]) -> dict:
    """``backend`` on ``device`` against ``selective_scan_ref`` differentiated by autograd on ``device``.

    ``backend`` REF_CPU: ``selective_scan_ref`` on the CPU instead, which checks the oracle itself.
    """
    inputs, dy = scan_inputs(shape, seed)
    if shape not in oracle:
        oracle[shape] = scan_with_grads(selective_scan_ref, inputs, dy, device)
    if backend == REF_CPU:
        got = scan_with_grads(selective_scan_ref, inputs, dy, torch.device('cpu'))
    else:
        got = scan_with_grads(lambda *a, **k: selective_scan(*a, **k, backend=backend), inputs, dy, device)
    errors = {name: rel_max_err(g, w) for name, g, w in zip(('y',) + GRAD_NAMES, got, oracle[shape])}
    max_bwd = max(errors[n] for n in GRAD_NAMES)
    passed = errors['y'] <= SCAN_TOL['y'] and max_bwd <= SCAN_TOL['grad']
    return dict(passed=passed, max_err_fwd=errors['y'], max_err_bwd=max_bwd, errors=errors)


# ----------------------------------------------------------------------------- 2. model correctness


@contextlib.contextmanager
def exact_float32():
    """TF32 off for matmuls and convolutions (the CPU computes in full float32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def logits_and_grads(model, x, proj):
    """Logits and every parameter's gradient of (logits * proj).sum(), on the CPU."""
    model.zero_grad(set_to_none=True)
    logits = model(x)
    (logits * proj).sum().backward()
    return logits.detach().cpu(), {n: p.grad.detach().cpu() for n, p in model.named_parameters()}


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    if not torch.isfinite(got).all():
        return math.inf
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def check_model(backend: str, name: str, batch: int, img_size: int, device: torch.device, cache: dict) -> dict:
    if 'cpu' not in cache:
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 3, img_size, img_size, generator=g)
        proj = torch.randn(batch, model.num_classes, generator=g)
        cache['cpu'] = (model, x, proj, logits_and_grads(model, x, proj))  # auto scan backend of the CPU
    model, x, proj, (logits_ref, grads_ref) = cache['cpu']
    set_scan_backend(backend)
    with exact_float32():
        logits, grads = logits_and_grads(copy.deepcopy(model).to(device), x.to(device), proj.to(device))
    grad_errs = {n: rel_l2(grads[n], grads_ref[n]) for n in grads_ref}
    worst = max(grad_errs, key=grad_errs.get)
    logits_err = rel_l2(logits, logits_ref)
    return dict(passed=logits_err <= MODEL_TOL['logits'] and grad_errs[worst] <= MODEL_TOL['grad'],
                logits_rel_err=logits_err, grad_max_rel_err=grad_errs[worst], grad_worst_param=worst,
                grad_median_rel_err=statistics.median(grad_errs.values()))
