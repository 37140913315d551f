"""ONNX export of MambaVision models, checked in ONNX Runtime (``mambavision export`` on the command line).

The graph comes from PyTorch's TorchScript-based exporter (``torch.onnx.export(...,
dynamo=False)``). The selective scan, a custom op elsewhere, is exported as
``selective_scan_graph``: its recurrence unrolled into standard ops (a multiply and an add
per token), since a window's token count is fixed per stage. Batch, height and width stay dynamic: the window
padding and partitioning are traced as shape arithmetic, so one file serves any input
size (odd and non-square included).

    mambavision export --model mambavision_t --checkpoint mambavision_tiny_1k.pth.tar --output t.onnx
"""
import os
import tempfile
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

__all__ = ['export_onnx', 'onnx_session', 'max_onnx_difference']

DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = 'images', 'logits'  # the graph's tensor names, the command line's and the README's too


def export_onnx(
        model: nn.Module,
        path: Union[str, os.PathLike],
        img_size: Union[int, Sequence[int]] = 224,
        opset: int = DEFAULT_OPSET,
        dynamic: bool = True,
        batch_size: int = 1,
) -> str:
    """Write ``model`` (put in eval mode) to ``path`` as ONNX: 'images' (B, C, H, W) -> 'logits'.

    With ``dynamic``, batch, height and width are free in the graph; otherwise they are
    fixed to ``batch_size`` x ``img_size``. Models over 2 GB (L3) keep their weights in
    ``path + '.data'`` beside the graph, as ONNX requires. Returns ``path`` as a string.
    """
    path = os.path.abspath(os.fspath(path))
    if opset < 17:
        raise ValueError(f'opset {opset} is too old: LayerNormalization needs opset 17 or newer')
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    model.eval()
    x = torch.randn(batch_size, getattr(model, 'in_chans', 3), h, w)
    dynamic_axes = {INPUT_NAME: {0: 'batch', 2: 'height', 3: 'width'}, OUTPUT_NAME: {0: 'batch'}} if dynamic else None
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns wherever a shape becomes a Python value. Those values are the
        # channel count and a window's token count (fixed by the architecture); the spatial
        # sizes are traced symbolically (checked at other sizes by the tests).
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        warnings.filterwarnings('ignore', message='.*legacy TorchScript-based ONNX export', category=DeprecationWarning)
        warnings.filterwarnings('ignore', category=DeprecationWarning, module=r'torch\.onnx')
        with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
            traced = os.path.join(tmp, 'model.onnx')
            torch.onnx.export(
                model, (x,), traced, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes, do_constant_folding=True)
            if len(os.listdir(tmp)) == 1:
                os.replace(traced, path)
            else:  # over protobuf's 2 GB the exporter writes one file per tensor: gather them in one
                import onnx

                data = path + '.data'
                if os.path.exists(data):
                    os.remove(data)  # onnx appends to an existing data file
                onnx.save_model(onnx.load(traced), path, save_as_external_data=True, all_tensors_to_one_file=True,
                                location=os.path.basename(data))
    return path


def onnx_session(path: Union[str, os.PathLike], threads: Optional[int] = None):
    """An ONNX Runtime CPU session on ``path`` with all graph optimisations, ``threads`` (default: torch's) threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])


def max_onnx_difference(session, model: nn.Module, x: torch.Tensor) -> float:
    """max |onnx(x) - model(x)| over all outputs, for one (B, C, H, W) float32 batch ``x``."""
    with torch.no_grad():
        expected = model.eval()(x)
    got = torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])
    if got.shape != expected.shape:
        raise RuntimeError(f'ONNX output has shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}')
    return (got - expected).abs().max().item()
