"""benchmarks/gpu.py, the one script a session lent a GPU runs: every path proven here on the CPU.

``--device cpu --smoke`` runs all four sections (scan and model correctness, inference and
training timings, eager and compiled) on test_mambavision at 64x64; the JSON it writes is
checked for its keys, finite numbers and passing correctness rows. Its recorder is checked
in-process: a failing measurement is recorded with its error and the next one still runs,
and measurements past the time budget are recorded as skipped.
"""
import importlib
import json
import math
import subprocess
import sys
import weakref

import pytest
import torch

from mambavision.ops import get_scan_backend, set_scan_backend

from conftest import REPO
SCRIPT = REPO / 'benchmarks' / 'gpu.py'


@pytest.fixture
def bench(monkeypatch):
    """Imports a module of the script (gpu, gpu_report, gpu_timings) as the script does: its folder on the path."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    return importlib.import_module


def _numbers(obj):
    """Every int / float in a JSON value."""
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [obj]
    if isinstance(obj, dict):
        return [n for v in obj.values() for n in _numbers(v)]
    if isinstance(obj, list):
        return [n for v in obj for n in _numbers(v)]
    return []


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp('gpu_out')
    cmd = [sys.executable, str(SCRIPT), '--device', 'cpu', '--smoke', '--backends', 'mamba_ssm,torch,reference',
           '--out', str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / 'gpu_results.json').read_text()), proc.stdout, out


def test_smoke_run_writes_complete_results(smoke):
    report, _, _ = smoke
    assert report['finished'] is True
    assert {'command', 'started', 'elapsed_s', 'env', 'settings', 'skipped', 'scan', 'model', 'inference', 'train',
            'compile'} <= set(report)
    env = report['env']
    assert {'python', 'torch', 'torch_cuda', 'triton', 'timm', 'mamba_ssm', 'mambavision', 'git_commit',
            'scan_backends_available', 'selective_scan_cuda'} <= set(env)
    assert report['settings']['backends'] == ['torch', 'reference']  # asked-for mamba_ssm is not on the CPU
    assert [s['backend'] for s in report['skipped']] == ['mamba_ssm']
    assert all(math.isfinite(n) for n in _numbers(report))


def test_smoke_correctness_rows_pass(smoke):
    report, _, _ = smoke
    scan = report['scan']
    assert {r['backend'] for r in scan} == {'torch', 'reference', 'reference on cpu'}
    assert {r['length'] for r in scan} >= {1, 7, 49}  # odd lengths and a 7x7 window
    for row in scan:
        assert row['passed'] is True and 'error' not in row, row
        assert set(row['errors']) == {'y', 'du', 'ddelta', 'dA', 'dB', 'dC', 'dD', 'ddelta_bias'}
    assert [r['backend'] for r in report['model']] == ['torch', 'reference']
    for row in report['model']:
        assert row['passed'] is True and row['logits_rel_err'] <= 1e-4 and row['grad_max_rel_err'] <= 1e-3, row


def test_smoke_timings_cover_every_mode_and_backend(smoke):
    report, stdout, out = smoke
    for section, modes in (('inference', ('eager', 'compile', 'optimize')), ('train', ('eager', 'compile'))):
        rows = report[section]
        assert {(r['mode'], r['backend']) for r in rows} == {(m, b) for m in modes for b in ('torch', 'reference')}
        for row in rows:
            assert 'error' not in row and 'skipped' not in row, row
            assert 0 < row['ms_min'] <= row['ms'] <= row['ms_max'] and row['img_per_s'] > 0, row
            assert row['repeats'] == 2 and row['peak_mem_gib'] is None  # memory is only tracked on CUDA
    assert sorted(r['section'] for r in report['compile']) == ['inference', 'inference', 'train']
    assert all(r['compile_s'] > 0 and r['compile_backend'] == 'aot_eager' for r in report['compile'])
    # the markdown table comes last on stdout, and is written beside the JSON
    lines = stdout.strip().splitlines()
    assert lines[-1].startswith('| test_mambavision | compile |') and '| model | mode | torch | reference |' in lines
    assert '\n'.join(lines[-4:]) in (out / 'gpu_results.md').read_text()


def test_recorder_keeps_going_after_a_failure_and_respects_the_budget(tmp_path, bench):
    report = {}
    gpu_report = bench('gpu_report')
    rec = gpu_report.Recorder(str(tmp_path / 'r.json'), budget_s=1e9, device=torch.device('cpu'), report=report)

    def broken():
        set_scan_backend('reference')
        raise RuntimeError('kernel exploded\nsecond line')
    rec.run('scan', dict(backend='x'), broken)
    assert get_scan_backend() == 'auto'  # the forced backend does not leak into the next row
    rec.run('scan', dict(backend='y'), lambda: dict(passed=True, err=float('inf')))
    rec.budget_s = 0.
    rec.run('scan', dict(backend='z'), lambda: pytest.fail('ran past the budget'))
    saved = json.loads((tmp_path / 'r.json').read_text())
    first, second, third = saved['scan']
    assert first['error'] == 'RuntimeError: kernel exploded\nsecond line' and 'passed' not in first
    assert second['passed'] is True and second['err'] is None  # non-finite numbers are null in strict JSON
    assert third['skipped'].startswith('time budget') and 'wall_s' not in third


def test_recorder_frees_memory_after_leaving_the_handler(tmp_path, monkeypatch, bench):
    """Memory is freed once the failed measurement's frames (held by the traceback inside the
    handler) are gone, so its tensors can be freed too."""
    gpu_report = bench('gpu_report')
    tensors, alive_when_freeing = [], []

    def out_of_memory():
        activations = torch.ones(1000)
        tensors.append(weakref.ref(activations))
        raise RuntimeError('CUDA out of memory')
    monkeypatch.setattr(gpu_report, 'free_memory', lambda device: alive_when_freeing.append(tensors[0]() is not None))
    rec = gpu_report.Recorder(str(tmp_path / 'r.json'), budget_s=1e9, device=torch.device('cpu'), report={})
    rec.run('train', dict(backend='x'), out_of_memory)
    assert alive_when_freeing == [False]


def test_every_backend_is_timed_from_cleared_gradients(tmp_path, monkeypatch, bench):
    """A training step that failed after its backward leaves .grad tensors: the next backend's timing
    starts without them (they would be added to)."""
    gpu_timings = bench('gpu_timings')
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 1000))
    monkeypatch.setattr(gpu_timings, 'build', lambda name, device, train: model)
    grads_cleared = []

    def measure(step, warmup, repeats, batch, device):
        grads_cleared.append(all(p.grad is None for p in model.parameters()))
        if len(grads_cleared) == 1:  # out of memory in the optimizer step, after the backward
            model(torch.randn(2, 3, 4, 4)).sum().backward()
            raise RuntimeError('CUDA out of memory')
        return dict(ms=1.)
    monkeypatch.setattr(gpu_timings, 'measure', measure)
    rec = bench('gpu_report').Recorder(str(tmp_path / 'r.json'), budget_s=1e9, device=torch.device('cpu'), report={})
    settings = dict(train_warmup=1, train_repeats=1, batch_size=2, img_size=4)
    gpu_timings.timing_section(rec, 'train', ['test_mambavision'], ['torch', 'reference'], 'eager', settings)
    assert grads_cleared == [True, True]
    assert [('error' in r, r.get('ms')) for r in rec.report['train']] == [(True, None), (False, 1.)]


def test_bad_arguments_are_one_line_errors(capsys, bench):
    gpu = bench('gpu')
    cases = [(['--backends', 'triton,cuda'], '--backends: unknown cuda'),
             (['--train-models', 'mambavision_x'], '--train-models: unknown model mambavision_x')]
    if not torch.cuda.is_available():
        cases.append((['--device', 'cuda'], '--device cuda: PyTorch sees no CUDA device'))
    for argv, message in cases:
        with pytest.raises(SystemExit):
            gpu.parse_args(argv)
        assert message in capsys.readouterr().err
