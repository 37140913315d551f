"""Peak memory of one CPU training step, with and without gradient checkpointing.

Each configuration runs in a fresh Python process, which builds the model, optimizer
and batch, reads its resident set size (RSS), runs one training step and reads its peak RSS
(``getrusage`` high-water mark) after the backward and after the AdamW step. Reported
are peaks minus that baseline, as the OS saw them, allocator caching included: the
forward+backward peak (activations kept for backward, gradients) and the whole step's
(plus AdamW's two state buffers, 2x the parameters). Grad checkpointing can only
shrink the activations. Python's ``tracemalloc`` would not see any of it.

    python benchmarks/train_memory.py --output train_memory.md
"""
import argparse
import datetime
import json
import os
import resource
import shlex
import subprocess
import sys
import time


def rss_mib() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def child(cfg: dict) -> dict:
    import timm
    import torch
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
    import mambavision  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model(cfg['model']).train()
    model.set_grad_checkpointing(cfg['checkpointing'])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(cfg['batch'], 3, cfg['size'], cfg['size'])
    target = torch.randint(0, 1000, (cfg['batch'],))
    base = rss_mib()
    start = time.perf_counter()
    with torch.autocast('cpu', torch.bfloat16, enabled=cfg['bf16']):
        loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    backward_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    opt.step()
    step_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(cfg, backward_mib=backward_peak - base, step_mib=step_peak - base, base_mib=base,
                seconds=time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='mambavision_t')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--output')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    lines = [
        f'## Training-step memory on CPU: {args.model}, batch {args.batch}, {args.size}x{args.size}',
        f'- {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; '
        f'command: `python {" ".join(shlex.quote(a) for a in sys.argv)}`',
        '- peak RSS minus RSS before the step, fresh process per row; the whole step adds AdamW state',
        '',
        '| precision | grad checkpointing | forward+backward peak (MiB) | whole step peak (MiB) | '
        'RSS before (MiB) | step time (s) |',
        '|---|---|---:|---:|---:|---:|',
    ]
    print('\n'.join(lines), flush=True)
    for bf16 in (False, True):
        for checkpointing in (False, True):
            cfg = dict(model=args.model, batch=args.batch, size=args.size, bf16=bf16, checkpointing=checkpointing)
            out = subprocess.run([sys.executable, __file__, '--child', json.dumps(cfg)],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            line = (f'| {"bf16 autocast" if bf16 else "fp32"} | {"on" if checkpointing else "off"} | '
                    f'{r["backward_mib"]:.0f} | {r["step_mib"]:.0f} | {r["base_mib"]:.0f} | {r["seconds"]:.1f} |')
            print(line, flush=True)
            lines.append(line)
    if args.output:
        with open(args.output, 'w') as f:
            f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
