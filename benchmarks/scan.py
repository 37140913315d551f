"""Selective-scan backends alone, on the shapes MambaVision's mixers really see.

For every shape, backend, input dtype (fp32, bf16) and pass (forward under
inference_mode; forward+backward), the calls are interleaved over ``--repeats`` rounds
after one warm-up; reported are the median time and the speed-up over the reference
backend (median of per-round ratios), plus the max relative error of the output
against the reference (max |diff| / max |ref|, in the output dtype: bf16 outputs differ
by their own rounding). Calls go through ``selective_scan(..., backend=name)``, the
op the model uses. The reference's backward costs O(L^2) (each step's slice gradient is
a full-size tensor): at L=1024 about 30 s a call, so it is left out there unless
``--slow-reference``.

    python benchmarks/scan.py --output scan.md
"""
import argparse
import datetime
import os
import shlex
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from mambavision.ops.selective_scan import available_scan_backends, selective_scan  # noqa: E402

# (label, batch, channels D = C/2, tokens L = window^2), state size N = 8 everywhere
SHAPES = (
    ('T/T2/S stage 3, window 14', 16, 160, 196),
    ('T/T2/S stage 4, window 7', 16, 320, 49),
    ('L3-512 stage 3, window 32', 2, 512, 1024),
)


def inputs(batch, d, length, dtype, requires_grad, n=8):
    """Mixer-like inputs; delta before softplus around -2 (steps ~0.1), B and C strided views as in the model."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, d, length, generator=g)
    delta = torch.randn(batch, length, d, generator=g).sub_(2).transpose(1, 2)
    proj = torch.randn(batch, length, 2 * n + 4, generator=g)
    B, C = proj[..., 4:4 + n].transpose(1, 2), proj[..., 4 + n:].transpose(1, 2)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    D, bias = torch.ones(d), torch.rand(d, generator=g) - 4
    ts = [u.to(dtype), delta.to(dtype), A, B.to(dtype), C.to(dtype), D, bias]
    return [t.detach().requires_grad_(requires_grad) for t in ts]


def call(backend, args, backward):
    if backward:
        y = selective_scan(*args, backend=backend)
        y.float().square().mean().backward()
        return y.detach()
    with torch.inference_mode():
        return selective_scan(*args, backend=backend)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--slow-reference', action='store_true', help='also run the reference fwd+bwd at L=1024')
    parser.add_argument('--output')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = available_scan_backends('cpu')
    lines = [
        '## Selective scan backends (CPU)',
        f'- torch {torch.__version__}, {torch.get_num_threads()} threads, '
        f'{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC',
        f'- command: `python {" ".join(shlex.quote(a) for a in sys.argv)}`',
        '',
        '| shape (B, D, L), N=8 | dtype | pass | backend | ms (median) | speed-up vs reference | max rel err |',
        '|---|---|---|---|---:|---:|---:|',
    ]
    print('\n'.join(lines), flush=True)
    for label, batch, d, length in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for backward in (False, True):
                names = [b for b in backends if not (
                    backward and b == 'reference' and length > 512 and not args.slow_reference)]
                data = {b: inputs(batch, d, length, dtype, backward) for b in names}
                outs = {b: call(b, data[b], backward).float() for b in names}
                times = {b: [] for b in names}
                for r in range(args.repeats):
                    for b in names[r % len(names):] + names[:r % len(names)]:
                        t0 = time.perf_counter()
                        call(b, data[b], backward)
                        times[b].append(time.perf_counter() - t0)
                ref = outs.get('reference')
                for b in names:
                    ratio = err = '- (reference not run)'
                    if ref is not None:
                        ratio = f'{statistics.median(x / y for x, y in zip(times["reference"], times[b])):.2f}x'
                        err = f'{float((outs[b] - ref).abs().max() / ref.abs().max()):.1e}'
                    line = (f'| {label} ({batch}, {d}, {length}) | {str(dtype)[6:]} | '
                            f'{"fwd+bwd" if backward else "fwd"} | {b} | {statistics.median(times[b]) * 1e3:.1f} | '
                            f'{ratio} | {err} |')
                    print(line, flush=True)
                    lines.append(line)
    if args.output:
        with open(args.output, 'w') as f:
            f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
