"""Triton selective scan against the sequential float32 reference, forward and every gradient.

The kernels run through Triton's CPU interpreter, which only works when TRITON_INTERPRET=1
is set before triton is first imported in the process: Triton decides at import time
whether its own library functions (``tl.sum``, ``tl.cdiv`` ...) are interpreted. Under
pytest, ``conftest.py`` imports timm, and timm imports triton, before this file runs. So
the kernel cases run in one fresh worker process (this file run as a script, started with
the variable set); the tests below read its results and check them. The cases that
launch no kernel run in the pytest process.

Shapes stay small because the interpreter is slow. Small ``block_d`` / ``block_l``
overrides make small tensors span several channel blocks and several time chunks, which
is where the state and adjoint carries between programs and chunks are exercised.
"""
import os
import importlib.util
import json
import subprocess
from pathlib import Path
import sys
import traceback

import pytest
import torch

pytest.importorskip('triton')

REPO = Path(__file__).resolve().parents[2]  # not conftest's: the worker runs this file as a script
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mambavision.ops import triton_scan  # noqa: E402
from mambavision.ops.selective_scan import selective_scan, selective_scan_ref, selective_scan_torch  # noqa: E402
from mambavision.ops.triton_scan import selective_scan_triton  # noqa: E402

NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'delta_bias')
FP32_TOL = 1e-4
LOW_PRECISION_TOL = {'bfloat16': 2e-2, 'float16': 4e-3}


# ----------------------------------------------------------------------------- helpers

def make_inputs(batch, dim, seqlen, dstate, dtype=torch.float32, has_d=True, has_bias=True, softplus=True):
    """Random (u, delta, A, B, C, D, delta_bias); u, delta, B, C in ``dtype``, the rest float32."""
    u = torch.randn(batch, dim, seqlen)
    if softplus:
        delta = torch.randn(batch, dim, seqlen) - 1.0
        bias = torch.randn(dim) * 0.5 if has_bias else None
    else:  # dt = delta + bias itself: keep it a positive step size
        delta = torch.rand(batch, dim, seqlen) * 0.5 + 0.05
        bias = torch.rand(dim) * 0.1 if has_bias else None
    A = -(0.2 + 3.0 * torch.rand(dim, dstate))
    B = torch.randn(batch, dstate, seqlen)
    C = torch.randn(batch, dstate, seqlen)
    D = torch.randn(dim) if has_d else None
    return (u.to(dtype), delta.to(dtype), A, B.to(dtype), C.to(dtype), D, bias)


def rel_err(got, want):
    """max |got - want| / max |want|, in float32 (the plain max error when want is all zero)."""
    got, want = got.float(), want.float()
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    return err / scale if scale > 0 else err


def compare(inputs, softplus=True, grad_oracle=selective_scan_ref, **kw):
    """Forward and all gradients of the Triton scan, on the same inputs and dy: y against the reference,
    the gradients against ``grad_oracle`` (the reference unless given).

    Returns {'errors': {'y': e, 'du': e, ...}, 'problems': [...]} (problems: wrong dtype,
    shape, missing or non-finite results).
    """
    outs = []
    gy = None
    for fn in (selective_scan_triton, grad_oracle):
        args = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
        y = fn(*args, delta_softplus=softplus, **(kw if fn is selective_scan_triton else {}))
        if gy is None:
            gy = torch.randn(y.shape).to(y.dtype)
        y.backward(gy)
        outs.append((y.detach(), [None if a is None else a.grad for a in args]))
    (y, grads), (y_ref, grads_ref) = outs
    if grad_oracle is not selective_scan_ref:
        with torch.no_grad():
            y_ref = selective_scan_ref(*inputs, delta_softplus=softplus)
    problems = []
    if y.dtype != inputs[0].dtype or y.shape != inputs[0].shape or not torch.isfinite(y.float()).all():
        problems.append(f'y: dtype {y.dtype}, shape {tuple(y.shape)}, finite {bool(torch.isfinite(y.float()).all())}')
    errors = {'y': rel_err(y, y_ref)}
    for name, t, g, g_ref in zip(NAMES, inputs, grads, grads_ref):
        if t is None:
            if g is not None:
                problems.append(f'd{name}: gradient for an absent input')
            continue
        if g is None or g.shape != t.shape or g.dtype != t.dtype or not torch.isfinite(g.float()).all():
            problems.append(f'd{name}: missing, misshapen, wrong dtype or not finite')
            continue
        errors['d' + name] = rel_err(g, g_ref)
    return {'errors': errors, 'problems': problems}


# ----------------------------------------------------------------------------- kernel cases

# (batch, channels, length, state, block_d, block_l); None keeps the default launch config
FP32_SHAPES = {
    'one_token': (1, 3, 1, 4, None, None),
    'odd_small': (2, 5, 7, 4, None, None),           # odd channels and length, one chunk
    'window_7x7': (1, 7, 49, 8, None, None),         # default tiles: two chunks of 32
    'many_blocks': (1, 10, 37, 4, 4, 8),             # 3 channel blocks, 5 chunks, ragged last chunk
    'wide_ragged': (1, 19, 70, 2, 16, 32),           # ragged channel block and chunk, 70 tokens
    'tokens_197': (1, 3, 197, 4, 4, 64),             # four chunks
    'odd_state': (1, 9, 24, 3, 4, 8),                # N=3 padded to 4; L a multiple of the chunk
}
OPTIONAL = {  # has_d, has_bias, softplus
    'no_d_no_bias': (False, False, True),
    'd_only': (True, False, True),
    'bias_only': (False, True, True),
    'no_softplus': (True, True, False),
    'bare': (False, False, False),
}
LOW_PRECISION_SHAPES = {'blocks': (2, 7, 19, 4, 4, 8), 'default_tiles': (1, 5, 49, 8, None, None)}
# the two-pass (segmented) scan, forced on small shapes: (batch, channels, length, state, block_d, block_l, seg_len)
SEGMENTED_SHAPES = {
    'ragged': (2, 10, 70, 4, 4, 8, 16),          # 5 segments, the last one ragged; 3 channel blocks
    'chunk_per_segment': (1, 5, 37, 3, 4, 8, 8),  # every chunk its own segment; N=3 padded to 4
}
# a detection model's stage-3 window (112 x 112 tokens); 2 channels and 2 states, since the interpreter's
# associative_scan steps through every tile element in Python
LONG_WINDOW = (1, 2, 12544, 2)


def _case_fp32(name):
    batch, dim, seqlen, dstate, block_d, block_l = FP32_SHAPES[name]
    torch.manual_seed(1000 + seqlen * 7 + dim)
    return compare(make_inputs(batch, dim, seqlen, dstate), block_d=block_d, block_l=block_l)


def _case_optional(name):
    has_d, has_bias, softplus = OPTIONAL[name]
    torch.manual_seed(7 + 2 * has_d + has_bias + 4 * softplus)
    inputs = make_inputs(1, 7, 23, 4, has_d=has_d, has_bias=has_bias, softplus=softplus)
    return compare(inputs, softplus, block_d=4, block_l=8)


def _case_extreme():
    """softplus branches (z > 20, tiny e^z) and decays that underflow to zero."""
    torch.manual_seed(3)
    inputs = list(make_inputs(1, 8, 40, 4))
    inputs[1] = torch.linspace(-30.0, 30.0, 8 * 40).reshape(1, 8, 40)[:, :, torch.randperm(40)]
    inputs[2] = inputs[2] * 5.0  # A down to -16
    return compare(inputs, block_l=16)


def _case_low_precision(dtype_name, shape_name):
    """bf16 / fp16 u, delta, B, C, compared with the reference on the same rounded inputs."""
    batch, dim, seqlen, dstate, block_d, block_l = LOW_PRECISION_SHAPES[shape_name]
    torch.manual_seed(11 + seqlen)
    inputs = make_inputs(batch, dim, seqlen, dstate, dtype=getattr(torch, dtype_name))
    return compare(inputs, block_d=block_d, block_l=block_l)


def _case_segmented(name):
    batch, dim, seqlen, dstate, block_d, block_l, seg_len = SEGMENTED_SHAPES[name]
    torch.manual_seed(20 + seqlen)
    return compare(make_inputs(batch, dim, seqlen, dstate), block_d=block_d, block_l=block_l, seg_len=seg_len)


def _case_long_window():
    """L = 12,544 with the default launch config, which must choose the segmented scan here. Gradients
    against the torch backend, a sequential loop checked against the reference in test_scan.py
    (the reference's own backward is quadratic in L: minutes here)."""
    batch, dim, seqlen, dstate = LONG_WINDOW
    torch.manual_seed(12544)
    inputs = make_inputs(batch, dim, seqlen, dstate)
    cfg = triton_scan._launch_config(batch, dim, seqlen, dstate, inputs[0].device)
    n_chunks = -(-seqlen // cfg.block_l)
    result = compare(inputs, grad_oracle=selective_scan_torch)
    if not (cfg.seg_chunks_fwd < n_chunks and cfg.seg_chunks_bwd < n_chunks):
        result['problems'].append(f'one segment for {LONG_WINDOW}: {cfg}')
    return result


def _case_nan_step(seg_len):
    """A NaN step size makes the outputs NaN from its token on in its channel, as in the reference."""
    torch.manual_seed(9)
    u, delta, A, B, C, D, bias = make_inputs(1, 6, 21, 4)
    delta[0, 1, 5] = delta[0, 4, 0] = delta[0, 5, 20] = float('nan')
    with torch.no_grad():
        y = selective_scan_triton(u, delta, A, B, C, D, bias, True, block_d=4, block_l=8, seg_len=seg_len)
        y_ref = selective_scan_ref(u, delta, A, B, C, D, bias, True)
    nan, nan_ref = torch.isnan(y), torch.isnan(y_ref)
    problems = []
    if not nan_ref.any() or not torch.equal(nan, nan_ref):
        problems.append(f'NaN outputs: {int(nan.sum())} from Triton, {int(nan_ref.sum())} from the reference')
    return {'errors': {'y': rel_err(y[~nan_ref], y_ref[~nan_ref])}, 'problems': problems}


def _case_strided():
    """Strided views (as splits and transposes in the model produce) are read in place."""
    torch.manual_seed(5)
    batch, dim, seqlen, dstate = 2, 6, 21, 4
    u = torch.randn(batch, seqlen, dim).transpose(1, 2)                       # stride 1 on D
    delta = (torch.randn(batch, dim, 2 * seqlen) - 1.0)[:, :, ::2]            # stride 2 on L
    x_dbl = torch.randn(batch, 3 * dstate, seqlen)
    B, C = x_dbl[:, dstate:2 * dstate], x_dbl[:, 2 * dstate:]                 # channel slices
    A = -(0.2 + torch.rand(dstate, dim)).t()                                  # (D, N) transposed
    inputs = (u, delta, A, B, C, torch.randn(dim), torch.randn(dim))
    result = compare(inputs, block_d=4, block_l=8)
    if any(t.is_contiguous() for t in inputs[:5]):
        result['problems'].append('an input meant to be strided is contiguous')
    return result


def _case_no_grad_and_partial():
    """No saved states under no_grad; gradients only for the inputs that ask for them."""
    torch.manual_seed(6)
    u, delta, A, B, C, D, bias = make_inputs(1, 5, 13, 4)
    with torch.no_grad():
        y = selective_scan_triton(u, delta, A, B, C, D, bias, True, block_l=4)
    errors = {'y': rel_err(y, selective_scan_ref(u, delta, A, B, C, D, bias, True))}
    u2, C2 = u.clone().requires_grad_(), C.clone().requires_grad_()
    selective_scan_triton(u2, delta, A, B, C2, D, bias, True, block_l=4).sum().backward()
    u3, C3 = u.clone().requires_grad_(), C.clone().requires_grad_()
    selective_scan_ref(u3, delta, A, B, C3, D, bias, True).sum().backward()
    errors.update(du=rel_err(u2.grad, u3.grad), dC=rel_err(C2.grad, C3.grad))
    return {'errors': errors, 'problems': []}


def _case_dispatcher():
    """selective_scan(..., backend='triton') loads this backend and runs it."""
    torch.manual_seed(8)
    inputs = make_inputs(1, 4, 9, 4)
    y = selective_scan(*inputs, delta_softplus=True, backend='triton')
    return {'errors': {'y': rel_err(y, selective_scan_ref(*inputs))}, 'problems': []}


def kernel_cases():
    """name -> (zero-argument case function, tolerance)."""
    cases = {f'fp32/{n}': (lambda n=n: _case_fp32(n), FP32_TOL) for n in FP32_SHAPES}
    cases.update({f'optional/{n}': (lambda n=n: _case_optional(n), FP32_TOL) for n in OPTIONAL})
    cases['fp32/extreme_steps'] = (_case_extreme, FP32_TOL)
    for dt, tol in LOW_PRECISION_TOL.items():
        for n in LOW_PRECISION_SHAPES:
            cases[f'{dt}/{n}'] = (lambda dt=dt, n=n: _case_low_precision(dt, n), tol)
    cases['fp32/strided'] = (_case_strided, FP32_TOL)
    cases.update({f'segmented/{n}': (lambda n=n: _case_segmented(n), FP32_TOL) for n in SEGMENTED_SHAPES})
    cases['segmented/long_window_12544'] = (_case_long_window, FP32_TOL)
    cases['nan/step_size'] = (lambda: _case_nan_step(None), FP32_TOL)
    cases['nan/step_size_segmented'] = (lambda: _case_nan_step(8), FP32_TOL)
    cases['fp32/no_grad_and_partial'] = (_case_no_grad_and_partial, FP32_TOL)
    cases['fp32/dispatcher'] = (_case_dispatcher, FP32_TOL)
    return cases


def _worker_main():
    """Run every kernel case here and print {name: result or {'exception': traceback}} as JSON."""
    from triton.runtime.interpreter import InterpretedFunction
    assert isinstance(triton_scan._scan_fwd_kernel, InterpretedFunction), 'kernels are not interpreted'
    results = {}
    for name, (fn, _) in kernel_cases().items():
        try:
            results[name] = fn()
        except Exception:
            results[name] = {'exception': traceback.format_exc()}
    print('RESULTS ' + json.dumps(results))


@pytest.fixture(scope='module')
def worker_results():
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('RESULTS ')]
    if proc.returncode != 0 or not lines:
        pytest.fail(f'worker failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}')
    return json.loads(lines[-1][len('RESULTS '):])


@pytest.mark.parametrize('case', list(kernel_cases()))
def test_kernel_matches_reference(case, worker_results):
    """Forward and all gradients within tolerance of selective_scan_ref (errors relative to max |ref|)."""
    result = worker_results[case]
    assert 'exception' not in result, result.get('exception')
    assert not result['problems'], result['problems']
    tol = kernel_cases()[case][1]
    bad = {k: v for k, v in result['errors'].items() if not v <= tol}
    assert not bad, f'{case}: errors above {tol}: {bad} (all: {result["errors"]})'


# ----------------------------------------------------------------------------- no kernel launched

def test_bad_arguments(monkeypatch):
    monkeypatch.setattr(triton_scan, '_check_device', lambda *tensors: None)  # CPU tensors, no interpreter here
    u, delta, A, B, C, D, bias = make_inputs(1, 4, 9, 4)
    with pytest.raises(ValueError):
        selective_scan_triton(u, delta, A, B[:, :, :5], C, D, bias)
    with pytest.raises(ValueError):
        selective_scan_triton(u, delta, A, B, C, D[:3], bias)
    with pytest.raises(ValueError):
        selective_scan_triton(u, delta, A, B, C, D, bias, block_l=6)
    with pytest.raises(ValueError, match='seg_len'):
        selective_scan_triton(u, delta, A, B, C, D, bias, block_l=4, seg_len=6)


def test_kernels_launch_inside_the_tensors_device_context(monkeypatch):
    """Triton launches on the current CUDA device, not the tensors': every launch (forward, backward,
    their segment passes) must run inside torch.cuda.device_of(u). Mocked context and kernels."""
    launches, entered = [], []

    class DeviceOf:
        def __init__(self, obj):
            self.device = obj.device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.pop()

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, list(entered)))

    monkeypatch.setattr(torch.cuda, 'device_of', DeviceOf)
    monkeypatch.setattr(triton_scan, '_check_device', lambda *tensors: None)
    kernels = ('_scan_fwd_kernel', '_scan_bwd_kernel', '_segment_carry_kernel')
    for name in kernels:
        monkeypatch.setattr(triton_scan, name, Kernel(name))
    u, delta, A, B, C, D, bias = make_inputs(2, 6, 40, 4)
    _, states = triton_scan.triton_scan_fwd(u, delta, A, B, C, D, bias, block_l=8, seg_len=16, save=True)
    triton_scan.triton_scan_bwd(torch.randn_like(u), states, u, delta, A, B, C, D, bias, block_l=8, seg_len=16)
    assert {name for name, _ in launches} == set(kernels)
    assert all(devices == [u.device] for _, devices in launches), launches


def test_imports_without_triton(monkeypatch):
    """With triton unimportable the module still imports; calling it raises RuntimeError."""
    monkeypatch.setitem(sys.modules, 'triton', None)
    spec = importlib.util.spec_from_file_location('_triton_scan_without_triton', triton_scan.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.HAS_TRITON is False
    with pytest.raises(RuntimeError, match='triton'):
        module.selective_scan_triton(*make_inputs(1, 2, 3, 2))


if __name__ == '__main__':
    _worker_main()
