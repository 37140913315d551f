"""ONNX Runtime vs PyTorch eager on this CPU, side by side in one process.

Exports the model (dynamic axes, as ``mambavision export`` does), then times both
runtimes on the same input in interleaved repeats (eager, onnxruntime, eager, ...)
so that load from other processes hits both alike, and reports medians and their ratio.

    python benchmarks/onnx_cpu.py --model mambavision_t --batch 8 --img-size 224
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch

import mambavision  # noqa: F401  (registers the models)
from mambavision.export import INPUT_NAME, export_onnx, onnx_session


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='mambavision_t')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=7, help='timed runs of each runtime (after one warm-up)')
    parser.add_argument('--threads', type=int, default=None, help='threads of both runtimes (default: torch default)')
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model = timm.create_model(args.model).eval()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'model.onnx'
        t0 = time.perf_counter()
        export_onnx(model, path, args.img_size)
        export_s = time.perf_counter() - t0
        session = onnx_session(path, threads)
        feed = {INPUT_NAME: x.numpy()}

        def run_eager():
            with torch.inference_mode():
                return model(x).numpy()

        def run_ort():
            return session.run(None, feed)[0]

        runs = {'eager': run_eager, 'onnxruntime': run_ort}
        outputs = {name: fn() for name, fn in runs.items()}  # warm-up
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)

    ref = outputs['eager']
    rel = np.abs(outputs['onnxruntime'] - ref).max() / np.abs(ref).max()
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f'{args.model} batch {args.batch} x {args.img_size}x{args.img_size}, {threads} threads, '
          f'torch {torch.__version__}, export {export_s:.1f} s, max rel diff {rel:.2e}')
    for name, t in times.items():
        print(f'  {name:12s} median {med[name] * 1e3:8.1f} ms  ({args.batch / med[name]:6.1f} img/s; '
              f'min {min(t) * 1e3:.1f}, max {max(t) * 1e3:.1f}, {len(t)} runs)')
    print(f'  onnxruntime / eager time ratio: {med["onnxruntime"] / med["eager"]:.3f} '
          f'(< 1: onnxruntime faster)')


if __name__ == '__main__':
    main()
