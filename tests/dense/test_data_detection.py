"""Detection training data: the transforms and the published pipeline equal mmdet 3.3.0's (det_pipeline.npz,
made by make_det_pipeline.py with mmdet's random choices fixed), the COCO reader equals mmdet's CocoDataset +
LoadAnnotations, the YOLO reader, batching, per-sample seeding, and the one-line errors."""
import hashlib
import json
import sys

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_api

from mambavision.dense.data import (
    DetectionTrainPipeline, collate_detection, detection_dataset, read_coco_detection, read_yolo_detection,
)
from mambavision.dense.data.detection import _resize_masks, crop, decode_masks, hflip, resize
from mambavision.dense.evaluate import coco_evaluate, coco_results
from mambavision.dense.image import normalize

from conftest import DENSE_FIXTURES


@pytest.fixture(scope='module')
def golden():
    with np.load(DENSE_FIXTURES / 'det_pipeline.npz') as f:
        return dict(f)


def _input(golden):
    return golden['input.image'], dict(boxes=golden['input.boxes'], labels=golden['input.labels'],
                                       masks=golden['input.masks'])


def _assert_case(golden, name, image, target):
    assert target['boxes'].dtype == np.float32 and target['labels'].dtype == np.int64
    np.testing.assert_array_equal(target['boxes'], golden[f'{name}.boxes'].reshape(-1, 4))
    np.testing.assert_array_equal(target['labels'], golden[f'{name}.labels'])
    assert image.shape == tuple(golden[f'{name}.image_shape'])
    assert target['masks'].shape == tuple(golden[f'{name}.masks_shape'])
    if f'{name}.image' in golden:
        np.testing.assert_array_equal(image, golden[f'{name}.image'])
        np.testing.assert_array_equal(target['masks'], golden[f'{name}.masks'])
    else:
        assert _sha256(image) == golden[f'{name}.image_sha256'].tobytes()
        assert _sha256(target['masks']) == golden[f'{name}.masks_sha256'].tobytes()


def _sha256(array) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).digest()


def test_flip_is_mmdets(golden):
    _assert_case(golden, 'flip', *hflip(*_input(golden)))


def test_resize_is_mmdets(golden):
    image, target = resize(*_input(golden), (100, 70))
    _assert_case(golden, 'resize', image, target)
    assert target['scale_factor'] == tuple(golden['resize.scale_factor'])


@pytest.mark.parametrize('k', range(4))  # objects cut / none left / the whole image / at the bottom
def test_crop_is_mmdets(golden, k):
    crop_height, crop_width, top, left = golden['crops'][k].tolist()
    _assert_case(golden, f'crop{k}', *crop(*_input(golden), top, left, crop_height, crop_width))


class ScriptedGenerator:
    """A stand-in for numpy's Generator drawing from the fractions mmdet's global RNG was given."""

    def __init__(self, fractions):
        self.fractions, self.calls = list(fractions), []

    def random(self):
        return self.fractions.pop(0)

    def integers(self, low, high=None):
        low, high = (0, low) if high is None else (low, high)
        value = low + int(self.fractions.pop(0) * (high - low))
        self.calls.append([low, high, value])
        return value


@pytest.mark.parametrize('k', range(3))  # (a) with flip; (b) without; (b) with flip, a crop cutting objects away
def test_published_pipeline_is_mmdets(golden, k):
    rng = ScriptedGenerator(golden[f'pipeline{k}.script'].tolist())
    image, target = DetectionTrainPipeline()(*_input(golden), rng)
    assert not rng.fractions
    assert rng.calls == golden[f'pipeline{k}.calls'].tolist()  # the same choices from the same ranges
    _assert_case(golden, f'pipeline{k}', image, target)
    assert target['scale_factor'] == tuple(golden[f'pipeline{k}.scale_factor'])


def _large_input():
    """make_det_pipeline.large_input(): a 600x900 image given by a formula, three boxes with box masks."""
    yy, xx = np.mgrid[:600, :900]
    image = np.stack([(xx * 7 + yy * 13) % 256, (xx * yy) % 251, (xx // 3 + yy * 5) % 256], -1).astype(np.uint8)
    boxes = np.array([[10.5, 20.25, 300.75, 400.0], [500.0, 100.0, 899.5, 599.0], [0.0, 0.0, 900.0, 600.0]],
                     np.float32)
    masks = np.zeros((3, 600, 900), np.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes.astype(int)):
        mask[y1:y2, x1:x2] = 1
    return image, dict(boxes=boxes, labels=np.array([0, 1, 2], np.int64), masks=masks)


@pytest.mark.parametrize('k', range(2))  # shrinking: (a) with flip at the smallest scale; (b) at the largest
def test_published_pipeline_is_mmdets_on_a_large_image(golden, k):
    rng = ScriptedGenerator(golden[f'large{k}.script'].tolist())
    image, target = DetectionTrainPipeline()(*_large_input(), rng)
    assert rng.calls == golden[f'large{k}.calls'].tolist()
    _assert_case(golden, f'large{k}', image, target)
    assert target['scale_factor'] == tuple(golden[f'large{k}.scale_factor'])


def test_mask_resize_is_per_mask_nearest_for_many_masks():
    masks = (np.random.default_rng(0).random((600, 9, 13)) < 0.5).astype(np.uint8)  # > 128: OpenCV 5 channels
    expected = np.stack([cv2.resize(m, (20, 14), interpolation=cv2.INTER_NEAREST) for m in masks])
    np.testing.assert_array_equal(_resize_masks(masks, (14, 20)), expected)
    np.testing.assert_array_equal(_resize_masks(masks[:1], (14, 20)), expected[:1])


def test_pipeline_draws_only_from_the_generator_it_is_given(golden):
    image, target = _input(golden)
    runs = [DetectionTrainPipeline()(image, target, np.random.default_rng(7)) for _ in range(2)]
    np.random.seed(0)
    runs.append(DetectionTrainPipeline()(image, target, np.random.default_rng(7)))
    for other in runs[1:]:
        np.testing.assert_array_equal(runs[0][0], other[0])
        np.testing.assert_array_equal(runs[0][1]['boxes'], other[1]['boxes'])


# ---------------------------------------------------------------------------------------------
# COCO


def _write_golden_coco(golden, root):
    (root / 'train').mkdir()
    for key in golden:
        if key.startswith('coco.image'):
            cv2.imwrite(str(root / 'train' / f'im{key[len("coco.image"):]}.png'), golden[key][..., ::-1])
    (root / 'train.json').write_bytes(golden['coco.json'].tobytes())
    return root


def test_coco_reader_is_mmdets(golden, tmp_path):
    root = _write_golden_coco(golden, tmp_path)
    with pytest.warns(UserWarning) as caught:
        dataset = detection_dataset(str(root), 'train', pipeline=None)
    message = str(caught[0].message)
    assert '1 boxes reach outside their image and were clipped (first: annotation 3 of im1.png)' in message
    assert '3 objects smaller than 1 px, outside their image or with an unusable mask' in message
    assert dataset.class_names == ('three', 'seven', 'twelve') and dataset.category_ids == (3, 7, 12)
    assert dataset.with_masks
    # filter_empty_gt and min_size as mmdet: no annotations (5) and 20 px high (3) out; crowd only (4) in
    assert [r.image_id for r in dataset.records] == golden['coco.kept'].tolist()
    for index, record in enumerate(dataset.records):
        image, target = dataset.load(index)
        np.testing.assert_array_equal(image, golden[f'coco.image{record.image_id}'])
        trained = ~golden[f'coco.{record.image_id}.ignore']  # crowd and unusable masks are not trained on
        boxes = golden[f'coco.{record.image_id}.boxes'].reshape(-1, 4)[trained]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, record.width)  # ours clipped on reading, mmdet's at the resize
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, record.height)
        np.testing.assert_array_equal(target['boxes'], boxes)
        np.testing.assert_array_equal(target['labels'], golden[f'coco.{record.image_id}.labels'][trained])
        np.testing.assert_array_equal(target['masks'], golden[f'coco.{record.image_id}.masks'][trained])


def test_coco_validation_split_keeps_every_image(golden, tmp_path):
    root = _write_golden_coco(golden, tmp_path)
    with pytest.warns(UserWarning):
        dataset = read_coco_detection(str(root / 'train.json'), str(root / 'train'), train=False, pipeline=None)
    assert [r.image_id for r in dataset.records] == [1, 2, 3, 4, 5, 6]


def _coco(root, annotations, images=None, categories=None, size=(40, 48), write_images=True):
    images = images or [dict(id=1, file_name='a.png', height=size[0], width=size[1])]
    (root / 'img').mkdir(exist_ok=True)
    if write_images:
        for image in images:
            cv2.imwrite(str(root / 'img' / image['file_name']), np.zeros((image['height'], image['width'], 3)))
    (root / 'ann.json').write_text(json.dumps(dict(
        images=images, annotations=annotations,
        categories=categories or [dict(id=5, name='a'), dict(id=9, name='b')])))
    return str(root / 'ann.json'), str(root / 'img')


def _box(i, category_id=5, bbox=(2, 3, 10, 12), **extra):
    return dict(id=i, image_id=1, category_id=category_id, bbox=list(bbox), area=bbox[2] * bbox[3], iscrowd=0,
                **extra)


def test_coco_boxes_only_items_and_collate(tmp_path):
    images = [dict(id=1, file_name='a.png', height=40, width=48), dict(id=2, file_name='b.png', height=70, width=33)]
    annotations = [_box(1), _box(2, 9, (20, 5, 8, 30)), dict(_box(3, 9, (1, 1, 20, 40)), image_id=2)]
    dataset = read_coco_detection(*_coco(tmp_path, annotations, images), pipeline=None)
    assert not dataset.with_masks
    image, target = dataset[0]
    assert set(target) == {'boxes', 'labels', 'image_size', 'image_id', 'orig_size', 'scale_factor'}
    torch.testing.assert_close(image, normalize(np.zeros((40, 48, 3), np.uint8)), rtol=0, atol=0)
    torch.testing.assert_close(target['boxes'], torch.tensor([[2., 3., 12., 15.], [20., 5., 28., 35.]]))
    assert target['labels'].tolist() == [0, 1] and target['labels'].dtype == torch.int64
    assert target['image_size'] == target['orig_size'] == (40, 48) and target['image_id'] == 1
    inputs, targets = collate_detection([dataset[0], dataset[1]])
    assert inputs.shape == (2, 3, 96, 64) and [t['image_id'] for t in targets] == [1, 2]
    torch.testing.assert_close(inputs[1, :, :70, :33], dataset[1][0], rtol=0, atol=0)
    assert inputs[0, :, 40:].abs().sum() == 0 and inputs[0, :, :, 48:].abs().sum() == 0
    assert inputs[1, :, 70:].abs().sum() == 0 and inputs[1, :, :, 33:].abs().sum() == 0


def test_items_are_seeded_from_seed_epoch_and_index(tmp_path):
    path, images = _coco(tmp_path, [_box(1)], size=(60, 80))
    dataset = read_coco_detection(path, images, seed=3)
    first, again = dataset[0], dataset[0]
    assert min(first[0].shape[1:]) >= 384  # through the training pipeline
    torch.testing.assert_close(first[0], again[0], rtol=0, atol=0)
    shapes = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        shapes.add(tuple(dataset[0][0].shape))
    assert len(shapes) > 1  # the epoch reaches the generator


def test_coco_masks_through_the_pipeline(tmp_path):
    polygon = [[2, 3, 12, 3, 12, 15, 2, 15]]
    path, images = _coco(tmp_path, [_box(1, segmentation=polygon)], size=(60, 80))
    dataset = read_coco_detection(path, images, seed=0)
    _, target = dataset[0]
    h, w = target['image_size']
    assert target['masks'].shape == (1, h, w) and target['masks'].dtype == torch.uint8
    ys, xs = np.nonzero(target['masks'][0].numpy())
    extent = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    assert (extent - target['boxes'][0]).abs().max() <= 2 * max(target['scale_factor'])  # moved together


def test_objects_without_a_mask_in_a_dataset_with_masks_are_left_out(tmp_path):
    annotations = [_box(1, segmentation=[[2, 3, 12, 3, 12, 15]]), _box(2, 9), _box(3, 9, segmentation=[])]
    with pytest.warns(UserWarning, match=r'2 objects .* unusable mask .*\(first: annotation 2 of a.png\)'):
        dataset = read_coco_detection(*_coco(tmp_path, annotations), pipeline=None)
    assert dataset.with_masks and dataset[0][1]['labels'].tolist() == [0]


def test_masks_need_pycocotools_named_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, 'pycocotools', None)
    with pytest.raises(ImportError, match=r"pip install pycocotools "):
        decode_masks([[[0, 0, 4, 0, 4, 4]]], 8, 8)


def test_rle_of_another_size_is_named(tmp_path):
    rle = mask_api.encode(np.asfortranarray(np.ones((10, 10), np.uint8)))
    with pytest.raises(ValueError, match='RLE of size 10x10 on an image of 40x48'):
        decode_masks([dict(size=rle['size'], counts=rle['counts'].decode())], 40, 48)


@pytest.mark.parametrize('case, message', [
    ('unreadable', r'ann.json: unreadable JSON \(JSONDecodeError'),
    ('not_coco', r'not a COCO instances json: expected lists "images", "annotations"'),
    ('missing_image', r'1 of the 1 images of the annotations are not in .*img \(first: .*a.png\)'),
    ('zero_size', r'image 1 \(a.png\) has size 0x48; expected a positive height and width'),
    ('unknown_category', r'annotation 1 \(image 1\) has unknown category id 6; the categories are \[5, 9\]'),
    ('negative_box', r'annotation 1 \(image 1\) has a negative box size -3x12'),
    ('bad_bbox', r'annotation 1 \(image 1\) has bbox \[1, 2\]; expected \[x, y, width, height\]'),
    ('unknown_image', r'annotation 1 refers to image 7, which is not in "images"'),
])
def test_bad_coco_annotations_raise_one_line(tmp_path, case, message):
    if case == 'unreadable':
        (tmp_path / 'ann.json').write_text('{"images": [')
        args = str(tmp_path / 'ann.json'), str(tmp_path)
    elif case == 'not_coco':
        (tmp_path / 'ann.json').write_text('{"images": []}')
        args = str(tmp_path / 'ann.json'), str(tmp_path)
    elif case == 'missing_image':
        args = _coco(tmp_path, [_box(1)], write_images=False)
    elif case == 'zero_size':
        args = _coco(tmp_path, [], images=[dict(id=1, file_name='a.png', height=0, width=48)], write_images=False)
    else:
        annotation = dict(unknown_category=_box(1, 6), negative_box=_box(1, bbox=(1, 2, -3, 12)),
                          bad_bbox=dict(_box(1), bbox=[1, 2]), unknown_image=dict(_box(1), image_id=7))[case]
        args = _coco(tmp_path, [annotation])
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        read_coco_detection(*args)
    assert '\n' not in str(error.value)


def test_image_size_differing_from_the_annotations_is_named(tmp_path):
    path, images = _coco(tmp_path, [_box(1)])
    cv2.imwrite(str(tmp_path / 'img' / 'a.png'), np.zeros((48, 40, 3)))
    dataset = read_coco_detection(path, images, pipeline=None)
    with pytest.raises(ValueError, match=r'a.png is 48x40 .* but its annotations say 40x48'):
        dataset[0]


def test_no_dataset_found_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='neither a COCO dataset'):
        detection_dataset(str(tmp_path), 'train')


# ---------------------------------------------------------------------------------------------
# YOLO


def _yolo(root, labels, names=('cat', 'dog'), layout='ultralytics', size=(50, 80)):
    """A YOLO dataset: ``labels`` maps split -> {image stem: label file text or None (no file)}."""
    yaml = [f'names: {list(names)}']
    for split, files in labels.items():
        key = 'valid' if layout == 'roboflow' and split == 'val' else split
        image_dir, label_dir = ((root / 'images' / key, root / 'labels' / key) if layout == 'ultralytics' else
                                (root / key / 'images', root / key / 'labels'))
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        yaml.append(f'{split}: ' + (f'images/{key}' if layout == 'ultralytics' else f'../{key}/images'))
        for stem, text in files.items():
            cv2.imwrite(str(image_dir / f'{stem}.jpg'), np.full((*size, 3), 128, np.uint8))
            if text is not None:
                (label_dir / f'{stem}.txt').write_text(text)
    (root / 'data.yaml').write_text('\n'.join(yaml) + '\n')
    return str(root)


@pytest.mark.parametrize('layout', ['ultralytics', 'roboflow'])
def test_yolo_boxes(tmp_path, layout):
    root = _yolo(tmp_path, {'train': {'a': '0 0.5 0.5 0.25 0.4\n1 0.1 0.2 0.3 0.2\n', 'b': '', 'c': None},
                            'val': {'d': '1 0.5 0.5 0.5 0.5\n'}}, layout=layout)
    with pytest.warns(UserWarning, match=r'1 boxes reach outside their image and were clipped \(first: object 2 of'):
        train = detection_dataset(root, 'train', pipeline=None)
    assert not train.with_masks and train.class_names == ('cat', 'dog') and train.category_ids == (0, 1)
    assert len(train) == 1  # images without objects are left out of training
    _, target = train[0]
    torch.testing.assert_close(target['boxes'], torch.tensor([[30., 15., 50., 35.], [0., 5., 20., 15.]]))
    assert target['labels'].tolist() == [0, 1]
    val = detection_dataset(root, 'val', pipeline=None)
    assert len(val) == 1 and val[0][1]['boxes'].tolist() == [[20., 12.5, 60., 37.5]]
    assert [a['bbox'] for a in val.coco_ground_truth().anns.values()] == [[20., 12.5, 40., 25.]]


def test_yolo_polygons_are_masks(tmp_path):
    root = _yolo(tmp_path, {'train': {'a': '1 0.1 0.2 0.5 0.2 0.5 0.8 0.1 0.8\n'}})
    dataset = read_yolo_detection(root + '/data.yaml', 'train', pipeline=None)
    assert dataset.with_masks
    _, target = dataset[0]
    torch.testing.assert_close(target['boxes'], torch.tensor([[8., 10., 40., 40.]]))
    expected = mask_api.decode(mask_api.merge(mask_api.frPyObjects([[8., 10., 40., 10., 40., 40., 8., 40.]], 50, 80)))
    np.testing.assert_array_equal(target['masks'][0].numpy(), expected)


def test_yolo_boxes_and_polygons_mixed_read_as_boxes(tmp_path):
    root = _yolo(tmp_path, {'train': {'a': '1 0.1 0.2 0.5 0.2 0.5 0.8\n0 0.5 0.5 0.2 0.2\n'}})
    with pytest.warns(UserWarning, match='some objects are boxes and some polygons; read as boxes only'):
        dataset = read_yolo_detection(root, 'train', pipeline=None)
    assert not dataset.with_masks and len(dataset[0][1]['boxes']) == 2


@pytest.mark.parametrize('line, message', [
    ('2 0.5 0.5 0.2 0.2', r'a.txt:1: unknown class id 2; data.yaml names 2 classes \(0..1\)'),
    ('0 0.5 0.5 0.2', r'a.txt:1: expected "class cx cy w h" or a polygon'),
    ('0 0.5 x 0.2 0.2', r'a.txt:1: expected numbers'),
    ('0 0.5 0.5 0 0.2', r'a.txt:1: box size 0.0x0.2; expected a positive'),
])
def test_bad_yolo_labels_raise_one_line(tmp_path, line, message):
    root = _yolo(tmp_path, {'train': {'a': line + '\n'}})
    with pytest.raises(ValueError, match=message):
        read_yolo_detection(root)


def test_yolo_split_not_found_is_named(tmp_path):
    root = _yolo(tmp_path, {'train': {'a': ''}})
    with pytest.raises(FileNotFoundError, match="no image folder for split 'val'"):
        read_yolo_detection(root, 'val')


def test_yolo_ground_truth_evaluates_with_coco_tools(tmp_path):
    root = _yolo(tmp_path, {'val': {'a': '1 0.1 0.2 0.5 0.2 0.5 0.8 0.1 0.8\n0 0.6 0.1 0.9 0.1 0.9 0.5\n',
                                    'b': '0 0.2 0.2 0.6 0.2 0.4 0.9\n'}})
    dataset = read_yolo_detection(root, 'val', pipeline=None)
    coco = dataset.coco
    assert sorted(coco.getCatIds()) == [0, 1] and len(coco.anns) == 3
    results = []
    for index in range(len(dataset)):
        _, target = dataset[index]
        assert target['image_id'] == dataset.load(index)[1]['image_id'] == index
        detections = dict(boxes=target['boxes'], labels=target['labels'], masks=target['masks'],
                          scores=torch.ones(len(target['labels'])))
        results += coco_results([detections], [target['image_id']], dataset.category_ids)
    assert coco_evaluate(coco, results, 'bbox')['AP'] == pytest.approx(100)
    assert coco_evaluate(coco, results, 'segm')['AP'] == pytest.approx(100)


def test_coco_ground_truth_is_the_annotation_file(golden, tmp_path):
    root = _write_golden_coco(golden, tmp_path)
    with pytest.warns(UserWarning):
        dataset = read_coco_detection(str(root / 'train.json'), str(root / 'train'), train=False)
    assert len(dataset.coco_ground_truth().anns) == 10  # crowd objects too, for COCOeval
