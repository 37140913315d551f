"""MambaVision: a hierarchical hybrid Mamba-Transformer vision backbone, for timm.

Paper: `MambaVision: A Hybrid Mamba-Transformer Vision Backbone`, Hatamizadeh & Kautz,
CVPR 2025, https://arxiv.org/abs/2407.08083

Layout: a two-conv stem (stride 4), two stages of residual conv blocks, then two
stages of windowed hybrid blocks (MambaVision mixers first, self-attention last),
a BatchNorm over the final map and a pooled linear classifier. Stages 2-4 start
with a stride-2 conv downsample, so stage ``i`` outputs stride ``4 * 2**i`` maps.
"""
import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ClassifierHead, DropPath, LayerNorm2d, LayerScale, LayerScale2d, Mlp, get_device_dtype, trunc_normal_)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from .ops import mixer_cpu
from .ops.selective_scan import selective_scan
from .published import PUBLISHED_MODELS, PublishedModel
from .weights import checkpoint_filter_fn, load_pretrained_file, rename_published_keys_, resolve_weights_source

__all__ = [
    'MambaVision', 'Stem', 'ConvBlock', 'Downsample', 'MambaVisionMixer', 'Attention', 'HybridBlock',
    'MambaVisionStage', 'window_partition', 'window_reverse', 'create_dense_backbone',
]


class Stem(nn.Module):
    """Two stride-2 3x3 convs with BatchNorm and ReLU: (B, in_chans, H, W) -> (B, dim, H/4, W/4)."""

    def __init__(self, in_chans: int = 3, in_dim: int = 64, dim: int = 96, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, in_dim, 3, stride=2, padding=1, bias=False, **dd)
        self.norm1 = nn.BatchNorm2d(in_dim, eps=1e-4, **dd)
        self.conv2 = nn.Conv2d(in_dim, dim, 3, stride=2, padding=1, bias=False, **dd)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-4, **dd)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(x)))


class Downsample(nn.Module):
    """Stride-2 3x3 conv, no bias, no norm: (B, dim, H, W) -> (B, dim_out, ceil(H/2), ceil(W/2))."""

    def __init__(self, dim: int, dim_out: int, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, stride=2, padding=1, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConvBlock(nn.Module):
    """Residual conv3x3-BN-GELU(tanh)-conv3x3-BN block: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(
            self, dim: int, drop_path: float = 0., layer_scale: Optional[float] = None, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, **dd)
        self.norm1 = nn.BatchNorm2d(dim, eps=1e-5, **dd)
        self.act = nn.GELU(approximate='tanh')
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, **dd)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-5, **dd)
        self.ls = LayerScale2d(dim, layer_scale, **dd) if layer_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))
        return x + self.drop_path(self.ls(y))


def _mixer_scan(
        x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, D: torch.Tensor,
        delta_bias: torch.Tensor,
) -> torch.Tensor:
    """The mixer's ``selective_scan`` (softplus on dt + delta_bias), one opaque call in fx graphs.

    TorchScript runs the scan op directly: the Python wrapper does not compile.
    """
    if torch.jit.is_scripting():
        return torch.ops.mambavision.selective_scan(
            x.float(), dt.float(), A.float(), b.float(), c.float(), D.float(), delta_bias.float(), True, 'auto',
        ).to(x.dtype)
    return selective_scan(x, dt, A, b, c, D, delta_bias=delta_bias, delta_softplus=True)


torch.fx.wrap('_mixer_scan')  # fx tracers (timm's, torchvision's) keep the scan as one call, not traced into


class MambaVisionMixer(nn.Module):
    """MambaVision token mixer: (B, L, C) -> (B, L, C).

    Half of the projected channels go through a non-causal depthwise conv and the
    selective scan (SSM branch), the other half through their own conv only
    (symmetric branch); both are concatenated and projected back.

    Args:
        dim: channels C (even).
        d_state: SSM state size N.
        d_conv: kernel of the depthwise sequence convs (odd, 'same' padding).
        dt_rank: rank of the step-size projection; ``ceil(C / 16)`` by default.
    """

    def __init__(
            self, dim: int, d_state: int = 8, d_conv: int = 3, dt_rank: Optional[int] = None, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if dim % 2:
            raise ValueError(f'MambaVisionMixer needs an even channel count, got dim={dim}')
        inner = dim // 2
        self.d_state = d_state
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, dim, bias=False, **dd)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False, **dd)
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=True, **dd)
        self.A_log = nn.Parameter(torch.empty(inner, d_state, **dd))
        self.D = nn.Parameter(torch.empty(inner, **dd))
        self.out_proj = nn.Linear(dim, dim, bias=False, **dd)
        self.conv1d_x = nn.Conv1d(inner, inner, d_conv, padding=d_conv // 2, groups=inner, bias=False, **dd)
        self.conv1d_z = nn.Conv1d(inner, inner, d_conv, padding=d_conv // 2, groups=inner, bias=False, **dd)
        self.reset_ssm_parameters()

    def reset_ssm_parameters(self):
        """A = -(1..N) for every channel, D = 1 (Mamba's initialisation)."""
        with torch.no_grad():
            n = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
            self.A_log.copy_(torch.log(n).expand_as(self.A_log))
            self.D.fill_(1.)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self._fused_applies(x):
                return self._forward_fused(x)
        x, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (B, C/2, L) each
        x = F.silu(self.conv1d_x(x))
        z = F.silu(self.conv1d_z(z))
        dt, b, c = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # the dt_proj bias enters twice, in the Linear and as the scan's delta bias, as in the published model
        dt = self.dt_proj(dt).transpose(1, 2)
        A = -torch.exp(self.A_log.float())
        b, c = b.transpose(1, 2), c.transpose(1, 2)
        y = _mixer_scan(x, dt, A, b, c, self.D, self.dt_proj.bias)
        return self.out_proj(torch.cat([y, z], dim=1).transpose(1, 2))

    @torch.jit.unused
    def _fused_applies(self, x: torch.Tensor) -> bool:
        """Inference on a CPU where ``mixer_cpu``'s kernel runs (not while fx/jit tracing or exporting)."""
        if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() \
                or torch.compiler.is_exporting():
            return False
        return mixer_cpu.applies(x, self.conv1d_x.kernel_size[0], self.dt_rank, self.d_state, *self.parameters())

    @torch.jit.unused
    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` by ``mixer_cpu``'s kernel, tokens-first throughout (no gradient)."""
        xz = self.in_proj(x)
        conv_weight = torch.cat([self.conv1d_x.weight, self.conv1d_z.weight])
        if torch.is_autocast_enabled('cpu'):  # the conv weights autocast would use
            conv_weight = conv_weight.to(torch.get_autocast_dtype('cpu'))
        A = -torch.exp(self.A_log.float())
        y = mixer_cpu.mixer_core(xz, conv_weight, self.x_proj.weight, self.dt_proj.weight, self.dt_proj.bias, A,
                                 self.D)
        return self.out_proj(y.to(xz.dtype))


class Attention(nn.Module):
    """Multi-head self-attention without masking: (B, L, C) -> (B, L, C)."""

    def __init__(
            self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0., device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim={dim} is not divisible by num_heads={num_heads}')
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        return self.proj(x.transpose(1, 2).reshape(B, L, C))


class HybridBlock(nn.Module):
    """Pre-norm residual block, token mixer (MambaVision mixer or attention) then MLP: (B, L, C) -> (B, L, C)."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            use_attention: bool,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            layer_scale: Optional[float] = None,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.mixer: nn.Module
        if use_attention:
            self.mixer = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, **dd)
        else:
            self.mixer = MambaVisionMixer(dim, **dd)
        self.ls1 = LayerScale(dim, layer_scale, **dd) if layer_scale is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, layer_scale, **dd) if layer_scale is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.mixer(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of w -> (B * H/w * W/w, w*w, C), windows and tokens in raster order."""
    B, H, W, C = x.shape
    w = window_size
    x = x.reshape(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, C).contiguous()  # a view when there is one window: the blocks want tokens-first


def window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """Inverse of ``window_partition``: (B * H/w * W/w, w*w, C) -> (B, H, W, C)."""
    w = window_size
    C = windows.shape[-1]
    x = windows.reshape(-1, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


class MambaVisionStage(nn.Module):
    """Optional downsample, then conv blocks or windowed hybrid blocks: (B, C_in, H, W) -> (B, C, H', W').

    Windowed stages zero-pad the map on the right and bottom to multiples of the
    window once, run every block on (B * windows, w*w, C) and crop afterwards. In a
    stage of depth d the last floor(d/2) blocks use attention, the others the mixer.
    """

    def __init__(
            self,
            dim: int,
            dim_out: int,
            depth: int,
            downsample: bool,
            windowed: bool,
            num_heads: int = 1,
            window_size: int = 7,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: Union[float, Sequence[float]] = 0.,
            layer_scale: Optional[float] = None,
            layer_scale_conv: Optional[float] = None,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if not downsample and dim != dim_out:
            raise ValueError(f'a stage without downsample keeps its width, got {dim} -> {dim_out}')
        drop_path = drop_path if isinstance(drop_path, (list, tuple)) else [cast(float, drop_path)] * depth
        self.downsample = Downsample(dim, dim_out, **dd) if downsample else nn.Identity()
        self.window_size = window_size if windowed else None
        self.grad_checkpointing = False
        blocks: List[nn.Module]
        if windowed:
            first_attention = (depth + 1) // 2
            blocks = [
                HybridBlock(
                    dim_out, num_heads, use_attention=i >= first_attention, mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop, drop_path=drop_path[i],
                    layer_scale=layer_scale, **dd)
                for i in range(depth)]
        else:
            blocks = [
                ConvBlock(dim_out, drop_path=drop_path[i], layer_scale=layer_scale_conv, **dd) for i in range(depth)]
        self.blocks = nn.Sequential(*blocks)

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.window_size is None:
            return self._run_blocks(x)
        w = self.window_size
        _, _, H, W = x.shape
        pad_b, pad_r = (w - H % w) % w, (w - W % w) % w
        x = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, pad_r, 0, pad_b))  # (B, Hp, Wp, C)
        Hp, Wp = H + pad_b, W + pad_r
        x = window_reverse(self._run_blocks(window_partition(x, w)), w, Hp, Wp)
        return x[:, :H, :W].permute(0, 3, 1, 2).contiguous()  # as the next conv and a caller expect: (B, C, H, W)


def _accept_published_names(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: a state dict in the published names is renamed to ours first."""
    rename_published_keys_(state_dict, prefix)


class MambaVision(nn.Module):
    """MambaVision classifier and backbone: (B, in_chans, H, W) -> (B, num_classes).

    Any H, W works; stage ``i`` gives (B, dim * 2**i, ~H / 2**(i+2), ~W / 2**(i+2)).

    Args:
        dim: width of stage 1 (stages double it).
        in_dim: width of the stem's first conv.
        depths: blocks per stage (4 stages).
        num_heads: attention heads per stage (used in stages 3-4).
        window_size: window per stage (used in stages 3-4).
        mlp_ratio: MLP expansion in the hybrid blocks.
        layer_scale: initial per-channel scale of the hybrid blocks' branches, None for none.
        layer_scale_conv: the same for the conv blocks.
        drop_path_rate: stochastic depth, rising linearly over all blocks from 0.
        drop_rate: dropout before the classifier.
        device, dtype: where, and in which dtype, parameters and buffers are created (timm's factory arguments).
        out_norm: the published detection/segmentation backbone: each stage output taken by
            ``forward_intermediates`` passes through its own LayerNorm2d (``out_norms``), and there
            is no final BatchNorm.
    """

    def __init__(
            self,
            dim: int = 80,
            in_dim: int = 32,
            depths: Sequence[int] = (1, 3, 8, 4),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            window_size: Sequence[int] = (8, 8, 14, 7),
            mlp_ratio: float = 4.,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            layer_scale: Optional[float] = None,
            layer_scale_conv: Optional[float] = None,
            out_norm: bool = False,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if not len(depths) == len(num_heads) == len(window_size) == 4:
            raise ValueError('depths, num_heads and window_size need one entry per stage (4)')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.stem = Stem(in_chans, in_dim, dim, **dd)
        # on the cpu: also under torch.device('meta')
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        dims = [dim * 2 ** i for i in range(4)]
        self.stages = nn.Sequential()
        self.feature_info = []
        for i in range(4):
            self.stages.append(MambaVisionStage(
                dims[max(i - 1, 0)], dims[i], depths[i], downsample=i > 0, windowed=i > 1,
                num_heads=num_heads[i], window_size=window_size[i], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                layer_scale=layer_scale, layer_scale_conv=layer_scale_conv, **dd))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.num_features = self.head_hidden_size = dims[-1]
        self.out_norms = nn.ModuleList([LayerNorm2d(d, eps=1e-5, **dd) for d in dims]) if out_norm else None
        self.norm = nn.Identity() if out_norm else nn.BatchNorm2d(self.num_features, **dd)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.apply(self._init_weights)
        self.register_load_state_dict_pre_hook(_accept_published_names)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):  # LayerNorm2d is a LayerNorm
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {n for n, _ in self.named_parameters() if n.endswith(('.A_log', '.D'))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute the windowed stages' blocks in backward; not the conv stages, whose BatchNorm
        running statistics would be updated a second time by the recomputation."""
        for stage in self.stages:  # typed as Module, whose attributes torch types Tensor | Module: hence the ignore
            stage.grad_checkpointing = enable and stage.window_size is not None  # type: ignore[assignment]

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, **get_device_dtype(self))

    def load_pretrained(self, checkpoint_path: str):
        """Load a published or local weight file into this model (timm's ``custom_load`` hook).

        Weights whose config has no classifier (the dense backbones) leave this model's head freshly
        initialised, whatever its class count, as timm does for another class count.
        """
        headless = getattr(self, 'pretrained_cfg', {}).get('num_classes') == 0
        load_pretrained_file(self, checkpoint_path, headless=headless)

    def _check_input(self, x: torch.Tensor):
        """A one-line ``ValueError`` for input that is not a (B, in_chans, H, W) float tensor, in eager mode only:
        fx, TorchScript, ONNX tracing and torch.compile / torch.export see no check (callers skip it when scripting)."""
        if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point() or x.shape[1] != self.in_chans:
            got = (f'{tuple(x.shape)} {x.dtype}' if isinstance(x, torch.Tensor) else type(x).__name__)
            raise ValueError(
                f'MambaVision expects a float tensor of shape (B, {self.in_chans}, H, W), got {got}')

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (strides 4, 8, 16, 32) and, unless ``intermediates_only``, the final map.

        Args:
            x: (B, in_chans, H, W) images.
            indices: last n stages if int, all if None, else these stage indices.
            norm: apply the final norm to the last stage's output when it is taken (the out-norms,
                when the model has them, always apply).
            stop_early: stop after the last stage that is taken.
            output_fmt: 'NCHW' or 'NHWC'.
            intermediates_only: return only the list of stage outputs.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        if not torch.jit.is_scripting():
            self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_index = len(self.stages) - 1
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self.norm(x) if norm and i == last_index else x
                y = self.out_norms[i](y) if self.out_norms is not None else y
                intermediates.append(y.permute(0, 2, 3, 1) if output_fmt == 'NHWC' else y)
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.stages):
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        """Drop the stages after the last one in ``indices`` (and the norm/head as asked)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if self.out_norms is not None:
            self.out_norms = self.out_norms[:max_index + 1]
        if prune_norm or max_index < 3:
            self.norm = nn.Identity()
        if prune_head or max_index < 3:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_features, ~H/32, ~W/32), after the final norm."""
        if not torch.jit.is_scripting():
            self._check_input(x)
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_mambavision(variant: str, pretrained: bool = False, **kwargs) -> MambaVision:
    output_stride = kwargs.pop('output_stride', None)
    if output_stride not in (None, 32):
        raise ValueError(
            f'MambaVision has no dilated stages: output_stride={output_stride} is not supported, only 32')
    cfg = resolve_pretrained_cfg(
        variant, kwargs.pop('pretrained_cfg', None), kwargs.pop('pretrained_cfg_overlay', None))
    kwargs = {**_arch_args(variant), **_DENSE_ARGS.get(f'{variant}.{cfg.tag}', {}), **kwargs}
    if kwargs.get('features_only'):
        kwargs.setdefault('num_classes', 0)  # the head is pruned anyway; a head-less file then fits
    kwargs['pretrained_cfg'] = resolve_weights_source(cfg, kwargs.get('cache_dir')) if pretrained else cfg
    return build_model_with_cfg(
        MambaVision, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),
        **kwargs,
    )


def create_dense_backbone(name: str, window_size: Optional[Sequence[int]] = None, **kwargs) -> MambaVision:
    """The published detection/segmentation backbone: out-norms, no head.

    ``name`` is a dense backbone tag ('mambavision_t.nv_coco': the architecture and the task's
    windows) or an architecture; ``window_size`` replaces the windows, ``kwargs`` the architecture's
    other arguments (e.g. ``dim``, ``depths`` for a small test model).
    ``backbone.forward_intermediates(x, intermediates_only=True)`` gives its four outputs.
    """
    import timm
    windows: Dict[str, Any] = {} if window_size is None else dict(window_size=tuple(window_size))
    return cast(MambaVision, timm.create_model(name, num_classes=0, out_norm=True, **windows, **kwargs))


def _cfg(hf_hub_id: str = '', hf_hub_filename: str = '', **kwargs):
    return {
        'hf_hub_id': hf_hub_id, 'hf_hub_filename': hf_hub_filename, 'custom_load': 'hf' if hf_hub_id else False,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 1.0, 'crop_mode': 'center', 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1', 'classifier': 'head.fc',
        'license': 'cc-by-nc-sa-4.0',  # the published weights' licence (the published code's is NVIDIA's own)
        'paper_ids': 'arXiv:2407.08083', 'origin_url': 'https://github.com/NVlabs/MambaVision',
        **kwargs,
    }


# model arguments a dense tag implies: the task's windows, out-norms, no classifier
_DENSE_ARGS = {m.backbone_tag: dict(window_size=m.window_size, out_norm=True, num_classes=0)
               for m in PUBLISHED_MODELS.values()}


def _dense_cfg(published: PublishedModel) -> dict:
    """A dense backbone's weights: the ``backbone.*`` tensors of a published detection/segmentation file."""
    return _cfg(
        published.hf_repo, published.hf_file, num_classes=0, input_size=(3, *published.input_size), pool_size=None,
        classifier=None, license=published.license)


default_cfgs = generate_default_cfgs({
    'mambavision_t.nv_in1k': _cfg('nvidia/MambaVision-T-1K', 'mambavision_tiny_1k.pth.tar'),
    'mambavision_t2.nv_in1k': _cfg('nvidia/MambaVision-T2-1K', 'mambavision_tiny2_1k.pth.tar', crop_pct=0.98),
    'mambavision_s.nv_in1k': _cfg('nvidia/MambaVision-S-1K', 'mambavision_small_1k.pth.tar', crop_pct=0.93),
    'mambavision_b.nv_in1k': _cfg('nvidia/MambaVision-B-1K', 'mambavision_base_1k.pth.tar'),
    'mambavision_b.nv_in21k_ft_in1k': _cfg('nvidia/MambaVision-B-21K', 'mambavision_base_21k.pth.tar'),
    'mambavision_l.nv_in1k': _cfg('nvidia/MambaVision-L-1K', 'mambavision_large_1k.pth.tar'),
    'mambavision_l.nv_in21k_ft_in1k': _cfg('nvidia/MambaVision-L-21K', 'mambavision_large_21k.pth.tar'),
    'mambavision_l2.nv_in1k': _cfg('nvidia/MambaVision-L2-1K', 'mambavision_large2_1k.pth.tar'),
    'mambavision_l2_512.nv_in21k_ft_in1k': _cfg(
        'nvidia/MambaVision-L2-512-21K', 'mambavision_L2_21k_240m_512.pth.tar',
        input_size=(3, 512, 512), pool_size=(16, 16), crop_pct=0.93, crop_mode='squash'),
    'mambavision_l3_256.nv_in21k_ft_in1k': _cfg(
        'nvidia/MambaVision-L3-256-21K', 'mambavision_L3_21k_740m_256.pth.tar',
        input_size=(3, 256, 256), pool_size=(8, 8)),
    'mambavision_l3_512.nv_in21k_ft_in1k': _cfg(
        'nvidia/MambaVision-L3-512-21K', 'mambavision_L3_21k_740m_512.pth.tar',
        input_size=(3, 512, 512), pool_size=(16, 16), crop_pct=0.93, crop_mode='squash'),
    'test_mambavision': _cfg(input_size=(3, 64, 64), pool_size=(2, 2), license='apache-2.0'),
    **{m.backbone_tag: _dense_cfg(m) for m in PUBLISHED_MODELS.values()},
})

class _Arch(NamedTuple):
    """The constructor arguments of a published architecture."""
    depths: Tuple[int, ...]
    num_heads: Tuple[int, ...]
    window_size: Tuple[int, ...]
    dim: int
    in_dim: int
    drop_path_rate: float
    layer_scale: Optional[float]


_SMALL_HEADS, _L_HEADS = (2, 4, 8, 16), (4, 8, 16, 32)
_WINDOWS_224 = (8, 8, 14, 7)
ARCHS = {
    'mambavision_t': _Arch((1, 3, 8, 4), _SMALL_HEADS, _WINDOWS_224, 80, 32, 0.2, None),
    'mambavision_t2': _Arch((1, 3, 11, 4), _SMALL_HEADS, _WINDOWS_224, 80, 32, 0.2, None),
    'mambavision_s': _Arch((3, 3, 7, 5), _SMALL_HEADS, _WINDOWS_224, 96, 64, 0.2, None),
    'mambavision_b': _Arch((3, 3, 10, 5), _SMALL_HEADS, _WINDOWS_224, 128, 64, 0.3, 1e-5),
    'mambavision_l': _Arch((3, 3, 10, 5), _L_HEADS, _WINDOWS_224, 196, 64, 0.3, 1e-5),
    'mambavision_l2': _Arch((3, 3, 12, 5), _L_HEADS, _WINDOWS_224, 196, 64, 0.3, 1e-5),
    'mambavision_l2_512': _Arch((3, 3, 12, 5), _L_HEADS, (8, 8, 32, 16), 196, 64, 0.3, 1e-5),
    'mambavision_l3_256': _Arch((3, 3, 20, 10), _L_HEADS, (8, 8, 16, 8), 256, 64, 0.5, 1e-5),
    'mambavision_l3_512': _Arch((3, 3, 20, 10), _L_HEADS, (8, 8, 32, 16), 256, 64, 0.5, 1e-5),
    'test_mambavision': _Arch((1, 1, 2, 2), (1, 1, 2, 2), (8, 8, 4, 2), 16, 8, 0.0, None),
}


def _arch_args(name: str) -> dict:
    return ARCHS[name]._asdict()


@register_model
def mambavision_t(pretrained: bool = False, **kwargs) -> MambaVision:
    return _create_mambavision('mambavision_t', pretrained, **kwargs)


@register_model
def mambavision_t2(pretrained: bool = False, **kwargs) -> MambaVision:
    return _create_mambavision('mambavision_t2', pretrained, **kwargs)


@register_model
def mambavision_s(pretrained: bool = False, **kwargs) -> MambaVision:
    return _create_mambavision('mambavision_s', pretrained, **kwargs)


@register_model
def mambavision_b(pretrained: bool = False, **kwargs) -> MambaVision:
    return _create_mambavision('mambavision_b', pretrained, **kwargs)


@register_model
def mambavision_l(pretrained: bool = False, **kwargs) -> MambaVision:
    return _create_mambavision('mambavision_l', pretrained, **kwargs)


@register_model
def mambavision_l2(pretrained: bool = False, **kwargs) -> MambaVision:
    return _create_mambavision('mambavision_l2', pretrained, **kwargs)


@register_model
def mambavision_l2_512(pretrained: bool = False, **kwargs) -> MambaVision:
    return _create_mambavision('mambavision_l2_512', pretrained, **kwargs)


@register_model
def mambavision_l3_256(pretrained: bool = False, **kwargs) -> MambaVision:
    return _create_mambavision('mambavision_l3_256', pretrained, **kwargs)


@register_model
def mambavision_l3_512(pretrained: bool = False, **kwargs) -> MambaVision:
    return _create_mambavision('mambavision_l3_512', pretrained, **kwargs)


@register_model
def test_mambavision(pretrained: bool = False, **kwargs) -> MambaVision:
    return _create_mambavision('test_mambavision', pretrained, **kwargs)
