"""Shared test helpers: the golden fixtures of the published code and the published checkpoint names."""
import atexit
import json
import os
import shutil
import tempfile
from functools import cached_property, cache
from pathlib import Path

# A Hugging Face cache of the machine (real published weights, say) must not change what the tests see:
# point the hub at an empty cache before huggingface_hub is first imported (it reads this at import).
os.environ['HF_HOME'] = tempfile.mkdtemp(prefix='mambavision-tests-hf-')
atexit.register(shutil.rmtree, os.environ['HF_HOME'], True)
os.environ.pop('HF_HUB_CACHE', None)
# The C scan kernel is built into a fresh cache, so every run exercises the build and none reuses the machine's.
os.environ['MAMBAVISION_CACHE'] = tempfile.mkdtemp(prefix='mambavision-tests-cache-')
atexit.register(shutil.rmtree, os.environ['MAMBAVISION_CACHE'], True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file
from timm.layers import LayerScale

import mambavision
from mambavision import MambaVisionMixer, checkpoint_filter_fn

# The tests run small ops, where intra-op threads cost more than they give; on a shared, loaded CPU
# two threads made the suite ~10x slower (OpenMP waits), one thread runs it at full speed.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / 'tests' / 'fixtures'
DENSE_FIXTURES = FIXTURES / 'dense'  # the published detection and segmentation code's golden files
TINY_FIXTURES = ('official_tiny_a', 'official_tiny_b')

# published model entry (official_state_dict_keys.json) -> our registered architecture
PUBLISHED_TO_REGISTERED = {
    'mamba_vision_T': 'mambavision_t',
    'mamba_vision_T2': 'mambavision_t2',
    'mamba_vision_S': 'mambavision_s',
    'mamba_vision_B': 'mambavision_b',
    'mamba_vision_B_21k': 'mambavision_b',
    'mamba_vision_L': 'mambavision_l',
    'mamba_vision_L_21k': 'mambavision_l',
    'mamba_vision_L2': 'mambavision_l2',
    'mamba_vision_L2_512_21k': 'mambavision_l2_512',
    'mamba_vision_L3_256_21k': 'mambavision_l3_256',
    'mamba_vision_L3_512_21k': 'mambavision_l3_512',
}


class TinyFixture:
    """One golden fixture: published constructor args, published weights and the published code's outputs."""

    def __init__(self, name: str):
        self.name = name
        self.arch = json.loads((FIXTURES / f'{name}.json').read_text())['architecture']
        self.tensors = load_file(FIXTURES / f'{name}.safetensors')
        prefix = 'state_dict.'
        self.state_dict = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        self.num_inputs = sum(k.startswith('input.') for k in self.tensors)

    def __getitem__(self, key: str):
        return self.tensors[key]

    def create_model(self, **kwargs):
        """``test_mambavision`` with this fixture's architecture (random weights, eval mode)."""
        return timm.create_model('test_mambavision', **dict(self.arch, **kwargs)).eval()

    @cached_property
    def our_state_dict(self) -> dict:
        """The fixture's weights in our names."""
        return self.loaded_model().state_dict()

    def loaded_model(self, **kwargs):
        """The fixture's architecture holding the fixture's weights (strict load of the mapped names)."""
        model = self.create_model(**kwargs)
        model.load_state_dict(checkpoint_filter_fn(self.state_dict, model))
        return model


@torch.no_grad()
def scan_visible_(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights under which every part shows in the output, the scan's recurrence included; in place.

    With the default init the mixer's skip (D * x) drowns the scan: a model-level check with a wrong
    scan would pass. Here the projections into and out of the scan are of unit gain, the step sizes and
    decays spread (A_log perturbed), D is small, layer scales (B, L variants: 1e-5) are 1, and the
    norms have statistics.
    """
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
        elif isinstance(m, MambaVisionMixer):
            for proj in (m.in_proj, m.x_proj, m.dt_proj, m.out_proj):
                proj.weight.normal_(0, proj.in_features ** -0.5)
            m.dt_proj.bias.uniform_(-2, 0)
            m.A_log.add_(torch.randn_like(m.A_log))
            m.D.uniform_(-0.1, 0.1)
        elif isinstance(m, LayerScale):
            m.gamma.fill_(1.)
    return model


@cache
def _tiny_fixture(name: str) -> TinyFixture:
    return TinyFixture(name)


@pytest.fixture(params=TINY_FIXTURES)
def tiny(request) -> TinyFixture:
    return _tiny_fixture(request.param)


@pytest.fixture
def tiny_a() -> TinyFixture:
    return _tiny_fixture('official_tiny_a')


@pytest.fixture
def tiny_b() -> TinyFixture:
    """The fixture with layer scale (gamma) tensors."""
    return _tiny_fixture('official_tiny_b')


@pytest.fixture(scope='session')
def published_keys() -> dict:
    """Published entry name -> [[tensor name, shape], ...] of the 11 published checkpoints."""
    return json.loads((FIXTURES / 'official_state_dict_keys.json').read_text())


@pytest.fixture(autouse=True)
def _default_scan_backend(monkeypatch):
    """Every test starts and ends with the scan backend chosen per device."""
    monkeypatch.delenv('MAMBAVISION_SCAN', raising=False)
    mambavision.set_scan_backend(None)
    yield
    mambavision.set_scan_backend(None)


# COCO annotations and detections of boxes, shared by the evaluation and command-line tests

CATEGORY_IDS = [1, 3, 7]  # not contiguous: label i is the i-th smallest id


def _box_mask(box, height, width):
    """(H, W) bool mask of an x, y, w, h box with integer corners."""
    x, y, w, h = box
    mask = np.zeros((height, width), bool)
    mask[y:y + h, x:x + w] = True
    return mask


def write_coco(path, objects, size=(120, 160)):
    """An instances json: ``objects`` is [(image_id, category_id, [x, y, w, h])]; masks are the boxes, as RLE."""
    from pycocotools import mask as pycocotools_mask  # the `coco` extra, part of the test extra

    height, width = size
    annotations = []
    for i, (image_id, category_id, box) in enumerate(objects, 1):
        rle = pycocotools_mask.encode(np.asfortranarray(_box_mask(box, height, width).astype(np.uint8)))
        annotations.append(dict(id=i, image_id=image_id, category_id=category_id, bbox=box, area=box[2] * box[3],
                                iscrowd=0, segmentation=dict(size=rle['size'], counts=rle['counts'].decode())))
    images = sorted({o[0] for o in objects})
    path.write_text(json.dumps(dict(
        images=[dict(id=i, file_name=f'{i}.png', height=height, width=width) for i in images],
        annotations=annotations,
        categories=[dict(id=c, name=f'class{c}') for c in CATEGORY_IDS])))
    return str(path)


def detections_of(objects, size=(120, 160)):
    """Per image id, detections in the model's output form: labels 0.., x1 y1 x2 y2 boxes, bool masks."""
    by_image = {}
    for image_id, category_id, box in objects:
        by_image.setdefault(image_id, []).append((CATEGORY_IDS.index(category_id), box))
    return {image_id: dict(
        boxes=torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in found], dtype=torch.float32),
        scores=torch.linspace(0.9, 0.5, len(found)), labels=torch.tensor([label for label, _ in found]),
        masks=torch.from_numpy(np.stack([_box_mask(box, *size) for _, box in found])))
        for image_id, found in by_image.items()}
