"""``mambavision info``: versions, devices and scan backends, and every model with its size and cost."""
import argparse
import json
import platform
from importlib import metadata
from typing import Any, Dict, Optional

__all__ = ['add_arguments_info', 'run_info', 'gather_info']

GMACS_NOTE = ('GMACs: 1e9 multiply-accumulates per image at input_size (what the paper calls FLOPs; '
              'GFLOPs = 2 x GMACs), counted by torch FlopCounterMode, attention matmuls included')

METRIC_NAMES = {'box_ap': 'box AP', 'mask_ap': 'mask AP', 'miou': 'mIoU'}


def add_arguments_info(parser: argparse.ArgumentParser):
    parser.add_argument('--json', action='store_true', help='print one JSON object')


def _dist_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _devices() -> Dict[str, Dict[str, Any]]:
    """Per device type: what runs the scan there, and which backends could."""
    import torch
    from mambavision.ops import available_scan_backends, cpu_scan, resolve_scan_backend
    from mambavision.runtime import one_line

    def backend(device_type):
        try:
            return resolve_scan_backend(device_type)
        except RuntimeError as e:  # a forced backend ($MAMBAVISION_SCAN) that cannot run there
            return f'error: {one_line(e)}'

    devices = {'cpu': {'threads': torch.get_num_threads(), 'scan_backend': backend('cpu'),
                       'scan_backends_available': available_scan_backends('cpu'),
                       'cpu_kernel': 'built' if cpu_scan.load() is not None else f'not built: {cpu_scan.build_error}'}}
    if torch.cuda.is_available():
        devices['cuda'] = {'name': torch.cuda.get_device_name(0), 'count': torch.cuda.device_count(),
                           'scan_backend': backend('cuda'), 'scan_backends_available': available_scan_backends('cuda')}
        if devices['cuda']['scan_backend'] == 'triton':  # run it once: a Triton that cannot run here shows now
            from mambavision.ops.selective_scan import probe_scan_backend
            devices['cuda']['triton_failures'] = probe_scan_backend('cuda')
    return devices


def gather_info() -> Dict[str, Any]:
    """The report of ``mambavision info --json``: versions, devices, models."""
    import timm
    import torch

    import mambavision
    from mambavision.factory import model_complexity
    from mambavision.published import published_models

    models = []
    for name in timm.list_models('mambavision*'):
        params, macs = model_complexity(name)
        tags = [n.split('.', 1)[1] for n in timm.list_models(name, pretrained=True)]
        cfg = timm.models.get_pretrained_cfg(name)
        models.append(dict(name=name, params=params, input_size=list(cfg.input_size), gmacs=round(macs / 1e9, 3),
                           pretrained_tags=tags, weights_license=cfg.license))
    models.sort(key=lambda m: (m['params'], m['input_size']))
    dense_models = [dict(name=m.name, task=m.task, backbone=m.backbone_tag, dataset=m.dataset, metrics=m.metrics,
                         hf_repo=m.hf_repo, file=m.hf_file, weights_license=m.license)
                    for m in published_models()]
    devices = _devices()
    return dict(
        versions=dict(mambavision=mambavision.__version__, torch=torch.__version__, timm=timm.__version__,
                      python=platform.python_version(), mamba_ssm=_dist_version('mamba-ssm'),
                      triton=_dist_version('triton'), cuda=torch.version.cuda),
        device='cuda' if 'cuda' in devices else 'cpu', devices=devices, models=models, dense_models=dense_models,
        gmacs_note=GMACS_NOTE)


def _print_info(report: Dict[str, Any]):
    v, devices, models = report['versions'], report['devices'], report['models']
    print(f"mambavision {v['mambavision']}  (python {v['python']}, torch {v['torch']}, timm {v['timm']}, "
          f"CUDA {v['cuda'] or 'none'}, mamba-ssm {v['mamba_ssm'] or 'not installed'}, "
          f"triton {v['triton'] or 'not installed'})")
    for device_type, d in devices.items():
        what = d['name'] if device_type == 'cuda' else f"{d['threads']} threads"
        kernel = f"; cpu_kernel {d['cpu_kernel']}" if d.get('cpu_kernel', 'built') != 'built' else ''
        print(f"{device_type:5s} {what}: scan backend {d['scan_backend']} "
              f"(available: {', '.join(d['scan_backends_available'])}{kernel})")
        for config, error in d.get('triton_failures', {}).items():
            print(f"      triton failed at its first call, the torch scan runs instead: {error} ({config})")
    if 'cuda' not in devices:
        print('cuda  not available')
    print(f"\n{'model':20s} {'params':>9s} {'input':>7s} {'GMACs':>8s}  pretrained tags")
    for m in models:
        print(f"{m['name']:20s} {m['params'] / 1e6:8.1f}M {m['input_size'][-1]:7d} {m['gmacs']:8.2f}  "
              f"{', '.join(m['pretrained_tags'])}")
    print(f"\n{report['gmacs_note']}.")
    print(f"\n{'detector / segmenter':44s} {'backbone tag':40s} published result")
    for m in report['dense_models']:
        result = ', '.join(f'{METRIC_NAMES[k]} {v}' for k, v in m['metrics'].items())
        print(f"{m['name']:44s} {m['backbone']:40s} {result} ({m['dataset']})")
    print(f"Licences: the published weights {', '.join(sorted({m['weights_license'] for m in models}))} "
          f"(non-commercial), this library's code Apache-2.0.")


def run_info(args) -> int:
    report = gather_info()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_info(report)
    return 0
