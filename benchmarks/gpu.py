"""Every GPU check and timing in one run: scan and model correctness, inference throughput, training step.

A session lent a GPU runs, from the repository root:

    pip install --no-deps --no-build-isolation -e .
    python benchmarks/gpu.py            # about 5-7 min on an H100; --quick for a first look

and records the printed table, the card and the versions in benchmarks/RESULTS.md. Full
results go to ``$OUT/gpu_results.json`` (and the table to ``gpu_results.md``; ``$OUT``
defaults to ./out), rewritten after every measurement so that a killed run keeps what it
measured. Every measurement runs in its own try/except: a failing backend or compile is
recorded with its error and the others still run. A time budget (``--budget-s``) stops
starting measurements that would not finish in it, so one 10-minute device command holds
the whole run; what it skipped is recorded.

Sections, cheap and essential first:

1. ``scan``: each scan backend the device has (``available_scan_backends``, or ``--backends``)
   against the sequential float32 ``selective_scan_ref`` differentiated by autograd, on the same
   fresh random inputs (``--seed``, random by default, recorded): the output and the gradient of
   every input, as max |err| / max |ref|. The oracle runs on the device (its backward on the CPU
   takes minutes at 1024 tokens); ``reference on cpu`` rows check it against itself on the CPU
   where that is cheap. Shapes: (channels, tokens) of every windowed stage of every registered
   MambaVision (stage width / 2 = 160..1024 channels, window^2 = 49..1024 tokens), odd ones and
   a 12,544-token window.
2. ``model``: mambavision_t (timm init, seed 0) in float32 (TF32 off) on the device, per
   backend, against the same weights on the CPU: logits and every parameter's gradient of a
   fixed random projection of the logits, as relative L2 errors (the worst parameter named).
3. ``inference``: images/s of each model (``--models``) x backend at batch 128, 224x224,
   bf16 autocast, channels-last, under ``inference_mode``: the median of ``repeats`` batches
   timed with CUDA events after ``warmup`` batches, and the peak memory allocated; eager,
   then ``torch.compile``, and for the first model ``optimize_for_inference`` (mode ``optimize``:
   BatchNorm folded into the convs, bf16 weights, compiled with inductor's freezing). A model is
   compiled once (a ``compile`` row, run with the ``torch`` scan): the scan op picks its backend
   when it runs, so the compiled graph serves every backend through ``set_scan_backend``.
4. ``train``: one AdamW step (forward, cross-entropy, backward, step) under bf16 autocast,
   channels-last, for each backend and ``--train-models``, eager and compiled: time and peak memory.

Timings run eager (inference, then train), then compiled: the first model's inference (compile,
then optimize), the training step, the other models' inference.

``--device cpu --smoke`` runs every path on ``test_mambavision`` at 64x64 with tiny shapes
and compiles with the ``aot_eager`` backend (Dynamo and AOTAutograd, without Inductor's C++
compile, which takes minutes on a small CPU); tests/test_gpu_script.py runs it.

This file is the command line and the order of the run; the sections are in ``gpu_checks.py``
(1-2) and ``gpu_timings.py`` (3-4), the recording and the summary table in ``gpu_report.py``.
"""
import argparse
import datetime
import os
import secrets
import shlex
import sys

import torch

import timm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import mambavision  # noqa: E402,F401  (registers the models)
from mambavision.ops import available_scan_backends  # noqa: E402

from gpu_checks import CPU_ORACLE_MAX, REF_CPU, check_model, check_scan, scan_shapes  # noqa: E402
from gpu_report import NEEDS_S, Recorder, environment, markdown  # noqa: E402
from gpu_timings import timing_section  # noqa: E402

BACKENDS = ('mamba_ssm', 'triton', 'torch', 'reference')  # fastest first, as available_scan_backends lists them


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', choices=('cuda', 'cpu'), default='cuda')
    p.add_argument('--smoke', action='store_true',
                   help='tiny everything (test_mambavision at 64x64, batch 2, aot_eager compile): proves the paths')
    p.add_argument('--quick', action='store_true', help='fewer warm-up and timed repeats (compiles take as long)')
    p.add_argument('--models', help='comma-separated (default mambavision_t,mambavision_s,mambavision_b)')
    p.add_argument('--train-models', help='comma-separated models for the training step (default mambavision_t)')
    p.add_argument('--backends', help=f"comma-separated scan backends, of {', '.join(BACKENDS)} "
                                      '(default all; those the device lacks are recorded as skipped)')
    p.add_argument('--batch-size', type=int, help='default 128 (smoke 2)')
    p.add_argument('--img-size', type=int, help='default 224 (smoke 64)')
    p.add_argument('--no-compile', action='store_true', help='skip the torch.compile rows')
    p.add_argument('--compile-backend', help='torch.compile backend (default inductor; smoke aot_eager)')
    p.add_argument('--seed', type=int, help='seed of the scan inputs (default random, recorded)')
    p.add_argument('--budget-s', type=float, default=500.,
                   help='seconds from the start after which no measurement starts (a compile needs '
                        f"{NEEDS_S['compile']:.0f} s left, others {NEEDS_S['default']:.0f} s; default 500)")
    p.add_argument('--out', default=os.environ.get('OUT') or 'out', help='output folder (default $OUT, else ./out)')
    args = p.parse_args(argv)
    known = set(timm.list_models('mambavision*')) | {'test_mambavision'}
    for option in ('models', 'train_models'):
        value = getattr(args, option)
        bad = [m for m in (value or '').split(',') if value and m not in known]
        if bad:
            p.error(f"--{option.replace('_', '-')}: unknown model {', '.join(bad)}; expected some of "
                    f"{', '.join(sorted(known))}")
    bad = [b for b in (args.backends or '').split(',') if args.backends and b not in BACKENDS]
    if bad:
        p.error(f"--backends: unknown {', '.join(bad)}; expected some of {', '.join(BACKENDS)}")
    if args.device == 'cuda' and not torch.cuda.is_available():
        p.error('--device cuda: PyTorch sees no CUDA device here (use --device cpu --smoke to test the script)')
    return args


def settings(args, device: torch.device) -> dict:
    """Every choice the run makes, defaults resolved (recorded in the JSON)."""
    smoke, quick = args.smoke, args.quick
    split = lambda v, default: v.split(',') if v else default  # noqa: E731
    return dict(
        device=device.type, smoke=smoke, quick=quick,
        models=split(args.models, ['test_mambavision'] if smoke else
                     ['mambavision_t', 'mambavision_s', 'mambavision_b']),
        train_models=split(args.train_models, ['test_mambavision'] if smoke else ['mambavision_t']),
        backends=split(args.backends, list(BACKENDS) if device.type == 'cuda' else available_scan_backends('cpu')),
        check_model='test_mambavision' if smoke else 'mambavision_t', check_batch=2,
        check_img_size=64 if smoke else 224,
        batch_size=args.batch_size or (2 if smoke else 128), img_size=args.img_size or (64 if smoke else 224),
        warmup=1 if smoke else 2 if quick else 3, repeats=2 if smoke else 5 if quick else 10,
        train_warmup=1 if smoke else 2 if quick else 3, train_repeats=2 if smoke else 3 if quick else 8,
        compile=not args.no_compile, compile_backend=args.compile_backend or ('aot_eager' if smoke else 'inductor'),
        seed=args.seed if args.seed is not None else secrets.randbelow(2 ** 31),
        budget_s=args.budget_s, cudnn_benchmark=device.type == 'cuda', cpu_threads=torch.get_num_threads(),
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    if args.smoke and device.type == 'cpu':
        torch.set_num_threads(1)  # on a shared small CPU, OpenMP barriers stall whenever a core is taken
    s = settings(args, device)
    report = dict(
        command='python ' + shlex.join(sys.argv if argv is None else ['benchmarks/gpu.py', *argv]),
        started=datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
        env=environment(device), settings=s, skipped=[], finished=False)
    rec = Recorder(os.path.join(args.out, 'gpu_results.json'), s['budget_s'], device, report)
    available = report['env']['scan_backends_available']
    for b in s['backends']:
        if b not in available:
            why = (f"selective_scan_cuda: {report['env']['selective_scan_cuda']} (benchmarks/build_mamba_ssm.sh "
                   'builds it)' if b == 'mamba_ssm' and device.type == 'cuda' else
                   f"available on {device.type} here: {', '.join(available)}")
            report['skipped'].append(dict(backend=b, reason=f'not available: {why}'))
    s['backends'] = backends = [b for b in s['backends'] if b in available]

    oracle = {}
    for i, shape in enumerate(scan_shapes(s['smoke'])):
        cpu_check = [REF_CPU] if shape[1] * shape[2] ** 2 <= CPU_ORACLE_MAX else []
        for backend in backends + cpu_check:
            row = dict(backend=backend, batch=shape[0], channels=shape[1], length=shape[2], state=shape[3])
            rec.run('scan', row, lambda backend=backend, shape=shape, seed=s['seed'] + i: check_scan(
                backend, shape, seed, device, oracle))
        oracle.pop(shape, None)
    cache = {}
    for backend in backends:
        rec.run('model', dict(backend=backend, model=s['check_model'], batch=s['check_batch'],
                              img_size=s['check_img_size']),
                lambda backend=backend: check_model(backend, s['check_model'], s['check_batch'], s['check_img_size'],
                                                    device, cache))
    cache.clear()

    torch.backends.cudnn.benchmark = s['cudnn_benchmark']
    models, train_models = s['models'], s['train_models']
    jobs = [('inference', models, 'eager'), ('train', train_models, 'eager')]
    if s['compile']:  # the larger models' compiled inference last: the first thing a short budget drops
        jobs += [('inference', models[:1], 'compile'), ('inference', models[:1], 'optimize'),
                 ('train', train_models, 'compile'), ('inference', models[1:], 'compile')]
    for section, names, mode in jobs:
        timing_section(rec, section, names, backends, mode, s)
    report['finished'] = True
    rec.save()
    table = markdown(report)
    with open(os.path.join(args.out, 'gpu_results.md'), 'w') as f:
        f.write(f"{report['command']}\n\n{table}\n")
    print(f"\nresults: {rec.path} ({report['elapsed_s']:.0f} s; {report['env'].get('gpu', device.type)}, "
          f"torch {torch.__version__}, triton {report['env']['triton']}, mamba-ssm {report['env']['mamba_ssm']})\n")
    print(table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
