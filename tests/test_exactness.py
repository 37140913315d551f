"""The published function: golden outputs of the published code, and the names of all 11 published checkpoints."""
import math

import pytest
import timm
import torch

import mambavision
from mambavision import checkpoint_filter_fn

from conftest import PUBLISHED_TO_REGISTERED

TOL = 1e-4
BUFFER_SUFFIXES = ('.running_mean', '.running_var', '.num_batches_tracked')
# SPEC table: parameters in millions, as published
SPEC_PARAMS_M = {
    'mambavision_t': 31.8, 'mambavision_t2': 35.1, 'mambavision_s': 50.1, 'mambavision_b': 97.7,
    'mambavision_l': 228.0, 'mambavision_l2': 241.6, 'mambavision_l2_512': 241.6,
    'mambavision_l3_256': 739.6, 'mambavision_l3_512': 739.6,
}


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f'shape {tuple(a.shape)} != {tuple(b.shape)}'
    return (a - b).abs().max().item()


def test_cpu_backends_include_reference_and_torch():
    assert {'reference', 'torch'} <= set(mambavision.available_scan_backends('cpu'))


@pytest.mark.parametrize('backend', mambavision.available_scan_backends('cpu'))
def test_fixture_outputs(tiny, backend):
    """Every stage output, the pooled features and the logits of the published code, for both inputs."""
    mambavision.set_scan_backend(backend)
    model = tiny.loaded_model()
    assert tiny.num_inputs == 2
    for j in range(tiny.num_inputs):
        x = tiny[f'input.{j}']
        with torch.no_grad():
            final, stages = model.forward_intermediates(x)
            pooled = model.forward_head(final, pre_logits=True)
            logits = model.forward_head(final)
            direct = model(x)
        assert len(stages) == 4
        for i, y in enumerate(stages):
            assert _max_err(y, tiny[f'stage{i}.{j}']) <= TOL, f'stage {i}, input {j}'
        assert _max_err(pooled, tiny[f'pooled.{j}']) <= TOL
        assert _max_err(logits, tiny[f'logits.{j}']) <= TOL
        assert torch.equal(direct, logits)


def test_fixture_through_timm_pretrained(tiny, tmp_path):
    """The public path: the published ``.pth.tar`` form loaded by ``timm.create_model(..., pretrained=True)``."""
    path = tmp_path / 'published.pth.tar'
    torch.save({'state_dict': tiny.state_dict, 'epoch': 299}, path)
    model = timm.create_model(
        'test_mambavision', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **tiny.arch).eval()
    for j in range(tiny.num_inputs):
        with torch.no_grad():
            assert _max_err(model(tiny[f'input.{j}']), tiny[f'logits.{j}']) <= TOL


def test_published_entries_are_all_mapped(published_keys):
    assert set(published_keys) == set(PUBLISHED_TO_REGISTERED)


@pytest.mark.parametrize('published', list(PUBLISHED_TO_REGISTERED))
def test_published_names_map_one_to_one(published, published_keys):
    """Every tensor of every published checkpoint maps onto exactly one of ours, with the same shape."""
    with torch.device('meta'):
        model = timm.create_model(PUBLISHED_TO_REGISTERED[published])
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes = dict((name, tuple(shape)) for name, shape in published_keys[published])
    assert len(shapes) == len(published_keys[published])

    mapped = checkpoint_filter_fn({k: torch.empty(s, device='meta') for k, s in shapes.items()}, model)
    assert len(mapped) == len(shapes), 'two published names map onto one of ours'
    assert set(mapped) == set(own)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == own

    published_params = sum(math.prod(s) for k, s in shapes.items() if not k.endswith(BUFFER_SUFFIXES))
    ours = sum(p.numel() for p in model.parameters())
    assert ours == published_params
    assert round(ours / 1e6, 1) == SPEC_PARAMS_M[PUBLISHED_TO_REGISTERED[published]]


def test_fixture_stages_through_features_only(tiny, tmp_path):
    """Detection/segmentation use: ``features_only=True`` with published weights gives the published stage outputs."""
    path = tmp_path / 'published.pth.tar'
    torch.save({'state_dict': tiny.state_dict}, path)
    model = timm.create_model(
        'test_mambavision', features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
        **tiny.arch).eval()
    for j in range(tiny.num_inputs):
        with torch.no_grad():
            maps = model(tiny[f'input.{j}'])
        assert len(maps) == 4
        for i, y in enumerate(maps):
            assert _max_err(y, tiny[f'stage{i}.{j}']) <= TOL, f'stage {i}, input {j}'


def test_fixture_through_timm_state_dict_overlay(tiny):
    """timm's generic loader (``pretrained_cfg_overlay=dict(state_dict=...)``) maps published names too."""
    overlay = dict(state_dict={'state_dict': tiny.state_dict}, num_classes=tiny.arch['num_classes'])
    model = timm.create_model('test_mambavision', pretrained=True, pretrained_cfg_overlay=overlay, **tiny.arch).eval()
    with torch.no_grad():
        assert _max_err(model(tiny['input.1']), tiny['logits.1']) <= TOL


def test_fixture_under_bf16_autocast(tiny):
    """Mixed precision stays finite and near the float32 function (the scan itself runs in float32)."""
    model = tiny.loaded_model()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        logits = model(tiny['input.1'])
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert _max_err(logits.float(), tiny['logits.1']) <= 0.03 * tiny['logits.1'].abs().max()


def test_published_state_dict_loads_directly(tiny):
    """model.load_state_dict takes the published names (also nested under a prefix) and gives the published outputs."""
    model = tiny.create_model()
    model.load_state_dict(tiny.state_dict)
    wrapper = torch.nn.Sequential(tiny.create_model())
    wrapper.load_state_dict({f'0.{k}': v for k, v in tiny.state_dict.items()})
    for m in (model, wrapper):
        with torch.no_grad():
            assert _max_err(m(tiny['input.0']), tiny['logits.0']) <= TOL


def test_fixture_through_timm_checkpoint_path(tiny, tmp_path):
    """timm's own checkpoint_path loads a published .pth.tar; as timm does, it takes state_dict_ema when present."""
    path = tmp_path / 'published.pth.tar'
    perturbed = {k: v + 1 if v.is_floating_point() else v for k, v in tiny.state_dict.items()}
    torch.save({'state_dict': perturbed, 'state_dict_ema': tiny.state_dict, 'epoch': 299}, path)
    model = timm.create_model('test_mambavision', checkpoint_path=str(path), **tiny.arch).eval()
    with torch.no_grad():
        assert _max_err(model(tiny['input.1']), tiny['logits.1']) <= TOL
