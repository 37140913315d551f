"""The mixer's fused CPU inference kernels (``ops.mixer_cpu``): against float64 / sequential references
on odd shapes, the path the mixer takes (inference only) and its fallbacks."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import mambavision
from mambavision.model import MambaVisionMixer
from mambavision.ops import cpu_scan, mixer_cpu
from mambavision.ops.torch_scan import selective_scan_ref

scan_module = importlib.import_module('mambavision.ops.selective_scan')
needs_kernel = pytest.mark.skipif(cpu_scan._compiler() is None, reason='no C compiler: the kernels cannot exist')


def _conv_silu_reference(x, weight):
    """float64 silu(depthwise conv1d) of (B, L, C) tokens, 'same' padding."""
    x, weight = x.double(), weight.double()
    y = F.conv1d(x.transpose(1, 2), weight, padding=weight.shape[-1] // 2, groups=x.shape[-1])
    return F.silu(y).transpose(1, 2)


def _ssm_reference(act, proj, w_dt, dt_bias, A, D):
    """[scan, z] by dt_proj in float64 and the sequential reference scan."""
    u, z = act.double().chunk(2, dim=-1)
    rank, nstate = w_dt.shape[1], A.shape[1]
    dt, b, c = proj.double().split([rank, nstate, nstate], dim=-1)
    delta = F.linear(dt, w_dt.double(), dt_bias.double())
    y = selective_scan_ref(u.transpose(1, 2), delta.transpose(1, 2), A, b.transpose(1, 2), c.transpose(1, 2), D,
                           dt_bias, True)
    return torch.cat([y.transpose(1, 2).double(), z], dim=-1)


def _ssm_inputs(batch, channels, length, rank, nstate, seed):
    g = torch.Generator().manual_seed(seed)
    return dict(act=torch.randn(batch, length, 2 * channels, generator=g),
                proj=torch.randn(batch, length, rank + 2 * nstate, generator=g),
                w_dt=torch.randn(channels, rank, generator=g) / rank ** 0.5,
                dt_bias=torch.randn(channels, generator=g) * 0.5 - 1,
                A=-torch.rand(channels, nstate, generator=g) * 4 - 0.05,
                D=torch.randn(channels, generator=g))


@needs_kernel
@pytest.mark.parametrize('channels', [1, 15, 17, 40])
@pytest.mark.parametrize('length', [1, 2, 29])
@pytest.mark.parametrize('width', [1, 3, 5])
def test_conv_silu_matches_float64(channels, length, width):
    g = torch.Generator().manual_seed(channels * 100 + length * 10 + width)
    x, weight = torch.randn(2, length, channels, generator=g), torch.randn(channels, 1, width, generator=g)
    y = mixer_cpu.mixer_conv_silu(x, weight)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y.double(), _conv_silu_reference(x, weight), rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize('channels', [1, 17, 40])
@pytest.mark.parametrize('length', [1, 29, 197])
@pytest.mark.parametrize('rank,nstate', [(1, 1), (3, 8), (20, 5)])
def test_ssm_matches_sequential_reference(channels, length, rank, nstate):
    x = _ssm_inputs(2, channels, length, rank, nstate, seed=channels + length + rank)
    y = mixer_cpu.mixer_ssm(**x)
    assert y.dtype == torch.float32 and y.shape == x['act'].shape
    torch.testing.assert_close(y.double(), _ssm_reference(**x), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernels_take_bf16_inputs_and_do_not_depend_on_threads():
    x = _ssm_inputs(3, 50, 31, 4, 8, seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mixer_cpu.mixer_ssm(**x), mixer_cpu.mixer_conv_silu(x['act'], torch.ones(100, 1, 3))
        torch.set_num_threads(2)
        two = mixer_cpu.mixer_ssm(**x), mixer_cpu.mixer_conv_silu(x['act'], torch.ones(100, 1, 3))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    half = {k: v.bfloat16() for k, v in x.items()}  # bf16 act and proj are read as they are, the rest cast
    expected = mixer_cpu.mixer_ssm(**{k: v.float() for k, v in half.items()})
    torch.testing.assert_close(mixer_cpu.mixer_ssm(**half), expected, rtol=0, atol=0)
    weight = torch.randn(100, 1, 3)
    expected = mixer_cpu.mixer_conv_silu(half['act'].float(), weight)
    torch.testing.assert_close(mixer_cpu.mixer_conv_silu(half['act'], weight), expected, rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize('backend', ['torch', 'reference'])
def test_ssm_follows_the_scan_backend_at_run_time(backend, monkeypatch):
    x = _ssm_inputs(2, 17, 29, 3, 8, seed=3)
    calls = []
    forward, backward = scan_module._load(backend)
    monkeypatch.setitem(scan_module._loaded, backend, (lambda *a: calls.append(1) or forward(*a), backward))
    mambavision.set_scan_backend(backend)
    try:
        y = mixer_cpu.mixer_ssm(**x)
    finally:
        mambavision.set_scan_backend(None)
    assert calls == [1]
    torch.testing.assert_close(y.double(), _ssm_reference(**x), rtol=1e-5, atol=1e-5)


def _mixer(seed=0, **kwargs):
    torch.manual_seed(seed)
    mixer = MambaVisionMixer(**kwargs).eval()
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0, 0.3)
        mixer.A_log.uniform_(-1, 1.5)
    return mixer


@needs_kernel
@pytest.mark.parametrize('kwargs', [dict(dim=46, d_state=5, d_conv=5, dt_rank=3), dict(dim=34)])
def test_mixer_inference_takes_the_kernels_and_matches_the_op_path(kwargs, monkeypatch):
    """Under no_grad the mixer runs the fused kernels (tokens-first); with gradients, the scan op as before."""
    mixer, x = _mixer(**kwargs), torch.randn(3, 37, kwargs['dim'])
    with torch.enable_grad():
        expected = mixer(x)  # parameters want gradients: the op path
    calls = []
    ssm = mixer_cpu.mixer_ssm
    monkeypatch.setattr(mixer_cpu, 'mixer_ssm', lambda *a: calls.append(1) or ssm(*a))
    mambavision.set_scan_backend('reference')
    try:
        with torch.enable_grad():
            mixer(x).sum().backward()  # training still works, by the op path
        assert not calls
        with torch.no_grad():
            y = mixer(x)
    finally:
        mambavision.set_scan_backend(None)
    assert calls == [1]
    torch.testing.assert_close(y, expected.detach(), rtol=1e-5, atol=1e-5)
    with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
        low = mixer(x)
    assert low.dtype == torch.bfloat16
    assert ((low.float() - expected).norm() / expected.norm()).item() < 2e-2
    with torch.no_grad():  # a bf16 model, no autocast
        low = mixer.to(torch.bfloat16)(x.bfloat16())
    assert calls == [1, 1, 1] and low.dtype == torch.bfloat16
    assert ((low.float() - expected).norm() / expected.norm()).item() < 3e-2


def test_without_kernels_the_mixer_runs_the_op_path(monkeypatch):
    monkeypatch.setattr(mixer_cpu, '_kernel_limits', lambda: None)
    monkeypatch.setattr(mixer_cpu, 'mixer_ssm', None)  # would fail if called
    mixer, x = _mixer(dim=34), torch.randn(2, 9, 34)
    with torch.no_grad():
        assert mixer(x).shape == x.shape


@needs_kernel
def test_sizes_beyond_the_kernels_run_the_op_path():
    limits = mixer_cpu._kernel_limits()
    x = torch.randn(1, 5, 8)
    assert mixer_cpu.applies(x, 3, 1, 8)
    assert not mixer_cpu.applies(x, limits[0] + 2, 1, 8)
    assert not mixer_cpu.applies(x, 4, 1, 8)  # even conv width
    assert not mixer_cpu.applies(x, 3, limits[1] + 1, 8)
    assert not mixer_cpu.applies(x, 3, 1, limits[2] + 1)
    assert not mixer_cpu.applies(x.double(), 3, 1, 8)
    assert not mixer_cpu.applies(x.to('meta'), 3, 1, 8)  # another device
