"""Cascade Mask R-CNN with a MambaVision backbone: NVIDIA's published COCO detectors on torchvision ops.

The test path of MMDetection 3.3.0's ``CascadeRCNN`` as published (FPN, RPN, three cascade box
heads, three FCN mask heads), reproducing mmdet's arithmetic step by step, assembled from parts
with one job each as torchvision's ``GeneralizedRCNN``: the image transform (``transform.py``:
resize, normalise, pad; boxes and masks back to the image), the backbone and FPN, the RPN
(``rpn.py``), the cascade RoI heads (``roi_heads.py``), on the box operations of ``boxes.py``.
Submodules carry mmdet's names, so a published ``state_dict`` loads with a plain strict
``load_state_dict``.

    det = create_detector('cascade_mask_rcnn_mambavision_t.nv_coco', pretrained=True)
    result = det.predict(Image.open('street.jpg'))[0]   # 'boxes', 'scores', 'labels', 'masks'
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..model import create_dense_backbone
from ..published import published_models
from .factory import load_published_model, published_entry, read_dense_checkpoint
from .classes import COCO_CLASSES, COCO_PALETTE, random_palette
from .image import as_rgb_images
from .layers import ConvModule
from .predict import predict_images
from .roi_heads import CascadeRoIHead
from .rpn import RPNHead
from .targets import batch_targets, check_targets, train_config
from .transform import DetectionTransform

__all__ = ['FPN', 'CascadeMaskRCNN', 'create_detector', 'list_detectors']


class FPN(nn.Module):
    """Feature pyramid: 4 maps (strides 4-32) -> ``num_outs`` maps of ``channels`` (the 5th a stride-2 max-pool)."""

    def __init__(self, in_channels: Sequence[int], channels: int = 256, num_outs: int = 5):
        super().__init__()
        self.lateral_convs = nn.ModuleList([ConvModule(c, channels, 1, act=False) for c in in_channels])
        self.fpn_convs = nn.ModuleList([ConvModule(channels, channels, 3, act=False) for _ in in_channels])
        self.num_outs = num_outs

    def forward(self, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs


class CascadeMaskRCNN(nn.Module):
    """Cascade Mask R-CNN with a MambaVision backbone, as NVIDIA published it for COCO.

    ``predict(images)`` runs the published test protocol; ``forward(x, image_sizes, original_sizes)``
    runs the network and postprocessing on a normalised, zero-padded batch.

    Args:
        backbone: a dense MambaVision (``mambavision.model.create_dense_backbone``) or any module
            with ``feature_info`` and ``forward_intermediates(x, intermediates_only=True)``
            giving four maps at strides 4, 8, 16, 32.
        num_classes: object classes (background comes on top).
        channels: width of the FPN, the RPN and the RoI heads' convs.
        fc_channels: width of the box heads' fc layer.
        test_scale: the keep-ratio resize of the test protocol, (long side, short side).
        size_divisor: the network input is zero-padded to multiples of it.
        class_names, palette: class names and RGB colours for display, one per class (default: COCO's
            for 80 classes, else 'class i' and random colours).
        train_cfg: changes to the published training settings, mmdet's names (``targets.train_config``),
            e.g. ``{'rpn': {'sampler': {'num': 512}}}``.
    """

    def __init__(
            self,
            backbone: nn.Module,
            num_classes: int = 80,
            channels: int = 256,
            fc_channels: int = 1024,
            test_scale: Tuple[int, int] = (1333, 800),
            size_divisor: int = 32,
            class_names: Optional[Sequence[str]] = None,
            palette: Optional[Sequence[Sequence[int]]] = None,
            train_cfg: Optional[dict] = None,
    ):
        super().__init__()
        self.train_cfg = train_config(train_cfg)
        self.transform = DetectionTransform(test_scale, size_divisor)
        self.backbone = backbone
        self.neck = FPN([info['num_chs'] for info in backbone.feature_info], channels)
        self.rpn_head = RPNHead(channels, channels)
        self.roi_head = CascadeRoIHead(channels, channels, fc_channels, num_classes)
        coco = num_classes == len(COCO_CLASSES)
        self.class_names = list(class_names or (COCO_CLASSES if coco else [f'class {i}' for i in range(num_classes)]))
        self.palette = [list(c) for c in palette or (COCO_PALETTE if coco else random_palette(num_classes))]
        if len(self.class_names) != num_classes or len(self.palette) != num_classes:
            raise ValueError(f'class_names and palette need one entry per class ({num_classes}), '
                             f'got {len(self.class_names)} and {len(self.palette)}')
        self.published: Optional[dict] = None  # set by create_detector

    def extract_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """(B, 3, H, W) normalised images -> 5 FPN maps (B, channels, H / s, W / s), s = 4 ... 64."""
        return self.neck(self.backbone.forward_intermediates(x, intermediates_only=True))

    def forward(
            self,
            x: torch.Tensor,
            image_sizes: Sequence[Tuple[int, int]],
            original_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> List[Dict[str, torch.Tensor]]:
        """Detections of a normalised batch zero-padded on the right and bottom.

        Args:
            x: (B, 3, H, W) images, H and W multiples of ``size_divisor``.
            image_sizes: each image's (h, w) inside the padding.
            original_sizes: each image's (h, w) before the resize (default: ``image_sizes``).

        Returns:
            Per image: boxes (N, 4) x1 y1 x2 y2 in original pixels, scores (N,), labels (N,) int64,
            masks (N, h, w) bool at the original size; highest score first.
        """
        if len(image_sizes) != len(x):
            raise ValueError(f'image_sizes needs one (h, w) per image: got {len(image_sizes)} for a batch of {len(x)}')
        feats = self.extract_features(x)
        proposals = [boxes for boxes, _ in self.rpn_head.predict(feats, image_sizes)]
        detections = self.roi_head.predict(feats, proposals, image_sizes)
        return self.transform.postprocess(detections, image_sizes, original_sizes or image_sizes)

    def loss(
            self, inputs: torch.Tensor, targets: Sequence[dict], generator: Optional[torch.Generator] = None,
    ) -> Dict[str, torch.Tensor]:
        """mmdet's CascadeRCNN.loss: the training losses of a normalised, zero-padded batch, by mmdet's names.

        Args:
            inputs: (B, 3, H, W) images, each at the top left of its padding.
            targets: per image, torchvision's form: ``boxes`` (N, 4) float x1 y1 x2 y2 in input pixels,
                ``labels`` (N,) int64 from 0, ``image_size`` (h, w) unpadded, and ``masks`` (N, h, w) uint8
                (left out for boxes-only data: no mask losses, the mask heads untouched).
            generator: the samplers' random draws (default: torch's global generator).

        Returns:
            ``loss_rpn_cls.{level}``, ``loss_rpn_bbox.{level}`` (levels 0-4) and per cascade stage
            ``s{i}.loss_cls``, ``s{i}.acc`` (percent, not a loss), ``s{i}.loss_bbox`` [, ``s{i}.loss_mask``];
            ``losses.total_loss`` sums the losses. Settings: ``self.train_cfg``.
        """
        image_sizes = check_targets(targets, len(inputs), inputs.shape[-2:], self.roi_head.num_classes)
        targets = batch_targets(targets, inputs)
        cfg = self.train_cfg
        feats = self.extract_features(inputs)
        logits, deltas = self.rpn_head(feats)
        losses = self.rpn_head.loss(logits, deltas, [t['boxes'] for t in targets], image_sizes, cfg['rpn'], generator)
        proposal_cfg = cfg['rpn_proposal']
        proposals = self.rpn_head.select_proposals(
            logits, deltas, image_sizes, proposal_cfg['nms_pre'], proposal_cfg['max_per_img'],
            proposal_cfg['nms']['iou_threshold'], proposal_cfg['min_bbox_size'])
        losses.update(self.roi_head.loss(
            feats, [boxes for boxes, _ in proposals], targets, image_sizes, cfg['rcnn'], generator))
        return losses

    @torch.no_grad()
    def predict(self, images, batch_size: int = 1) -> List[Dict[str, torch.Tensor]]:
        """Detect objects in one image or a list (PIL, (H, W, 3) uint8 RGB array or tensor, or path).

        The published test protocol: keep-ratio resize to ``test_scale``, normalise, zero-pad to a
        multiple of 32. Up to ``batch_size`` images that pad to the same size run in one forward
        (the backbone's windows see the padding, so only same-size images batch exactly).

        Returns:
            Per image: boxes (N, 4) float32 x1 y1 x2 y2 in image pixels, scores (N,), labels (N,)
            int64 in 0..num_classes-1, masks (N, H, W) bool; highest score first.
        """
        return predict_images(self, as_rgb_images(images), self.transform, batch_size, self)




def list_detectors() -> List[str]:
    """The published detectors' names, which ``create_detector`` accepts (also without their tag)."""
    return [m.name for m in published_models('det')]


def create_detector(
        name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None,
        backbone_kwargs: Optional[dict] = None, **kwargs,
) -> CascadeMaskRCNN:
    """A published Cascade Mask R-CNN (see ``list_detectors()``), in eval mode.

    Args:
        name: e.g. 'cascade_mask_rcnn_mambavision_t.nv_coco' (or 'cascade_mask_rcnn_mambavision_t').
        pretrained: download the published weights (Hugging Face; cached).
        checkpoint_path: a local published ``.pth`` (mmengine checkpoint) or a saved ``state_dict`` of ours; a
            checkpoint that records its classes (a fine-tuned one: ``meta.dataset_meta``) brings its class count,
            names and palette, unless ``num_classes`` is given.
        backbone_kwargs: ``MambaVision`` arguments overriding the architecture's (e.g. ``drop_path_rate``).
        kwargs: ``CascadeMaskRCNN`` arguments, e.g. ``num_classes`` for one's own classes (the published weights then
            load into everything but the class-specific layers - classifiers, class-specific box regressors, mask
            logits - which stay freshly initialised), or ``test_scale``.
    """
    entry = published_entry('det', name)
    checkpoint, kwargs = read_dense_checkpoint(checkpoint_path, kwargs)
    kwargs = {'test_scale': entry.test_scale, **kwargs}
    model = CascadeMaskRCNN(create_dense_backbone(entry.backbone_tag, **(backbone_kwargs or {})), **kwargs)
    return load_published_model(model, entry, checkpoint, checkpoint_path, pretrained,
                                class_specific=('.fc_cls.', '.fc_reg.', '.conv_logits.'))
