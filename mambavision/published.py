"""The seven published detection and segmentation models, one entry each: what they are, where their file
is, how they were tested and what they scored (the ImageNet checkpoints are timm pretrained tags in model.py).

Every part of the library that needs a fact about a published dense model reads it here: the dense backbone
tags of timm (model.py), ``create_detector`` / ``create_segmenter``, ``mambavision info``, and the tests.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

__all__ = ['PublishedModel', 'PUBLISHED_MODELS', 'published_models', 'published_by_backbone_tag']


@dataclass(frozen=True)
class PublishedModel:
    """One published detection or segmentation model (SPEC, "Dense prediction")."""
    name: str  # our name, e.g. 'upernet_mambavision_t.nv_ade20k'
    task: str  # 'det' (Cascade Mask R-CNN) or 'seg' (UPerNet)
    arch: str  # the backbone's architecture, a timm model name
    tag: str  # the dense backbone's timm tag: f'{arch}.{tag}' holds the task's windows and this file's backbone
    hf_repo: str  # Hugging Face repository; the file is its name + '.pth'
    window_size: Tuple[int, int, int, int]  # the task's windows of the four stages
    test_scale: Tuple[int, int]  # the test pipeline's keep-ratio resize scale (long side, short side)
    input_size: Tuple[int, int]  # the backbone tag's nominal input size (timm's pretrained cfg)
    dataset: str  # 'coco' or 'ade20k': class names and palette
    metrics: Dict[str, float]  # the published results on the dataset's validation split (percent)
    license: str = 'cc-by-nc-sa-4.0'  # the published weights' licence

    @property
    def backbone_tag(self) -> str:
        return f'{self.arch}.{self.tag}'

    @property
    def hf_file(self) -> str:
        return self.hf_repo.split('/')[-1] + '.pth'


def _coco(name: str, arch: str, hf_repo: str, box_ap: float, mask_ap: float) -> PublishedModel:
    """A published Cascade Mask R-CNN: COCO 3x, windows (8, 8, 112, 56), tested at (1333, 800)."""
    return PublishedModel(name, 'det', arch, 'nv_coco', hf_repo, window_size=(8, 8, 112, 56), test_scale=(1333, 800),
                          input_size=(800, 1344), dataset='coco', metrics={'box_ap': box_ap, 'mask_ap': mask_ap})


def _ade20k(name: str, arch: str, tag: str, hf_repo: str, window_size: Tuple[int, int, int, int], miou: float,
            crop: int = 512) -> PublishedModel:
    """A published UPerNet: ADE20K 160k at crop ``crop``, tested at (4 x crop, crop)."""
    return PublishedModel(name, 'seg', arch, tag, hf_repo, window_size=window_size, test_scale=(4 * crop, crop),
                          input_size=(crop, crop), dataset='ade20k', metrics={'miou': miou})


PUBLISHED_MODELS: Dict[str, PublishedModel] = {m.name: m for m in (
    _coco('cascade_mask_rcnn_mambavision_t.nv_coco', 'mambavision_t',
          'nvidia/cascade_mask_rcnn_mamba_vision_tiny_3x_coco', 51.1, 44.3),
    _coco('cascade_mask_rcnn_mambavision_s.nv_coco', 'mambavision_s',
          'nvidia/cascade_mask_rcnn_mamba_vision_small_3x_coco', 52.3, 45.2),
    _coco('cascade_mask_rcnn_mambavision_b.nv_coco', 'mambavision_b',
          'nvidia/cascade_mask_rcnn_mamba_vision_base_3x_coco', 52.8, 45.7),
    _ade20k('upernet_mambavision_t.nv_ade20k', 'mambavision_t', 'nv_ade20k',
            'nvidia/mamba_vision_160k_ade20k-512x512_tiny', (8, 8, 64, 32), 46.0),
    _ade20k('upernet_mambavision_s.nv_ade20k', 'mambavision_s', 'nv_ade20k',
            'nvidia/mamba_vision_160k_ade20k-512x512_small', (8, 8, 160, 56), 48.2),
    _ade20k('upernet_mambavision_b.nv_ade20k', 'mambavision_b', 'nv_ade20k',
            'nvidia/mamba_vision_160k_ade20k-512x512_base', (8, 8, 64, 32), 49.1),
    _ade20k('upernet_mambavision_l3.nv_in21k_ade20k_640', 'mambavision_l3_256', 'nv_in21k_ade20k_640',
            'nvidia/mamba_vision_160k_ade20k-640x640_l3_21k', (8, 8, 64, 32), 53.2, crop=640),
)}


def published_models(task: Optional[str] = None) -> List[PublishedModel]:
    """The published models of ``task`` ('det', 'seg'; all when None), in table order."""
    return [m for m in PUBLISHED_MODELS.values() if task is None or m.task == task]


def published_by_backbone_tag(backbone_tag: str) -> PublishedModel:
    """The published model whose dense backbone is timm tag ``backbone_tag`` ('mambavision_t.nv_coco')."""
    return next(m for m in PUBLISHED_MODELS.values() if m.backbone_tag == backbone_tag)
