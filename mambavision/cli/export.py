"""``mambavision export``: a model as an ONNX file, checked in onnxruntime against PyTorch."""
import argparse
import os
import time

__all__ = ['add_arguments_export', 'run_export']


def add_arguments_export(parser: argparse.ArgumentParser):
    from mambavision.export import DEFAULT_OPSET
    from mambavision.factory import DEFAULT_MODEL

    parser.add_argument('--model', default=DEFAULT_MODEL,
                        help=f'model name, optionally with a weight tag (default {DEFAULT_MODEL})')
    parser.add_argument('--checkpoint', metavar='FILE',
                        help='local weight file (.pth.tar as published, .pth, .safetensors) instead of the hub')
    parser.add_argument('--random-weights', action='store_true',
                        help='export randomly initialised weights (no download)')
    parser.add_argument('--format', default='onnx', choices=['onnx'], help='output format (default onnx)')
    parser.add_argument('--output', required=True, metavar='FILE', help='file to write')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET, metavar='N',
                        help=f'ONNX opset, 17 or newer (default {DEFAULT_OPSET})')
    parser.add_argument('--no-dynamic', dest='dynamic', action='store_false',
                        help='fix batch 1 and the image size in the graph (default: batch, height, width dynamic)')
    parser.add_argument('--img-size', type=int, metavar='S',
                        help="image size S x S used for tracing and the check (default: the model's)")


def run_export(args) -> int:
    import torch
    from timm.data import resolve_model_data_config

    from mambavision.export import export_onnx, max_onnx_difference, onnx_session
    from mambavision.factory import check_classifier_name, create_model_with_weights
    from mambavision.runtime import UserError

    check_classifier_name(args.model)  # a dense backbone tag: no classifier, and a 1344x1344 export
    if args.opset < 17:
        raise UserError(f'--opset {args.opset}: the graph needs opset 17 or newer (LayerNormalization)')
    if args.img_size is not None and args.img_size < 1:
        raise UserError(f'--img-size must be a positive integer, got {args.img_size}')
    if os.path.isdir(args.output):
        raise UserError(f'--output {args.output} is a folder; expected a file name such as '
                        f'{os.path.join(args.output, "model.onnx")}')
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise UserError(f'output directory does not exist: {out_dir}')
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError("ONNX export needs onnx and onnxruntime: pip install onnx onnxruntime onnxscript "
                        "(in a checkout of mambavision: pip install -e '.[onnx]')") from None
    model = create_model_with_weights('export', args.model, args.checkpoint, args.random_weights).eval()
    img_size = args.img_size or resolve_model_data_config(model)['input_size'][-1]
    start = time.time()
    export_onnx(model, args.output, img_size, opset=args.opset, dynamic=args.dynamic)
    batch = 2 if args.dynamic else 1
    x = torch.randn(batch, model.in_chans, img_size, img_size)
    diff = max_onnx_difference(onnx_session(args.output), model, x)
    written = [p for p in (args.output, args.output + '.data')
               if os.path.exists(p) and os.path.getmtime(p) >= start - 1]
    size_mb = sum(os.path.getsize(p) for p in written) / 2 ** 20
    print(f"wrote {' + '.join(written)} ({size_mb:.1f} MiB, opset {args.opset}, "
          f"{'dynamic batch/height/width' if args.dynamic else f'fixed 1x{model.in_chans}x{img_size}x{img_size}'})")
    print(f'onnxruntime vs PyTorch at {batch}x{model.in_chans}x{img_size}x{img_size}: max abs difference {diff:.3g}')
    return 0
