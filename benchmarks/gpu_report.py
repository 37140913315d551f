"""What benchmarks/gpu.py records: the environment, every measurement (each in try/except, within
the time budget, the JSON rewritten after each) and the markdown summary."""
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from importlib import metadata
from typing import Callable, List, Optional

import torch

import timm

import mambavision
from mambavision.ops import available_scan_backends, set_scan_backend

START = time.monotonic()  # the time budget counts from here (imports and environment included)
NEEDS_S = {'compile': 150., 'default': 20.}  # seconds of budget a measurement must have left to start


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def describe_error(e: BaseException) -> str:
    return f'{type(e).__name__}: {str(e).strip()[:2000]}'


def _command(cmd: List[str]) -> Optional[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except Exception:
        return None


def environment(device: torch.device) -> dict:
    """Card, driver, CUDA and library versions, and what the scan backends found."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
    env = dict(
        python=platform.python_version(), platform=platform.platform(), cpu_count=os.cpu_count(),
        torch=torch.__version__, torch_cuda=torch.version.cuda, triton=_version('triton'), timm=timm.__version__,
        mamba_ssm=_version('mamba-ssm'), mambavision=mambavision.__version__,
        git_commit=_command(['git', '-C', root, 'rev-parse', 'HEAD']),
        git_dirty=bool(_command(['git', '-C', root, 'status', '--porcelain', '--untracked-files=no'])),
        scan_env=os.environ.get('MAMBAVISION_SCAN'),
        scan_backends_available=available_scan_backends(device.type),
    )
    try:
        import selective_scan_cuda  # noqa: F401  (mamba-ssm's extension; any failure is worth recording)
        env['selective_scan_cuda'] = 'imported'
    except Exception as e:
        env['selective_scan_cuda'] = describe_error(e)
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name, gpu_capability=f'{props.major}.{props.minor}', gpu_sms=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), cudnn=torch.backends.cudnn.version(),
            driver=_command(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader']),
            nvcc=next((line for line in (_command(['nvcc', '--version']) or '').splitlines() if 'release' in line),
                      None))
    return env


class Recorder:
    """Runs measurements one by one, each in try/except, and rewrites the JSON after each."""

    def __init__(self, path: str, budget_s: float, device: torch.device, report: dict):
        self.path, self.budget_s, self.device, self.report = path, budget_s, device, report
        self.fatal: Optional[str] = None  # set when the CUDA context is lost: nothing more can run

    def elapsed(self) -> float:
        return time.monotonic() - START

    def run(self, section: str, row: dict, fn: Callable[[], dict], kind: str = 'default') -> dict:
        """Append ``row``, updated with ``fn()`` or with ``error`` / ``skipped``, to ``report[section]``."""
        left = self.budget_s - self.elapsed()
        if self.fatal:
            row['skipped'] = self.fatal
        elif left < NEEDS_S[kind]:
            row['skipped'] = (f'time budget: {left:.0f} s of --budget-s {self.budget_s:.0f} left, '
                              f'needs {NEEDS_S[kind]:.0f}')
        else:
            start = time.monotonic()
            try:
                row.update(fn())
            except Exception as e:
                row['error'] = describe_error(e)
                print(f'[{section}] {row}:\n{traceback.format_exc()}', file=sys.stderr)
                self._check_device(row)
            finally:
                set_scan_backend(None)
            # out of the handler, whose traceback held the failed call's frames and tensors: an
            # out-of-memory error leaves them and cached blocks behind
            if 'error' in row and not self.fatal:
                free_memory(self.device)
            row['wall_s'] = round(time.monotonic() - start, 3)
        return self.add(section, row)

    def add(self, section: str, row: dict) -> dict:
        """Append ``row`` to ``report[section]`` as it is, log it and save."""
        print(f'[{section} {self.elapsed():6.1f}s] ' + ', '.join(f'{k}={_short(v)}' for k, v in row.items()),
              file=sys.stderr, flush=True)
        self.report.setdefault(section, []).append(row)
        self.save()
        return row

    def _check_device(self, row: dict):
        if self.device.type != 'cuda':
            return
        try:
            torch.cuda.synchronize(self.device)
        except Exception as e:
            self.fatal = f'CUDA context lost after {row}: {describe_error(e)}'

    def save(self):
        self.report['elapsed_s'] = round(self.elapsed(), 1)
        tmp = self.path + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(_finite(self.report), f, indent=1, allow_nan=False)
        os.replace(tmp, self.path)


def free_memory(device: torch.device):
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def _finite(obj):
    """``obj`` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _short(v):
    return f'{v:.4g}' if isinstance(v, float) else v if not isinstance(v, dict) else '{...}'


# ----------------------------------------------------------------------------- table


def _cell(row: dict, value: str) -> str:
    if 'error' in row:
        return 'error'
    if 'skipped' in row:
        return 'skipped'
    return value


def markdown(report: dict) -> str:
    """The short summary: correctness counts, then throughput and training tables."""
    lines = []
    for section in ('scan', 'model'):
        rows = report.get(section, [])
        ok = sum(bool(r.get('passed')) for r in rows)
        worst = max((r.get('max_err_bwd', r.get('grad_max_rel_err', 0.)) for r in rows if 'passed' in r), default=0.)
        failed = sum('error' in r for r in rows), sum('skipped' in r for r in rows)
        lines.append(f'- {section} correctness: {ok}/{len(rows)} rows pass, {failed[0]} errors, {failed[1]} skipped '
                     f'(worst gradient error {worst:.2e})')
    for r in report.get('compile', []):
        what = f"{r['compile_s']:.0f} s" if 'compile_s' in r else r.get('error') or r.get('skipped')
        lines.append(f"- compile {r['model']} ({r['section']}): {what}")
    backends = report['settings']['backends']
    for section, unit in (('inference', 'img/s'), ('train', 'ms/step')):
        rows = report.get(section, [])
        if not rows:
            continue
        lines += ['', f'{section} ({unit}, peak GiB), batch {rows[0]["batch"]} at {rows[0]["img_size"]}px, bf16, '
                      f'channels-last', '', '| model | mode | ' + ' | '.join(backends) + ' |',
                  '|---|---|' + '---|' * len(backends)]
        for key in dict.fromkeys((r['model'], r['mode']) for r in rows):
            cells = []
            for b in backends:
                r = next((r for r in rows if (r['model'], r['mode'], r['backend']) == (*key, b)), None)
                if r is None:
                    cells.append('')
                    continue
                value = r.get('img_per_s') if section == 'inference' else r.get('ms')
                mem = '' if r.get('peak_mem_gib') is None else f", {r['peak_mem_gib']:.1f}"
                cells.append(_cell(r, f'{value:.1f}{mem}' if value is not None else ''))
            lines.append(f'| {key[0]} | {key[1]} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)
