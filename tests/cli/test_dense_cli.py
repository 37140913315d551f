"""``mambavision segment``, ``detect`` and ``validate --task seg|det`` end to end, on stub models.

The stubs stand in for ``mambavision.create_segmenter`` / ``create_detector`` and answer ``predict`` with
fixed outputs, so the commands, the drawing and the metrics are tested independently of the networks.
"""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as pycocotools_mask
from safetensors.torch import load_file

import mambavision
from mambavision import weights
from mambavision.cli import main
from mambavision.dense.detection import CascadeMaskRCNN, create_detector
from mambavision.dense.evaluate import COCO_CATEGORY_IDS
from mambavision.dense.segmentation import UPerNet, create_segmenter
from mambavision.dense.visualize import draw_detections, segmentation_overlay
from mambavision.model import create_dense_backbone

from conftest import CATEGORY_IDS, detections_of, write_coco
from conftest import DENSE_FIXTURES as FIXTURES

# pycocotools' mask.decode warns under numpy 2 (its own code); the decoded masks are right
pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')

SEG_CLASSES = ['sky', 'tree', 'road']
SEG_PALETTE = [[70, 130, 180], [0, 200, 0], [128, 64, 128]]
DET_CLASSES = [f'class{c}' for c in CATEGORY_IDS]
DET_PALETTE = [[220, 20, 60], [0, 0, 142], [250, 170, 30]]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.delenv('MAMBAVISION_DEBUG', raising=False)


class StubModel(torch.nn.Module):
    """``predict(image)`` -> ``[outputs[key(image)]]``, by default the fixed prediction for an image of its size."""

    def __init__(self, outputs, class_names, palette, key=lambda image: image.shape[:2]):
        super().__init__()
        self.outputs, self.class_names, self.palette, self.key = outputs, class_names, palette, key

    def predict(self, image, **options):
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape[2] == 3
        assert options == ({} if 'boxes' in next(iter(self.outputs.values())) else dict(return_logits=False))
        return [self.outputs[self.key(image)]]


@pytest.fixture
def use_stub(monkeypatch):
    """``use_stub(factory_name, model)``: the factory returns ``model`` (and the published files count as
    downloaded); returns the list of its calls' arguments."""
    monkeypatch.setattr(weights, 'download_weights', lambda repo_id, filename, cache_dir=None: f'cache/{filename}')

    def install(factory_name, model):
        calls = []

        def factory(name, pretrained=False, checkpoint_path=None):
            calls.append(dict(name=name, pretrained=pretrained, checkpoint_path=checkpoint_path))
            return model
        monkeypatch.setattr(mambavision, factory_name, factory, raising=False)
        return calls
    return install


def _one_line_error(capsys, command, *fragments):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'mambavision {command}: error: '), captured.err
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def _image(path, height, width, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_segment(tmp_path, use_stub, capsys):
    pixels = _image(tmp_path / 'street.png', 40, 60)
    labels = np.zeros((40, 60), np.int64)
    labels[:, 45:] = 2  # sky 75 %, road 25 %, no tree
    calls = use_stub('create_segmenter', StubModel(
        {(40, 60): dict(labels=torch.from_numpy(labels), logits=torch.zeros(3, 40, 60))}, SEG_CLASSES, SEG_PALETTE))
    out = tmp_path / 'out'
    assert main(['segment', str(tmp_path / 'street.png'), '--output', str(out)]) == 0
    assert calls == [dict(name='upernet_mambavision_t.nv_ade20k', pretrained=True, checkpoint_path=None)]
    assert capsys.readouterr().out.strip().endswith('(sky 75.0%, road 25.0%)')

    label_png = Image.open(out / 'street_labels.png')
    assert label_png.mode == 'P' and np.array_equal(np.array(label_png), labels)
    assert label_png.getpalette()[:9] == sum(SEG_PALETTE, [])

    overlay = np.array(Image.open(out / 'street_overlay.png').convert('RGB'))
    assert overlay.shape[0] >= 40 and overlay.shape[1] > 60  # the image and a legend strip on its right
    expected = pixels * 0.5 + np.array(SEG_PALETTE)[labels] * 0.5  # half image, half class color
    assert np.abs(overlay[:40, :60] - expected).max() <= 0.5
    legend = {tuple(c) for c in overlay[:, 60:].reshape(-1, 3).tolist()}
    assert tuple(SEG_PALETTE[0]) in legend and tuple(SEG_PALETTE[2]) in legend  # classes present have swatches
    assert tuple(SEG_PALETTE[1]) not in legend


def test_detect(tmp_path, use_stub, capsys):
    _image(tmp_path / 'room.jpg', 60, 80)
    masks = torch.zeros(2, 60, 80, dtype=torch.bool)
    masks[0, 12:40, 15:50] = masks[1, 0:5, 0:5] = True
    found = dict(boxes=torch.tensor([[15., 12., 50., 40.], [0., 0., 5., 5.]]), scores=torch.tensor([0.8, 0.2]),
                 labels=torch.tensor([2, 0]), masks=masks)
    calls = use_stub('create_detector', StubModel({(60, 80): found}, DET_CLASSES, DET_PALETTE))
    out = tmp_path / 'out'
    (tmp_path / 'weights.pth').touch()
    argv = ['detect', str(tmp_path / 'room.jpg'), '--output', str(out), '--checkpoint', str(tmp_path / 'weights.pth')]
    assert main(argv) == 0
    assert calls == [dict(name='cascade_mask_rcnn_mambavision_t.nv_coco', pretrained=False,
                          checkpoint_path=str(tmp_path / 'weights.pth'))]
    assert capsys.readouterr().out.strip().endswith('(image_id 0: 1 class7 above 0.3)')

    results = json.loads((out / 'room_detections.json').read_text())  # only the detection scoring above 0.3
    assert len(results) == 1 and set(results[0]) == {'image_id', 'category_id', 'bbox', 'score', 'segmentation'}
    # 3 classes, so labels map to 1..3 (the 80 COCO classes map to COCO's ids)
    assert results[0]['image_id'] == 0 and results[0]['category_id'] == 3
    assert results[0]['bbox'] == [15, 12, 35, 28] and results[0]['score'] == pytest.approx(0.8)
    rle = dict(results[0]['segmentation'], counts=results[0]['segmentation']['counts'].encode())
    assert np.array_equal(pycocotools_mask.decode(rle), masks[0].numpy())

    picture = np.array(Image.open(out / 'room_detections.png'))
    original = np.array(Image.open(tmp_path / 'room.jpg'))
    assert picture.shape == original.shape
    assert tuple(picture[26, 15]) == tuple(DET_PALETTE[2])  # the box's left edge in the class color
    assert np.abs(picture[30:38, 25:45].astype(int) - original[30:38, 25:45]).mean() > 10  # the mask, blended in
    assert np.array_equal(picture[50:, 60:], original[50:, 60:])  # untouched away from the detection
    assert np.array_equal(picture[0:5, 0:5], original[0:5, 0:5])  # the detection scoring 0.2 is not drawn


def test_detect_uses_coco_category_ids(tmp_path, use_stub):
    _image(tmp_path / 'a.png', 20, 30)
    found = dict(boxes=torch.tensor([[1., 2., 10., 12.]]), scores=torch.tensor([0.9]), labels=torch.tensor([11]),
                 masks=torch.ones(1, 20, 30, dtype=torch.bool))
    use_stub('create_detector', StubModel({(20, 30): found}, [f'c{i}' for i in range(80)], [[9, 9, 9]] * 80))
    assert main(['detect', str(tmp_path / 'a.png'), '--output', str(tmp_path)]) == 0
    assert json.loads((tmp_path / 'a_detections.json').read_text())[0]['category_id'] == 13  # COCO skips id 12


def _ade20k(root, shapes):
    """An ADEChallengeData2016 tree with one image per shape; labels 0 ("other") .. 3, random."""
    rng = np.random.default_rng(0)
    for folder in ('images/validation', 'annotations/validation'):
        (root / folder).mkdir(parents=True)
    labels = {}
    for i, (height, width) in enumerate(shapes):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / f'images/validation/{i}.jpg')
        file_labels = rng.integers(0, 4, (height, width), dtype=np.uint8)
        Image.fromarray(file_labels).save(root / f'annotations/validation/{i}.png')
        labels[(height, width)] = file_labels
    return labels


def test_validate_segmentation(tmp_path, use_stub, capsys):
    """The file's labels 1..3 predicted as classes 0..2 (its 0 = "other" predicted as anything): 100 everywhere."""
    file_labels = _ade20k(tmp_path / 'ADEChallengeData2016', [(24, 32), (30, 20)])
    predicted = {shape: dict(labels=torch.from_numpy(np.maximum(f.astype(np.int64) - 1, 0)))
                 for shape, f in file_labels.items()}
    use_stub('create_segmenter', StubModel(predicted, SEG_CLASSES + ['unseen'], SEG_PALETTE + [[0, 0, 0]]))
    results_file = tmp_path / 'results.json'
    assert main(['validate', '--task', 'seg', '--model', 'upernet_mambavision_t.nv_ade20k', '--pretrained',
                 '--data-dir', str(tmp_path / 'ADEChallengeData2016'), '--device', 'cpu',
                 '--results-file', str(results_file), '--per-class']) == 0
    results = json.loads(capsys.readouterr().out)
    assert results == json.loads(results_file.read_text())
    assert results['images'] == 2 and results['task'] == 'seg'
    assert results['aAcc'] == results['mIoU'] == results['mAcc'] == 100
    assert results['per_class']['unseen'] == dict(IoU=None, Acc=None)


def test_validate_segmentation_counts_a_confusion(tmp_path, use_stub, capsys):
    """Every pixel of the file's label 1 (class 0) predicted as class 1, the rest right."""
    (file_labels,) = _ade20k(tmp_path / 'ADE', [(16, 16)]).values()
    predicted = np.maximum(file_labels.astype(np.int64) - 1, 0)
    predicted[file_labels == 1] = 1
    outputs = {(16, 16): dict(labels=torch.from_numpy(predicted))}
    use_stub('create_segmenter', StubModel(outputs, SEG_CLASSES, SEG_PALETTE))
    argv = ['validate', '--task', 'seg', '--model', 'm', '--pretrained', '--data-dir', str(tmp_path / 'ADE'),
            '--device', 'cpu']
    assert main(argv) == 0
    assert 'per_class' not in json.loads(capsys.readouterr().out)  # per-class rows only on request
    assert main(argv + ['--per-class']) == 0
    results = json.loads(capsys.readouterr().out)
    n1, n2, n3 = (int((file_labels == k).sum()) for k in (1, 2, 3))
    # class 0: never predicted (IoU 0, Acc 0); class 1: n2 right of n1 + n2 predicted; class 2: all right
    assert results['per_class']['tree']['IoU'] == pytest.approx(100 * n2 / (n1 + n2))
    assert results['mIoU'] == pytest.approx(100 * (0 + n2 / (n1 + n2) + 1) / 3)
    assert results['mAcc'] == pytest.approx(100 * (0 + 1 + 1) / 3)
    assert results['aAcc'] == pytest.approx(100 * (n2 + n3) / (n1 + n2 + n3))


OBJECTS = [(1, 1, [10, 10, 20, 20]), (1, 7, [40, 30, 60, 50]), (2, 3, [0, 0, 100, 110])]


@pytest.fixture
def coco_root(tmp_path):
    """COCO_ROOT/val2017/{1,2}.png and COCO_ROOT/annotations/instances_val2017.json (images of 120 x 160)."""
    (tmp_path / 'val2017').mkdir()
    (tmp_path / 'annotations').mkdir()
    for image_id in (1, 2):
        _image(tmp_path / f'val2017/{image_id}.png', 120, 160, seed=image_id)
    write_coco(tmp_path / 'annotations/instances_val2017.json', OBJECTS)
    return tmp_path


def test_validate_detection(coco_root, use_stub, capsys, monkeypatch):
    """Ground truth as detections: box and mask AP 100 %. The stub tells the two images apart by their content."""
    detections = detections_of(OBJECTS)
    corner = {np.array(Image.open(coco_root / f'val2017/{i}.png'))[0, 0].tobytes(): detections[i] for i in (1, 2)}
    use_stub('create_detector', StubModel(corner, DET_CLASSES, DET_PALETTE, key=lambda image: image[0, 0].tobytes()))
    (coco_root / 'weights.pth').touch()
    assert main(['validate', '--task', 'det', '--model', 'd', '--checkpoint', str(coco_root / 'weights.pth'),
                 '--data-dir', str(coco_root), '--annotations', str(coco_root / 'annotations/instances_val2017.json'),
                 '--device', 'cpu', '--per-class']) == 0
    results = json.loads(capsys.readouterr().out)
    assert results['images'] == 2 and results['detections'] == 3
    for iou_type in ('bbox', 'segm'):
        assert results[iou_type]['AP'] == pytest.approx(100) and results[iou_type]['AP75'] == pytest.approx(100)
        assert results[iou_type]['per_class'] == {name: pytest.approx(100) for name in DET_CLASSES}


# ---------------------------------------------------------------------------------------------
# every error is one line


def test_image_errors(tmp_path, use_stub, capsys):
    calls = use_stub('create_segmenter', None)
    assert main(['segment', str(tmp_path / 'nope.jpg'), '--output', str(tmp_path)]) == 1
    _one_line_error(capsys, 'segment', 'image not found', 'nope.jpg')
    (tmp_path / 'text.png').write_text('not an image')
    assert main(['detect', str(tmp_path / 'text.png'), '--output', str(tmp_path)]) == 1
    _one_line_error(capsys, 'detect', 'cannot read', 'text.png')
    assert calls == []  # the images are checked before a model is built


def test_model_errors(tmp_path, monkeypatch, capsys):
    """With the real factories: an unknown name suggests close ones; offline without --checkpoint says which file
    to download and the flags that take it; random weights only with --random-weights."""
    monkeypatch.setattr(mambavision, 'create_segmenter', create_segmenter, raising=False)
    monkeypatch.setattr(mambavision, 'create_detector', create_detector, raising=False)
    _image(tmp_path / 'a.png', 8, 8)
    image = str(tmp_path / 'a.png')
    assert main(['segment', image, '--model', 'upernet_mambavision_tq.nv_ade20k', '--output', str(tmp_path)]) == 1
    _one_line_error(capsys, 'segment', "unknown segmenter 'upernet_mambavision_tq.nv_ade20k'; did you mean "
                                       "upernet_mambavision_t.nv_ade20k")
    assert main(['detect', str(tmp_path / 'a.png'), '--model', 'cascade_mambavision_t', '--output', str(tmp_path)]) == 1
    _one_line_error(capsys, 'detect', "unknown detector 'cascade_mambavision_t'; did you mean")
    assert main(['segment', image, '--checkpoint', str(tmp_path / 'no.pth'), '--output', str(tmp_path)]) == 1
    _one_line_error(capsys, 'segment', 'checkpoint not found', 'no.pth')
    assert main(['segment', str(tmp_path / 'a.png'), '--output', str(tmp_path)]) == 1  # HF_HUB_OFFLINE=1
    _one_line_error(capsys, 'segment', 'the Hugging Face hub is unreachable',
                    'download mamba_vision_160k_ade20k-512x512_tiny.pth from '
                    'https://huggingface.co/nvidia/mamba_vision_160k_ade20k-512x512_tiny and pass --checkpoint '
                    'mamba_vision_160k_ade20k-512x512_tiny.pth, or --random-weights')
    assert not list(tmp_path.glob('*_overlay.png'))


def test_random_weights_folders_and_output_checks(tmp_path, use_stub, capsys):
    """--random-weights builds the model untrained (no download) and says so; a folder gives the images below
    it; an --output that is a file is one line, before a model is built."""
    (tmp_path / 'in' / 'sub').mkdir(parents=True)
    _image(tmp_path / 'in' / 'a.png', 8, 8)
    _image(tmp_path / 'in' / 'sub' / 'b.png', 8, 8, seed=1)
    (tmp_path / 'in' / 'notes.txt').write_text('not an image')
    labels = torch.zeros(8, 8, dtype=torch.int64)
    calls = use_stub('create_segmenter', StubModel({(8, 8): dict(labels=labels)}, SEG_CLASSES, SEG_PALETTE))
    (tmp_path / 'taken').write_text('a file')
    assert main(['segment', str(tmp_path / 'in'), '--output', str(tmp_path / 'taken')]) == 1
    _one_line_error(capsys, 'segment', f'--output {tmp_path / "taken"} is a file; expected a folder')
    assert calls == []
    assert main(['segment', str(tmp_path / 'in'), '--random-weights', '--output', str(tmp_path / 'out')]) == 0
    assert calls == [dict(name='upernet_mambavision_t.nv_ade20k', pretrained=False, checkpoint_path=None)]
    captured = capsys.readouterr()
    assert captured.err == 'mambavision segment: RANDOM weights (--random-weights): the outputs mean nothing\n'
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == [
        'a_labels.png', 'a_overlay.png', 'b_labels.png', 'b_overlay.png']
    (tmp_path / 'empty').mkdir()
    assert main(['segment', str(tmp_path / 'empty'), '--output', str(tmp_path / 'out')]) == 1
    _one_line_error(capsys, 'segment', 'empty is a folder without image files')


def test_validate_errors(tmp_path, coco_root, use_stub, monkeypatch, capsys):
    use_stub('create_detector', StubModel({}, DET_CLASSES, DET_PALETTE))
    assert main(['validate', '--task', 'seg', '--model', 'm', '--pretrained', '--data-dir', str(tmp_path / 'ADE')]) == 1
    _one_line_error(capsys, 'validate', 'ADE/images/validation not found', 'ADEChallengeData2016')
    det = ['validate', '--task', 'det', '--model', 'd', '--pretrained', '--data-dir', str(coco_root)]
    assert main(det) == 1
    _one_line_error(capsys, 'validate', '--task det needs --annotations FILE')
    annotations = ['--annotations', str(coco_root / 'annotations/instances_val2017.json')]
    assert main(det[:-1] + [str(tmp_path / 'elsewhere')] + annotations) == 1
    _one_line_error(capsys, 'validate', '2 of the 2 images', 'elsewhere')
    monkeypatch.setitem(sys.modules, 'pycocotools', None)
    assert main(det + annotations) == 1
    _one_line_error(capsys, 'validate', 'pip install pycocotools')


# ---------------------------------------------------------------------------------------------
# the commands on the real networks: tiny configurations holding the golden fixtures' weights


def _fixture(name):
    """(tensors, state dict) of a golden fixture of the published code (tests/fixtures/dense)."""
    tensors = load_file(FIXTURES / f'{name}.safetensors')
    return tensors, {k[len('state_dict.'):]: v for k, v in tensors.items() if k.startswith('state_dict.')}


TINY_BACKBONE = dict(dim=16, in_dim=8, depths=(1, 2, 3, 2), num_heads=(1, 2, 2, 4))


def test_segment_with_a_tiny_upernet_gives_the_published_label_map(tmp_path, use_stub, capsys):
    tensors, state_dict = _fixture('upernet_tiny')
    model = UPerNet(create_dense_backbone('test_mambavision', (8, 8, 32, 16), **TINY_BACKBONE), 19, 32, 16,
                    test_scale=(512, 128))
    model.load_state_dict(state_dict)
    use_stub('create_segmenter', model)
    Image.fromarray(tensors['image_rgb'].numpy()).save(tmp_path / 'scene.png')
    assert main(['segment', str(tmp_path / 'scene.png'), '--output', str(tmp_path / 'out')]) == 0
    assert np.array_equal(np.array(Image.open(tmp_path / 'out/scene_labels.png')), tensors['pred'][0].numpy())


def test_detect_with_a_tiny_cascade_writes_what_predict_finds(tmp_path, use_stub, capsys):
    """The JSON holds every detection of ``predict`` (threshold 0), in COCO form."""
    tensors, state_dict = _fixture('cascade_tiny')
    model = CascadeMaskRCNN(create_dense_backbone('test_mambavision', (8, 8, 32, 16), **TINY_BACKBONE), channels=32,
                            fc_channels=64, test_scale=(333, 200))
    model.load_state_dict(state_dict)
    use_stub('create_detector', model)
    Image.fromarray(tensors['image_rgb'].numpy()).save(tmp_path / 'scene.png')
    argv = ['detect', str(tmp_path / 'scene.png'), '--output', str(tmp_path / 'out'), '--score-threshold', '0']
    assert main(argv) == 0
    results = json.loads((tmp_path / 'out/scene_detections.json').read_text())
    expected = model.predict(tensors['image_rgb'].numpy())[0]
    assert len(results) == len(expected['boxes']) > 0
    assert [r['category_id'] for r in results] == [COCO_CATEGORY_IDS[i] for i in expected['labels'].tolist()]
    assert [r['score'] for r in results] == expected['scores'].tolist()
    boxes = expected['boxes'].double()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
    assert torch.tensor([r['bbox'] for r in results], dtype=torch.float64).equal(xywh)
    masks = np.stack([pycocotools_mask.decode(dict(r['segmentation'], counts=r['segmentation']['counts'].encode()))
                      for r in results])
    assert np.array_equal(masks, expected['masks'].numpy())
    assert Image.open(tmp_path / 'out/scene_detections.png').size == (80, 60)


# ---------------------------------------------------------------------------------------------
# drawing


def test_overlapping_masks_blend_with_the_best_on_top():
    """Each mask is blended on its own (torchvision's one-call drawing paints overlaps black)."""
    gray = np.full((60, 80, 3), 100, np.uint8)
    masks = torch.zeros(2, 60, 80, dtype=torch.bool)
    masks[0, 30:45, 10:40] = masks[1, 38:55, 25:70] = True
    detections = dict(boxes=torch.tensor([[10., 30., 40., 45.], [25., 38., 70., 55.]]), scores=torch.tensor([0.9, 0.8]),
                      labels=torch.tensor([0, 1]), masks=masks)
    picture = np.array(draw_detections(gray, detections, ['a', 'b'], [[200, 0, 0], [0, 0, 200]])).astype(int)
    assert np.abs(picture[50, 60] - [50, 50, 150]).max() <= 1  # mask 1 alone: half gray, half blue
    assert np.abs(picture[42, 32] - [125, 25, 75]).max() <= 1  # both: mask 0 (the better) blended over mask 1
    assert np.array_equal(picture[59, 0], [100, 100, 100])


def test_legend_stays_within_the_image_height():
    """Ten classes on a 40 px tall image: the legend takes more columns, not more height."""
    labels = np.repeat(np.arange(10), 6)[None].repeat(40, 0)  # (40, 60), ten 6-px stripes
    palette = [[25 * i, 0, 0] for i in range(10)]
    overlay = segmentation_overlay(np.zeros((40, 60, 3), np.uint8), labels, palette, [f'c{i}' for i in range(10)])
    assert overlay.height == 40 and overlay.width > 60 + 10 * 20
    swatches = {tuple(c) for c in np.array(overlay)[:, 60:].reshape(-1, 3).tolist()}
    assert all(tuple(color) in swatches for color in palette)
