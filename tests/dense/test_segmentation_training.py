"""UPerNet training: ``UPerNet.loss`` and its gradients equal mmseg's on ``upernet_tiny_train``; the
training-time model (dropout, drop path, starting points) of ``segmenter_for_training``."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from mambavision.dense.segmentation import UPerNet
from mambavision.model import create_dense_backbone
from mambavision.weights import rename_published_keys_

from conftest import DENSE_FIXTURES

LOSS_REL_TOL = 1e-5
GRAD_REL_TOL = 1e-4  # largest difference, relative to the expected gradient's norm
GRAD_ABS_FLOOR = 1e-6  # the fixture's gradients that are zero in exact arithmetic hold rounding noise (~1e-8)
# In float32 a few gradients are sums over a whole feature map that cancel to ~1e-3 of their terms (the BN
# biases of the stride-4 lateral conv): their float32 rounding reaches ~3e-3 of their norm, ~2e-5 absolute.
FLOAT32_GRAD_ABS_FLOOR = 5e-5


def _tiny_upernet(**kwargs) -> UPerNet:
    """The ``upernet_tiny`` configuration (random weights)."""
    backbone = create_dense_backbone(
        'test_mambavision', (8, 8, 32, 16), dim=16, in_dim=8, depths=(1, 2, 3, 2), num_heads=(1, 2, 2, 4),
        **kwargs)
    return UPerNet(backbone, num_classes=19, channels=32, aux_channels=16, dropout=0.)


def _published_to_ours(tensors: dict, prefix: str) -> dict:
    """``prefix``-named tensors of the fixture, under our parameter names."""
    named = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    rename_published_keys_(named, 'backbone.')
    return named


@pytest.fixture(scope='module')
def train_step():
    """(model with the fixture's weights in train mode, inputs, labels, the fixture's tensors)."""
    config = json.loads((DENSE_FIXTURES / 'upernet_tiny_train.json').read_text())['model']
    assert config['decode_head']['dropout_ratio'] == config['auxiliary_head']['dropout_ratio'] == 0
    assert config['auxiliary_head']['loss_decode']['loss_weight'] == 0.4
    golden = load_file(DENSE_FIXTURES / 'upernet_tiny_train.safetensors')
    weights = load_file(DENSE_FIXTURES / 'upernet_tiny.safetensors')  # the notes: the inference fixture's weights
    model = _tiny_upernet(drop_path_rate=0.)
    model.load_state_dict(_published_to_ours(weights, 'state_dict.'))
    inputs = golden['inputs'].float()
    labels = torch.stack([golden[f'labels.{i}'] for i in range(len(inputs))]).long()
    return model.train(), inputs, labels, golden


def test_loss_is_mmsegs(train_step):
    model, inputs, labels, golden = train_step
    with torch.no_grad():
        loss = model.loss(inputs, labels)
    expected = golden['loss.decode.loss_ce'] + golden['loss.aux.loss_ce']
    torch.testing.assert_close(expected, golden['loss_total'])
    assert abs(loss.item() - golden['loss_total'].item()) <= LOSS_REL_TOL * golden['loss_total'].item()


@pytest.mark.parametrize('dtype, floor', [(torch.float64, GRAD_ABS_FLOOR), (torch.float32, FLOAT32_GRAD_ABS_FLOOR)])
def test_every_gradient_is_mmsegs(train_step, dtype, floor):
    """Float64 shows the arithmetic is mmseg's (worst 1.6e-5 of a norm); float32 (training's dtype) its rounding."""
    model, inputs, labels, golden = train_step
    model = copy.deepcopy(model).to(dtype)
    loss = model.loss(inputs.to(dtype), labels)
    assert abs(loss.item() - golden['loss_total'].item()) <= LOSS_REL_TOL * golden['loss_total'].item()
    loss.backward()
    expected = _published_to_ours(golden, 'grad.')
    got = {name: p.grad.float() for name, p in model.named_parameters()}
    assert sorted(got) == sorted(expected)
    errors = {}
    for name, grad in got.items():
        error = (grad - expected[name]).abs().max().item()
        if error > max(GRAD_REL_TOL * expected[name].norm().item(), floor):
            errors[name] = (error, expected[name].norm().item())
    assert not errors, errors
