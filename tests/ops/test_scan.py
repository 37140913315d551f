"""Selective scan: the backends against an independent float64 loop, gradients, dtypes and backend selection."""
import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F

import mambavision
from mambavision.ops import selective_scan, selective_scan_ref, selective_scan_torch, torch_scan
from mambavision.ops.cpu_scan import selective_scan_cpu

CPU_BACKENDS = mambavision.available_scan_backends('cpu')


def _inputs(batch=2, channels=5, length=7, d_state=4, seed=0, dtype=torch.float32):
    """Random scan inputs (shapes: mambavision.ops.torch_scan's module doc)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    return dict(
        u=rand(batch, channels, length).to(dtype),
        delta=(0.5 * rand(batch, channels, length)).to(dtype),
        A=-torch.exp(0.5 * rand(channels, d_state)).float(),
        B=rand(batch, d_state, length).to(dtype),
        C=rand(batch, d_state, length).to(dtype),
        D=rand(channels).float(),
        delta_bias=(0.5 * rand(channels)).float(),
    )


def _loop64(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """The recurrence written out element by element in float64."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    batch, channels, length = u.shape
    y = torch.zeros(batch, channels, length, dtype=torch.float64)
    for b in range(batch):
        for d in range(channels):
            h = torch.zeros(A.shape[1], dtype=torch.float64)
            for t in range(length):
                dt = delta[b, d, t] + (delta_bias[d].double() if delta_bias is not None else 0.)
                dt = F.softplus(dt) if delta_softplus else dt
                h = torch.exp(dt * A[d]) * h + dt * B[b, :, t] * u[b, d, t]
                y[b, d, t] = (h * C[b, :, t]).sum() + (D[d].double() * u[b, d, t] if D is not None else 0.)
    return y


@pytest.mark.parametrize('length', [1, 7, 49])
@pytest.mark.parametrize('use_d, use_bias, softplus', [(True, True, True), (False, False, True), (True, False, False)])
def test_reference_matches_float64_loop(length, use_d, use_bias, softplus):
    x = _inputs(batch=2, channels=3, length=length)
    if not softplus:
        x['delta'] = x['delta'].abs()
    kwargs = dict(D=x['D'] if use_d else None, delta_bias=x['delta_bias'] if use_bias else None,
                  delta_softplus=softplus)
    args = (x['u'], x['delta'], x['A'], x['B'], x['C'])
    y = selective_scan_ref(*args, **kwargs)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _loop64(*args, **kwargs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('length', [1, 2, 7, 49, 197])
@pytest.mark.parametrize('channels', [1, 5])
@pytest.mark.parametrize('use_d, use_bias, softplus', [(True, True, True), (False, False, True), (True, False, False)])
def test_torch_backend_matches_reference_with_gradients(length, channels, use_d, use_bias, softplus):
    x = _inputs(batch=2, channels=channels, length=length, seed=length + channels)
    if not softplus:
        x['delta'] = x['delta'].abs()
    names = ['u', 'delta', 'A', 'B', 'C'] + ['D'] * use_d + ['delta_bias'] * use_bias

    def run(fn):
        leaves = {k: x[k].clone().requires_grad_(True) for k in names}
        y = fn(leaves['u'], leaves['delta'], leaves['A'], leaves['B'], leaves['C'],
               D=leaves.get('D'), delta_bias=leaves.get('delta_bias'), delta_softplus=softplus)
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        y.backward(grad_out)
        # a gradient that does not flow (A when L == 1, since h_0 = 0) is zero
        return y.detach(), {k: torch.zeros_like(v) if v.grad is None else v.grad for k, v in leaves.items()}

    y_ref, g_ref = run(selective_scan_ref)
    y, g = run(selective_scan_torch)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert set(g) == set(names)
    for k in names:
        assert g_ref[k].abs().sum() > 0 or (k == 'A' and length == 1), k
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-4, atol=1e-4, msg=f'gradient of {k}')


@pytest.mark.parametrize('length', [1, 13, 197])
@pytest.mark.parametrize('layout', ['channels_first', 'tokens_first'])
def test_torch_backend_inference_blocks_match_reference(length, layout, monkeypatch):
    """Without autograd the sweep runs in blocks of time steps; any block size and input layout gives the same y.

    'tokens_first' passes delta, B and C as transposed views of (batch, L, channels) tensors, as the mixer does.
    """
    x = _inputs(batch=3, channels=6, length=length, d_state=4, seed=length)
    if layout == 'tokens_first':
        for k in ('delta', 'B', 'C'):
            x[k] = x[k].transpose(1, 2).contiguous().transpose(1, 2)
    y_ref = selective_scan_ref(**x)
    for block_elements in (1, 5 * 3 * 6 * 4, 2 ** 17):  # one step, five steps and all steps per block
        monkeypatch.setattr(torch_scan, '_BLOCK_ELEMENTS', block_elements)
        with torch.inference_mode():
            torch.testing.assert_close(selective_scan_torch(**x), y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('backend', CPU_BACKENDS)
def test_bf16_under_autocast_computes_in_float32(backend):
    """bf16 inputs give bf16 outputs, equal to the float32 computation on the same values, autocast or not."""
    x = _inputs(length=33, dtype=torch.bfloat16)
    y32 = selective_scan(**{k: v.float() for k, v in x.items()}, backend=backend)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = selective_scan(**x, backend=backend)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, y32.to(torch.bfloat16))


def test_float64_inputs_keep_their_dtype():
    x = _inputs(length=5, dtype=torch.float64)
    for backend in CPU_BACKENDS:
        assert selective_scan(**x, backend=backend).dtype == torch.float64


def test_backend_from_env_and_api(monkeypatch):
    assert mambavision.get_scan_backend() == 'auto'
    assert mambavision.ops.resolve_scan_backend('cpu') == CPU_BACKENDS[0]
    monkeypatch.setenv('MAMBAVISION_SCAN', 'reference')
    assert mambavision.get_scan_backend() == 'reference'
    assert mambavision.ops.resolve_scan_backend('cpu') == 'reference'
    mambavision.set_scan_backend('torch')  # the API wins over the environment
    assert mambavision.get_scan_backend() == 'torch'
    mambavision.set_scan_backend(None)
    assert mambavision.get_scan_backend() == 'reference'
    monkeypatch.delenv('MAMBAVISION_SCAN')
    mambavision.set_scan_backend('auto')
    assert mambavision.get_scan_backend() == 'auto'


def test_available_backends_on_cpu():
    assert CPU_BACKENDS[-2:] == ['torch', 'reference']
    assert 'mamba_ssm' not in CPU_BACKENDS  # a CUDA kernel
    assert set(mambavision.available_scan_backends('cuda')) >= {'torch', 'reference'}


def test_unknown_backend_is_a_value_error(monkeypatch):
    with pytest.raises(ValueError, match='unknown scan backend'):
        mambavision.set_scan_backend('cuda_fast')
    with pytest.raises(ValueError, match='unknown scan backend'):
        selective_scan(**_inputs(), backend='cuda_fast')
    monkeypatch.setenv('MAMBAVISION_SCAN', 'cuda_fast')
    with pytest.raises(ValueError, match='cuda_fast'):
        selective_scan(**_inputs())


@pytest.mark.parametrize('name', [n for n in ('mamba_ssm', 'triton') if n not in CPU_BACKENDS])
def test_forced_backend_that_cannot_run_on_cpu(name, monkeypatch):
    x = _inputs()
    mambavision.set_scan_backend(name)
    with pytest.raises(RuntimeError, match=f"'{name}' cannot run on cpu"):
        selective_scan(**x)
    mambavision.set_scan_backend(None)
    monkeypatch.setenv('MAMBAVISION_SCAN', name)
    with pytest.raises(RuntimeError, match=f"'{name}' cannot run on cpu"):
        selective_scan(**x)


def test_explicit_backend_that_is_not_installed():
    with pytest.raises(RuntimeError, match='mamba_ssm'):
        selective_scan(**_inputs(), backend='mamba_ssm')


@pytest.mark.parametrize('backend', CPU_BACKENDS)
def test_mixer_runs_the_chosen_backend(backend, monkeypatch):
    """The mixer's scan on its op path (gradients wanted; inference takes ``mixer_cpu``'s kernels, tested there)
    goes through the dispatcher and gives exactly the chosen backend's result."""
    import mambavision.model as model_module
    calls = []

    def spy(*args, **kwargs):
        y = selective_scan(*args, **kwargs)
        calls.append((args, kwargs, y))
        return y

    monkeypatch.setattr(model_module, 'selective_scan', spy)
    torch.manual_seed(0)
    mixer = mambavision.MambaVisionMixer(32)
    mambavision.set_scan_backend(backend)
    mixer(torch.randn(2, 49, 32))
    assert len(calls) == 1
    args, kwargs, y = calls[0]
    kwargs = {k: v for k, v in kwargs.items() if k != 'backend'}
    functions = {'reference': selective_scan_ref, 'torch': selective_scan_torch, 'cpu_kernel': selective_scan_cpu}
    outputs = {name: functions[name](*args, **kwargs) for name in CPU_BACKENDS}
    for a, b in itertools.combinations(outputs.values(), 2):
        assert not torch.equal(a, b), 'the backends must differ in rounding for this check to mean anything'
    assert torch.equal(y, outputs[backend])


@pytest.fixture
def broken_automatic_triton(monkeypatch):
    """The automatic backend is 'triton', whose kernels raise at every call (as a ptxas / driver failure
    would); no failure remembered yet. Returns the list of calls that reached the kernels."""
    scan_module = importlib.import_module('mambavision.ops.selective_scan')
    calls = []

    def broken(kind):
        def run(*args):
            calls.append(kind)
            raise RuntimeError(f'ptxas fatal: {kind} kernel failed to compile\nsecond line')
        return run

    monkeypatch.setattr(scan_module, 'resolve_scan_backend', lambda device_type='cpu': 'triton')
    monkeypatch.setitem(scan_module._loaded, 'triton', (broken('forward'), broken('backward')))
    monkeypatch.setattr(scan_module, '_triton_failed', {})
    monkeypatch.setattr(scan_module, '_triton_ran', set())
    return calls


def _forward_backward(x, backend=None):
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    y = selective_scan(**leaves, backend=backend)
    y.backward(torch.ones_like(y))
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def test_triton_failing_at_its_first_call_falls_back_to_torch_once(broken_automatic_triton, recwarn):
    """An automatically chosen Triton whose first call fails gives the torch backend's results, warns
    once, is not tried again for that configuration, and is remembered for `mambavision info`."""
    x = _inputs(length=13)
    y_torch, grads_torch = _forward_backward(x, backend='torch')
    for _ in range(2):
        y, grads = _forward_backward(x)
        assert torch.equal(y, y_torch)
        for k in grads:
            assert torch.equal(grads[k], grads_torch[k]), k
    assert broken_automatic_triton == ['forward']  # the backward of a failed configuration is not tried
    messages = [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and 'first forward call' in messages[0] and 'torch backend' in messages[0]
    failures = importlib.import_module('mambavision.ops.selective_scan').triton_failures()
    assert list(failures.values()) == ['RuntimeError: ptxas fatal: forward kernel failed to compile']
    assert 'cpu' in next(iter(failures)) and 'float32' in next(iter(failures))


def test_triton_failing_after_it_ran_or_when_forced_raises(broken_automatic_triton, monkeypatch):
    """Only a configuration's first call falls back: a later failure, or one of a forced backend, is raised."""
    scan_module = importlib.import_module('mambavision.ops.selective_scan')
    x = _inputs(length=13)
    with pytest.raises(RuntimeError, match='ptxas'):
        selective_scan(**x, backend='triton')
    working = scan_module._load('torch')
    forward, backward = scan_module._loaded['triton']
    monkeypatch.setitem(scan_module._loaded, 'triton', working)
    _forward_backward(x)  # runs once: remembered as working
    monkeypatch.setitem(scan_module._loaded, 'triton', (forward, backward))
    with pytest.raises(RuntimeError, match='ptxas'):
        selective_scan(**x)
    assert scan_module.triton_failures() == {}


def test_probe_reports_a_failing_triton(broken_automatic_triton):
    scan_module = importlib.import_module('mambavision.ops.selective_scan')
    failures = scan_module.probe_scan_backend('cpu')
    assert list(failures.values()) == ['RuntimeError: ptxas fatal: forward kernel failed to compile']


@pytest.mark.parametrize('device, saved_dtype', [('cuda', torch.bfloat16), ('cpu', torch.float32)])
def test_scan_inputs_enter_the_op_in_native_dtype_on_cuda(device, saved_dtype):
    """bf16 u, delta, B, C (as autocast makes them) reach the op, and what autograd saves for its backward,
    as bf16 on CUDA (half the memory of float32 copies), float32 on the CPU; A, D, delta_bias float32.
    CUDA is simulated with fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    x = _inputs(batch=2, channels=8, length=16, dtype=torch.bfloat16)
    saved = []
    with FakeTensorMode() as mode:
        leaves = {k: mode.from_tensor(v).to(device).requires_grad_() for k, v in x.items()}
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
            y = selective_scan(**leaves)
        assert y.dtype == torch.bfloat16 and y.device.type == device
        io = [leaves[k].to(saved_dtype) for k in ('u', 'delta', 'A', 'B', 'C', 'D', 'delta_bias')]
        io[2], io[5], io[6] = (t.float() for t in (io[2], io[5], io[6]))
        grads = torch.ops.mambavision.selective_scan_backward(torch.empty_like(io[0]), *io, True, 'auto')
    assert saved == [saved_dtype, saved_dtype, torch.float32, saved_dtype, saved_dtype, torch.float32, torch.float32]
    assert [g.dtype for g in grads] == [t.dtype for t in io]  # the backward op's gradients: their inputs' dtypes
