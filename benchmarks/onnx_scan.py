"""The exported scan in ONNX Runtime: our unrolled sweep vs the log-depth (Hillis-Steele) scan it replaced.

Exports the model twice (the scan as ``selective_scan_graph``, and as the log-depth form kept
here as the baseline), then times PyTorch eager and both onnxruntime sessions on the same input
in interleaved repeats (eager, unrolled, log-depth, eager, ...), so that load from other
processes hits all alike, and reports medians, ranges and ratios.

    python benchmarks/onnx_scan.py --model mambavision_t --batch 8 --img-size 224
"""
import argparse
import importlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import timm
import torch

import mambavision  # noqa: F401  (registers the models)
from mambavision.export import INPUT_NAME, export_onnx, onnx_session
from mambavision.ops import torch_scan

scan_module = importlib.import_module('mambavision.ops.selective_scan')  # the export's selective_scan_graph


def selective_scan_log_depth(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """The previous ONNX scan: ceil(log2 L) whole-tensor steps composing h -> a*h + b over doubling distances."""
    a, b = torch_scan._discretize(u, delta, A, B, delta_bias, delta_softplus)  # (B, D, L, N)
    length = u.shape[-1]
    k = 1
    while k < length:
        b = torch.cat([b[:, :, :k], b[:, :, k:] + a[:, :, k:] * b[:, :, :-k]], dim=2)
        if 2 * k < length:
            a = torch.cat([a[:, :, :k], a[:, :, k:] * a[:, :, :-k]], dim=2)
        k *= 2
    return torch_scan._add_skip((b * C.float().transpose(1, 2).unsqueeze(1)).sum(-1), u, D)


def export_with(scan, model, path, img_size):
    unrolled = scan_module.selective_scan_graph
    scan_module.selective_scan_graph = scan
    try:
        t0 = time.perf_counter()
        export_onnx(model, path, img_size)
        return time.perf_counter() - t0
    finally:
        scan_module.selective_scan_graph = unrolled


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='mambavision_t')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=7, help='timed runs of each (after one warm-up)')
    parser.add_argument('--threads', type=int, default=None, help='threads of all runtimes (default: torch default)')
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model = timm.create_model(args.model).eval()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    scans = {'unrolled': scan_module.selective_scan_graph, 'log-depth': selective_scan_log_depth}
    runs = {}

    def run_eager():
        with torch.inference_mode():
            return model(x).numpy()

    runs['eager'] = run_eager
    with tempfile.TemporaryDirectory() as tmp:
        for name, scan in scans.items():
            path = Path(tmp) / f'{name}.onnx'
            export_s = export_with(scan, model, path, args.img_size)
            nodes = len(onnx.load(path).graph.node)
            session = onnx_session(path, threads)
            print(f'{name:9s} export {export_s:5.1f} s, {nodes} nodes, {path.stat().st_size / 2 ** 20:.1f} MiB')
            runs[f'ort {name}'] = lambda session=session: session.run(None, {INPUT_NAME: x.numpy()})[0]
        outputs = {name: fn() for name, fn in runs.items()}  # warm-up
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)

    ref = outputs['eager']
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f'{args.model} batch {args.batch} x {args.img_size}x{args.img_size}, {threads} threads, '
          f'torch {torch.__version__}')
    for name, t in times.items():
        rel = np.abs(outputs[name] - ref).max() / np.abs(ref).max()
        print(f'  {name:14s} median {med[name] * 1e3:8.1f} ms  (min {min(t) * 1e3:.1f}, max {max(t) * 1e3:.1f}, '
              f'{len(t)} runs; x eager {med[name] / med["eager"]:.2f}; max rel diff {rel:.1e})')
    print(f'  log-depth / unrolled time ratio: {med["ort log-depth"] / med["ort unrolled"]:.2f}')


if __name__ == '__main__':
    main()
