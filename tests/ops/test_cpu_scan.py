"""Our C scan kernel (``cpu_kernel`` backend): built on first use, against the sequential reference, and its
fallbacks."""
import importlib
import os
import shutil

import pytest
import torch

import mambavision
from mambavision.ops import cpu_scan
from mambavision.ops.cpu_scan import selective_scan_cpu
from mambavision.ops.selective_scan import selective_scan, selective_scan_ref, selective_scan_torch

scan_module = importlib.import_module('mambavision.ops.selective_scan')
HAS_COMPILER = cpu_scan._compiler() is not None


def _inputs(batch, channels, length, d_state, seed, tokens_first=False, delta_scale=1.0):
    """Random scan inputs; ``tokens_first``: delta, B and C as transposed views of (batch, L, .) tensors (the
    mixer's)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, channels, length, generator=g)
    delta = torch.randn(batch, channels, length, generator=g) * delta_scale - 1
    A = -torch.rand(channels, d_state, generator=g) * 4 - 0.05
    B = torch.randn(batch, d_state, length, generator=g)
    C = torch.randn(batch, d_state, length, generator=g)
    if tokens_first:
        delta, B, C = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (delta, B, C))
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=torch.randn(channels, generator=g),
                delta_bias=torch.randn(channels, generator=g) * 0.5)


def test_built_here_and_chosen_first_on_cpu():
    """Where a C compiler exists the kernel builds and 'auto' picks it on CPU; elsewhere torch runs."""
    assert (cpu_scan.load() is not None) == HAS_COMPILER
    expected = ['cpu_kernel', 'torch', 'reference'] if HAS_COMPILER else ['torch', 'reference']
    assert mambavision.available_scan_backends('cpu') == expected
    assert 'cpu_kernel' not in mambavision.available_scan_backends('cuda')


needs_kernel = pytest.mark.skipif(not HAS_COMPILER, reason='no C compiler on this machine: the kernel cannot exist')


@needs_kernel
@pytest.mark.parametrize('channels', [1, 15, 16, 17, 40])
@pytest.mark.parametrize('length', [1, 2, 29, 197])
@pytest.mark.parametrize('d_state', [1, 8, 16])
def test_kernel_matches_reference(channels, length, d_state):
    x = _inputs(batch=2, channels=channels, length=length, d_state=d_state, seed=channels * 1000 + length + d_state)
    torch.testing.assert_close(selective_scan_cpu(**x), selective_scan_ref(**x), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_result_does_not_depend_on_threads():
    x = _inputs(batch=3, channels=50, length=31, d_state=8, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = selective_scan_cpu(**x)
        torch.set_num_threads(2)
        assert torch.equal(selective_scan_cpu(**x), one)
    finally:
        torch.set_num_threads(threads)


def _gradients(x, backend, softplus=True):
    """y and the gradient of every input through the op with ``backend``, for a fixed random output gradient."""
    leaves = {k: v.clone().requires_grad_() for k, v in x.items() if v is not None}
    y = selective_scan(**{**x, **leaves}, delta_softplus=softplus, backend=backend)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(0)))
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def _assert_kernels_match(x, reference='reference', softplus=True, exact=False):
    """Output and every gradient through the op: cpu_kernel against ``reference``."""
    (y, g), (y_ref, g_ref) = _gradients(x, 'cpu_kernel', softplus), _gradients(x, reference, softplus)
    tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ref, **tolerance)
    assert set(g) == set(g_ref) == {k for k, v in x.items() if v is not None}
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], **(tolerance if exact else dict(rtol=1e-4, atol=1e-4)),
                                   msg=f'gradient of {k}')


@needs_kernel
@pytest.mark.parametrize('channels, length, d_state', [(1, 1, 1), (16, 2, 8), (19, 23, 4), (37, 64, 16), (5, 197, 8)])
def test_backward_kernel_matches_reference(channels, length, d_state):
    """The op's forward and backward run our kernels; output and every gradient against the sequential reference."""
    _assert_kernels_match(_inputs(batch=2, channels=channels, length=length, d_state=d_state,
                                  seed=channels + length + d_state))


@needs_kernel
@pytest.mark.parametrize('use_d, use_bias, softplus',
                         [(False, False, True), (True, False, False), (False, True, False)])
def test_kernels_with_optional_inputs(use_d, use_bias, softplus):
    x = _inputs(batch=3, channels=21, length=17, d_state=4, seed=9, tokens_first=True)
    x['delta'] = x['delta'].abs() if not softplus else x['delta']
    x['D'] = x['D'] if use_d else None
    x['delta_bias'] = x['delta_bias'] if use_bias else None
    _assert_kernels_match(x, softplus=softplus)


@needs_kernel
def test_kernels_with_softplus_at_extremes():
    """delta + bias from -60 to 60: softplus's exp tail, its linear range above 20, and decays that reach 0."""
    x = _inputs(batch=2, channels=18, length=40, d_state=8, seed=4, delta_scale=25.0)
    assert x['delta'].max() > 25 and x['delta'].min() < -40
    _assert_kernels_match(x)


@needs_kernel
def test_states_beyond_the_kernel_run_the_torch_backend():
    x = _inputs(batch=1, channels=5, length=9, d_state=cpu_scan.load().mv_max_state() + 1, seed=12)
    _assert_kernels_match(x, reference='torch', exact=True)


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """A not-yet-tried build into an empty cache; the module's state comes back afterwards."""
    monkeypatch.setattr(cpu_scan, '_tried', False)
    monkeypatch.setattr(cpu_scan, '_library', None)
    monkeypatch.setattr(cpu_scan, 'build_error', None)
    monkeypatch.delitem(scan_module._loaded, 'cpu_kernel', raising=False)
    monkeypatch.setenv(cpu_scan.CACHE_ENV_VAR, str(tmp_path / 'cache'))
    return tmp_path


def test_without_a_compiler_the_torch_backend_runs(fresh_build, monkeypatch):
    monkeypatch.setenv('CC', str(fresh_build / 'no-such-compiler'))
    assert cpu_scan.load() is None
    assert 'no-such-compiler' in cpu_scan.build_error  # what `mambavision info` shows
    assert mambavision.available_scan_backends('cpu') == ['torch', 'reference']
    x = _inputs(batch=1, channels=4, length=5, d_state=2, seed=1)
    assert torch.equal(selective_scan(**x), selective_scan_torch(**x))
    with pytest.raises(RuntimeError, match='could not be built .*no-such-compiler'):
        selective_scan_cpu(**x)


@needs_kernel
def test_a_failing_compiler_is_reported_in_one_line(fresh_build, monkeypatch):
    broken = fresh_build / 'broken.h'
    broken.write_text('int broken = ;\n')
    monkeypatch.setenv('CC', f'{shutil.which("cc") or "gcc"} -include {broken}')
    assert cpu_scan.load() is None
    assert 'could not build it' in cpu_scan.build_error and 'error' in cpu_scan.build_error
    assert '\n' not in cpu_scan.build_error


@needs_kernel
def test_a_refused_flag_falls_back_to_the_next_flag_set(fresh_build, monkeypatch):
    """$CC with an argument, of a compiler that rejects -march=native: a library all the same, built once."""
    wrapper = fresh_build / 'cc-without-march-native'
    wrapper.write_text(f'case "$*" in *-march=native*) exit 1;; esac\nexec {shutil.which("cc") or "gcc"} "$@"\n')
    monkeypatch.setenv('CC', f'sh {wrapper}')
    assert cpu_scan.load() is not None
    built = os.listdir(fresh_build / 'cache')
    assert len(built) == 1 and built[0].startswith('selective_scan_cpu-') and built[0].endswith('.so')
    x = _inputs(batch=2, channels=17, length=12, d_state=8, seed=2)
    torch.testing.assert_close(selective_scan_cpu(**x), selective_scan_ref(**x), rtol=1e-5, atol=1e-5)
