"""Metrics and dataset readers of the ADE20K and COCO evaluations (mambavision.dense.evaluate).

Expected numbers are worked out by hand from the definitions (mmseg's IoUMetric, COCO AP), not by our code.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pycocotools import mask as pycocotools_mask  # the `coco` extra, part of the test extra
from conftest import CATEGORY_IDS, DENSE_FIXTURES, detections_of, write_coco

from mambavision.dense.evaluate import (
    COCO_CATEGORY_IDS, ade20k_samples, coco_evaluate, coco_results, intersect_and_union, load_coco, read_ade20k_label,
    segmentation_metrics,
)

# pycocotools' mask.decode warns under numpy 2 (its own code); the decoded masks are right
pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')

IGN = 255
LABEL = torch.tensor([[0, 0, 1, 1],
                      [0, 0, 1, 1],
                      [0, 0, 2, 2],
                      [IGN, IGN, 2, 2]])
PRED = torch.tensor([[0, 1, 1, 1],
                     [0, 0, 1, 1],
                     [0, 0, 1, 2],
                     [2, 2, 2, 2]])


def test_ground_truth_as_prediction_scores_100():
    metrics = segmentation_metrics(intersect_and_union(LABEL.clamp(max=2), LABEL, 4), ['a', 'b', 'c', 'd'])
    assert metrics['aAcc'] == metrics['mIoU'] == metrics['mAcc'] == 100
    assert metrics['per_class']['d'] == dict(IoU=None, Acc=None)  # no pixels: left out of the means


def test_known_confusion():
    """14 labelled pixels (2 ignored). class 0: 6 labelled, 5 predicted, all 5 right -> IoU 5/6, Acc 5/6.
    class 1: 4 labelled, 6 predicted (2 of them wrong) -> IoU 4/6, Acc 4/4. class 2: 4 labelled, 3 predicted
    among the labelled pixels, all right (the 2 on ignored pixels do not count) -> IoU 3/4, Acc 3/4. class 3: absent."""
    metrics = segmentation_metrics(intersect_and_union(PRED, LABEL, 4))
    assert metrics['aAcc'] == pytest.approx(100 * 12 / 14)
    assert metrics['mIoU'] == pytest.approx(100 * (5 / 6 + 4 / 6 + 3 / 4) / 3)
    assert metrics['mAcc'] == pytest.approx(100 * (5 / 6 + 1 + 3 / 4) / 3)
    assert [c['IoU'] for c in metrics['per_class'].values()] == pytest.approx([500 / 6, 400 / 6, 75, None])


def test_counts_are_summed_over_images_not_averaged():
    """The dataset's metric is one ratio of the total areas: two images count like one image holding both."""
    both = intersect_and_union(torch.cat([PRED, LABEL]), torch.cat([LABEL, LABEL]), 4)
    assert torch.equal(intersect_and_union(PRED, LABEL, 4) + intersect_and_union(LABEL, LABEL, 4), both)
    assert segmentation_metrics(both)['aAcc'] == pytest.approx(100 * (12 + 14) / 28)


def test_ade20k_reader(tmp_path):
    """reduce_zero_label: 0 ("other") -> 255 ignored, k -> k - 1, and 255 stays ignored."""
    for folder in ('images/validation', 'annotations/validation'):
        (tmp_path / folder).mkdir(parents=True)
    Image.new('RGB', (3, 2)).save(tmp_path / 'images/validation/b.jpg')
    Image.new('RGB', (3, 2)).save(tmp_path / 'images/validation/a.jpg')
    for stem in 'ab':
        label_file = tmp_path / f'annotations/validation/{stem}.png'
        Image.fromarray(np.array([[0, 1, 2], [150, 255, 0]], np.uint8)).save(label_file)
    samples = ade20k_samples(str(tmp_path))
    assert samples == [(str(tmp_path / f'images/validation/{s}.jpg'), str(tmp_path / f'annotations/validation/{s}.png'))
                       for s in 'ab']
    assert read_ade20k_label(samples[0][1]).tolist() == [[255, 0, 1], [149, 255, 255]]
    (tmp_path / 'annotations/validation/b.png').unlink()
    with pytest.raises(FileNotFoundError, match='annotation .*b.png of image'):
        ade20k_samples(str(tmp_path))
    with pytest.raises(FileNotFoundError, match='images/validation not found: expected the ADE20K layout'):
        ade20k_samples(str(tmp_path / 'missing'))


# ---------------------------------------------------------------------------------------------
# COCO

OBJECTS = [(1, 1, [10, 10, 20, 20]), (1, 7, [40, 30, 60, 50]), (2, 3, [0, 0, 100, 110]), (2, 1, [5, 60, 40, 12])]


def _evaluate(annotation_file, detections):
    coco = load_coco(annotation_file)
    results = coco_results(list(detections.values()), list(detections), sorted(coco.getCatIds()))
    return {iou_type: coco_evaluate(coco, results, iou_type) for iou_type in ('bbox', 'segm')}


def test_coco_results_format(tmp_path):
    """bbox x, y, w, h; category id of the label; the mask as a decodable RLE with a str ``counts``."""
    detections = detections_of(OBJECTS)
    results = coco_results([detections[2]], [2], CATEGORY_IDS)
    assert [(r['image_id'], r['category_id'], r['bbox']) for r in results] == [
        (2, 3, [0, 0, 100, 110]), (2, 1, [5, 60, 40, 12])]
    assert results[0]['score'] == pytest.approx(0.9) and isinstance(results[0]['segmentation']['counts'], str)
    rle = dict(results[1]['segmentation'], counts=results[1]['segmentation']['counts'].encode())
    assert np.array_equal(pycocotools_mask.decode(rle).astype(bool), detections[2]['masks'][1].numpy())
    json.dumps(results)


def test_ground_truth_as_detections_gives_ap_1(tmp_path):
    metrics = _evaluate(write_coco(tmp_path / 'gt.json', OBJECTS), detections_of(OBJECTS))
    for iou_type in ('bbox', 'segm'):
        # small (20x20, 40x12: under 32^2), medium (60x50) and large (100x110) objects: every range has some
        assert metrics[iou_type] == pytest.approx(dict(AP=100, AP50=100, AP75=100, APs=100, APm=100, APl=100))


def test_shifted_box(tmp_path):
    """One 100x100 box, detected 10 px to the right: IoU 9000 / 11000 = 0.818, a match at the IoU thresholds
    0.50, 0.55, ..., 0.80 (7 of the 10) with precision 1, none above -> AP 70 %, AP50 and AP75 100 %."""
    annotation_file = write_coco(tmp_path / 'gt.json', [(1, 3, [10, 10, 100, 100])])
    metrics = _evaluate(annotation_file, detections_of([(1, 3, [20, 10, 100, 100])]))
    for iou_type in ('bbox', 'segm'):
        assert metrics[iou_type]['AP'] == pytest.approx(70)
        assert metrics[iou_type]['AP50'] == metrics[iou_type]['AP75'] == pytest.approx(100)
        assert metrics[iou_type]['APl'] == pytest.approx(70) and metrics[iou_type]['APs'] == -1


def test_one_object_missed(tmp_path):
    """Two objects, one found exactly: precision 1 up to recall 0.5, then none; COCO's 101-point
    interpolation (recall 0, 0.01, ..., 1) gives 51 / 101 at every IoU threshold."""
    objects = [(1, 1, [10, 10, 40, 40]), (1, 1, [80, 60, 40, 40])]
    metrics = _evaluate(write_coco(tmp_path / 'gt.json', objects), detections_of(objects[:1]))
    assert metrics['bbox']['AP'] == metrics['segm']['AP'] == pytest.approx(100 * 51 / 101)


def test_per_class_ap_on_request(tmp_path):
    """class1 found exactly (100 %), class7 missed (0 %), class3 without ground truth (None); only when asked."""
    objects = [(1, 1, [10, 10, 40, 40]), (1, 7, [80, 60, 40, 40])]
    coco = load_coco(write_coco(tmp_path / 'gt.json', objects))
    results = coco_results([detections_of(objects[:1])[1]], [1], CATEGORY_IDS)
    assert 'per_class' not in coco_evaluate(coco, results, 'bbox')
    for iou_type in ('bbox', 'segm'):
        metrics = coco_evaluate(coco, results, iou_type, per_class=True)
        assert metrics['per_class'] == dict(class1=pytest.approx(100), class3=None, class7=0)
        assert metrics['AP'] == pytest.approx(50)  # the mean over the classes with ground truth


def test_no_detections_give_ap_0(tmp_path):
    metrics = _evaluate(write_coco(tmp_path / 'gt.json', OBJECTS), {})
    assert metrics['bbox']['AP'] == metrics['segm']['AP'] == 0.0


def test_missing_pycocotools_names_the_extra(monkeypatch, tmp_path):
    annotations = write_coco(tmp_path / 'gt.json', OBJECTS)
    monkeypatch.setitem(__import__('sys').modules, 'pycocotools', None)
    with pytest.raises(ImportError, match=r"^COCO evaluation needs pycocotools: pip install pycocotools \(.*coco.*\)$"):
        load_coco(annotations)


def test_mask_ap_takes_object_areas_from_the_masks(tmp_path):
    """As mmdet evaluates masks: a false positive whose mask is small (a thin L, 2 x 100 + 98 x 2 = 396 px) but
    whose box is large (100 x 100) counts among the small objects. It outscores the one exact (small) detection,
    so small-object precision is 1/2 at every recall -> mask APs 50 %; the box AP ranges it as large (APs 100 %)."""
    objects = [(1, 1, [10, 10, 20, 20])]
    detections = detections_of(objects)[1]
    ell = np.zeros((120, 160), bool)
    ell[15:115, 50:52] = ell[113:115, 50:150] = True
    detections = dict(boxes=torch.cat([torch.tensor([[50., 15., 150., 115.]]), detections['boxes']]),
                      scores=torch.tensor([0.95, 0.9]), labels=torch.tensor([0, 0]),
                      masks=torch.cat([torch.from_numpy(ell)[None], detections['masks']]))
    metrics = _evaluate(write_coco(tmp_path / 'gt.json', objects), {1: detections})
    assert metrics['segm']['APs'] == pytest.approx(50)
    assert metrics['bbox']['APs'] == pytest.approx(100)


def test_shipped_class_names_and_palettes_are_the_published_ones():
    from mambavision.dense import classes
    published = json.loads((DENSE_FIXTURES / 'dataset_meta.json').read_text())
    for dataset, names, palette, count in (('ade20k', classes.ADE20K_CLASSES, classes.ADE20K_PALETTE, 150),
                                           ('coco', classes.COCO_CLASSES, classes.COCO_PALETTE, 80)):
        assert list(names) == published[dataset]['classes'] and len(names) == count
        assert [list(c) for c in palette] == published[dataset]['palette']
    assert len(COCO_CATEGORY_IDS) == 80 and COCO_CATEGORY_IDS[-1] == 90
