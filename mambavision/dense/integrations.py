"""MambaVision inside the detection and segmentation libraries people already use.

torchvision detection: ``mambavision_fpn_backbone`` builds a MambaVision + FPN backbone
for torchvision's FasterRCNN, MaskRCNN, KeypointRCNN, RetinaNet and FCOS::

    import mambavision
    from mambavision.dense.integrations import mambavision_fpn_backbone
    from torchvision.models.detection import MaskRCNN

    backbone = mambavision_fpn_backbone('mambavision_t.nv_in1k', pretrained=True)
    model = MaskRCNN(backbone, num_classes=91)

segmentation_models_pytorch: nothing to build here. ``import mambavision`` registers the
models with timm, and smp's ``tu-`` encoders reach them through timm's ``features_only``
(strides 4, 8, 16, 32, which smp treats as a transformer-style encoder). Unet, UnetPlusPlus,
MAnet, Linknet, FPN, PSPNet, UPerNet, Segformer and DPT (``decoder_readout='ignore'``) work;
a weights tag in the name and ``encoder_weights=True`` load its weights, and other keyword
arguments go to ``timm.create_model``::

    import mambavision
    import segmentation_models_pytorch as smp

    model = smp.UPerNet('tu-mambavision_t', encoder_weights=None, classes=150)
    model = smp.Unet('tu-mambavision_t.nv_in1k', encoder_weights=True, classes=2)
    model = smp.Unet('tu-mambavision_t', encoder_weights=True, pretrained_cfg_overlay=dict(file='weights.pth.tar'))

MambaVision has no dilated mode, so the smp models that need ``output_stride`` 8 or 16
(DeepLabV3, DeepLabV3+, PAN) fail at construction with one ``ValueError`` line that says so.
"""
from collections import OrderedDict
from typing import Callable, Dict, Optional, Sequence, cast

import timm
import torch
from timm.layers import freeze_batch_norm_2d
from timm.utils import freeze
from torch import nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

__all__ = ['MambaVisionFPN', 'mambavision_fpn_backbone']

_NUM_STAGES = 4


class MambaVisionFPN(nn.Module):
    """A ``features_only`` MambaVision and a torchvision FPN: (B, 3, H, W) -> OrderedDict of FPN maps.

    The maps are named '0', '1', ... (one per returned stage, finest first, each
    (B, out_channels, ~H/s, ~W/s) at that stage's stride s) followed by the extra
    block's ('pool' for ``LastLevelMaxPool``, 'p6' and 'p7' for ``LastLevelP6P7``),
    the names torchvision's detection heads and RoI poolers expect.

    Args:
        body: a timm ``features_only`` MambaVision (list of stage maps, ``feature_info``).
        out_channels: channels of every FPN map (``self.out_channels``, read by torchvision's detectors).
        extra_blocks: maps added after the coarsest one; ``LastLevelMaxPool()`` when None.
        fpn_norm_layer: norm of the FPN's convs (torchvision's ``FeaturePyramidNetwork``), None for none.
    """

    def __init__(
            self,
            body: nn.Module,
            out_channels: int = 256,
            extra_blocks: Optional[ExtraFPNBlock] = None,
            fpn_norm_layer: Optional[Callable[..., nn.Module]] = None,
    ):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.feature_info.channels(), out_channels,
            extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks,
            norm_layer=fpn_norm_layer)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), feature) for i, feature in enumerate(features)))


def mambavision_fpn_backbone(
        name: str = 'mambavision_t',
        pretrained: bool = False,
        checkpoint_path: Optional[str] = None,
        out_channels: int = 256,
        returned_layers: Sequence[int] = (0, 1, 2, 3),
        extra_blocks: Optional[ExtraFPNBlock] = None,
        trainable_stages: int = 5,
        freeze_batch_norm: bool = False,
        fpn_norm_layer: Optional[Callable[..., nn.Module]] = None,
        **kwargs,
) -> MambaVisionFPN:
    """A MambaVision + FPN backbone for torchvision's detection models.

    Strides of stages 0..3 are 4, 8, 16, 32 and their widths ``dim * 2**i``
    (``model.body.feature_info``). For FasterRCNN, MaskRCNN and KeypointRCNN keep the
    defaults (4 maps + 'pool' = the 5 levels of their default anchors); for RetinaNet
    and FCOS do as torchvision's ``retinanet_resnet50_fpn`` and ``fcos_resnet50_fpn`` do::

        from torchvision.ops.feature_pyramid_network import LastLevelP6P7
        backbone = mambavision_fpn_backbone(
            'mambavision_t', returned_layers=(1, 2, 3), extra_blocks=LastLevelP6P7(256, 256))
        model = RetinaNet(backbone, num_classes=91)

    Args:
        name: a timm model name with an optional weights tag ('mambavision_s', 'mambavision_t.nv_in1k',
            or a dense backbone tag).
        pretrained: load the tag's weights (downloaded, or from timm's cache).
        checkpoint_path: load this local weight file instead: a classification file (published or ours), or
            the ``backbone.*`` tensors of a published detection/segmentation file (then pass ``out_norm=True``).
        out_channels: channels of every FPN map.
        returned_layers: stage indices (0..3) that feed the FPN.
        extra_blocks: torchvision FPN extra block; ``LastLevelMaxPool()`` when None.
        trainable_stages: how many parts stay trainable, counted from the top: stages 3, 2, 1, 0, then the
            stem (5: everything, 0: nothing). Frozen parts also get frozen BatchNorm statistics.
        freeze_batch_norm: turn every BatchNorm of the backbone into a ``FrozenBatchNorm2d`` (fixed statistics
            and affine, as torchvision does for small detection batches).
        fpn_norm_layer: norm of the FPN convs, None for none.
        **kwargs: passed to ``timm.create_model``, e.g. ``out_norm=True``, ``window_size=(8, 8, 112, 56)``,
            ``drop_path_rate``.
    """
    if not 0 <= trainable_stages <= _NUM_STAGES + 1:
        raise ValueError(f'trainable_stages must be in 0..{_NUM_STAGES + 1}, got {trainable_stages}')
    returned_layers = tuple(returned_layers)
    if not returned_layers or any(i not in range(_NUM_STAGES) for i in returned_layers) \
            or list(returned_layers) != sorted(set(returned_layers)):
        raise ValueError(f'returned_layers must be increasing stage indices in 0..3, got {returned_layers}')
    if checkpoint_path is not None:
        pretrained = True
        kwargs['pretrained_cfg_overlay'] = {**kwargs.get('pretrained_cfg_overlay', {}), 'file': checkpoint_path}
    kwargs.setdefault('num_classes', 0)  # no classifier: a detection file has none, a classification file's is dropped
    body = timm.create_model(name, pretrained=pretrained, features_only=True, out_indices=returned_layers, **kwargs)
    stages = cast(nn.Sequential, body.model.stages)
    parts = ['model.stem'] + [f'model.stages.{i}' for i in range(len(stages))]  # bottom first
    frozen = parts[:_NUM_STAGES + 1 - trainable_stages]
    if frozen:
        freeze(body, frozen)
    if freeze_batch_norm:
        freeze_batch_norm_2d(body)
    return MambaVisionFPN(body, out_channels, extra_blocks, fpn_norm_layer)
