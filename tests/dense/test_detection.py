"""Cascade Mask R-CNN: exact against mmdet's golden fixture, published names, predict contract, bad input."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mambavision.dense import boxes as box_ops
from mambavision.dense.detection import CascadeMaskRCNN, create_detector, list_detectors
from mambavision.model import create_dense_backbone

from conftest import DENSE_FIXTURES as FIXTURES


@pytest.fixture(scope='module')
def fixture():
    return load_file(FIXTURES / 'cascade_tiny.safetensors'), json.loads((FIXTURES / 'cascade_tiny.json').read_text())


def tiny_detector(**kwargs) -> CascadeMaskRCNN:
    """The fixture's architecture: a tiny backbone, 32-wide heads, 64-wide box fc."""
    cfg = json.loads((FIXTURES / 'cascade_tiny.json').read_text())['model']['backbone']
    backbone = create_dense_backbone('test_mambavision', cfg['window_size'],
                                     **{k: cfg[k] for k in ('dim', 'in_dim', 'depths', 'num_heads')})
    return CascadeMaskRCNN(backbone, **dict(dict(channels=32, fc_channels=64, test_scale=(333, 200)), **kwargs)).eval()


@pytest.fixture(scope='module')
def published_tiny(fixture):
    tensors, _ = fixture
    model = tiny_detector()
    model.load_state_dict({k[len('state_dict.'):]: v for k, v in tensors.items() if k.startswith('state_dict.')})
    return model


@pytest.fixture(scope='module')
def confident_tiny():
    """A random tiny detector whose class logits favour classes 3 and 17, so that it detects things."""
    torch.manual_seed(0)
    model = tiny_detector()
    for head in model.roi_head.bbox_head:
        head.fc_cls.bias.data[3], head.fc_cls.bias.data[17] = 5., 4.
    return model


def test_network_input_matches_fixture(fixture, published_tiny):
    tensors, config = fixture
    x, scale_factor = published_tiny.transform.preprocess(tensors['image_rgb'].numpy())
    assert tuple(x.shape[1:]) == tuple(config['img_shape'])
    assert scale_factor == pytest.approx(config['scale_factor'])
    batch = published_tiny.transform.pad_batch([x])
    assert batch.shape == tensors['network_input'].shape
    torch.testing.assert_close(batch, tensors['network_input'], atol=1e-5, rtol=0)


def test_rpn_proposals_match_fixture(fixture, published_tiny):
    """Same proposals and scores; proposals whose scores tie exactly (saturated sigmoids of random
    weights) come out of the sorts in an implementation-defined order, so they are compared as sets."""
    tensors, config = fixture
    image_sizes = [tuple(config['img_shape'])]
    feats = published_tiny.extract_features(tensors['network_input'])
    boxes, scores = published_tiny.rpn_head.predict(feats, image_sizes)[0]
    expected_boxes, expected_scores = tensors['proposals'], tensors['proposal_scores']
    assert boxes.shape == expected_boxes.shape
    torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=0)
    assert (scores[:-1] >= scores[1:]).all()
    same_score = (scores[:, None] - expected_scores[None, :]).abs() < 1e-5
    distance = torch.cdist(boxes, expected_boxes, p=float('inf')).masked_fill(~same_score, float('inf'))
    assert distance.min(dim=1).values.max() < 0.05  # pixels of a 267 x 200 input
    assert distance.min(dim=0).values.max() < 0.05


def test_cascade_heads_match_fixture(fixture, published_tiny):
    """From the network input and the fixture's proposals: mmdet's boxes, scores, labels and masks."""
    tensors, config = fixture
    image_sizes, original_sizes = [tuple(config['img_shape'])], [tuple(tensors['image_rgb'].shape[:2])]
    feats = published_tiny.extract_features(tensors['network_input'])
    detections = published_tiny.roi_head.predict(feats, [tensors['proposals']], image_sizes)
    out = published_tiny.transform.postprocess(detections, image_sizes, original_sizes)[0]
    assert out['boxes'].shape == tensors['boxes'].shape
    torch.testing.assert_close(out['boxes'], tensors['boxes'], atol=2e-3, rtol=0)  # measured 4.1e-4
    torch.testing.assert_close(out['scores'], tensors['scores'], atol=1e-4, rtol=0)  # measured 3.3e-5
    assert torch.equal(out['labels'], tensors['labels'])
    assert out['masks'].dtype == torch.bool and out['masks'].shape == tensors['masks'].shape
    # a pixel may flip where the averaged mask probability sits at 0.5; measured: none of 480,000 do
    assert (out['masks'] != tensors['masks']).sum() <= 10


def test_predict_matches_fixture(fixture, published_tiny):
    """The whole pipeline from the RGB image. Float rounding in the backbone moves RoIAlign's adaptive
    sampling grid at a few boxes, which then reorders near-equal scores or drops one out of the best 100,
    so detections are matched as a set (measured: 99 of 100 within 0.013 px and 8.8e-4 in score, their
    masks 19 pixels of 475,200 apart)."""
    tensors, _ = fixture
    out = published_tiny.predict(tensors['image_rgb'].numpy())[0]
    expected_boxes, expected_scores, expected_labels = tensors['boxes'], tensors['scores'], tensors['labels']
    same = (expected_labels[:, None] == out['labels'][None]) & (
        (expected_scores[:, None] - out['scores'][None]).abs() < 2e-3)
    distance = torch.cdist(expected_boxes, out['boxes'], p=float('inf')).masked_fill(~same, float('inf'))
    nearest, match = distance.min(dim=1)
    matched = nearest < 0.05
    assert matched.sum() >= 95
    assert (out['masks'][match[matched]] != tensors['masks'][matched]).float().mean() < 1e-3


def test_predict_contract(confident_tiny):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), rng.integers(0, 256, (64, 50, 3), dtype=np.uint8)]
    outputs = confident_tiny.predict(images)
    assert len(outputs) == 2
    for image, out in zip(images, outputs):
        n = len(out['scores'])
        assert 0 < n <= 100
        assert out['boxes'].dtype == torch.float32 and out['boxes'].shape == (n, 4)
        assert out['scores'].dtype == torch.float32 and (out['scores'][:-1] >= out['scores'][1:]).all()
        assert out['labels'].dtype == torch.int64 and out['labels'].min() >= 0 and out['labels'].max() < 80
        assert out['masks'].dtype == torch.bool and out['masks'].shape == (n, *image.shape[:2])
        boxes = out['boxes']
        assert (boxes[:, 2:] >= boxes[:, :2]).all() and (boxes >= 0).all()
        assert (boxes[:, 2] <= image.shape[1]).all() and (boxes[:, 3] <= image.shape[0]).all()
    assert confident_tiny.class_names[0] == 'person' and len(confident_tiny.palette) == 80


def test_predict_batches_same_size_images(confident_tiny):
    """Only images that pad to the same size share a forward, so batching changes nothing but the
    rounding of batched matrix products (measured: boxes 2.3e-5, one mask pixel in 3.2 M)."""
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8) for _ in range(2)]
    images.insert(1, rng.integers(0, 256, (120, 90, 3), dtype=np.uint8))  # another padded size: its own batch
    batched = confident_tiny.predict(images, batch_size=3)
    for image, out in zip(images, batched):
        single = confident_tiny.predict(image)[0]
        assert torch.equal(out['labels'], single['labels'])
        torch.testing.assert_close(out['boxes'], single['boxes'], atol=1e-3, rtol=0)
        torch.testing.assert_close(out['scores'], single['scores'], atol=1e-5, rtol=0)
        assert (out['masks'] != single['masks']).sum() <= 10


def test_predict_tiny_and_huge_images(confident_tiny):
    """A 1x1 image is upscaled and a 10000x8000 one downscaled by the protocol; masks come at image size."""
    out = confident_tiny.predict(np.full((1, 1, 3), 128, np.uint8))[0]
    assert out['masks'].shape[1:] == (1, 1) and (out['boxes'] <= 1).all()
    confident_tiny.roi_head.max_per_img = 1  # one mask of 80 M pixels is enough
    try:
        huge = np.zeros((8000, 10000, 3), np.uint8)
        huge[2000:6000, 3000:7000] = 200
        out = confident_tiny.predict(huge)[0]
    finally:
        confident_tiny.roi_head.max_per_img = 100
    assert len(out['scores']) == 1 and out['masks'].shape == (1, 8000, 10000)
    assert (out['boxes'][:, 2] <= 10000).all() and (out['boxes'][:, 3] <= 8000).all()


def test_batched_nms_follows_mmcv_beyond_its_split_threshold():
    """From 10,000 boxes on, mmcv orders the kept boxes by a score sort over the kept set in index order."""
    torch.manual_seed(0)
    xy = torch.rand(12000, 2) * 500
    boxes = torch.cat([xy, xy + 5 + torch.rand(12000, 2) * 50], dim=1)
    scores, groups = torch.rand(12000), torch.randint(0, 80, (12000,))
    keep = box_ops.batched_nms(boxes, scores, groups, 0.5)
    per_group = torch.cat([
        torch.nonzero(groups == g).squeeze(1)[
            box_ops.nms(boxes[groups == g], scores[groups == g], 0.5)] for g in range(80)])
    assert set(keep.tolist()) == set(per_group.tolist())
    assert (scores[keep][:-1] >= scores[keep][1:]).all()


def _test_cfg(model: CascadeMaskRCNN) -> dict:
    """The detector's test settings in mmdet's ``test_cfg`` form (proposals of any positive size are kept)."""
    rpn, rcnn = model.rpn_head, model.roi_head
    return dict(
        rpn=dict(nms_pre=rpn.pre_nms, max_per_img=rpn.max_per_img,
                 nms=dict(type='nms', iou_threshold=rpn.iou_threshold), min_bbox_size=0),
        rcnn=dict(score_thr=rcnn.score_threshold, nms=dict(type='nms', iou_threshold=rcnn.iou_threshold),
                  max_per_img=rcnn.max_per_img, mask_thr_binary=model.transform.mask_threshold))


def test_test_configuration_is_the_fixtures():
    """The published test settings, the fixture's preprocessing and the cascade's box coder stds, for the
    fixture's model and every published detector."""
    config = json.loads((FIXTURES / 'cascade_tiny.json').read_text())
    model_cfg = config['model']
    stds = tuple(tuple(head['bbox_coder']['target_stds']) for head in model_cfg['roi_head']['bbox_head'])
    with torch.device('meta'):
        published = [create_detector(name) for name in list_detectors()]
    for model in [tiny_detector(), *published]:
        assert _test_cfg(model) == model_cfg['test_cfg']
        assert model.transform.size_divisor == model_cfg['data_preprocessor']['pad_size_divisor']
        assert model.roi_head.stage_stds == stds
        assert model.rpn_head.strides == tuple(model_cfg['rpn_head']['anchor_generator']['strides'])
    assert tiny_detector().transform.test_scale == tuple(config['test_pipeline'][1]['scale'])
    assert all(model.transform.test_scale == (1333, 800) for model in published)


def test_predict_runs_in_eval_mode_and_restores_the_mode(confident_tiny):
    """The box heads' BatchNorm would normalise by the batch in train mode; predict switches to eval and back."""
    image = np.random.default_rng(2).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    expected = confident_tiny.predict(image)[0]
    confident_tiny.train()
    try:
        out = confident_tiny.predict(image)[0]
        assert confident_tiny.training and all(m.training for m in confident_tiny.modules())
    finally:
        confident_tiny.eval()
    assert torch.equal(out['boxes'], expected['boxes']) and torch.equal(out['masks'], expected['masks'])
