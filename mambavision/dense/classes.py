"""Class names and display palettes of the published models' datasets (ADE20K: 150, COCO: 80)."""
import json
from pathlib import Path
from typing import List

import torch

__all__ = ['ADE20K_CLASSES', 'ADE20K_PALETTE', 'COCO_CLASSES', 'COCO_PALETTE', 'random_palette']

_META = json.loads((Path(__file__).parent / 'dataset_meta.json').read_text())
ADE20K_CLASSES = tuple(_META['ade20k']['classes'])
ADE20K_PALETTE = tuple(tuple(c) for c in _META['ade20k']['palette'])
COCO_CLASSES = tuple(_META['coco']['classes'])
COCO_PALETTE = tuple(tuple(c) for c in _META['coco']['palette'])


def random_palette(num_classes: int) -> List[List[int]]:
    """``num_classes`` RGB colours for one's own classes, the same on every call (seed 0)."""
    return torch.randint(0, 256, (num_classes, 3), generator=torch.Generator().manual_seed(0), device='cpu').tolist()
