"""Class names and display palettes of the published models' datasets (ADE20K: 150, COCO: 80)."""
import json
from pathlib import Path

__all__ = ['ADE20K_CLASSES', 'ADE20K_PALETTE', 'COCO_CLASSES', 'COCO_PALETTE']

_META = json.loads((Path(__file__).parent / 'dataset_meta.json').read_text())
ADE20K_CLASSES = tuple(_META['ade20k']['classes'])
ADE20K_PALETTE = tuple(tuple(c) for c in _META['ade20k']['palette'])
COCO_CLASSES = tuple(_META['coco']['classes'])
COCO_PALETTE = tuple(tuple(c) for c in _META['coco']['palette'])
