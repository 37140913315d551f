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


_COCO = dict(task='det', window_size=(8, 8, 112, 56), test_scale=(1333, 800), input_size=(800, 1344), dataset='coco')
_ADE20K = dict(task='seg', test_scale=(2048, 512), input_size=(512, 512), dataset='ade20k')

PUBLISHED_MODELS: Dict[str, PublishedModel] = {m.name: m for m in (
    PublishedModel('cascade_mask_rcnn_mambavision_t.nv_coco', arch='mambavision_t', tag='nv_coco',
                   hf_repo='nvidia/cascade_mask_rcnn_mamba_vision_tiny_3x_coco',
                   metrics={'box_ap': 51.1, 'mask_ap': 44.3}, **_COCO),
    PublishedModel('cascade_mask_rcnn_mambavision_s.nv_coco', arch='mambavision_s', tag='nv_coco',
                   hf_repo='nvidia/cascade_mask_rcnn_mamba_vision_small_3x_coco',
                   metrics={'box_ap': 52.3, 'mask_ap': 45.2}, **_COCO),
    PublishedModel('cascade_mask_rcnn_mambavision_b.nv_coco', arch='mambavision_b', tag='nv_coco',
                   hf_repo='nvidia/cascade_mask_rcnn_mamba_vision_base_3x_coco',
                   metrics={'box_ap': 52.8, 'mask_ap': 45.7}, **_COCO),
    PublishedModel('upernet_mambavision_t.nv_ade20k', arch='mambavision_t', tag='nv_ade20k',
                   hf_repo='nvidia/mamba_vision_160k_ade20k-512x512_tiny', window_size=(8, 8, 64, 32),
                   metrics={'miou': 46.0}, **_ADE20K),
    PublishedModel('upernet_mambavision_s.nv_ade20k', arch='mambavision_s', tag='nv_ade20k',
                   hf_repo='nvidia/mamba_vision_160k_ade20k-512x512_small', window_size=(8, 8, 160, 56),
                   metrics={'miou': 48.2}, **_ADE20K),
    PublishedModel('upernet_mambavision_b.nv_ade20k', arch='mambavision_b', tag='nv_ade20k',
                   hf_repo='nvidia/mamba_vision_160k_ade20k-512x512_base', window_size=(8, 8, 64, 32),
                   metrics={'miou': 49.1}, **_ADE20K),
    PublishedModel('upernet_mambavision_l3.nv_in21k_ade20k_640', arch='mambavision_l3_256', tag='nv_in21k_ade20k_640',
                   hf_repo='nvidia/mamba_vision_160k_ade20k-640x640_l3_21k', window_size=(8, 8, 64, 32),
                   metrics={'miou': 53.2}, **dict(_ADE20K, test_scale=(2560, 640), input_size=(640, 640))),
)}


def published_models(task: Optional[str] = None) -> List[PublishedModel]:
    """The published models of ``task`` ('det', 'seg'; all when None), in table order."""
    return [m for m in PUBLISHED_MODELS.values() if task is None or m.task == task]


def published_by_backbone_tag(backbone_tag: str) -> PublishedModel:
    """The published model whose dense backbone is timm tag ``backbone_tag`` ('mambavision_t.nv_coco')."""
    return next(m for m in PUBLISHED_MODELS.values() if m.backbone_tag == backbone_tag)
