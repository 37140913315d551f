"""The selective scan (Mamba-1 SSM recurrence) in pure PyTorch: the reference, the ``torch`` backend,
the ONNX graph form, and the backward by recomputation of either.

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

The kernels (``cpu_scan``, ``triton_scan``) and the dispatch (``selective_scan``) build on
this module, which imports none of them.
"""
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ['selective_scan_ref', 'selective_scan_torch', 'selective_scan_graph', 'vjp_backward']


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


def _scan_(a, h):
    """In place over dim 1: h_t <- a_t * h_{t-1} + h_t, so inputs b become states h. (B, L, ...) -> h."""
    states = h.unbind(1)  # views made in one call: the loop's cost at small sizes is per-op overhead
    for a_t, h_prev, h_t in zip(a.unbind(1)[1:], states, states[1:]):
        h_t.addcmul_(a_t, h_prev)
    return h


class _LinearScan(torch.autograd.Function):
    """Differentiable ``_scan_``: (a, b) -> h, each (B, L, ...), h_t = a_t * h_{t-1} + b_t, h_0 = b_0.

    The backward is the reverse scan g_{t-1} += a_t * g_t, then da_t = g_t * h_{t-1}, db_t = g_t.
    """

    @staticmethod
    def forward(a, b):
        return _scan_(a, b.clone())

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)

    @staticmethod
    def backward(ctx, grad_h):
        a, h = ctx.saved_tensors
        g = grad_h.clone()
        grads = g.unbind(1)
        for a_t, g_t, g_prev in zip(a.unbind(1)[:0:-1], grads[:0:-1], grads[-2::-1]):
            g_prev.addcmul_(a_t, g_t)
        grad_a = torch.zeros_like(a)
        torch.mul(g[:, 1:], h[:, :-1], out=grad_a[:, 1:])
        return grad_a, g


_BLOCK_ELEMENTS = 2 ** 17  # per thread, in a (B, T, D, N) block of the inference sweep: 512 KiB stays in cache


def _softplus(x):
    """``F.softplus(x)`` to float32 rounding (and its gradient), 4x faster on CPU, whose log1p is scalar.

    log1p(z) = log(1 + z) + (z - ((1 + z) - 1)) / (1 + z) recovers what rounding 1 + z lost.
    """
    z = torch.exp(x.clamp(max=20.))
    w = 1 + z
    return torch.where(x > 20., x, torch.log(w).add_((z - (w - 1)).div_(w)))


def selective_scan_torch(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """float32 scan in whole-tensor ops around an in-place sweep over time (shapes: module doc).

    Works in (B, L, D, N) layout, in which the model's delta, B and C are contiguous.
    The sweep costs L small ops over B*D*N elements each and touches every state once
    (a log-depth scan touches them log2(L) times, slower on CPU at every MambaVision
    shape). Without autograd, time runs in blocks of ``_BLOCK_ELEMENTS`` per thread, each
    discretised, swept from the previous block's last state and read out while it is
    still in cache; with autograd it is one block, swept by ``_LinearScan``.
    """
    with torch.autocast(u.device.type, enabled=False):
        delta = delta.float().transpose(1, 2).contiguous()  # (B, L, D); a strided layout would slow every op below
        if delta_bias is not None:
            delta = delta + delta_bias.float()
        if delta_softplus:
            delta = _softplus(delta)
        A = A.float()
        du = delta * u.float().transpose(1, 2)
        B = B.float().transpose(1, 2).contiguous().unsqueeze(2)  # (B, L, 1, N)
        C = C.float().transpose(1, 2).contiguous().unsqueeze(-1)  # (B, L, N, 1)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (A, delta, du, B, C))
        length = delta.shape[1]
        step = length if grad else max(1, _BLOCK_ELEMENTS * torch.get_num_threads() // (delta.shape[0] * A.numel()))
        ys, h = [], None
        for t in range(0, length, step):
            a = torch.mul(delta[:, t:t + step, :, None], A).exp_()  # (B, T, D, N)
            b = du[:, t:t + step, :, None] * B[:, t:t + step]  # (B, T, D, N)
            if h is not None:  # carry in the previous block's last state
                b[:, 0].addcmul_(a[:, 0], h)
            states = _LinearScan.apply(a, b) if grad else _scan_(a, b)
            h = states[:, -1]
            ys.append(torch.matmul(states, C[:, t:t + step]).squeeze(-1))  # (B, T, D)
        y = torch.cat(ys, dim=1) if len(ys) > 1 else ys[0]
        return _add_skip(y.transpose(1, 2), u, D)


def vjp_backward(forward: Callable) -> Callable:
    """Backward of a differentiable scan ``forward``: recompute it under ``torch.func.vjp``.

    ``torch.func`` (not ``torch.autograd.grad``) because it also differentiates inside a
    custom op's kernel, where the autograd dispatch keys are switched off.
    """
    def backward(dy, u, delta, A, B, C, D, delta_bias, delta_softplus):
        optional = {k: t for k, t in (('D', D), ('delta_bias', delta_bias)) if t is not None}

        def scan(u, delta, A, B, C, opt):
            return forward(u, delta, A, B, C, opt.get('D'), opt.get('delta_bias'), delta_softplus)

        _, vjp = torch.func.vjp(scan, u, delta, A, B, C, optional)
        du, ddelta, dA, dB, dC, dopt = vjp(dy)
        return du, ddelta, dA, dB, dC, dopt.get('D'), dopt.get('delta_bias')
    return backward


def selective_scan_graph(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """The scan as an unrolled sweep of standard ops, for static graphs (ONNX). Shapes: module doc.

    Works in (B, L, D, N) layout: one Split gives every step's decay and input, a step is one
    multiply and one add on the (B, 1, D, N) state, one Concat and one MatMul read out. L is the
    window's token count, fixed per stage, so the graph unrolls L steps. In onnxruntime this runs
    faster than a log-depth (Hillis-Steele) scan, which passes over all B*L*D*N states log2(L)
    times (benchmarks/onnx_scan.py), and it is the reference recurrence itself.
    """
    delta = delta.float().transpose(1, 2)  # (B, L, D)
    if delta_bias is not None:
        delta = delta + delta_bias.float()
    if delta_softplus:
        delta = F.softplus(delta)
    decays = torch.exp(delta.unsqueeze(-1) * A.float()).split(1, dim=1)  # L x (B, 1, D, N)
    inputs = (delta * u.float().transpose(1, 2)).unsqueeze(-1) * B.float().transpose(1, 2).unsqueeze(2)
    inputs = inputs.split(1, dim=1)
    h = inputs[0]
    states = [h]
    for a_t, b_t in zip(decays[1:], inputs[1:]):
        h = a_t * h + b_t
        states.append(h)
    y = torch.matmul(torch.cat(states, dim=1), C.float().transpose(1, 2).unsqueeze(-1)).squeeze(-1)  # (B, L, D)
    return _add_skip(y.transpose(1, 2), u, D)
