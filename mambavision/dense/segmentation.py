"""UPerNet semantic segmentation on MambaVision, as NVIDIA published it for ADE20K.

The network is MMSegmentation 1.2.2's ``EncoderDecoder`` (a ``UPerHead`` and an auxiliary
``FCNHead`` on the dense backbone) in plain PyTorch. Its submodules carry mmseg's names, so a
published state dict loads with a plain strict ``load_state_dict`` (the backbone renames its
published tensor names itself).

    seg = create_segmenter('upernet_mambavision_t.nv_ade20k', pretrained=True)
    result = seg.predict(Image.open('room.jpg'))[0]   # 'logits' (150, H, W), 'labels' (H, W)

``seg(x)`` on a normalised (B, 3, H, W) batch gives the decode head's logits at 1/4 size; in
train mode it gives ``(decode_logits, aux_logits)``, and ``seg.loss(x, target)`` forms mmseg's
training loss from them.
"""
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..model import create_dense_backbone
from ..published import published_models
from .factory import load_published_model, published_entry, published_file, read_dense_checkpoint
from .classes import ADE20K_CLASSES, ADE20K_PALETTE, random_palette
from .image import as_rgb_images
from .layers import ConvModule
from .predict import predict_images
from .transform import ImageTransform

__all__ = ['UPerNet', 'UPerHead', 'FCNHead', 'create_segmenter', 'list_segmenters', 'segmenter_for_training']

_logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
AUX_LOSS_WEIGHT = 0.4
MAX_LOGITS_ELEMENTS = 2 ** 30  # predict's largest logits at an image's size (4 GiB of float32)


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) to ``size`` with align_corners=False, as mmseg's heads do."""
    return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False)


class AdaptiveAvgPool(nn.Module):
    """``nn.AdaptiveAvgPool2d(size)`` written as two small averaging matrices: (B, C, H, W) -> (B, C, size, size).

    The bins are PyTorch's (rows floor(i H / size) .. ceil((i + 1) H / size)). The built-in op
    cannot be exported to ONNX with a dynamic input size; this form can.
    """

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def _bins(self, length: int, like: torch.Tensor) -> torch.Tensor:
        """(size, length) matrix whose row i averages bin i."""
        i = torch.arange(self.size, device=like.device)
        start, end = (i * length) // self.size, ((i + 1) * length + self.size - 1) // self.size
        pos = torch.arange(length, device=like.device)
        inside = ((pos >= start[:, None]) & (pos < end[:, None])).to(like.dtype)
        return inside / (end - start)[:, None].to(like.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._bins(x.shape[-2], x) @ x @ self._bins(x.shape[-1], x).T

    def extra_repr(self) -> str:
        return f'size={self.size}'


class _SegHead(nn.Module):
    """What both heads end with (mmseg's ``cls_seg``): Dropout2d, then a 1x1 classifier ``conv_seg``."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        assert self.conv_seg.bias is not None  # made with bias=True
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class UPerHead(_SegHead):
    """mmseg's UPerHead: a pyramid pooling module on the last map, an FPN over all maps, fused at the first.

    (B, in_channels[i], H_i, W_i) for each level -> (B, num_classes, H_0, W_0).
    """

    def __init__(
            self, in_channels: Sequence[int], channels: int = 512, num_classes: int = 150,
            pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        top = in_channels[-1]
        self.psp_modules = nn.ModuleList([
            nn.Sequential(AdaptiveAvgPool(scale), ConvModule(top, channels, 1, norm=True)) for scale in pool_scales])
        self.bottleneck = ConvModule(top + len(pool_scales) * channels, channels, 3, norm=True)
        self.lateral_convs = nn.ModuleList([ConvModule(c, channels, 1, norm=True) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvModule(channels, channels, 3, norm=True) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, norm=True)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        top = features[-1]
        pooled = [_resize(pool(top), top.shape[-2:]) for pool in self.psp_modules]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        laterals.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = torch.cat([outs[0]] + [_resize(out, size) for out in outs[1:]], dim=1)
        return self.cls_seg(self.fpn_bottleneck(fused))


class FCNHead(_SegHead):
    """mmseg's FCNHead as the published auxiliary head: one 3x3 conv-BN-ReLU, no input concat.

    (B, in_channels, H, W) -> (B, num_classes, H, W).
    """

    def __init__(self, in_channels: int, channels: int = 256, num_classes: int = 150, dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3, norm=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_seg(self.convs(x))


def _argmax_classes(logits: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (H, W) int64, the first best class as ``argmax(0)`` (which is many times slower for few classes)."""
    return logits.max(0).indices


def _bilinear_taps(in_size: int, out_size: int, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """PyTorch's bilinear (align_corners=False) sources along one axis: indices i0, i1 and weights w0, w1
    (bit-identical to ``F.interpolate``'s)."""
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size  # float32, as PyTorch's
    # the source index rounded once from the exact product (PyTorch's kernel uses a fused multiply-add)
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale.double() - 0.5).float().clamp(min=0)
    i0 = src.long()
    w1 = (src - i0).clamp(0, 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    return tuple(t.to(device) for t in (i0, i1, 1 - w1, w1))


def _labels_in_row_blocks(logits: torch.Tensor, size: Tuple[int, int], block_elements: int = 2 ** 27) -> torch.Tensor:
    """``_resize(logits[None], size)[0].argmax(0)`` for (C, h, w) logits -> (H, W) int64 on the CPU.

    Logits at ``size`` that take more than ``block_elements`` come a block of rows at a time
    (interpolated down the height, then across the width), so the label map of a huge image
    never holds all its logits at once.
    """
    (c, h, _), (height, width) = logits.shape, size
    step = max(1, block_elements // (c * width))
    if step >= height:  # in one piece
        return _argmax_classes(_resize(logits[None], size)[0]).cpu()
    y0, y1, w0, w1 = _bilinear_taps(h, height, logits.device)
    labels = torch.empty(size, dtype=torch.int64)
    for start in range(0, height, step):
        rows = slice(start, start + step)
        block = w0[rows, None] * logits[:, y0[rows]] + w1[rows, None] * logits[:, y1[rows]]
        labels[rows] = _argmax_classes(_resize(block[None], (block.shape[1], width))[0]).cpu()
    return labels


class UPerNet(nn.Module):
    """MambaVision + UPerHead (+ an auxiliary FCNHead for training): mmseg's EncoderDecoder.

    Args:
        backbone: a dense MambaVision (``mambavision.model.create_dense_backbone``) or any module
            with ``feature_info`` and ``forward_intermediates(x, intermediates_only=True)``
            giving four maps at strides 4, 8, 16, 32.
        num_classes: output classes.
        channels: width of the decode head.
        aux_channels: width of the auxiliary head (on the stride-16 map).
        pool_scales: output sizes of the pyramid pooling module.
        dropout: Dropout2d before each classifier.
        test_scale: ``predict``'s keep-ratio resize target (long side, short side).
        class_names, palette: class names and RGB colours for display, one per class.
    """

    def __init__(
            self,
            backbone: nn.Module,
            num_classes: int = 150,
            channels: int = 512,
            aux_channels: int = 256,
            pool_scales: Sequence[int] = (1, 2, 3, 6),
            dropout: float = 0.1,
            test_scale: Tuple[int, int] = (2048, 512),
            class_names: Optional[Sequence[str]] = None,
            palette: Optional[Sequence[Sequence[int]]] = None,
    ):
        super().__init__()
        self.backbone = backbone
        in_channels = [info['num_chs'] for info in backbone.feature_info]
        self.decode_head = UPerHead(in_channels, channels, num_classes, pool_scales, dropout)
        self.auxiliary_head = FCNHead(in_channels[2], aux_channels, num_classes, dropout)
        self.num_classes = num_classes
        self.in_chans = 3  # what export_onnx traces with
        self.test_scale = cast(Tuple[int, int], tuple(test_scale))  # a list (from a config file) taken too
        self.class_names = list(class_names) if class_names else [f'class {i}' for i in range(num_classes)]
        self.palette = [list(c) for c in palette] if palette else random_palette(num_classes)
        if len(self.class_names) != num_classes or len(self.palette) != num_classes:
            raise ValueError(f'class_names and palette need one entry per class ({num_classes}), '
                             f'got {len(self.class_names)} and {len(self.palette)}')
        self.published: Optional[Dict[str, Any]] = None  # set by create_segmenter

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute the backbone's windowed stages in backward (less memory for training)."""
        self.backbone.set_grad_checkpointing(enable)

    def extract_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """(B, 3, H, W) normalised images -> the backbone's four maps (strides 4, 8, 16, 32)."""
        return self.backbone.forward_intermediates(x, intermediates_only=True)

    def forward(self, x: torch.Tensor):
        """(B, 3, H, W) normalised images -> decode logits (B, num_classes, ~H/4, ~W/4).

        In train mode: ``(decode_logits, aux_logits)``, the auxiliary logits at ~H/16, ~W/16.
        """
        features = self.extract_features(x)
        logits = self.decode_head(features)
        return (logits, self.auxiliary_head(features[2])) if self.training else logits

    def loss(self, x: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """mmseg's training loss for images ``x`` (B, 3, H, W) and labels ``target`` (B, H, W) int64.

        Both heads' logits are resized bilinearly to the labels' size; loss = CE(decode) + 0.4 CE(aux),
        each the mean over all pixels, ``ignore_index`` pixels counting as zero (mmseg's default).
        """
        features = self.extract_features(x)
        total: Union[float, torch.Tensor] = 0.
        heads = ((self.decode_head(features), 1.), (self.auxiliary_head(features[2]), AUX_LOSS_WEIGHT))
        for logits, weight in heads:
            logits = _resize(logits, target.shape[-2:])
            total = total + weight * F.cross_entropy(logits, target, ignore_index=ignore_index, reduction='none').mean()
        return cast(torch.Tensor, total)  # a tensor once the heads' terms are added

    @torch.no_grad()
    def predict(self, images, batch_size: int = 4, return_logits: bool = True) -> List[Dict[str, torch.Tensor]]:
        """Segment images as the published test protocol does (keep-ratio resize, whole-image inference).

        Args:
            images: one image or a list: PIL, (H, W, 3) uint8 RGB array or tensor, or a path.
            batch_size: images of the same resized size run together, this many at a time.
            return_logits: False: ``labels`` alone, made a block of rows at a time (for images whose
                logits at full size would not fit in memory; over 4 GiB they are refused).

        Returns one dict per image: ``logits`` (num_classes, H, W) float32 and ``labels`` (H, W)
        int64, at the image's size (CPU tensors).
        """
        originals = as_rgb_images(images)
        for h, w, _ in (image.shape for image in originals) if return_logits else ():
            if self.num_classes * h * w > MAX_LOGITS_ELEMENTS:
                raise ValueError(
                    f'the logits of a {w}x{h} image ({self.num_classes} classes) would take '
                    f'{self.num_classes * h * w * 4 / 2 ** 30:.0f} GiB; '
                    f'predict(..., return_logits=False) gives its labels alone')

        def run(batch, image_sizes, original_sizes):
            return [self._postprocess(logits, batch.shape[-2:], size, return_logits)
                    for logits, size in zip(self(batch).float(), original_sizes)]
        return predict_images(self, originals, ImageTransform(self.test_scale), batch_size, run)

    @staticmethod
    def _postprocess(logits: torch.Tensor, input_size, image_size, return_logits: bool) -> Dict[str, torch.Tensor]:
        """(C, h, w) decode logits -> logits and labels at the image size, resized as mmseg does: first to the
        network input's size, then to the image's."""
        logits = _resize(logits[None], input_size)
        if not return_logits:
            return dict(labels=_labels_in_row_blocks(logits[0], image_size))
        logits = _resize(logits, image_size)[0]
        return dict(logits=logits.cpu(), labels=_argmax_classes(logits).cpu())




def list_segmenters() -> List[str]:
    """The published segmenters' names, which ``create_segmenter`` accepts (also without their tag)."""
    return [m.name for m in published_models('seg')]


def create_segmenter(
        name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None,
        backbone_kwargs: Optional[dict] = None, **kwargs,
) -> UPerNet:
    """A published UPerNet (see ``list_segmenters()``), in eval mode.

    Args:
        name: e.g. 'upernet_mambavision_t.nv_ade20k' (or 'upernet_mambavision_t').
        pretrained: download the published weights (Hugging Face; cached).
        checkpoint_path: a local published ``.pth`` (mmengine checkpoint) or a saved ``state_dict`` of ours; a
            checkpoint that records its classes (a fine-tuned one: ``meta.dataset_meta``) brings its class count,
            names and palette, unless ``num_classes`` is given.
        backbone_kwargs: ``MambaVision`` arguments overriding the architecture's (e.g. ``drop_path_rate``).
        kwargs: ``UPerNet`` arguments, e.g. ``num_classes`` for one's own classes (the published weights then
            load into everything but the two 1x1 classifiers, which stay freshly initialised).
    """
    entry = published_entry('seg', name)
    checkpoint, kwargs = read_dense_checkpoint(checkpoint_path, kwargs)
    ade20k = dict(class_names=ADE20K_CLASSES, palette=ADE20K_PALETTE) if kwargs.get('num_classes', 150) == 150 else {}
    kwargs = {'test_scale': entry.test_scale, **ade20k, **kwargs}
    model = UPerNet(create_dense_backbone(entry.backbone_tag, **(backbone_kwargs or {})), **kwargs)
    return load_published_model(model, entry, checkpoint, checkpoint_path, pretrained,
                                class_specific=('.conv_seg.',))


# ---------------------------------------------------------------------------------------------
# fine-tuning

TRAIN_DROP_PATH_RATE = 0.2  # what every published run trained with (the configs' values never reached the backbone)


def segmenter_for_training(
        name: str, num_classes: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
        palette: Optional[Sequence[Sequence[int]]] = None, pretrained: Union[bool, str] = False,
        backbone_weights: Optional[str] = None, drop_path_rate: float = TRAIN_DROP_PATH_RATE, dropout: float = 0.1,
        backbone_kwargs: Optional[dict] = None, **kwargs,
) -> UPerNet:
    """A UPerNet to fine-tune as the published runs trained, in train mode; its starting point logged in one line.

    Args:
        name: a published segmenter ('upernet_mambavision_t.nv_ade20k') or its architecture ('upernet_mambavision_t').
        num_classes: classes to learn (default: as many as ``class_names``, else ADE20K's 150).
        class_names, palette: names and RGB colours of the classes (default: ADE20K's for 150 classes).
        pretrained: start from a whole segmenter: True for the published weights of ``name``, or a local file
            (a published checkpoint, a saved ``state_dict`` or a training checkpoint of ours). With another class
            count the classifiers of both heads (``conv_seg``) start fresh, everything else loads.
        backbone_weights: start from ImageNet weights in the backbone, as the published training did: a
            classification tag ('mambavision_t.nv_in1k') or a local classification file; the out-norms and
            both heads start fresh.
        drop_path_rate: the backbone's stochastic depth, rising linearly over the blocks (0.2 as published).
        dropout: Dropout2d before both classifiers (0.1 as published).
        backbone_kwargs, kwargs: ``create_segmenter``'s (e.g. a smaller backbone for tests).
    """
    if pretrained and backbone_weights:
        raise ValueError('start from a pretrained segmenter or from backbone weights, not both')
    name = published_entry('seg', name).name
    num_classes = num_classes or (len(class_names) if class_names else 150)
    classes = {k: v for k, v in dict(class_names=class_names, palette=palette).items() if v is not None}
    model = create_segmenter(
        name, pretrained=pretrained is True, checkpoint_path=pretrained if isinstance(pretrained, str) else None,
        backbone_kwargs=dict(backbone_kwargs or {}, drop_path_rate=drop_path_rate), num_classes=num_classes,
        dropout=dropout, **classes, **kwargs)
    if pretrained:
        fresh = model.published.get('fresh', [])
        note = f'weights of {pretrained if isinstance(pretrained, str) else name} loaded' + (
            f'; {" and ".join(sorted({n.rsplit(".", 1)[0] for n in fresh}))} start fresh ({num_classes} classes)'
            if fresh else '')
    elif backbone_weights:
        _load_backbone_weights(model.backbone, backbone_weights)
        note = f'backbone weights of {backbone_weights} loaded; out-norms and both heads start fresh'
    else:
        note = 'random weights (neither pretrained nor backbone weights given)'
    _logger.info(f'{name}: {note}')
    return model.train()


def _load_backbone_weights(backbone: nn.Module, source: str) -> None:
    """Classification weights (a timm tag such as 'mambavision_t.nv_in1k', or a local file) into a dense backbone."""
    from ..weights import download_weights, load_pretrained_file
    if not os.path.isfile(source):
        import timm
        if '.' not in source or timm.models.get_pretrained_cfg(source) is None:
            raise ValueError(f'backbone weights {source!r}: no such file, nor a published tag such as '
                             f'mambavision_t.nv_in1k')
        source = download_weights(*published_file(source))
    load_pretrained_file(backbone, source, headless=True)  # the classifier has no place in a dense backbone
