"""Layers the dense heads share."""
import torch
from torch import nn

__all__ = ['ConvModule']


class ConvModule(nn.Module):
    """mmcv's ConvModule as the published heads use it: conv (bias unless normed) -> [BatchNorm] -> [ReLU].

    (B, in_channels, H, W) -> (B, out_channels, H, W); submodules ``conv``, ``bn``, ``act`` as mmcv names them.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: bool = False, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not norm)
        self.bn = nn.BatchNorm2d(out_channels) if norm else nn.Identity()
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))
