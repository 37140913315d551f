"""Inference-only rewrites of a MambaVision model.

``fuse_for_inference`` folds every BatchNorm that follows a conv (stem and conv
blocks) into that conv with PyTorch's ``fuse_conv_bn_eval``: the same function in
eval mode, with fewer passes over the stride-4 and stride-8 maps.

``cast_for_autocast`` stores conv and linear weights in autocast's dtype, so that
autocast stops re-casting all of them on every call (the same numbers: autocast
rounds them the same way). The model then has to run under ``torch.autocast``.

``optimize_for_inference`` does both, switches to channels_last and, optionally,
compiles with inductor's freezing (weights become constants: oneDNN gets prepacked
weights and fuses bias, GELU and BatchNorm into its matmuls and convs). On a CPU it also
asks inductor for its C++ wrapper and, in bf16 on a CPU with AMX, for its own GEMM
templates (``cpu_compile_options``). It returns a module that takes ordinary float32
images, which is the fastest CPU path measured in ``benchmarks/cpu.py`` and
``benchmarks/cpu_peers.py``.
"""
import types
import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .model import ConvBlock, MambaVision, MambaVisionMixer, Stem
from .runtime import one_line

__all__ = ['fuse_for_inference', 'cast_for_autocast', 'optimize_for_inference', 'InferenceModel', 'cpu_compile_options']

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


def cpu_compile_options(dtype: Optional[torch.dtype], gemm_templates: bool = True) -> dict:
    """Inductor options for compiling a CPU model that runs under autocast to ``dtype`` (None: float32).

    The C++ wrapper calls the kernels without Python between them (``mambavision_t``, batch 1, 2 threads:
    1.14-1.19x in bf16, 1.04x in float32). In bf16 on a CPU with AMX, the linears become inductor's AMX GEMM
    templates (``max_autotune`` over the 'CPP' backend only), which split every matmul over all threads,
    where oneDNN runs some 196-token matmuls of stage 3 on one core at batch 1 (1.09x more with 2 copies per
    variant; level at batch 4, 5-7% slower from batch 8: for throughput, pass ``options={'cpp_wrapper': True}``).
    In float32 those templates are slower than oneDNN's (0.68x), so they are not asked for;
    ``gemm_templates=False`` leaves them out too (for graphs with a matmul they cannot compile).
    """
    options: dict = {'cpp_wrapper': True}
    if gemm_templates and dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported():
        options.update(max_autotune=True, max_autotune_gemm_backends='CPP')
    return options


class InferenceModel(nn.Module):
    """Runs a prepared model without autograd, on channels_last input, under autocast to ``dtype`` (None: off).

    (B, C, H, W) float32 images -> what ``model`` returns, in ``dtype`` (float32 when ``dtype`` is None).
    With ``compile``, inductor compiles it with freezing on the first call and again, for that shape only
    (``dynamic=False``), on each new input shape, with ``cpu_compile_options`` for a model on a CPU (where
    inductor's GEMM templates cannot compile a graph, it warns once and compiles without them);
    ``compile_options`` go to ``torch.compile`` and win (one with ``mode``, ``options`` or another ``backend``
    replaces the CPU options).
    """

    def __init__(self, model: nn.Module, dtype: Optional[torch.dtype] = None, compile: bool = False,
                 compile_options: Optional[dict] = None):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.compiled = compile
        self.compile_options = compile_options or {}
        self._gemm_templates = True
        self._run = torch.compile(self._own_forward(), **self._compile_options()) if compile \
            else self._autocast_forward

    def _own_forward(self):
        """``_autocast_forward`` bound to this model with a code object of its own: dynamo keeps its compiled
        graphs per code object, so each InferenceModel gets its own cache and its own ``recompile_limit``
        rather than sharing them with every other InferenceModel in the process."""
        fn = InferenceModel._autocast_forward
        return types.MethodType(types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__), self)

    def _cpu_options(self) -> Optional[dict]:
        """``cpu_compile_options`` where ours apply (a model on a CPU, inductor, no ``mode`` or ``options`` of the
        caller's), else None."""
        on_cpu = next(self.model.parameters(), torch.empty(0)).device.type == 'cpu'
        if on_cpu and not {'mode', 'options'} & set(self.compile_options) \
                and self.compile_options.get('backend', 'inductor') == 'inductor':
            return cpu_compile_options(self.dtype, self._gemm_templates)
        return None

    def _compile_options(self) -> dict:
        """``torch.compile``'s arguments: ours, then the caller's."""
        options = self._cpu_options()
        return {'dynamic': False, **({} if options is None else {'options': options}), **self.compile_options}

    def _autocast_forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.model(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            if not self.compiled:
                return self._run(x)
            # dynamo reads inductor's global freezing flag when it traces, and freezes only graphs traced with
            # autograd off; torch.compile(options=dict(freezing=True)) would come too late to take effect
            import torch._inductor.config as inductor_config
            from torch._inductor.exc import InductorError
            with inductor_config.patch(freezing=True):
                try:
                    return self._run(x)
                except InductorError as e:
                    if 'max_autotune_gemm_backends' not in (self._cpu_options() or {}):
                        raise
                    warnings.warn(f'inductor cannot compile this graph with its GEMM templates ({one_line(e)}); '
                                  'compiling it with oneDNN\'s matmuls', stacklevel=2)
                    self._gemm_templates = False
                    self._run = torch.compile(self._own_forward(), **self._compile_options())
                    return self._run(x)


def optimize_for_inference(
        model: MambaVision,
        dtype: Optional[torch.dtype] = torch.bfloat16,
        compile: bool = False,
        compile_options: Optional[dict] = None,
) -> InferenceModel:
    """Fold BatchNorm, switch to channels_last, store weights in ``dtype`` and optionally compile, in place.

    Args:
        model: a MambaVision in eval mode; it is modified in place and wrapped.
        dtype: autocast dtype (``torch.bfloat16`` or ``torch.float16``), or None for float32.
        compile: ``torch.compile`` with inductor's freezing (and ``cpu_compile_options`` on a CPU); the first call
            compiles (about 35 s for mambavision_t in bf16 on 2 cores, autotuning its GEMMs), and each new input
            shape compiles a graph of its own (static shapes,
            ``dynamic=False``: as fast as the first, where dynamo's automatic dynamic shapes would spend
            minutes on a slower shape-generic graph). Past ``torch._dynamo.config.recompile_limit`` shapes (8, counted
            per optimized model) its further shapes run eagerly. Later changes to the weights are not seen.
        compile_options: more ``torch.compile`` arguments, which override the defaults: e.g.
            ``dict(dynamic=True)`` for one shape-generic graph when input sizes vary a lot, or
            ``dict(mode='max-autotune')`` (on CUDA it adds CUDA graphs); ``dict(options={})`` compiles without the
            CPU options.

    Returns:
        An ``InferenceModel``: call it on float32 (B, C, H, W) images, no autocast or no_grad needed.
    """
    if dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f'dtype must be torch.bfloat16, torch.float16 or None (float32), got {dtype}')
    fuse_for_inference(model).to(memory_format=torch.channels_last)
    if dtype is not None:
        cast_for_autocast(model, dtype)
    return InferenceModel(model, dtype, compile, compile_options)
