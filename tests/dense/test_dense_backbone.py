"""The published detection/segmentation backbone: exact outputs, the timm way to it, and safe reading of
the published mmengine checkpoint files."""
import json
import sys
import types

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from mambavision.model import create_dense_backbone
from mambavision.weights import checkpoint_filter_fn, read_checkpoint, read_state_dict

from conftest import FIXTURES

DENSE = FIXTURES / 'dense'
# published downstream entry (downstream_state_dict_keys.json) -> our dense backbone tag
DENSE_TAGS = {
    'cascade_mask_rcnn_mamba_vision_tiny_3x_coco': 'mambavision_t.nv_coco',
    'cascade_mask_rcnn_mamba_vision_small_3x_coco': 'mambavision_s.nv_coco',
    'cascade_mask_rcnn_mamba_vision_base_3x_coco': 'mambavision_b.nv_coco',
    'mamba_vision_160k_ade20k_tiny': 'mambavision_t.nv_ade20k',
    'mamba_vision_160k_ade20k_small': 'mambavision_s.nv_ade20k',
    'mamba_vision_160k_ade20k_base': 'mambavision_b.nv_ade20k',
    'mamba_vision_160k_ade20k_l3_21k': 'mambavision_l3_256.nv_in21k_ade20k_640',
}


def _fixture(name):
    """(backbone kwargs, published state dict with 'backbone.' names, tensors) of a dense backbone fixture."""
    cfg = json.loads((DENSE / f'{name}.json').read_text())['backbone']
    kwargs = {k: cfg[k] for k in ('dim', 'in_dim', 'depths', 'num_heads', 'window_size', 'mlp_ratio', 'layer_scale')}
    tensors = load_file(DENSE / f'{name}.safetensors')
    state_dict = {k[len('state_dict.'):]: v for k, v in tensors.items() if k.startswith('state_dict.')}
    return kwargs, state_dict, tensors


def _assert_outputs(outputs, tensors, j):
    assert len(outputs) == 4
    for i, out in enumerate(outputs):
        expected = tensors[f'out{i}.{j}']
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('name', ['dense_backbone_a', 'dense_backbone_b'])
def test_dense_backbone_reproduces_the_published_outputs(name):
    kwargs, state_dict, tensors = _fixture(name)
    windows = kwargs.pop('window_size')
    backbone = create_dense_backbone('test_mambavision', windows, **kwargs).eval()
    backbone.load_state_dict(checkpoint_filter_fn(state_dict))
    holder = nn.Module()  # a detector or segmenter holds it as .backbone and loads the file's names as they are
    holder.backbone = create_dense_backbone('test_mambavision', windows, **kwargs).eval()
    holder.load_state_dict(state_dict)
    with torch.no_grad():
        for j in range(sum(k.startswith('input.') for k in tensors)):
            _assert_outputs(backbone.forward_intermediates(tensors[f'input.{j}'], intermediates_only=True), tensors, j)
            _assert_outputs(holder.backbone.forward_intermediates(tensors[f'input.{j}'], intermediates_only=True),
                            tensors, j)


def test_features_only_with_out_norm_is_the_dense_backbone():
    kwargs, state_dict, tensors = _fixture('dense_backbone_b')
    model = timm.create_model('test_mambavision', features_only=True, out_norm=True, **kwargs).eval()
    model.model.load_state_dict(checkpoint_filter_fn(state_dict), strict=False)
    assert model.feature_info.channels() == [16, 32, 64, 128] and model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        _assert_outputs(model(tensors['input.1']), tensors, 1)


@pytest.fixture(scope='module')
def published_dense_keys():
    return json.loads((DENSE / 'downstream_state_dict_keys.json').read_text())


@pytest.mark.parametrize('entry', sorted(DENSE_TAGS))
def test_dense_tags_take_every_backbone_tensor_of_the_published_files(entry, published_dense_keys):
    published = published_dense_keys[entry]
    with torch.device('meta'):
        model = timm.create_model(DENSE_TAGS[entry])
        file_tensors = {name: torch.empty(shape) for name, shape in published['state_dict']}
    assert [s.window_size for s in model.stages[2:]] == published['backbone']['window_size'][2:]
    ours = checkpoint_filter_fn(file_tensors)
    own = model.state_dict()
    assert sorted(ours) == sorted(own)
    assert all(ours[k].shape == own[k].shape for k in own)
    cfg = model.pretrained_cfg
    assert cfg['hf_hub_id'] == 'nvidia/' + cfg['hf_hub_filename'][:-len('.pth')] and cfg['num_classes'] == 0
    assert cfg['license'] == 'cc-by-nc-sa-4.0'


def test_output_stride_other_than_32_is_refused_in_one_line():
    with pytest.raises(ValueError, match='output_stride=16 is not supported') as info:
        timm.create_model('test_mambavision', features_only=True, output_stride=16)
    assert '\n' not in str(info.value)
    assert timm.create_model('test_mambavision', output_stride=32).num_classes == 1000


# ---------------------------------------------------------------------------------------------
# mmengine checkpoints, as mmengine's runner and its publishing tool write them


class _Marker:
    """Unpickling it (for real) would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)


@pytest.fixture
def fake_mmengine(monkeypatch, tmp_path):
    """Classes pickled under mmengine's module names, as a real checkpoint refers to them."""
    marker = tmp_path / 'payload_ran'

    class HistoryBuffer:
        def __init__(self):
            self._log_history = np.arange(5, dtype=np.float64)
            self._count_history = np.ones(5)
            self.max_length = 1000000

    def touch(path):
        open(path, 'w').close()

    for module_name, attrs in {
            'mmengine.logging.history_buffer': dict(HistoryBuffer=HistoryBuffer),
            'mmengine.hooks.evil': dict(touch=touch)}.items():
        module = types.ModuleType(module_name)
        for attr, obj in attrs.items():
            obj.__module__, obj.__qualname__ = module_name, attr
            setattr(module, attr, obj)
        parts = module_name.split('.')
        for i in range(1, len(parts)):  # the parent packages, for pickle's import of the module
            monkeypatch.setitem(sys.modules, '.'.join(parts[:i]), sys.modules.get('.'.join(parts[:i]))
                                or types.ModuleType('.'.join(parts[:i])))
        monkeypatch.setitem(sys.modules, module_name, module)

    class DisguisedPayload:
        """Pickled as a call of mmengine.hooks.evil.touch(marker): a reader that imports it would run it."""

        def __reduce__(self):
            return touch, (str(marker),)

    return types.SimpleNamespace(HistoryBuffer=HistoryBuffer, DisguisedPayload=DisguisedPayload, marker=marker)


def _mmengine_checkpoint(state_dict, mm, full=True):
    meta = dict(
        mmengine_version='0.10.3', config="model = dict(type='CascadeRCNN')\n", seed=np.int64(1234),
        experiment_name='cascade', time='20240601_000000', epoch=36, iter=np.int64(263000),
        dataset_meta=dict(classes=('person', 'bicycle'), palette=[(220, 20, 60), (119, 11, 32)]),
        lr=np.float64(2e-4))
    checkpoint = dict(meta=meta, state_dict=state_dict)
    if full:  # the runner's own checkpoint; the publishing tool keeps meta and state_dict only
        checkpoint.update(
            message_hub=dict(log_scalars={'train/loss': mm.HistoryBuffer()}, runtime_info=dict(epoch=36, hook=None)),
            optimizer=dict(state={0: dict(step=torch.tensor(3.), exp_avg=torch.zeros(2))},
                           param_groups=[dict(lr=1e-4)]),
            param_schedulers=[dict(base_lrs=[1e-4], last_step=np.int64(36))])
    return checkpoint


def _save(obj, path, zip_format):
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    return str(path)


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
@pytest.mark.parametrize('full', [True, False], ids=['runner', 'published'])
def test_mmengine_checkpoint_gives_its_state_dict(fake_mmengine, tmp_path, zip_format, full):
    _, state_dict, _ = _fixture('dense_backbone_a')
    state_dict = dict(state_dict, **{'neck.fpn_convs.0.conv.weight': torch.randn(4, 4, 3, 3)})
    path = _save(_mmengine_checkpoint(state_dict, fake_mmengine, full), tmp_path / 'published.pth', zip_format)
    loaded = read_state_dict(path)
    assert sorted(loaded) == sorted(state_dict)
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())
    meta = read_checkpoint(path)['meta']
    assert meta['dataset_meta']['classes'] == ('person', 'bicycle') and meta['epoch'] == 36


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
@pytest.mark.parametrize('where', ['meta', 'message_hub', 'state_dict'])
def test_mmengine_payload_is_refused_or_skipped_without_running(fake_mmengine, tmp_path, zip_format, where):
    _, state_dict, _ = _fixture('dense_backbone_a')
    state_dict = dict(state_dict)
    checkpoint = _mmengine_checkpoint(state_dict, fake_mmengine)
    payload = fake_mmengine.DisguisedPayload()
    if where == 'state_dict':
        state_dict['backbone.outnorm0.weight'] = payload
    else:
        checkpoint[where]['hook'] = payload
    path = _save(checkpoint, tmp_path / 'evil.pth', zip_format)
    if where == 'state_dict':
        with pytest.raises(RuntimeError, match='non-tensor entries among its weights: backbone.outnorm0.weight'):
            read_state_dict(path)
    else:
        assert sorted(read_state_dict(path)) == sorted(state_dict)
    assert not fake_mmengine.marker.exists(), 'the pickle payload ran'


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_code_outside_mmengine_in_a_checkpoint_is_refused(fake_mmengine, tmp_path, zip_format):
    marker = fake_mmengine.marker

    class Opener:
        def __reduce__(self):
            return open, (str(marker), 'w')

    checkpoint = _mmengine_checkpoint({'w': torch.zeros(1)}, fake_mmengine)
    checkpoint['meta']['hook'] = Opener()
    path = _save(checkpoint, tmp_path / 'evil.pth', zip_format)
    with pytest.raises(RuntimeError, match=r'evil.pth: it holds io.open which is not allowed') as info:
        read_state_dict(path)
    assert '\n' not in str(info.value) and not marker.exists()


def test_dense_tag_loads_the_backbone_of_a_published_file(fake_mmengine, tmp_path):
    kwargs, state_dict, tensors = _fixture('dense_backbone_a')
    state_dict = dict(state_dict, **{'rpn_head.rpn_conv.weight': torch.randn(4, 4, 3, 3)})
    path = _save(_mmengine_checkpoint(state_dict, fake_mmengine, full=False), tmp_path / 'det.pth', False)
    model = timm.create_model(
        'mambavision_t.nv_coco', pretrained=True, pretrained_cfg_overlay=dict(file=path), features_only=True,
        **kwargs).eval()
    with torch.no_grad():
        _assert_outputs(model(tensors['input.0']), tensors, 0)


def test_classification_weights_start_a_dense_backbone(tiny_a, tmp_path):
    """As the published detectors were fine-tuned: ImageNet weights in, final norm left out, fresh out-norms."""
    path = tmp_path / 'classification.pth'
    torch.save({'state_dict': tiny_a.state_dict}, path)
    model = tiny_a.create_model(
        pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), features_only=True, out_norm=True)
    reference = tiny_a.loaded_model()
    x = tiny_a['input.0']
    with torch.no_grad():
        expected = reference.forward_intermediates(x, intermediates_only=True)
        for out, stage, norm in zip(model(x), expected, model.model.out_norms):
            torch.testing.assert_close(out, norm(stage))
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in model.model.out_norms)


def test_dense_weights_do_not_fit_a_classification_model(tmp_path):
    kwargs, state_dict, _ = _fixture('dense_backbone_a')
    path = tmp_path / 'dense.pth'
    torch.save({'state_dict': state_dict}, path)
    with pytest.raises(RuntimeError, match=r'dense.pth does not fit MambaVision: missing: norm.weight.*'
                                           r'unexpected: out_norms.0.bias') as info:
        timm.create_model('test_mambavision', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          num_classes=0, **kwargs)
    assert '\n' not in str(info.value)


def test_out_norms_use_the_published_eps():
    """LayerNorm over channels with eps 1e-5, as published: visible on maps whose channel variance is tiny."""
    model = create_dense_backbone('test_mambavision', dim=16, in_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                                  window_size=(8, 8, 8, 8)).eval()
    generator = torch.Generator().manual_seed(0)
    for norm in model.out_norms:
        channels = norm.weight.shape[0]
        nn.init.normal_(norm.weight, generator=generator)
        nn.init.normal_(norm.bias, generator=generator)
        x = 1e-3 * torch.randn(2, channels, 5, 4, generator=generator)  # channel variance ~1e-6 at each position
        expected = F.layer_norm(x.permute(0, 2, 3, 1), (channels,), norm.weight, norm.bias, eps=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(norm(x), expected.permute(0, 3, 1, 2), atol=1e-4, rtol=1e-4)
