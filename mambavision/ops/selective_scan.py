"""Selective scan (Mamba-1 SSM recurrence) with interchangeable backends, dispatched per call.

Shapes and the recurrence: the module doc of ``torch_scan``, which holds the pure-PyTorch scans.

Every backend computes in float32 (autocast is switched off around it) and returns
the dtype of ``u``. On CUDA, bf16 / fp16 ``u``, ``delta``, ``B``, ``C`` reach the backend as
they are (the kernels read them and compute in float32, and autograd saves them at half the
size); on the CPU they are cast to float32 first, which the C kernel wants. Backends:

* ``reference``: ``torch_scan.selective_scan_ref``, a sequential loop over time, the test oracle.
* ``torch``: ``torch_scan.selective_scan_torch``, pure PyTorch, whole-tensor discretisation and
  readout around one in-place sweep over time (a reverse sweep in the backward). Default wherever
  no kernel applies.
* ``cpu_kernel``: our C kernels of ``cpu_scan`` (forward and backward), for CPU tensors,
  when a C compiler on the machine could build them.
* ``triton``: the Triton kernels of ``triton_scan``, for CUDA tensors, when Triton imports.
  Chosen automatically, a configuration whose kernels fail at their first call (compile,
  resources, driver) falls back to ``torch`` with one warning, and stays there
  (``triton_failures``).
* ``mamba_ssm``: mamba-ssm's compiled CUDA kernel, for CUDA tensors, when it imports.

The backend is picked per call from the device; ``set_scan_backend`` or the
environment variable ``MAMBAVISION_SCAN`` force one. ``selective_scan`` runs as the
custom op ``torch.ops.mambavision.selective_scan`` (with its backward op
``mambavision::selective_scan_backward``), which torch.compile and torch.export keep
as one node; the pure-PyTorch backends get their backward by recomputation.
"""
import os
import warnings
from typing import Callable, Dict, Optional, Set, Tuple, cast

import torch

from .torch_scan import selective_scan_graph, selective_scan_ref, selective_scan_torch, vjp_backward

__all__ = [
    'selective_scan', 'selective_scan_ref', 'selective_scan_torch', 'available_scan_backends',
    'set_scan_backend', 'get_scan_backend', 'resolve_scan_backend', 'SCAN_BACKENDS', 'selective_scan_graph',
    'triton_failures', 'probe_scan_backend',
]

ENV_VAR = 'MAMBAVISION_SCAN'
SCAN_BACKENDS = ('auto', 'reference', 'torch', 'cpu_kernel', 'triton', 'mamba_ssm')


def _mamba_ssm_backend() -> Optional[Tuple[Callable, Callable]]:
    """(forward, backward) on mamba-ssm's compiled CUDA extension, or None when it cannot be imported."""
    try:  # a broken install (wrong torch ABI, missing symbols) may raise anything
        import selective_scan_cuda as ext
    except Exception:
        return None
    # newer mamba-ssm releases append optional arguments (e.g. cu_seqlens): pass None for them
    extra_fwd = [None] * max(0, (ext.fwd.__doc__ or '').split('->')[0].count('arg') - 9)
    extra_bwd = [None] * max(0, (ext.bwd.__doc__ or '').split('->')[0].count('arg') - 14)

    def forward(u, delta, A, B, C, D, delta_bias, delta_softplus):
        out, x, *_ = ext.fwd(
            u.contiguous(), delta.contiguous(), A.contiguous(), B.unsqueeze(1).contiguous(),
            C.unsqueeze(1).contiguous(), D, None, delta_bias, delta_softplus, *extra_fwd)
        return out

    def backward(dy, u, delta, A, B, C, D, delta_bias, delta_softplus):
        u, delta, A = u.contiguous(), delta.contiguous(), A.contiguous()
        B, C = B.unsqueeze(1).contiguous(), C.unsqueeze(1).contiguous()
        # the chunk states of the forward are only needed beyond one 2048-token chunk
        x = None if u.shape[-1] <= 2048 else ext.fwd(
            u, delta, A, B, C, D, None, delta_bias, delta_softplus, *extra_fwd)[1]
        du, ddelta, dA, dB, dC, dD, ddelta_bias, *_ = ext.bwd(
            u, delta, A, B, C, D, None, delta_bias, dy.contiguous(), x, None, None, delta_softplus, False,
            *extra_bwd)
        return du, ddelta, dA, dB.squeeze(1).to(B.dtype), dC.squeeze(1).to(C.dtype), dD, ddelta_bias
    return forward, backward


def _triton_backend() -> Optional[Tuple[Callable, Callable]]:
    """(forward, backward) on the Triton kernels, or None when they cannot be imported."""
    try:
        from .triton_scan import HAS_TRITON, selective_scan_triton, triton_scan_bwd, triton_scan_fwd
    except Exception:
        return None

    def backward(dy, u, delta, A, B, C, D, delta_bias, delta_softplus):
        # the forward op keeps no chunk states: the forward kernel runs again to save them
        _, states = triton_scan_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, save=True)
        return triton_scan_bwd(dy, states, u, delta, A, B, C, D, delta_bias, delta_softplus)
    return (selective_scan_triton, backward) if HAS_TRITON else None


def _cpu_kernel_backend() -> Optional[Tuple[Callable, Callable]]:
    """(forward, backward) on our C kernels, or None when they could not be built."""
    from .cpu_scan import load, selective_scan_cpu, selective_scan_cpu_backward
    return (selective_scan_cpu, selective_scan_cpu_backward) if load() is not None else None


_loaded: Dict[str, Optional[Tuple[Callable, Callable]]] = {}
_forced: Optional[str] = None


def _load(name: str) -> Optional[Tuple[Callable, Callable]]:
    """The backend's (forward, backward) on the op's tensors, or None when it cannot run here (imports it once).

    forward(u, delta, A, B, C, D, delta_bias, delta_softplus) -> y;
    backward(dy, u, delta, A, B, C, D, delta_bias, delta_softplus) -> (du, ddelta, dA, dB, dC, dD, ddelta_bias).
    """
    if name not in _loaded:
        if name == 'mamba_ssm':
            _loaded[name] = _mamba_ssm_backend()
        elif name == 'triton':
            _loaded[name] = _triton_backend()
        elif name == 'cpu_kernel':
            _loaded[name] = _cpu_kernel_backend()
        else:
            fn = {'reference': selective_scan_ref, 'torch': selective_scan_torch}[name]
            _loaded[name] = fn, vjp_backward(fn)
    return _loaded[name]


def _check_backend_name(name: str) -> str:
    name = name.strip().lower()
    if name not in SCAN_BACKENDS:
        raise ValueError(f"unknown scan backend {name!r}; expected one of {', '.join(SCAN_BACKENDS)}")
    return name


def set_scan_backend(name: Optional[str]) -> None:
    """Force a backend for every scan (``None`` or ``'auto'``: choose per device again)."""
    global _forced
    _forced = None if name is None or _check_backend_name(name) == 'auto' else _check_backend_name(name)


def get_scan_backend() -> str:
    """The forced backend (``set_scan_backend``, else ``$MAMBAVISION_SCAN``), or ``'auto'``."""
    if _forced is not None:
        return _forced
    return _check_backend_name(os.environ.get(ENV_VAR, 'auto') or 'auto')


def available_scan_backends(device_type: str = 'cpu') -> list:
    """Backends that can run on tensors of ``device_type``, fastest first."""
    names = ['mamba_ssm', 'triton'] if device_type == 'cuda' else ['cpu_kernel'] if device_type == 'cpu' else []
    return [n for n in names if _load(n) is not None] + ['torch', 'reference']


def resolve_scan_backend(device_type: str = 'cpu') -> str:
    """The backend a scan on ``device_type`` uses now."""
    name = get_scan_backend()
    if name == 'auto':
        return available_scan_backends(device_type)[0]
    if name not in available_scan_backends(device_type):
        raise RuntimeError(
            f"scan backend {name!r} cannot run on {device_type} here; "
            f"available: {', '.join(available_scan_backends(device_type))}")
    return name


_triton_failed: Dict[str, str] = {}  # kernel configuration -> the error of its first call
_triton_ran: Set[Tuple[str, str]] = set()  # (pass, kernel configuration) that ran once


def triton_failures() -> Dict[str, str]:
    """Triton kernel configurations (``triton_scan.kernel_config``) that failed at their first call
    in this process, with the error; their scans run on the ``torch`` backend."""
    return dict(_triton_failed)


def _first_call_fallback(kind: str, triton_fn: Callable, torch_fn: Callable) -> Callable:
    """``triton_fn``, or ``torch_fn`` for configurations whose Triton kernels failed at their first call.

    ``kind`` ('forward' / 'backward') names the pass: each configuration's first call of each pass
    may fall back (one warning per configuration); an error after a pass has run once is raised.
    """
    from .triton_scan import kernel_config

    def run(*args):
        tensors = args if kind == 'forward' else args[1:]  # the backward takes dy first
        config = kernel_config(*tensors)
        if config in _triton_failed:
            return torch_fn(*args)
        if (kind, config) in _triton_ran:
            return triton_fn(*args)
        try:
            out = triton_fn(*args)
        except Exception as e:
            _triton_failed[config] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            warnings.warn(f'Triton scan failed at its first {kind} call ({config}): {_triton_failed[config]}; '
                          'this configuration runs the torch backend from now on', RuntimeWarning, stacklevel=2)
            return torch_fn(*args)
        _triton_ran.add((kind, config))
        return out
    return run


def _backend_fns(backend: str, device_type: str) -> Tuple[Callable, Callable]:
    """(forward, backward) of ``backend``; ``'auto'`` resolves it for ``device_type`` now (an automatic
    Triton falls back to torch where its first call fails)."""
    name = resolve_scan_backend(device_type) if backend == 'auto' else backend
    fns = _load(name)
    if fns is None:
        raise RuntimeError(f'scan backend {name!r} is not installed')
    if backend == 'auto' and name == 'triton':
        torch_fns = _load('torch')
        assert torch_fns is not None  # the torch backend runs everywhere
        (forward, backward), (torch_forward, torch_backward) = fns, torch_fns
        return (_first_call_fallback('forward', forward, torch_forward),
                _first_call_fallback('backward', backward, torch_backward))
    return fns


def probe_scan_backend(device='cuda') -> Dict[str, str]:
    """Run a small float32 scan, forward and backward, on ``device`` through the automatic backend,
    so that a Triton configuration that cannot run there is found now; returns ``triton_failures()``."""
    g = torch.Generator().manual_seed(0)
    u, delta, B, C = (torch.randn(s, generator=g).to(device) for s in ((1, 4, 64), (1, 4, 64), (1, 2, 64), (1, 2, 64)))
    A, D, bias = -torch.ones(4, 2, device=device), torch.ones(4, device=device), torch.zeros(4, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        u.requires_grad_()
        selective_scan(u, delta, A, B, C, D, bias, True).sum().backward()
    return triton_failures()


# The scan as one PyTorch op, so that torch.compile and torch.export keep it whole (no graph
# break, no tracing into a backend) and autograd reaches every backend's own backward. Both ops
# take float32 A, D, delta_bias, and u, delta, B, C of one dtype (float32, or bf16 / fp16 on
# CUDA); every gradient has its input's dtype. ``backend`` is a name or 'auto' (resolved when the
# op runs, so compiled and exported graphs follow ``set_scan_backend`` and the device they run on).

@torch.library.custom_op('mambavision::selective_scan', mutates_args=())
def _scan_op(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], delta_softplus: bool, backend: str,
) -> torch.Tensor:
    forward, _ = _backend_fns(backend, u.device.type)
    return forward(u, delta, A, B, C, D, delta_bias, delta_softplus).contiguous()


@_scan_op.register_fake
def _scan_fake(u, delta, A, B, C, D, delta_bias, delta_softplus, backend):
    return u.new_empty(u.shape)


_Grads = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op('mambavision::selective_scan_backward', mutates_args=())
def _scan_backward_op(
        dy: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
        C: torch.Tensor, D: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], delta_softplus: bool,
        backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of every input of ``selective_scan``; an empty tensor for an absent D / delta_bias."""
    _, backward = _backend_fns(backend, u.device.type)
    grads = backward(dy, u, delta, A, B, C, D, delta_bias, delta_softplus)
    return cast(_Grads, tuple(dy.new_empty(0) if g is None else g.contiguous() for g in grads))  # seven, as backward's


@_scan_backward_op.register_fake
def _scan_backward_fake(dy, u, delta, A, B, C, D, delta_bias, delta_softplus, backend):
    return tuple(dy.new_empty(0) if t is None else t.new_empty(t.shape) for t in (u, delta, A, B, C, D, delta_bias))


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, delta_softplus, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
    ctx.delta_softplus, ctx.backend = delta_softplus, backend


def _scan_backward(ctx, dy):
    saved = ctx.saved_tensors
    grads = torch.ops.mambavision.selective_scan_backward(dy, *saved, ctx.delta_softplus, ctx.backend)
    return (*(None if t is None else g for g, t in zip(grads, saved)), None, None)


_scan_op.register_autograd(_scan_backward, setup_context=_scan_setup_context)


def _check_shapes(u, delta, A, B, C, D, delta_bias):
    shapes = [tuple(t.shape) if t is not None else None for t in (u, delta, A, B, C, D, delta_bias)]
    if u.ndim != 3 or A.ndim != 2 or shapes[1] != shapes[0] or A.shape[0] != u.shape[1] \
            or shapes[3] != (u.shape[0], A.shape[1], u.shape[2]) or shapes[4] != shapes[3] \
            or any(s is not None and s != (u.shape[1],) for s in shapes[5:]):
        raise ValueError(
            'selective_scan expects u, delta (B, D, L), A (D, N), B, C (B, N, L), D and delta_bias (D,) or None; '
            f'got shapes {", ".join(map(str, shapes))}')


def _io_dtype(u, delta, B, C) -> torch.dtype:
    """The dtype u, delta, B and C enter the op in: their own where they share bf16 or fp16 on CUDA (as
    autocast makes them; every CUDA backend reads it and computes in float32), else float32."""
    dtypes = {t.dtype for t in (u, delta, B, C)}
    if u.device.type == 'cuda' and len(dtypes) == 1 and u.dtype in (torch.bfloat16, torch.float16):
        return u.dtype
    return torch.float32


def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, backend=None):
    """Selective scan through ``backend`` (default: ``resolve_scan_backend``). Shapes: ``torch_scan``'s module doc.

    Runs the op ``torch.ops.mambavision.selective_scan`` on float32 A, D, delta_bias and on u, delta,
    B, C in ``_io_dtype`` (float32, or their own bf16 / fp16 on CUDA) and returns u's dtype. Inside
    a TorchScript-based ONNX export it is ``selective_scan_graph`` (standard ops) instead, whatever
    ``backend`` says.
    """
    if torch.onnx.is_in_onnx_export():  # ONNX graphs are built from standard ops only
        return selective_scan_graph(u, delta, A, B, C, D, delta_bias, delta_softplus)
    name = 'auto' if backend is None else _check_backend_name(backend)
    _check_shapes(u, delta, A, B, C, D, delta_bias)
    io = _io_dtype(u, delta, B, C)
    y = torch.ops.mambavision.selective_scan(
        u.to(io), delta.to(io), A.float(), B.to(io), C.to(io), None if D is None else D.float(),
        None if delta_bias is None else delta_bias.float(), bool(delta_softplus), name)
    return y.to(u.dtype)
