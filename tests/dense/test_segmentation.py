"""UPerNet segmentation: exact against mmseg's output (``upernet_tiny``), the published state dicts
load, ``predict`` on every kind of input and size, bad input, training and ONNX export."""
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from mambavision.dense import segmentation
from mambavision.dense.segmentation import AdaptiveAvgPool, UPerNet, create_segmenter
from mambavision.export import INPUT_NAME, export_onnx, onnx_session
from mambavision.model import create_dense_backbone

from conftest import DENSE_FIXTURES as FIXTURES

REL_TOL = 1e-5


def _tiny_upernet(num_classes=19, channels=32, aux_channels=16, test_scale=(512, 128), seed=0) -> UPerNet:
    """The ``upernet_tiny`` configuration (random weights unless loaded)."""
    torch.manual_seed(seed)
    backbone = create_dense_backbone(
        'test_mambavision', (8, 8, 32, 16), dim=16, in_dim=8, depths=(1, 2, 3, 2), num_heads=(1, 2, 2, 4))
    return UPerNet(backbone, num_classes, channels, aux_channels, test_scale=test_scale).eval()


def _rel_error(got, expected):
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope='module')
def golden():
    return load_file(FIXTURES / 'upernet_tiny.safetensors')


@pytest.fixture(scope='module')
def fixture_model(golden):
    """``upernet_tiny``'s model with its weights, loaded strictly under the published names."""
    model = _tiny_upernet()
    model.load_state_dict({k[len('state_dict.'):]: v for k, v in golden.items() if k.startswith('state_dict.')})
    return model


def test_fixture_config_is_the_one_we_build():
    config = json.loads((FIXTURES / 'upernet_tiny.json').read_text())
    model, backbone = config['model'], config['model']['backbone']
    decode, aux = model['decode_head'], model['auxiliary_head']
    assert (backbone['dim'], backbone['in_dim'], backbone['depths'], backbone['num_heads'], backbone['window_size'],
            backbone['layer_scale']) == (16, 8, [1, 2, 3, 2], [1, 2, 2, 4], [8, 8, 32, 16], None)
    assert (decode['channels'], decode['num_classes'], decode['pool_scales'], aux['channels'], aux['in_index']) == (
        32, 19, [1, 2, 3, 6], 16, 2)
    assert model['test_cfg'] == {'mode': 'whole'} and config['test_pipeline'][1]['scale'] == [512, 128]


def test_fixture_decode_and_aux_logits(golden, fixture_model):
    x = golden['network_input']
    with torch.no_grad():
        decode = fixture_model(x)
        aux = fixture_model.auxiliary_head(fixture_model.extract_features(x)[2])
    assert decode.shape == golden['decode_logits'].shape and aux.shape == golden['aux_logits'].shape
    assert _rel_error(decode, golden['decode_logits']) < REL_TOL
    assert _rel_error(aux, golden['aux_logits']) < REL_TOL


def test_fixture_predict_input_logits_and_labels(golden, fixture_model):
    """Image -> the test pipeline's network input -> final logits at the image size and the label map."""
    seen = []
    hook = fixture_model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        result = fixture_model.predict(golden['image_rgb'].numpy())
    finally:
        hook.remove()
    assert len(seen) == 1 and torch.equal(seen[0], golden['network_input'])
    (result,) = result
    assert result['logits'].dtype == torch.float32 and result['logits'].shape == golden['seg_logits'].shape
    assert _rel_error(result['logits'], golden['seg_logits']) < REL_TOL
    expected = golden['pred'][0]
    top2 = golden['seg_logits'].topk(2, dim=0).values
    tie = (top2[0] - top2[1]) < 1e-5 * top2.abs().max()
    assert result['labels'].dtype == torch.int64
    assert torch.equal(result['labels'][~tie], expected[~tie])
    assert torch.equal(result['labels'], result['logits'].argmax(0))


@pytest.mark.parametrize('size', [(4, 6), (1, 1), (13, 7), (2, 9)])
def test_adaptive_avg_pool_is_pytorchs(size):
    """The pooling matrices give nn.AdaptiveAvgPool2d's bins, also with more bins than rows (6 over 4)."""
    x = torch.randn(2, 3, *size)
    for scale in (1, 2, 3, 6):
        torch.testing.assert_close(AdaptiveAvgPool(scale)(x), F.adaptive_avg_pool2d(x, scale))


# ---------------------------------------------------------------------------------------------
# predict on every kind of input


@pytest.fixture(scope='module')
def tiny():
    return _tiny_upernet(num_classes=4, channels=8, aux_channels=8, test_scale=(96, 64), seed=1)


def _check(result, size, num_classes=4):
    assert set(result) == {'logits', 'labels'}
    assert result['logits'].shape == (num_classes, *size) and result['logits'].dtype == torch.float32
    assert result['labels'].shape == size and result['labels'].dtype == torch.int64
    assert torch.isfinite(result['logits']).all()
    assert torch.equal(result['labels'], result['logits'].argmax(0))


def test_predict_input_kinds_agree(tiny):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)  # odd size
    expected = tiny.predict(array)
    assert isinstance(expected, list) and len(expected) == 1
    _check(expected[0], (37, 53))
    for same in (Image.fromarray(array), torch.from_numpy(array), [array]):
        (result,) = tiny.predict(same)
        assert torch.equal(result['labels'], expected[0]['labels'])
        torch.testing.assert_close(result['logits'], expected[0]['logits'])


def test_predict_converts_grayscale_rgba_and_16_bit(tiny):
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (30, 41), dtype=np.uint8)
    expected = tiny.predict(np.repeat(gray[:, :, None], 3, axis=2))[0]['logits']
    rgba = np.concatenate([np.repeat(gray[:, :, None], 3, axis=2), np.full((30, 41, 1), 7, np.uint8)], axis=2)
    for image in (gray, Image.fromarray(gray), rgba, gray.astype(np.uint16) * 257):
        torch.testing.assert_close(tiny.predict(image)[0]['logits'], expected)


def test_predict_list_batches_same_sizes_and_keeps_order(tiny):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size, dtype=np.uint8) for size in [(40, 60, 3), (61, 29, 3), (40, 60, 3)]]
    calls = []
    hook = tiny.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        results = tiny.predict(images)
    finally:
        hook.remove()
    assert sorted(calls) == [1, 2]  # the two 40x60 images in one batch
    for image, result in zip(images, results):
        _check(result, image.shape[:2])
        (alone,) = tiny.predict(image)
        torch.testing.assert_close(result['logits'], alone['logits'], rtol=1e-5, atol=1e-5)


def test_predict_one_pixel_image(tiny):
    (result,) = tiny.predict(np.full((1, 1, 3), 200, np.uint8))
    _check(result, (1, 1))


def test_predict_in_bfloat16_and_under_autocast(tiny):
    """A bf16 model and fp32 under bf16 autocast: float32 logits at the image size, close to fp32's."""
    image = np.random.default_rng(4).integers(0, 256, (45, 60, 3), dtype=np.uint8)
    (expected,) = tiny.predict(image)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        (autocast,) = tiny.predict(image)
    (bf16,) = _tiny_upernet(num_classes=4, channels=8, aux_channels=8, test_scale=(96, 64), seed=1).to(
        torch.bfloat16).predict(image)
    for result in (autocast, bf16):
        _check(result, (45, 60))
        assert _rel_error(result['logits'], expected['logits']) < 0.05
        assert (result['labels'] == expected['labels']).float().mean() > 0.9


def test_predict_restores_train_mode(tiny):
    tiny.train()
    try:
        first = tiny.predict(np.zeros((20, 30, 3), np.uint8))[0]['logits']
        assert tiny.training
        torch.testing.assert_close(tiny.predict(np.zeros((20, 30, 3), np.uint8))[0]['logits'], first)  # no dropout
    finally:
        tiny.eval()


def test_label_blocks_equal_full_resize(monkeypatch):
    """Labels alone (a block of rows at a time) = argmax of the full bilinear resize."""
    logits = torch.randn(5, 23, 31)
    for size in [(97, 120), (23, 31), (7, 200), (1, 1)]:
        expected = F.interpolate(logits[None], size, mode='bilinear', align_corners=False)[0].argmax(0)
        assert torch.equal(segmentation._labels_in_row_blocks(logits, size, block_elements=5 * 120 * 3), expected)


def test_predict_labels_alone_equal_full(tiny):
    image = np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    (full,), (alone,) = tiny.predict(image), tiny.predict(image, return_logits=False)
    assert set(alone) == {'labels'} and torch.equal(alone['labels'], full['labels'])


def test_predict_huge_image():
    """A 10000x8000 image is resized by the protocol and its labels come a block of rows at a time; asking
    for its logits at full size when they are huge (150 classes: 45 GiB) is refused in one line, before any work."""
    image = np.zeros((8000, 10000, 3), np.uint8)  # zero pages: cheap
    image[2000:6000, 3000:7000] = (250, 120, 30)
    with pytest.raises(ValueError, match=r'^the logits of a 10000x8000 image \(150 classes\) would take 45 GiB; '
                                         r'predict\(\.\.\., return_logits=False\) gives its labels alone$'):
        _tiny_upernet(num_classes=150).predict(image)
    model = _tiny_upernet(num_classes=2, channels=8, aux_channels=8, test_scale=(96, 64))  # 2 classes: quicker
    outputs = []
    hook = model.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        (result,) = model.predict(image, return_logits=False)
    finally:
        hook.remove()
    (decode,) = outputs
    assert decode.shape[-2:] == (64 // 4, 80 // 4)  # the network saw the image resized to 80x64
    labels = result['labels']
    assert set(result) == {'labels'} and labels.shape == (8000, 10000) and labels.dtype == torch.int64
    # sampled rows against PyTorch's own resize (mmseg's two: to the network input, then to the image)
    rows = [0, 1, 2999, 4000, 7998, 7999]
    at_input = F.interpolate(decode, (64, 80), mode='bilinear', align_corners=False)
    tall = F.interpolate(at_input, (8000, 80), mode='bilinear', align_corners=False)[:, :, rows]
    expected = F.interpolate(tall, (len(rows), 10000), mode='bilinear', align_corners=False)[0]
    top2 = expected.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-5 * top2.abs().max()
    assert clear.float().mean() > 0.99
    assert torch.equal(labels[rows][clear], expected.argmax(0)[clear])


@pytest.mark.parametrize('bad, message', [
    (np.zeros((10, 10, 3), np.float32), 'uint8'),
    ('no-such-image.png', 'no-such-image.png'),
])
def test_predict_bad_input_is_one_line(tiny, bad, message):
    with pytest.raises((ValueError, FileNotFoundError, OSError)) as info:
        tiny.predict(bad)
    assert message in str(info.value) and '\n' not in str(info.value)


# ---------------------------------------------------------------------------------------------
# create_segmenter: names and weight files


def _tiny_segmenter(**kwargs):
    """create_segmenter's T entry on a tiny backbone (the same names as the real one)."""
    tiny_backbone = dict(dim=16, in_dim=8, depths=(1, 2, 3, 2), num_heads=(1, 2, 2, 4))
    return create_segmenter('upernet_mambavision_t.nv_ade20k', backbone_kwargs=tiny_backbone, channels=32,
                            aux_channels=16, **kwargs)


def test_checkpoint_path_reads_published_and_own_files(tmp_path, golden, fixture_model):
    """A published-style mmengine file (published names, beside 'meta') and our own saved state dict."""
    published = tmp_path / 'published.pth'
    torch.save({'meta': {'mmseg_version': '1.2.2', 'iter': 160000},
                'state_dict': {k[len('state_dict.'):]: v for k, v in golden.items() if k.startswith('state_dict.')}},
               published)
    loaded = _tiny_segmenter(checkpoint_path=str(published), num_classes=19)
    expected = fixture_model.state_dict()
    assert not loaded.training and loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(t, expected[n]) for n, t in loaded.state_dict().items())
    own = tmp_path / 'own.pth'
    torch.save(loaded.state_dict(), own)
    again = _tiny_segmenter(checkpoint_path=str(own), num_classes=19)
    assert all(torch.equal(t, expected[n]) for n, t in again.state_dict().items())


def test_own_classes_keep_fresh_classifiers(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / 'ade.pth'
    source = _tiny_segmenter()
    torch.save(source.state_dict(), path)
    model = _tiny_segmenter(checkpoint_path=str(path), num_classes=5)
    assert model.decode_head.conv_seg.out_channels == 5 and len(model.class_names) == 5
    torch.testing.assert_close(model.decode_head.bottleneck.conv.weight, source.decode_head.bottleneck.conv.weight)


# ---------------------------------------------------------------------------------------------
# training


def _synthetic_batch(n=4, size=(64, 96), seed=0):
    """Images with a bright rectangle on noise; labels: 1 inside, 0 outside, 255 (ignored) on a border strip."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, *size, generator=g) * 0.3
    target = torch.zeros(n, *size, dtype=torch.int64)
    for i in range(n):
        top, left = (torch.randint(0, side // 2, (1,), generator=g).item() for side in size)
        x[i, :, top:top + size[0] // 3, left:left + size[1] // 3] += 2
        target[i, top:top + size[0] // 3, left:left + size[1] // 3] = 1
    target[:, :, :4] = 255
    return x, target


def test_train_mode_gives_both_heads_and_loss_is_mmsegs():
    model = _tiny_upernet(num_classes=3)
    x, target = _synthetic_batch(2)
    model.eval()  # no dropout: the loss is a function of the logits alone
    with torch.no_grad():
        features = model.extract_features(x)
        decode, aux = model.decode_head(features), model.auxiliary_head(features[2])
        loss = model.loss(x, target)

    def ce(logits):  # mmseg: resize to the labels, CE per pixel (0 where ignored), mean over all pixels
        logits = F.interpolate(logits, target.shape[-2:], mode='bilinear', align_corners=False)
        per_pixel = F.cross_entropy(logits, target, ignore_index=255, reduction='none')
        assert (per_pixel[target == 255] == 0).all()
        return per_pixel.sum() / target.numel()

    torch.testing.assert_close(loss, ce(decode) + 0.4 * ce(aux))
    model.train()
    decode_train, aux_train = model(x)
    assert decode_train.shape == decode.shape and aux_train.shape == aux.shape


def _gradients(model, x, target):
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout masks
    model.loss(x, target).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradients_reach_the_backbone_and_checkpointing_keeps_them():
    model = _tiny_upernet(num_classes=3).train()
    x, target = _synthetic_batch(2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = _gradients(model, x, target)
    assert all(torch.isfinite(g).all() for g in plain.values())
    backbone = [n for n in plain if n.startswith('backbone.')]
    assert backbone and all(plain[n].abs().sum() > 0 for n in backbone)
    model.load_state_dict(state)  # the same BatchNorm statistics
    model.set_grad_checkpointing()
    assert any(stage.grad_checkpointing for stage in model.backbone.stages)
    checkpointed = _gradients(model, x, target)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize('optimizer', ['sgd', 'adamw'])
def test_a_few_steps_make_the_loss_fall(optimizer):
    model = _tiny_upernet(num_classes=2, channels=16, aux_channels=8).train()
    x, target = _synthetic_batch(4)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if optimizer == 'sgd'
           else torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01))
    losses = []
    for _ in range(12):
        loss = model.loss(x, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# ONNX


def test_onnx_export_dynamic_batch_height_width(tmp_path, fixture_model):
    """Normalised batch -> decode logits, traced once, run in onnxruntime at other sizes (the fixture's weights:
    the scan, the window padding and the pyramid pooling all matter)."""
    path = export_onnx(fixture_model, tmp_path / 'upernet.onnx', img_size=(128, 171), batch_size=2)
    graph = onnx.load(path).graph
    assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [
        'batch', 3, 'height', 'width']
    assert [bool(d.dim_param) for d in graph.output[0].type.tensor_type.shape.dim] == [True, False, True, True]
    session = onnx_session(path)
    for shape in [(1, 3, 97, 75), (3, 3, 200, 64)]:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = fixture_model(x)
        got = torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])
        assert got.shape == expected.shape
        assert _rel_error(got, expected) < 1e-4, shape
