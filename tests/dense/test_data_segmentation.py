"""Segmentation training data: each transform and the whole pipeline equal mmseg's with the random draws
fixed (``seg_pipeline``, made by ``make_seg_pipeline.py``), the batch equals ``SegDataPreProcessor``'s, and
datasets are read, checked and drawn as documented."""
import hashlib
import json
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from mambavision.dense.data import segmentation as seg
from mambavision.dense.data.segmentation import (
    SegmentationDataset, SegmentationTrainPipeline, collate_segmentation, read_segmentation_folder,
    segmentation_split,
)
from mambavision.dense.image import normalize

from conftest import DENSE_FIXTURES


class ScriptedRng:
    """A ``numpy.random.Generator`` stand-in that replays mmseg's recorded draws, checking that each of ours
    is of the same kind and range."""

    def __init__(self, calls):
        self.calls = list(calls)

    def _next(self, kind, low, high):
        assert self.calls, f'one draw more than mmseg: {kind}({low}, {high})'
        expected_kind, expected_low, expected_high, value = self.calls.pop(0)
        if expected_kind == 'flip':  # mmcv's choice of 'horizontal' with p=0.5 is our random() < 0.5
            assert (kind, low, high) == ('random', 0, 1)
            return 0.25 if value else 0.75
        assert (kind, low, high) == (expected_kind, expected_low, expected_high)
        return value

    def integers(self, low, high=None):
        low, high = (0, low) if high is None else (low, high)
        return self._next('integers', low, high)

    def uniform(self, low, high):
        return self._next('uniform', low, high)

    def random(self):
        return self._next('random', 0, 1)


@pytest.fixture(scope='module')
def golden():
    cases = json.loads((DENSE_FIXTURES / 'seg_pipeline.json').read_text())['cases']
    with np.load(DENSE_FIXTURES / 'seg_pipeline.npz') as arrays:
        return {case['name']: case for case in cases}, dict(arrays)


def _transform(case):
    op, params = case['op'], case['params']
    if op == 'random_resize':
        return lambda image, label, rng: seg.random_resize(image, label, rng, tuple(params['scale']),
                                                           tuple(params['ratio_range']))
    if op == 'random_crop':
        return lambda image, label, rng: seg.random_crop(image, label, rng, tuple(params['crop_size']),
                                                         params['cat_max_ratio'])
    if op == 'random_flip':
        return lambda image, label, rng: seg.random_flip(image, label, rng, params['prob'])
    return lambda image, label, rng: (seg.photometric_distortion(image, rng), label)


def _case_names():
    cases = json.loads((DENSE_FIXTURES / 'seg_pipeline.json').read_text())['cases']
    return [case['name'] for case in cases if case['op'] not in ('pipeline', 'published_pipeline')]


@pytest.mark.parametrize('name', _case_names())
def test_transform_is_mmsegs(golden, name):
    cases, arrays = golden
    rng = ScriptedRng(cases[name]['calls'])
    image, label = _transform(cases[name])(arrays['image'], arrays['label'], rng)
    assert not rng.calls, 'fewer draws than mmseg'
    assert image.dtype == np.uint8 and label.dtype == np.uint8
    np.testing.assert_array_equal(image, arrays[f'{name}.image'])
    np.testing.assert_array_equal(label, arrays[f'{name}.label'])


def test_crop_retries_while_one_class_dominates(golden):
    cases, _ = golden
    assert len(cases['crop.accepted_third']['calls']) == 6  # two rejected draws, the third kept
    assert len(cases['crop.all_rejected']['calls']) == 22  # the first draw and 10 more, the last kept unchecked


def test_pipeline_and_batch_are_mmsegs(golden):
    """RandomResize -> RandomCrop -> RandomFlip -> PhotoMetricDistortion, then normalise and pad to the crop."""
    cases, arrays = golden
    pipeline = SegmentationTrainPipeline(crop_size=24, scale=(96, 24))
    items = []
    for i in range(3):
        rng = ScriptedRng(cases[f'pipeline.{i}']['calls'])
        image, label = pipeline(arrays[f'pipeline.{i}.input_image'], arrays[f'pipeline.{i}.input_label'], rng)
        assert not rng.calls
        np.testing.assert_array_equal(image, arrays[f'pipeline.{i}.image'])
        np.testing.assert_array_equal(label, arrays[f'pipeline.{i}.label'])
        items.append((normalize(image), torch.from_numpy(label.astype(np.int64))))
    inputs, labels = collate_segmentation(items, size=(24, 24))
    assert inputs.dtype == torch.float32 and labels.dtype == torch.int64
    torch.testing.assert_close(inputs, torch.from_numpy(arrays['batch.inputs']), rtol=0, atol=0)
    torch.testing.assert_close(labels, torch.from_numpy(arrays['batch.labels']).long(), rtol=0, atol=0)


def _published_size_input():
    """make_seg_pipeline.published_size_input: 683x512, integer formulas."""
    ys, xs = np.mgrid[0:512, 0:683]
    image = np.stack([(ys * 3 + xs // 2) % 256, (xs * 5 + (ys // 4) * 17) % 256, (ys * xs // 97) % 256], -1)
    label = ((ys // 64) * 5 + (xs // 80) * 3) % 150
    label[:420, :560] = 7
    label[(ys + xs) % 97 < 5] = 255
    return image.astype(np.uint8), label.astype(np.uint8)


def test_published_pipeline_at_the_published_size_is_mmsegs(golden):
    """Crop 512 after a resize to (2048, 512) x 0.5..2: up- and down-scaled, crops drawn again, flips, hue."""
    cases, _ = golden
    image, label = _published_size_input()
    pipeline = SegmentationTrainPipeline()
    published = [case for case in cases.values() if case['op'] == 'published_pipeline']
    assert len(published) == 4
    for case in published:
        rng = ScriptedRng(case['calls'])
        out_image, out_label = pipeline(image, label, rng)
        assert not rng.calls
        assert list(out_image.shape) == case['image_shape'] and out_label.shape == out_image.shape[:2]
        assert hashlib.sha256(out_image).hexdigest() == case['image_sha256'], case['name']
        assert hashlib.sha256(out_label).hexdigest() == case['label_sha256'], case['name']


def test_published_pipeline_defaults():
    pipeline = SegmentationTrainPipeline()
    assert (pipeline.crop_size, pipeline.scale, pipeline.ratio_range, pipeline.cat_max_ratio) == (
        (512, 512), (2048, 512), (0.5, 2.0), 0.75)
    assert SegmentationTrainPipeline(640).scale == (2560, 640)  # L3


def test_collate_pads_to_the_crop_size_with_0_and_255():
    items = [(torch.ones(3, 5, 7), torch.zeros(5, 7, dtype=torch.int64)),
             (torch.full((3, 8, 4), 2.), torch.ones(8, 4, dtype=torch.int64))]
    inputs, labels = collate_segmentation(items, size=(8, 9))
    assert inputs.shape == (2, 3, 8, 9) and labels.shape == (2, 8, 9)
    assert inputs[0, :, :5, :7].eq(1).all() and inputs[0, :, 5:].eq(0).all() and inputs[0, :, :, 7:].eq(0).all()
    assert labels[0, :5, :7].eq(0).all() and labels[0, 5:].eq(255).all() and labels[1, :, 4:].eq(255).all()
    assert collate_segmentation(items, size=None)[0].shape == (2, 3, 8, 7)  # the largest item


# ---------------------------------------------------------------------------------------------
# datasets


def _write_pair(root, stem, size=(20, 30), values=(0, 1, 2), image_ext='.jpg', mask_mode='L'):
    height, width = size
    rng = np.random.default_rng(len(stem))
    (root / 'images').mkdir(parents=True, exist_ok=True)
    (root / 'masks').mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / 'images' / f'{stem}{image_ext}')
    mask = np.array(values, np.uint8)[rng.integers(0, len(values), (height, width))]
    mask_image = Image.fromarray(mask, 'L')
    if mask_mode == 'P':
        mask_image = mask_image.convert('P')
        mask_image.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    mask_image.save(root / 'masks' / f'{stem}.png')
    return mask


@pytest.fixture
def folder(tmp_path):
    """An own dataset: train/ (3 pairs, one a PNG image, one a palette mask) and val/ (1 pair), 3 classes."""
    (tmp_path / 'classes.txt').write_text('sky\nroad\n\ncar\n')
    _write_pair(tmp_path / 'train', 'a', values=(0, 1, 255))
    _write_pair(tmp_path / 'train', 'b', image_ext='.png', mask_mode='P')
    _write_pair(tmp_path / 'train', 'c', size=(24, 16))
    _write_pair(tmp_path / 'val', 'v')
    return tmp_path


def test_own_folder_reads_pairs_classes_and_masks(folder):
    train = segmentation_split(str(folder), 'train')
    assert train.class_names == ('sky', 'road', 'car') and train.palette is None and not train.reduce_zero_label
    assert [(p.split('/')[-2:], q.split('/')[-2:]) for p, q in train.samples] == [
        (['images', f'{s}{e}'], ['masks', f'{s}.png']) for s, e in (('a', '.jpg'), ('b', '.png'), ('c', '.jpg'))]
    assert len(segmentation_split(str(folder), 'val').samples) == 1
    assert len(read_segmentation_folder(str(folder / 'val')).samples) == 1  # a split folder given directly
    palette_mask = train.read_label(train.samples[1][1])
    assert palette_mask.dtype == np.uint8 and set(np.unique(palette_mask)) <= {0, 1, 2}  # indices, not colours


def test_classes_json_with_palette(folder):
    (folder / 'classes.txt').unlink()
    (folder / 'classes.json').write_text(json.dumps(dict(classes=['a', 'b', 'c'], palette=[[1, 2, 3]] * 3)))
    split = segmentation_split(str(folder), 'train')
    assert split.class_names == ('a', 'b', 'c') and split.palette == ((1, 2, 3),) * 3


def _mask_without_image(root):
    _write_pair(root / 'extra', 'z')
    (root / 'extra/masks/z.png').rename(root / 'train/masks/z.png')


def _sizes_differ(root):
    _write_pair(root / 'train', 'b', size=(21, 30))  # a 30x21 mask (and a .jpg image beside the 30x20 .png)
    (root / 'train/images/b.jpg').unlink()


def _bad_classes_json(root):
    (root / 'classes.txt').unlink()
    (root / 'classes.json').write_text('{"classes": [1]}')


@pytest.mark.parametrize('damage, message', [
    (lambda root: (root / 'train/masks/b.png').unlink(), 'image .*train/images/b.png has no mask'),
    (_mask_without_image, 'mask .*train/masks/z.png has no image'),
    (_sizes_differ, r'mask .*train/masks/b.png is 30x21 .* its image .*b.png 30x20'),
    (lambda root: _write_pair(root / 'train', 'c', size=(24, 16), values=(0, 3)),
     r'mask .*train/masks/c.png holds class 3, beyond the 3 classes'),
    (lambda root: (root / 'classes.txt').unlink(), 'no classes.txt or classes.json'),
    (lambda root: Image.new('RGB', (30, 20)).save(root / 'train/masks/a.png'), 'is a RGB image; expected an 8-bit'),
    (_bad_classes_json, 'expected a list of class names'),
])
def test_bad_folder_is_one_line_naming_the_first_offender(folder, damage, message):
    damage(folder)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        segmentation_split(str(folder), 'train')
    assert '\n' not in str(error.value)


def test_unknown_layout_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match='expected train/images/ and train/masks/'):
        segmentation_split(str(tmp_path), 'train')


def test_ade20k_layout_reduces_zero_label(tmp_path):
    for split in ('training', 'validation'):
        (tmp_path / 'images' / split).mkdir(parents=True)
        (tmp_path / 'annotations' / split).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / 'images' / split / 'x.jpg')
        Image.fromarray(np.array([[0, 1, 150, 255, 2, 3]] * 4, np.uint8)).save(
            tmp_path / 'annotations' / split / 'x.png')
    train = segmentation_split(str(tmp_path), 'train')
    assert train.reduce_zero_label and len(train.class_names) == 150 and len(train.palette) == 150
    assert train.read_label(train.samples[0][1])[0].tolist() == [255, 0, 149, 255, 1, 2]
    assert segmentation_split(str(tmp_path), 'val').samples[0][0].endswith('validation/x.jpg')


def test_dataset_items_are_deterministic_per_seed_epoch_and_index(folder):
    dataset = SegmentationDataset(segmentation_split(str(folder)), SegmentationTrainPipeline(crop_size=16), seed=7)
    image, label = dataset[0]
    assert image.dtype == torch.float32 and image.shape[0] == 3 and label.dtype == torch.int64
    assert image.shape[1:] == label.shape and max(label.shape) <= 16
    again = dataset[0]
    assert torch.equal(image, again[0]) and torch.equal(label, again[1])
    draws = {tuple(dataset[0][0].flatten()[:50].tolist()) for dataset.epoch in range(4)}
    assert len(draws) > 1  # another epoch, other draws
    plain = SegmentationDataset(segmentation_split(str(folder)))[2]
    assert plain[0].shape == (3, 24, 16) and plain[1].shape == (24, 16)  # no pipeline: the whole image
    dataset.epoch = 1
    collate = partial(collate_segmentation, size=(16, 16))
    in_process = collate([dataset[i] for i in range(3)])
    inputs, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate, num_workers=1)))
    assert inputs.shape == (3, 3, 16, 16) and labels.shape == (3, 16, 16)
    assert torch.equal(inputs, in_process[0]) and torch.equal(labels, in_process[1])  # the same draws in a worker
