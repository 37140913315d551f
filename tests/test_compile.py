"""The selective scan as the custom op ``mambavision::selective_scan``: registration, opcheck,
gradients, and the model under torch.compile (no graph break) and torch.export.

Fast tests compile with the 'aot_eager' backend: it runs Dynamo (graph capture, where
graph breaks happen) and AOTAutograd (fake tensors and the op's autograd formula) without
Inductor's C++ compile, which takes a minute on a small CPU; the Inductor run is slow.
"""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mambavision
from mambavision.ops.selective_scan import selective_scan, selective_scan_ref

scan_module = importlib.import_module('mambavision.ops.selective_scan')

NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'delta_bias')


def make_inputs(batch=2, channels=6, length=13, state=4, dtype=torch.float32, seed=0):
    """(u, delta, A, B, C, D, delta_bias) as the mixer makes them (delta pre-softplus, A < 0)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, channels, length, generator=g)
    delta = torch.randn(batch, channels, length, generator=g) - 1
    A = -torch.rand(channels, state, generator=g) * 2 - 0.1
    B = torch.randn(batch, state, length, generator=g)
    C = torch.randn(batch, state, length, generator=g)
    D = torch.randn(channels, generator=g)
    delta_bias = torch.randn(channels, generator=g) * 0.5
    return [t.to(dtype) for t in (u, delta, A, B, C, D, delta_bias)]


def test_ops_are_registered_and_used():
    assert hasattr(torch.ops.mambavision, 'selective_scan')
    assert hasattr(torch.ops.mambavision, 'selective_scan_backward')
    args = make_inputs()
    y = torch.ops.mambavision.selective_scan(*args, True, 'torch')
    torch.testing.assert_close(selective_scan(*args, backend='torch'), y, rtol=0, atol=0)
    torch.testing.assert_close(y, selective_scan_ref(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('backend', ['auto', 'torch', 'reference'])
@pytest.mark.parametrize('optional', ['D+bias', 'none', 'D only'])
def test_opcheck(backend, optional):
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch agree with the real op."""
    u, delta, A, B, C, D, bias = make_inputs()
    D, bias = {'D+bias': (D, bias), 'none': (None, None), 'D only': (D, None)}[optional]
    args = [t.requires_grad_() if t is not None else None for t in (u, delta, A, B, C, D, bias)]
    torch.library.opcheck(torch.ops.mambavision.selective_scan, (*args, True, backend))
    # The backward op is checked by hand: opcheck runs it under dispatch modes that cannot
    # look inside torch.func, which its kernel uses. Its fake kernel gives the real metadata,
    # it mutates no input and its outputs alias none (what opcheck's schema test checks).
    dy = torch.randn_like(u)
    plain = [t.detach() if t is not None else None for t in (dy, *args)]
    copies = [t.clone() if t is not None else None for t in plain]
    grads = torch.ops.mambavision.selective_scan_backward(*plain, True, backend)
    with FakeTensorMode() as mode:
        fakes = torch.ops.mambavision.selective_scan_backward(
            *[mode.from_tensor(t) if t is not None else None for t in plain], True, backend)
    for g, f in zip(grads, fakes):
        assert (g.shape, g.dtype, g.stride()) == (f.shape, f.dtype, f.stride())
    for t, c in zip(plain, copies):
        if t is not None:
            assert torch.equal(t, c)
            assert all(g.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for g in grads if g.numel())


@pytest.mark.parametrize('backend', ['torch', 'reference'])
@pytest.mark.parametrize('optional', [True, False])
@pytest.mark.parametrize('softplus', [True, False])
def test_gradients_through_the_op_match_reference(backend, optional, softplus):
    """Every input's gradient through the op (backward op) == autograd through the float64 reference."""
    inputs = make_inputs(length=21)
    if not optional:
        inputs[5:] = [None, None]
    if not softplus:
        inputs[1] = inputs[1].abs() * 0.3
    ours = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    ref = [t.double().requires_grad_() if t is not None else None for t in inputs]
    y = selective_scan(*ours, delta_softplus=softplus, backend=backend)
    y_ref = selective_scan_ref(*ref, delta_softplus=softplus)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy.double())
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-4, atol=1e-5)
    for name, a, b in zip(NAMES, ours, ref):
        if a is None:
            continue
        scale = b.grad.abs().max().item()
        err = (a.grad.double() - b.grad).abs().max().item()
        assert err <= 1e-4 * scale + 1e-6, f'd{name}: max error {err:.3g} vs max |grad| {scale:.3g}'


_TRITON_WORKER = """
import torch
from mambavision.ops.selective_scan import selective_scan, selective_scan_ref
from tests.test_compile import make_inputs
inputs = make_inputs(length=19)
ours = [t.clone().requires_grad_() for t in inputs]
ref = [t.double().requires_grad_() for t in inputs]
y = selective_scan(*ours, backend='triton')
y_ref = selective_scan_ref(*ref)
dy = torch.randn_like(y)
y.backward(dy)
y_ref.backward(dy.double())
errors = [(y.double() - y_ref).abs().max() / y_ref.abs().max()]
errors += [(a.grad.double() - b.grad).abs().max() / b.grad.abs().max() for a, b in zip(ours, ref)]
print('MAX_REL_ERROR', max(e.item() for e in errors))
"""


def test_triton_backend_through_the_op():
    """The op's forward and backward on the Triton kernels (CPU interpreter, in a fresh process:
    TRITON_INTERPRET must be set before triton is imported) match the float64 reference."""
    pytest.importorskip('triton')
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=os.pathsep.join(
        [str(repo)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, '-c', _TRITON_WORKER], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split('MAX_REL_ERROR')[1]) < 1e-5


def test_low_precision_inputs_go_through_float32():
    """bf16 in, bf16 out (computed in float32 inside the op), and bf16 gradients."""
    inputs = make_inputs()
    low = [t.bfloat16().requires_grad_() for t in inputs[:5]] + inputs[5:]
    y = selective_scan(*low)
    assert y.dtype == torch.bfloat16
    y_ref = selective_scan_ref(*[t.float() for t in low[:5]], *inputs[5:])
    torch.testing.assert_close(y.float(), y_ref.bfloat16().float(), rtol=0, atol=0)
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in low[:5])


def test_bad_shapes_raise_one_clear_error():
    u, delta, A, B, C, D, bias = make_inputs()
    with pytest.raises(ValueError, match=r'expects u, delta \(B, D, L\), A \(D, N\)'):
        selective_scan(u, delta, A, B.transpose(1, 2), C, D, bias)
    with pytest.raises(ValueError, match='D and delta_bias'):
        selective_scan(u, delta, A, B, C, D[:-1], bias)


def _test_model(**kwargs):
    """The tiny model with weights under which the scan shows, so that the model-level checks see it."""
    from conftest import scan_visible_  # here: the Triton worker process imports this module without tests/ on its path
    torch.manual_seed(0)
    return scan_visible_(timm.create_model('test_mambavision', **kwargs))


def test_model_has_no_graph_break():
    model = _test_model().eval()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_model_matches_eager_inference_and_training():
    """fullgraph compile of the whole model (odd size: window padding) gives eager's outputs and gradients."""
    torch._dynamo.reset()
    model = _test_model(drop_path_rate=0.0)
    x = torch.randn(2, 3, 61, 75)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    model.train()
    compiled(x).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert any(n.endswith('A_log') and grads[n].abs().sum() > 0 for n in grads)  # the scan's own backward ran


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager():
    torch._dynamo.reset()
    model = _test_model().eval()
    x = torch.randn(2, 3, 61, 75)
    with torch.no_grad():
        y = torch.compile(model, fullgraph=True)(x)
        expected = model(x)
    assert ((y - expected).abs().max() / expected.abs().max()).item() < 1e-4


def test_compiled_mixer_follows_the_backend_choice_at_run_time():
    """The op resolves 'auto' when it runs: a compiled graph follows set_scan_backend without recompiling."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    mixer = mambavision.MambaVisionMixer(32).eval()
    x = torch.randn(3, 16, 32)
    calls = []
    reference = scan_module._load('reference')

    def spy(*args):
        calls.append(1)
        return reference[0](*args)

    compiled = torch.compile(mixer, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        expected = mixer(x)
        compiled(x)
        assert not calls
        scan_module._loaded['reference'] = (spy, reference[1])
        try:
            mambavision.set_scan_backend('reference')
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
        finally:
            scan_module._loaded['reference'] = reference
    assert calls == [1]


def test_torch_export_program_runs():
    """torch.export keeps the scan as one op node per mixer; the program (dynamic batch) runs like eager."""
    model = _test_model().eval()
    x = torch.randn(2, 3, 64, 64)
    program = torch.export.export(model, (x,), dynamic_shapes={'x': {0: torch.export.Dim('batch')}})
    targets = [str(node.target) for node in program.graph.nodes]
    assert sum(t.startswith('mambavision.selective_scan.') for t in targets) == 2  # test_mambavision: 2 mixers
    for batch in (2, 3):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-5)
