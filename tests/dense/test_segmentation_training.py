"""UPerNet training: ``UPerNet.loss`` and its gradients equal mmseg's on ``upernet_tiny_train``; the model
to fine-tune (dropout, drop path, starting points) of ``segmenter_for_training``."""
import copy
import json
import logging

import pytest
import timm
import torch
from safetensors.torch import load_file

import mambavision.weights
from mambavision.dense.segmentation import UPerNet, segmenter_for_training
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


# ---------------------------------------------------------------------------------------------
# the model to fine-tune

TINY_BACKBONE = dict(dim=16, in_dim=8, depths=(1, 2, 3, 2), num_heads=(1, 2, 2, 4))


def _for_training(name='upernet_mambavision_t', **kwargs):
    """``segmenter_for_training`` on a tiny backbone (the names of the T entry)."""
    return segmenter_for_training(name, backbone_kwargs=TINY_BACKBONE, channels=32, aux_channels=16, **kwargs)


def _drop_path_rates(model):
    """The distinct stochastic-depth rates of the backbone's blocks (rate 0 blocks have none)."""
    return sorted({round(m.drop_prob, 6) for m in model.backbone.modules() if type(m).__name__ == 'DropPath'})


def test_training_model_defaults_are_the_published_runs(caplog):
    caplog.set_level(logging.INFO)
    model = _for_training()
    assert model.training and model.num_classes == 150 and model.class_names[0] == 'wall'
    assert model.decode_head.dropout.p == model.auxiliary_head.dropout.p == 0.1
    rates = _drop_path_rates(model)
    blocks = sum(TINY_BACKBONE['depths'])
    assert rates == [round(0.2 * i / (blocks - 1), 6) for i in range(1, blocks)]  # 0 .. 0.2 linearly over the blocks
    assert 'upernet_mambavision_t.nv_ade20k: random weights' in caplog.text
    custom = _for_training(drop_path_rate=0.05, dropout=0.3, class_names=['a', 'b'])
    assert max(_drop_path_rates(custom)) == pytest.approx(0.05) and custom.decode_head.dropout.p == 0.3
    assert custom.num_classes == 2 and custom.class_names == ['a', 'b']


def test_unknown_name_is_one_line():
    with pytest.raises(ValueError, match="unknown segmenter 'upernet_mambavision_q'; did you mean") as info:
        _for_training('upernet_mambavision_q')
    assert '\n' not in str(info.value)


def test_pretrained_segmenter_with_other_classes_keeps_all_but_the_classifiers(tmp_path, caplog):
    torch.manual_seed(0)
    source = _for_training(drop_path_rate=0.)
    path = tmp_path / 'ade.pth'
    torch.save({'meta': {}, 'state_dict': source.state_dict()}, path)
    caplog.set_level(logging.INFO)
    model = _for_training(pretrained=str(path), class_names=['sky', 'road', 'car'])
    expected = source.state_dict()
    for name, tensor in model.state_dict().items():
        if '.conv_seg.' in name:
            assert tensor.shape[0] == 3
        else:
            assert torch.equal(tensor, expected[name]), name
    assert f'weights of {path} loaded; auxiliary_head.conv_seg and decode_head.conv_seg start fresh' in caplog.text
    same = _for_training(pretrained=str(path))
    assert all(torch.equal(t, expected[n]) for n, t in same.state_dict().items())


def test_backbone_weights_from_a_classification_file(tmp_path, caplog):
    torch.manual_seed(0)
    classifier = timm.create_model('mambavision_t', **TINY_BACKBONE)
    path = tmp_path / 'in1k.pth'
    torch.save({'state_dict': classifier.state_dict()}, path)
    caplog.set_level(logging.INFO)
    model = _for_training(backbone_weights=str(path), num_classes=4)
    own, expected = model.backbone.state_dict(), classifier.state_dict()
    loaded = [n for n in own if not n.startswith('out_norms.')]
    assert loaded and all(torch.equal(own[n], expected[n]) for n in loaded)
    assert all(own[n].eq(1 if n.endswith('weight') else 0).all() for n in own if n.startswith('out_norms.'))
    assert f'backbone weights of {path} loaded; out-norms and both heads start fresh' in caplog.text
    with pytest.raises(ValueError, match="backbone weights 'nonesuch': no such file, nor a published tag"):
        _for_training(backbone_weights='nonesuch')
    with pytest.raises(ValueError, match='not both'):
        _for_training(backbone_weights=str(path), pretrained=True)


def test_backbone_weights_tag_downloads_the_imagenet_file(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = tmp_path / 'mambavision_tiny_1k.pth.tar'
    torch.save({'state_dict': timm.create_model('mambavision_t', **TINY_BACKBONE).state_dict()}, path)
    asked = []

    def fake_download(repo_id, filename, cache_dir=None):
        asked.append((repo_id, filename))
        return str(path)

    monkeypatch.setattr(mambavision.weights, 'download_weights', fake_download)
    _for_training(backbone_weights='mambavision_t.nv_in1k')
    assert asked == [('nvidia/MambaVision-T-1K', 'mambavision_tiny_1k.pth.tar')]
