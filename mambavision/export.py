"""ONNX export of MambaVision models, checked in ONNX Runtime; the ``mambavision export`` command.

The graph comes from PyTorch's TorchScript-based exporter (``torch.onnx.export(...,
dynamo=False)``). The selective scan, a custom op elsewhere, is exported as
``selective_scan_graph``: its recurrence unrolled into standard ops (a multiply and an add
per token), since a window's token count is fixed per stage. Batch, height and width stay dynamic: the window
padding and partitioning are traced as shape arithmetic, so one file serves any input
size (odd and non-square included).

    mambavision export --model mambavision_t --checkpoint mambavision_tiny_1k.pth.tar --output t.onnx
"""
import argparse
import os
import tempfile
import time
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

__all__ = ['export_onnx', 'onnx_session', 'max_onnx_difference', 'add_arguments_export', 'run_export']

DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = 'input', 'output'


def export_onnx(
        model: nn.Module,
        path: Union[str, os.PathLike],
        img_size: Union[int, Sequence[int]] = 224,
        opset: int = DEFAULT_OPSET,
        dynamic: bool = True,
        batch_size: int = 1,
) -> str:
    """Write ``model`` (put in eval mode) to ``path`` as ONNX: 'input' (B, C, H, W) -> 'output'.

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


# ---------------------------------------------------------------------------------------------
# mambavision export


def add_arguments_export(parser: argparse.ArgumentParser):
    from .cli import DEFAULT_MODEL

    parser.add_argument('--model', default=DEFAULT_MODEL, help=f'model name, optionally with a weight tag (default {DEFAULT_MODEL})')
    parser.add_argument('--checkpoint', metavar='PATH', help='local weight file (.pth.tar as published, .pth, .safetensors) instead of the hub')
    parser.add_argument('--random-weights', action='store_true', help='export randomly initialised weights (no download)')
    parser.add_argument('--format', default='onnx', choices=['onnx'], help='output format (default onnx)')
    parser.add_argument('--output', required=True, metavar='FILE', help='file to write')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET, metavar='N', help=f'ONNX opset, 17 or newer (default {DEFAULT_OPSET})')
    parser.add_argument('--no-dynamic', dest='dynamic', action='store_false',
                        help='fix batch 1 and the image size in the graph (default: batch, height, width dynamic)')
    parser.add_argument('--img-size', type=int, metavar='S', help="image size S x S used for tracing and the check (default: the model's)")


def run_export(args) -> int:
    from timm.data import resolve_model_data_config
    from .cli import CliError, check_model_name, create_model_with_weights

    check_model_name(args.model)
    if args.opset < 17:
        raise CliError(f'--opset {args.opset}: the graph needs opset 17 or newer (LayerNormalization)')
    if args.img_size is not None and args.img_size < 1:
        raise CliError(f'--img-size must be a positive integer, got {args.img_size}')
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise CliError(f'output directory does not exist: {out_dir}')
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise CliError("ONNX export needs onnx and onnxruntime: pip install 'mambavision[onnx]'") from None
    model = create_model_with_weights(
        'export', args.model, args.checkpoint, require_weights=True, random_weights=args.random_weights,
        hint='--checkpoint PATH exports a local file, --random-weights random weights').eval()
    img_size = args.img_size or resolve_model_data_config(model)['input_size'][-1]
    start = time.time()
    export_onnx(model, args.output, img_size, opset=args.opset, dynamic=args.dynamic)
    batch = 2 if args.dynamic else 1
    x = torch.randn(batch, model.in_chans, img_size, img_size)
    diff = max_onnx_difference(onnx_session(args.output), model, x)
    written = [p for p in (args.output, args.output + '.data') if os.path.exists(p) and os.path.getmtime(p) >= start - 1]
    size_mb = sum(os.path.getsize(p) for p in written) / 2 ** 20
    print(f"wrote {' + '.join(written)} ({size_mb:.1f} MiB, opset {args.opset}, "
          f"{'dynamic batch/height/width' if args.dynamic else f'fixed 1x{model.in_chans}x{img_size}x{img_size}'})")
    print(f'onnxruntime vs PyTorch at {batch}x{model.in_chans}x{img_size}x{img_size}: max abs difference {diff:.3g}')
    return 0
