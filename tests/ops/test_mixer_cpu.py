"""The mixer's fused CPU inference kernel (``ops.mixer_cpu``): against float64 / sequential references
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


def _core_reference(xz, conv_weight, x_proj_weight, dt_weight, dt_bias, A, D):
    """float64 [scan, z]: conv + silu, x_proj and dt_proj in float64, then the sequential reference scan."""
    xz = xz.double().transpose(1, 2)
    act = F.silu(F.conv1d(xz, conv_weight.double(), padding=conv_weight.shape[-1] // 2, groups=xz.shape[1]))
    u, z = act.chunk(2, dim=1)
    rank, nstate = dt_weight.shape[1], A.shape[1]
    dt, b, c = F.linear(u.transpose(1, 2), x_proj_weight.double()).split([rank, nstate, nstate], dim=-1)
    delta = F.linear(dt, dt_weight.double(), dt_bias.double())
    y = selective_scan_ref(u, delta.transpose(1, 2), A.double(), b.transpose(1, 2), c.transpose(1, 2), D.double(),
                           dt_bias.double(), True)
    return torch.cat([y.double(), z], dim=1).transpose(1, 2)


def _core_inputs(batch, channels, length, rank, nstate, width=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(xz=torch.randn(batch, length, 2 * channels, generator=g),
                conv_weight=torch.randn(2 * channels, 1, width, generator=g) / width ** 0.5,
                x_proj_weight=torch.randn(rank + 2 * nstate, channels, generator=g) / channels ** 0.5,
                dt_weight=torch.randn(channels, rank, generator=g) / rank ** 0.5,
                dt_bias=torch.randn(channels, generator=g) * 0.5 - 1,
                A=-torch.rand(channels, nstate, generator=g) * 4 - 0.05,
                D=torch.randn(channels, generator=g))


@needs_kernel
@pytest.mark.parametrize('channels', [1, 15, 17, 40])
@pytest.mark.parametrize('length', [1, 2, 9, 197])
@pytest.mark.parametrize('rank,nstate,width', [(1, 1, 1), (3, 8, 3), (20, 5, 5)])
def test_core_matches_float64_reference(channels, length, rank, nstate, width):
    x = _core_inputs(2, channels, length, rank, nstate, width, seed=channels + length + rank)
    y = mixer_cpu.mixer_core(**x)
    assert y.dtype == torch.float32 and y.shape == x['xz'].shape
    torch.testing.assert_close(y.double(), _core_reference(**x), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_core_reads_and_writes_bf16_and_does_not_depend_on_threads():
    x = _core_inputs(3, 50, 31, 4, 8, seed=1)
    x['xz'][1, 7, 3] = float('nan')  # NaN stays NaN in bf16 (one channel, from token 6 on, and the scan after it)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mixer_cpu.mixer_core(**x)
        torch.set_num_threads(2)
        two = mixer_cpu.mixer_core(**x)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, two, rtol=0, atol=0, equal_nan=True)
    half = dict(x, xz=x['xz'].bfloat16(), x_proj_weight=x['x_proj_weight'].bfloat16())
    expected = mixer_cpu.mixer_core(**{k: v.float() for k, v in half.items()}).bfloat16()  # rounded by torch
    y = mixer_cpu.mixer_core(**half)
    assert y.dtype == torch.bfloat16 and y.isnan().any()
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)


@needs_kernel
@pytest.mark.parametrize('backend', ['torch', 'reference'])
def test_core_follows_the_scan_backend_at_run_time(backend, monkeypatch):
    x = _core_inputs(2, 17, 29, 3, 8, seed=3)
    calls = []
    forward, backward = scan_module._load(backend)
    monkeypatch.setitem(scan_module._loaded, backend, (lambda *a: calls.append(1) or forward(*a), backward))
    mambavision.set_scan_backend(backend)
    try:
        y = mixer_cpu.mixer_core(**x)
        low = mixer_cpu.mixer_core(**dict(x, xz=x['xz'].bfloat16()))
    finally:
        mambavision.set_scan_backend(None)
    assert calls == [1, 1] and low.dtype == torch.bfloat16
    assert y.is_contiguous() and low.is_contiguous()  # the strides compiled graphs assume (the fake's)
    torch.testing.assert_close(y.double(), _core_reference(**x), rtol=1e-5, atol=1e-5)


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
    """Under no_grad the mixer runs the fused kernel (tokens-first); with gradients, the scan op as before."""
    mixer, x = _mixer(**kwargs), torch.randn(3, 37, kwargs['dim'])
    with torch.enable_grad():
        expected = mixer(x)  # parameters want gradients: the op path
    calls = []
    core = mixer_cpu.mixer_core
    monkeypatch.setattr(mixer_cpu, 'mixer_core', lambda *a: calls.append(1) or core(*a))
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
    monkeypatch.setattr(mixer_cpu, 'mixer_core', None)  # would fail if called
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
