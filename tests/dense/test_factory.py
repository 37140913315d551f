"""What ``create_detector`` and ``create_segmenter`` promise alike (mambavision/dense/factory.py), tested once for
both: published names with and without their tag, the published files' tensor names and shapes, the published
file downloaded, and a wrong weight file named in one line."""
import json

import pytest
import torch

import mambavision.weights
from conftest import DENSE_FIXTURES
from mambavision.dense import create_detector, create_segmenter
from mambavision.published import published_models
from mambavision.weights import rename_published_keys_

FACTORIES = {'det': create_detector, 'seg': create_segmenter}
# a shallow backbone of the T width and narrow heads: the published names, little compute
SMALL = {'det': dict(channels=32, fc_channels=64, backbone_kwargs=dict(depths=(1, 1, 1, 1))),
         'seg': dict(channels=32, aux_channels=16, backbone_kwargs=dict(depths=(1, 1, 1, 1)))}
T_NAMES = {'det': 'cascade_mask_rcnn_mambavision_t.nv_coco', 'seg': 'upernet_mambavision_t.nv_ade20k'}
KINDS = {'det': 'Cascade Mask R-CNN', 'seg': 'UPerNet segmenter'}
HEAD_TENSORS = {'det': 'roi_head.bbox_head.0.fc_cls.weight', 'seg': 'decode_head.conv_seg.weight'}
# the published files' entries in downstream_state_dict_keys.json
FIXTURE_ENTRY = {
    'cascade_mask_rcnn_mambavision_t.nv_coco': 'cascade_mask_rcnn_mamba_vision_tiny_3x_coco',
    'cascade_mask_rcnn_mambavision_s.nv_coco': 'cascade_mask_rcnn_mamba_vision_small_3x_coco',
    'cascade_mask_rcnn_mambavision_b.nv_coco': 'cascade_mask_rcnn_mamba_vision_base_3x_coco',
    'upernet_mambavision_t.nv_ade20k': 'mamba_vision_160k_ade20k_tiny',
    'upernet_mambavision_s.nv_ade20k': 'mamba_vision_160k_ade20k_small',
    'upernet_mambavision_b.nv_ade20k': 'mamba_vision_160k_ade20k_base',
    'upernet_mambavision_l3.nv_in21k_ade20k_640': 'mamba_vision_160k_ade20k_l3_21k',
}


@pytest.mark.parametrize('task, name, close', [
    ('det', 'cascade_mask_rcnn_mambavision_tt.nv_coco', 'cascade_mask_rcnn_mambavision_t.nv_coco'),
    ('seg', 'upernet_mambavision_tt.nv_ade20k', 'upernet_mambavision_t.nv_ade20k'),
    ('seg', 'upernet_mambavision_l', 'upernet_mambavision_l3'),
    ('seg', 'upernet_mambavision_L3.nv_ade20k', 'upernet_mambavision_l3.nv_in21k_ade20k_640'),  # not t/s/b
])
def test_unknown_name_suggests_close_names(task, name, close):
    with pytest.raises(ValueError) as info:
        FACTORIES[task](name)
    message = str(info.value)
    kind = 'detector' if task == 'det' else 'segmenter'
    assert message.startswith(f'unknown {kind} {name!r}; did you mean ') and '\n' not in message
    assert close in message


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_untagged_name_is_the_published_model(task):
    with torch.device('meta'):
        model = FACTORIES[task](T_NAMES[task].split('.')[0])
    assert model.published['hf_repo'] == published_models(task)[0].hf_repo


@pytest.mark.parametrize('entry', published_models(), ids=lambda m: m.name)
def test_published_state_dict_names_and_shapes(entry):
    """Every tensor of the published file has our model's name (after the backbone's renaming) and shape."""
    published = json.loads((DENSE_FIXTURES / 'downstream_state_dict_keys.json').read_text())[FIXTURE_ENTRY[entry.name]]
    with torch.device('meta'):
        model = FACTORIES[entry.task](entry.name)
    expected = {n: tuple(shape) for n, shape in published['state_dict']}
    rename_published_keys_(expected, 'backbone.')
    assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == expected
    assert [stage.window_size for stage in model.backbone.stages[2:]] == published['backbone']['window_size'][2:]
    assert model.published['file'] == model.published['hf_repo'].split('/')[-1] + '.pth'
    if entry.task == 'seg':
        assert model.test_scale == ((2560, 640) if 'l3' in entry.name else (2048, 512))
        assert len(model.class_names) == len(model.palette) == 150 and model.class_names[0] == 'wall'
    else:
        assert model.transform.test_scale == (1333, 800)
        assert len(model.class_names) == len(model.palette) == 80 and model.class_names[0] == 'person'


def _published_names(state_dict: dict, fixture_entry: str) -> dict:
    """Our tensor names -> the published ones (the inverse of the backbone's renaming)."""
    published = json.loads((DENSE_FIXTURES / 'downstream_state_dict_keys.json').read_text())
    names = {k: k for k, _ in published[fixture_entry]['state_dict']}
    rename_published_keys_(names, 'backbone.')  # keys become ours, values stay published
    return {names[k]: v for k, v in state_dict.items()}


@pytest.mark.parametrize('task', ['det', 'seg'])
@pytest.mark.parametrize('naming', ['ours', 'published'])
def test_checkpoint_round_trip_and_pretrained_download(tmp_path, monkeypatch, task, naming):
    """A saved state dict of ours and a published-style mmengine file (published names, beside 'meta') load; with
    ``pretrained`` the published file is the one downloaded."""
    torch.manual_seed(0)
    factory, name = FACTORIES[task], T_NAMES[task]
    source = factory(name, **SMALL[task])
    state_dict = source.state_dict()
    if naming == 'published':
        state_dict = _published_names(state_dict, FIXTURE_ENTRY[name])
    assert ('backbone.patch_embed.conv_down.0.weight' in state_dict) == (naming == 'published')
    path = tmp_path / 'model.pth'
    torch.save({'meta': {'epoch': 36, 'note': 'x'}, 'state_dict': state_dict}, path)
    loaded = factory(name, checkpoint_path=str(path), **SMALL[task])
    assert not loaded.training
    for (tensor_name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), tensor_name
    calls = []
    monkeypatch.setattr(mambavision.weights, 'download_weights',
                        lambda repo, file, cache_dir=None: calls.append((repo, file)) or str(path))
    model = factory(name, pretrained=True, **SMALL[task])
    repo = published_models(task)[0].hf_repo
    assert calls == [(repo, repo.split('/')[1] + '.pth')]
    assert model.published == dict(hf_repo=repo, file=repo.split('/')[1] + '.pth', **published_models(task)[0].metrics)


@pytest.mark.parametrize('task', ['det', 'seg'])
@pytest.mark.parametrize('content, message', [
    ({'stem.conv1.weight': torch.zeros(1), 'head.fc.weight': torch.zeros(1)}, 'holds a classification model'),
    ({'patch_embed.conv_down.0.weight': torch.zeros(1), 'head.weight': torch.zeros(1)},
     'holds a classification model'),
    ({'backbone.x': torch.zeros(1)}, 'holds a backbone without heads'),
    ({'backbone.patch_embed.conv_down.3.weight': torch.zeros(96, 64, 3, 3), 'HEAD': torch.zeros(1)},
     'is a MambaVision-S KIND (dim 96), the model is MambaVision-T (dim 80); pick the name that matches the file'),
])
def test_wrong_checkpoint_is_one_line(tmp_path, task, content, message):
    content = {HEAD_TENSORS[task] if k == 'HEAD' else k: v for k, v in content.items()}
    path = tmp_path / 'wrong.pth'
    torch.save({'state_dict': content}, path)
    with pytest.raises(ValueError) as info:
        FACTORIES[task](T_NAMES[task], checkpoint_path=str(path), **SMALL[task])
    assert message.replace('KIND', KINDS[task]) in str(info.value)
    assert '\n' not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize('task, other', [('det', 'decode_head.conv_seg.weight'),
                                         ('seg', 'roi_head.bbox_head.0.fc_cls.weight')])
def test_the_other_kind_of_model_is_named(tmp_path, task, other):
    path = tmp_path / 'other.pth'
    torch.save({'state_dict': {'backbone.stem.conv1.weight': torch.zeros(1), other: torch.zeros(1)}}, path)
    held = 'a segmentation model (no roi_head.* tensors)' if task == 'det' else \
        'a detection model (no decode_head.* tensors)'
    with pytest.raises(ValueError, match=f'holds {held}, not a {KINDS[task]}'.replace('(', r'\(').replace(')', r'\)')
                       .replace('*', r'\*').replace('.', r'\.')):
        FACTORIES[task](T_NAMES[task], checkpoint_path=str(path), **SMALL[task])


def test_a_width_of_no_published_architecture_is_named_plainly(tmp_path):
    path = tmp_path / 'wrong.pth'
    torch.save({'state_dict': {'backbone.patch_embed.conv_down.3.weight': torch.zeros(96, 64, 3, 3),
                               'decode_head.conv_seg.weight': torch.zeros(1)}}, path)
    tiny = dict(backbone_kwargs=dict(dim=16, in_dim=8, depths=(1, 2, 3, 2), num_heads=(1, 2, 2, 4)), channels=32,
                aux_channels=16)
    with pytest.raises(ValueError, match=r'is a MambaVision-S UPerNet segmenter \(dim 96\), the model is MambaVision '
                                         r'\(dim 16\); pick the name'):
        create_segmenter('upernet_mambavision_t.nv_ade20k', checkpoint_path=str(path), **tiny)


@pytest.mark.parametrize('task, fresh', [
    ('det', ['roi_head.bbox_head.0.fc_cls.weight', 'roi_head.bbox_head.2.fc_reg.bias',
             'roi_head.mask_head.1.conv_logits.weight']),
    ('seg', ['decode_head.conv_seg.weight', 'auxiliary_head.conv_seg.bias']),
])
def test_own_classes_keep_fresh_class_specific_layers(tmp_path, task, fresh):
    """A published model with another class count: its class-specific layers start fresh, everything else loads."""
    torch.manual_seed(0)
    source = FACTORIES[task](T_NAMES[task], **SMALL[task])
    path = tmp_path / 'published.pth'
    torch.save({'state_dict': source.state_dict()}, path)
    torch.manual_seed(1)
    model = FACTORIES[task](T_NAMES[task], checkpoint_path=str(path), num_classes=5, **SMALL[task])
    assert len(model.class_names) == len(model.palette) == 5
    loaded = model.state_dict()
    assert set(fresh) <= set(model.published['fresh'])
    for name, tensor in loaded.items():
        if name in model.published['fresh']:
            assert tensor.shape != source.state_dict()[name].shape, name
        else:
            assert torch.equal(tensor, source.state_dict()[name]), name


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_a_fine_tuned_checkpoint_brings_its_classes(tmp_path, task):
    """A checkpoint that records its classes (meta.dataset_meta, as mmengine and our trainer write it) comes back
    with its own classifiers, class names and palette from the name alone; num_classes given still wins."""
    names, palette = ['cat', 'dog', 'fish'], [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    torch.manual_seed(0)
    source = FACTORIES[task](T_NAMES[task], num_classes=3, **SMALL[task])
    path = tmp_path / 'fine_tuned.pth'
    torch.save({'meta': {'dataset_meta': {'classes': names, 'palette': palette}}, 'state_dict': source.state_dict()},
               path)
    model = FACTORIES[task](T_NAMES[task].split('.')[0], checkpoint_path=str(path), **SMALL[task])
    assert model.class_names == names and model.palette == palette and 'fresh' not in model.published
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    other = FACTORIES[task](T_NAMES[task], checkpoint_path=str(path), num_classes=5, **SMALL[task])
    assert len(other.class_names) == 5 and other.published['fresh']
