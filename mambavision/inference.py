"""Inference-only rewrites of a MambaVision model.

``fuse_for_inference`` folds every BatchNorm that follows a conv (stem and conv
blocks) into that conv with PyTorch's ``fuse_conv_bn_eval``: the same function in
eval mode, with fewer passes over the stride-4 and stride-8 maps.

``cast_for_autocast`` stores conv and linear weights in autocast's dtype, so that
autocast stops re-casting all of them on every call (the same numbers: autocast
rounds them the same way). The model then has to run under ``torch.autocast``.
"""
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .model import ConvBlock, MambaVision, MambaVisionMixer, Stem

__all__ = ['fuse_for_inference', 'cast_for_autocast']

_CONV_BN_PAIRS = {Stem: (('conv1', 'norm1'), ('conv2', 'norm2')), ConvBlock: (('conv1', 'norm1'), ('conv2', 'norm2'))}


@torch.no_grad()
def fuse_for_inference(model: MambaVision) -> MambaVision:
    """Fold conv -> BatchNorm pairs into single convs, in place; returns ``model`` (eval mode, frozen BN stats).

    The final BatchNorm before the head has no conv in front of it and stays, so
    ``forward_features`` and ``forward_intermediates`` keep their meaning.
    """
    if model.training:
        raise ValueError('fuse_for_inference needs a model in eval mode (call model.eval() first)')
    for module in model.modules():
        for conv_name, bn_name in _CONV_BN_PAIRS.get(type(module), ()):
            bn = getattr(module, bn_name)
            if isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(getattr(module, conv_name), bn))
                setattr(module, bn_name, nn.Identity())
    return model


@torch.no_grad()
def cast_for_autocast(model: MambaVision, dtype: torch.dtype = torch.bfloat16) -> MambaVision:
    """Store conv/linear weights in ``dtype``, in place; returns ``model``, to be run under ``torch.autocast``.

    The mixers' ``dt_proj`` stays float32: its bias is also the scan's float32 delta bias.
    """
    keep = {m.dt_proj for m in model.modules() if isinstance(m, MambaVisionMixer)}
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and m not in keep:
            m.to(dtype)
    return model
