"""Selective scan (Mamba-1 SSM recurrence) with interchangeable backends.

Shapes, as in mamba-ssm's ``selective_scan_fn``:

    u, delta:  (B, D, L)   input and step size per channel and token
    A:         (D, N)      state matrix (negative real)
    B, C:      (B, N, L)   input-dependent projections, shared over channels
    D:         (D,)        skip, optional
    delta_bias:(D,)        added to ``delta`` before the softplus, optional
    returns y: (B, D, L)

For every channel d and state n, with h_0 = 0 and dt = softplus(delta + delta_bias):

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t
    y_t = sum_n h_t[n] * C_t[n] + D * u_t

Every backend computes in float32 (autocast is switched off around it) and returns
the dtype of ``u``. Backends:

* ``reference``: sequential loop over time, the test oracle.
* ``torch``: pure PyTorch, all work vectorised; the recurrence runs as a log-depth
  (Hillis-Steele) scan over time. Default wherever no kernel applies.
* ``mamba_ssm``: mamba-ssm's compiled CUDA kernel, for CUDA tensors, when it imports.

The backend is picked per call from the device; ``set_scan_backend`` or the
environment variable ``MAMBAVISION_SCAN`` force one.
"""
import os
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

__all__ = [
    'selective_scan', 'selective_scan_ref', 'selective_scan_torch', 'available_scan_backends',
    'set_scan_backend', 'get_scan_backend', 'resolve_scan_backend', 'SCAN_BACKENDS',
]

ENV_VAR = 'MAMBAVISION_SCAN'
SCAN_BACKENDS = ('auto', 'reference', 'torch', 'triton', 'mamba_ssm')


def _discretize(u, delta, A, B, delta_bias, delta_softplus):
    """float32 (dA, dBu), each (B, D, L, N): the per-step decay and input of the recurrence."""
    u, delta, A, B = u.float(), delta.float(), A.float(), B.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dA = torch.exp(delta.unsqueeze(-1) * A[:, None, :])
    dBu = (delta * u).unsqueeze(-1) * B.float().transpose(1, 2).unsqueeze(1)
    return dA, dBu


def _add_skip(y, u, D):
    """y + D * u in float32, returned in the dtype of u."""
    if D is not None:
        y = y + D.float()[:, None] * u.float()
    return y.to(u.dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """Sequential float32 reference: one recurrence step and readout per token (shapes: module doc)."""
    with torch.autocast(u.device.type, enabled=False):
        dA, dBu = _discretize(u, delta, A, B, delta_bias, delta_softplus)
        C = C.float()
        h = dA.new_zeros(dA.shape[:2] + dA.shape[3:])
        ys = []
        for t in range(u.shape[-1]):
            h = dA[:, :, t] * h + dBu[:, :, t]
            ys.append(torch.einsum('bdn,bn->bd', h, C[:, :, t]))
        return _add_skip(torch.stack(ys, dim=-1), u, D)


def selective_scan_torch(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """Vectorised float32 scan: ceil(log2 L) whole-tensor steps (shapes: module doc).

    Composes the affine maps h -> a*h + b over doubling distances: after the step at
    distance k, (a_t, b_t) is the map from h_{t-2k} to h_t. Only products of decays
    in (0, 1] are formed, so it is as stable as the sequential loop.
    """
    with torch.autocast(u.device.type, enabled=False):
        a, b = _discretize(u, delta, A, B, delta_bias, delta_softplus)
        length = u.shape[-1]
        k = 1
        while k < length:
            b = torch.cat([b[:, :, :k], torch.addcmul(b[:, :, k:], a[:, :, k:], b[:, :, :-k])], dim=2)
            if 2 * k < length:  # the last step needs no decays
                a = torch.cat([a[:, :, :k], a[:, :, k:] * a[:, :, :-k]], dim=2)
            k *= 2
        return _add_skip(torch.einsum('bdln,bnl->bdl', b, C.float()), u, D)


def _mamba_ssm_scan() -> Optional[Callable]:
    """mamba-ssm's CUDA ``selective_scan_fn``, or None when it cannot be imported."""
    try:  # a broken install (wrong torch ABI, missing Triton) may raise anything
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:
        return None
    return selective_scan_fn


def _mamba_ssm_backend(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    with torch.autocast(u.device.type, enabled=False):
        y = _loaded['mamba_ssm'](
            u.contiguous(), delta.contiguous(), A.float().contiguous(), B.contiguous(), C.contiguous(),
            None if D is None else D.float(), z=None,
            delta_bias=None if delta_bias is None else delta_bias.float(), delta_softplus=delta_softplus)
    return y.to(u.dtype)


_loaded: Dict[str, Optional[Callable]] = {}
_forced: Optional[str] = None


def _load(name: str) -> Optional[Callable]:
    """The backend's function, or None when it cannot run here (imports it once)."""
    if name not in _loaded:
        if name == 'mamba_ssm':
            _loaded[name] = _mamba_ssm_scan()
        elif name == 'triton':
            try:
                from .triton_scan import selective_scan_triton
            except Exception:
                selective_scan_triton = None
            _loaded[name] = selective_scan_triton
        else:
            _loaded[name] = {'reference': selective_scan_ref, 'torch': selective_scan_torch}[name]
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
    names = ['mamba_ssm', 'triton'] if device_type == 'cuda' else []
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


def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, backend=None):
    """Selective scan through ``backend`` (default: ``resolve_scan_backend``). Shapes: module doc."""
    name = resolve_scan_backend(u.device.type) if backend is None else _check_backend_name(backend)
    fn = _mamba_ssm_backend if name == 'mamba_ssm' else _load(name)
    if fn is None:
        raise RuntimeError(f'scan backend {name!r} is not installed')
    return fn(u, delta, A, B, C, D, delta_bias, delta_softplus)
