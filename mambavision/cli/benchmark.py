"""``mambavision benchmark``: inference throughput and latency of a model, synchronised and warmed up."""
import argparse
import functools
import json
import platform
import statistics
import sys
from typing import cast

from . import int_at_least

__all__ = ['add_arguments_benchmark', 'run_benchmark']


def add_arguments_benchmark(parser: argparse.ArgumentParser):
    parser.add_argument('--model', default='mambavision_t', help='model name (default mambavision_t)')
    parser.add_argument('--batch-size', type=int_at_least(1), help='images per batch (default 128 on cuda, 8 on cpu)')
    parser.add_argument('--img-size', type=int_at_least(1), help="square input side (default the model's native size)")
    parser.add_argument('--device', choices=('cpu', 'cuda'), help='default cuda when available')
    parser.add_argument('--amp', choices=('bf16', 'fp16'), help='autocast to this dtype (default float32)')
    parser.add_argument('--channels-last', action='store_true', help='channels-last memory format')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model (warm-up includes compiling)')
    parser.add_argument('--optimize', action='store_true',
                        help='run mambavision.optimize_for_inference: BatchNorm folded, channels-last, weights in the '
                             '--amp dtype; with --compile, inductor with freezing (the fastest CPU path)')
    parser.add_argument('--warmup', type=int_at_least(0), default=5, metavar='N',
                        help='untimed batches first (default 5)')
    parser.add_argument('--repeats', type=int_at_least(1), default=20, metavar='N',
                        help='timed batches; the median is reported (default 20)')
    parser.add_argument('--json', action='store_true', help='print one JSON object')


def run_benchmark(args) -> int:
    import timm
    import torch
    from tqdm import tqdm

    from mambavision.factory import check_model_name
    from mambavision.ops import resolve_scan_backend
    from mambavision.runtime import amp_autocast, amp_dtype, resolve_device
    from mambavision.timing import time_calls

    check_model_name(args.model)
    device = resolve_device(args.device)
    if args.amp == 'fp16' and device.type == 'cpu':
        print('mambavision benchmark: warning: --amp fp16 on a CPU is far slower than float32 (CPUs have no fast '
              'fp16 matmuls; seconds per image); --amp bf16 is the fast CPU precision', file=sys.stderr)
    batch_size = args.batch_size or (128 if device.type == 'cuda' else 8)
    with device:  # initialise on the device: quick even for the 740M-parameter models on a GPU
        model = timm.create_model(args.model).eval()
    img_size = args.img_size or cast(int, model.pretrained_cfg['input_size'][-1])
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    if args.optimize:
        from mambavision.inference import optimize_for_inference
        from mambavision.model import MambaVision
        model = optimize_for_inference(cast(MambaVision, model), amp_dtype(args.amp), compile=args.compile)
    else:
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        if args.compile:
            model = cast(torch.nn.Module, torch.compile(model))  # a module (OptimizedModule), typed as a callable
    progress = functools.partial(tqdm, desc=f'benchmark {args.model}', unit='batch', file=sys.stderr, leave=False,
                                 disable=None)
    with torch.inference_mode(), amp_autocast(device.type, args.amp):
        times = time_calls(lambda: model(x), args.warmup, args.repeats, device, progress)
    latency = statistics.median(times)
    result = dict(
        model=args.model, device=device.type,
        device_name=torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.machine(),
        threads=torch.get_num_threads(), scan_backend=resolve_scan_backend(device.type),
        batch_size=batch_size, img_size=img_size, amp=args.amp, channels_last=args.channels_last or args.optimize,
        compile=args.compile, optimize=args.optimize,
        warmup=args.warmup, repeats=args.repeats,
        latency_ms=1e3 * latency, latency_ms_min=1e3 * min(times), latency_ms_max=1e3 * max(times),
        img_per_s=batch_size / latency, torch=torch.__version__,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    where = result['device_name'] if device.type == 'cuda' else f"{result['device_name']}, {result['threads']} threads"
    print(f"{args.model} on {device.type} ({where}), scan {result['scan_backend']}: "
          f"batch {batch_size} x {img_size}x{img_size}, {args.amp or 'fp32'}"
          f"{', channels-last' if result['channels_last'] else ''}{', compiled' if args.compile else ''}"
          f"{', optimize_for_inference' if args.optimize else ''}")
    print(f"  {result['img_per_s']:.1f} img/s, {result['latency_ms']:.2f} ms per batch "
          f"(median of {args.repeats}; min {result['latency_ms_min']:.2f}, max {result['latency_ms_max']:.2f})")
    return 0
