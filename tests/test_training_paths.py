"""Training paths on a CPU: mixed-precision steps of every variant's layout, and gradients of every CPU scan backend."""
import pytest
import timm
import torch

import mambavision
from mambavision.ops.selective_scan import available_scan_backends, selective_scan_ref, selective_scan_torch

VARIANTS = [n for n in timm.list_models('mambavision_*')]


def tiny(name: str, **kwargs) -> mambavision.MambaVision:
    """The variant's depths, heads, windows and layer scale at width 8 (heads divide 32 and 64)."""
    torch.manual_seed(0)
    return timm.create_model(name, dim=8, in_dim=4, num_classes=5, **kwargs)


def test_variants_found():
    assert len(VARIANTS) == 9, VARIANTS


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine their barriers cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
@pytest.mark.parametrize('name', VARIANTS)
def test_autocast_training_step(name, dtype):
    model = tiny(name).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # the native resolution: smaller inputs zero-pad most of each window, and LayerNorm over those
    # near-constant tokens gives fp32 gradients around 5e4, past float16's range, whatever the scan
    x, target = torch.randn(2, *model.pretrained_cfg['input_size']), torch.tensor([1, 3])
    with torch.autocast('cpu', dtype=dtype):
        loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert torch.isfinite(loss), f'{name}: loss {loss}'
    assert all(g is not None and torch.isfinite(g).all() for g in grads), f'{name}: missing or non-finite grads'
    assert all(g.abs().sum() > 0 for g in grads[:4])  # the stem's convs and norms learn
    before = model.stem.conv1.weight.detach().clone()
    opt.step()
    assert torch.isfinite(model.stem.conv1.weight).all() and not torch.equal(before, model.stem.conv1.weight)


@pytest.mark.parametrize('backend', [b for b in available_scan_backends('cpu') if b != 'reference'])
def test_backend_gradients_match_reference_on_model(backend):
    """A float32 training step's gradients through ``backend`` equal those through the reference scan."""
    x, target = torch.randn(2, 3, 48, 40), torch.tensor([0, 4])  # padded, non-square windows
    grads = {}
    for name in ('reference', backend):
        model = tiny('mambavision_t', depths=(1, 1, 3, 2)).train()
        for m in model.modules():  # PyTorch's default init: the 0.02 init leaves the scan's gradients ~1e-14
            if isinstance(m, torch.nn.Linear):
                m.reset_parameters()
        model.set_grad_checkpointing(name == backend)  # its recomputed forward must not change them either
        mambavision.set_scan_backend(name)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    # outside the mixers, an absolute floor: conv biases before a train-mode BatchNorm have zero gradient
    floor = 1e-6 * max(float(g.norm()) for g in grads['reference'].values())
    for n, g in grads[backend].items():
        ref = grads['reference'][n]
        tol = 1e-4 * float(ref.norm()) + (0. if '.mixer.' in n else floor)
        assert float((g - ref).norm()) <= tol, f'{backend}: gradient of {n} differs'


def test_torch_scan_inference_blocks_match_reference():
    """Without autograd the torch scan sweeps time in blocks, carrying the state between them."""
    g = torch.Generator().manual_seed(0)
    b, d, n, length = 4, 64, 8, 300  # several blocks of _BLOCK_ELEMENTS
    u, delta = torch.randn(b, d, length, generator=g), torch.randn(b, d, length, generator=g) - 2
    A = -torch.rand(d, n, generator=g) * 4
    B, C = torch.randn(b, n, length, generator=g), torch.randn(b, n, length, generator=g)
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    with torch.inference_mode():
        y, ref = selective_scan_torch(u, delta, A, B, C, D, bias), selective_scan_ref(u, delta, A, B, C, D, bias)
    assert float((y - ref).norm()) <= 1e-5 * float(ref.norm())


def test_torch_scan_matches_reference_over_softplus_range():
    """Step sizes from underflow to the linear branch of softplus (x > 20): outputs and all gradients."""
    g = torch.Generator().manual_seed(1)
    b, d, n, length = 2, 6, 4, 9
    delta = torch.linspace(-40, 40, b * d * length).reshape(b, d, length)
    args = [torch.randn(b, d, length, generator=g), delta, -torch.rand(d, n, generator=g) / 10,
            torch.randn(b, n, length, generator=g), torch.randn(b, n, length, generator=g),
            torch.randn(d, generator=g), torch.randn(d, generator=g)]
    outs = []
    for fn in (selective_scan_ref, selective_scan_torch):
        leaves = [t.clone().requires_grad_() for t in args]
        y = fn(*leaves)
        grads = torch.autograd.grad((y * torch.randn(y.shape, generator=g.manual_seed(2))).sum(), leaves)
        outs.append([y.detach(), *grads])
    for got, ref in zip(*outs):
        assert float((got - ref).norm()) <= 1e-5 * float(ref.norm())
