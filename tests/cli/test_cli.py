"""The ``mambavision`` command line: info, predict, benchmark, errors and the command table."""
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_model_data_config

import mambavision
from mambavision import factory
from mambavision.cli import COMMANDS, main

ROOT = Path(mambavision.__file__).resolve().parents[1]
TOPK_LINE = re.compile(r'^  (\d+)\.\s+([\d.]+)%  (.+) \((\d+)\)$')


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Never download: the hub is unreachable for every test, so the offline path is deterministic."""
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.delenv('MAMBAVISION_DEBUG', raising=False)


def _topk(stdout: str):
    """[(rank, percent, label, index)] of the top-k lines printed by ``predict``."""
    return [(int(m[1]), float(m[2]), m[3], int(m[4])) for m in map(TOPK_LINE.match, stdout.splitlines()) if m]


def _assert_one_line_error(rc, captured, command, *fragments):
    assert rc != 0
    assert captured.out == ''
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f'mambavision {command}: error: ')
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / 'noise.png'
    Image.fromarray(torch.randint(0, 256, (48, 80, 3), dtype=torch.uint8).numpy()).save(path)
    return path


def test_entry_point_info_json():
    """``python -m mambavision info --json`` runs as a program and reports every registered model."""
    out = subprocess.run(
        [sys.executable, '-m', 'mambavision', 'info', '--json'], cwd=ROOT, capture_output=True, text=True,
        timeout=300, env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report['versions']['mambavision'] == mambavision.__version__
    assert report['versions']['torch'] == torch.__version__ and report['versions']['timm'] == timm.__version__
    assert report['devices']['cpu']['scan_backend'] == mambavision.ops.resolve_scan_backend('cpu')
    built = importlib.import_module('mambavision.ops.cpu_scan').load() is not None
    assert (report['devices']['cpu']['cpu_kernel'] == 'built') == built
    models = {m['name']: m for m in report['models']}
    assert sorted(models) == sorted(timm.list_models('mambavision*')) and len(models) == 9
    assert models['mambavision_t']['params'] == sum(p.numel() for p in timm.create_model('mambavision_t').parameters())
    native = {'mambavision_l2_512': 512, 'mambavision_l3_512': 512, 'mambavision_l3_256': 256}
    for name, m in models.items():
        assert m['input_size'] == [3, native.get(name, 224), native.get(name, 224)]
    # the paper gives 4.4 G multiply-accumulates for T; the attention matmuls it seems to leave out add ~0.1 G
    assert 4.4 < models['mambavision_t']['gmacs'] < 4.7
    # same architecture, 512 vs 256 input: about 4x the work
    assert 3.5 < models['mambavision_l3_512']['gmacs'] / models['mambavision_l3_256']['gmacs'] < 4.5
    assert models['mambavision_b']['pretrained_tags'] == ['nv_ade20k', 'nv_coco', 'nv_in1k', 'nv_in21k_ft_in1k']


def test_info_text(capsys, monkeypatch):
    """The table lists every model; counting itself is checked above, here it is stubbed to keep this fast."""
    monkeypatch.setattr(factory, 'model_complexity', lambda name: (len(name) * 10 ** 6, 10 ** 9))
    assert main(['info']) == 0
    out = capsys.readouterr().out
    assert out.startswith(f'mambavision {mambavision.__version__}  (python ')
    assert re.search(r'^cpu +\d+ threads: scan backend \w+ \(available: ', out, re.M)
    for name in timm.list_models('mambavision*'):
        assert re.search(rf'^{name} +{len(name)}\.0M +\d+ +1\.00  nv_', out, re.M), name
    assert 'GMACs' in out


def test_predict_sample_offline_warns_and_uses_random_weights(capsys):
    assert main(['predict', '--topk', '3']) == 0
    captured = capsys.readouterr()
    warning = captured.err.strip().splitlines()
    assert len(warning) == 1 and 'warning' in warning[0] and 'RANDOM weights' in warning[0], captured.err
    lines = captured.out.splitlines()
    assert lines[0].endswith('sample.jpg') and Path(lines[0]).is_file()
    top = _topk(captured.out)
    assert [t[0] for t in top] == [1, 2, 3]
    assert [t[1] for t in top] == sorted((t[1] for t in top), reverse=True)
    names = ImageNetInfo()
    assert all(label == names.index_to_description(index) for _, _, label, index in top)


def test_predict_require_weights_offline_fails(capsys):
    rc = main(['predict', '--require-weights'])
    _assert_one_line_error(rc, capsys.readouterr(), 'predict', 'unreachable', '--require-weights')


def test_predict_checkpoint_weights_are_used(tmp_path, image_file, capsys):
    model = timm.create_model('test_mambavision').eval()
    with torch.no_grad():
        model.head.fc.weight.mul_(300)  # peaked probabilities: a random model would print other numbers
    checkpoint = tmp_path / 'weights.pth'
    torch.save(model.state_dict(), checkpoint)

    with torch.inference_mode():
        x = create_transform(**resolve_model_data_config(model))(Image.open(image_file).convert('RGB'))
        p, i = model(x[None]).softmax(-1)[0].topk(4)
    assert main(['predict', str(image_file), '--model', 'test_mambavision', '--checkpoint', str(checkpoint),
                 '--topk', '4']) == 0
    captured = capsys.readouterr()
    assert captured.err == ''
    top = _topk(captured.out)
    assert [t[3] for t in top] == i.tolist()
    assert [t[1] for t in top] == pytest.approx((100 * p).tolist(), abs=0.006)
    assert p[0] > 0.05  # the check above is meaningful: far from uniform over 1000 classes


@pytest.mark.parametrize('argv, fragments', [
    (['predict', '{tmp}/missing.jpg'], ['image not found', 'missing.jpg']),
    (['predict', '{tmp}/notes.txt'], ['cannot read', 'notes.txt', 'as an image']),
    (['predict', '{tmp}'], ['is a directory']),
    (['predict', '--model', 'mambavision_tt'], ["unknown model 'mambavision_tt'", 'did you mean mambavision_t']),
    (['predict', '--model', 'mambavision_t.in21k'], ['unknown model', 'mambavision_t.nv_in1k']),
    (['benchmark', '--model', 'mambvision_s'], ['unknown model', 'mambavision_s']),
    (['predict', '--checkpoint', '{tmp}/missing.pth'], ['checkpoint not found', 'missing.pth']),
    (['predict', '--model', 'test_mambavision', '--checkpoint', '{tmp}/notes.txt'], ['cannot read weight file']),
])
def test_errors_are_one_line(argv, fragments, tmp_path, capsys):
    (tmp_path / 'notes.txt').write_text('not an image, not weights\n')
    argv = [a.format(tmp=tmp_path) for a in argv]
    _assert_one_line_error(main(argv), capsys.readouterr(), argv[0], *fragments)


def test_unexpected_errors_one_line_or_traceback_with_debug(tmp_path, capsys, monkeypatch):
    """A weight file that lacks a tensor fails inside timm's loading: one line, or the traceback on request."""
    state_dict = timm.create_model('test_mambavision').state_dict()
    del state_dict['stem.conv1.weight']
    checkpoint = tmp_path / 'incomplete.pth'
    torch.save(state_dict, checkpoint)
    argv = ['predict', '--model', 'test_mambavision', '--checkpoint', str(checkpoint)]
    _assert_one_line_error(main(argv), capsys.readouterr(), 'predict', 'does not fit', 'stem.conv1.weight', '--debug')
    with pytest.raises(RuntimeError, match='does not fit'):
        main(argv + ['--debug'])
    monkeypatch.setenv('MAMBAVISION_DEBUG', '1')
    with pytest.raises(RuntimeError, match='does not fit'):
        main(argv)


def test_usage_errors_exit_2(capsys):
    assert main(['benchmark', '--repeats', '0']) == 2
    err = capsys.readouterr().err
    assert 'usage: mambavision benchmark' in err and 'expected an integer >= 1' in err and 'Traceback' not in err
    assert main([]) == 2
    assert main(['predict', '--topk', 'many']) == 2


def test_benchmark_json(capsys):
    argv = ['benchmark', '--model', 'test_mambavision', '--device', 'cpu', '--batch-size', '2', '--img-size', '32',
            '--warmup', '1', '--repeats', '3', '--json']
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert {'model', 'device', 'batch_size', 'img_size', 'amp', 'scan_backend', 'latency_ms', 'latency_ms_min',
            'latency_ms_max', 'img_per_s', 'repeats', 'warmup'} <= set(result)
    assert result['model'] == 'test_mambavision' and result['device'] == 'cpu'
    assert (result['batch_size'], result['img_size']) == (2, 32)
    assert 0 < result['latency_ms_min'] <= result['latency_ms'] <= result['latency_ms_max']
    assert result['img_per_s'] == pytest.approx(2 * 1000 / result['latency_ms'])


def test_benchmark_text_amp_channels_last(capsys):
    argv = ['benchmark', '--model', 'test_mambavision', '--device', 'cpu', '--batch-size', '1', '--img-size', '32',
            '--warmup', '0', '--repeats', '2', '--amp', 'bf16', '--channels-last']
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert 'bf16, channels-last' in out and re.search(r'[\d.]+ img/s, [\d.]+ ms per batch \(median of 2', out)


def test_benchmark_optimize_for_inference(capsys):
    argv = ['benchmark', '--model', 'test_mambavision', '--device', 'cpu', '--batch-size', '2', '--img-size', '32',
            '--warmup', '0', '--repeats', '2', '--amp', 'bf16', '--optimize', '--json']
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result['optimize'] and result['channels_last'] and result['amp'] == 'bf16' and result['latency_ms'] > 0


def test_command_table_imports_lazily(tmp_path, monkeypatch, capsys):
    """A command is one table entry; its module is imported only when it runs."""
    (tmp_path / 'mv_hello_cmd.py').write_text(
        'def add_arguments_hello(parser):\n'
        '    parser.add_argument("--name", default="world")\n'
        'def run_hello(args):\n'
        '    print("hello", args.name)\n'
        '    return 3\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(COMMANDS, 'hello', ('mv_hello_cmd', 'say hello'))
    monkeypatch.delitem(sys.modules, 'mv_hello_cmd', raising=False)

    assert main(['--help']) == 0
    assert re.search(r'hello +say hello', capsys.readouterr().out)
    assert main(['benchmark', '--help']) == 0
    assert 'usage: mambavision benchmark' in capsys.readouterr().out
    assert 'mv_hello_cmd' not in sys.modules
    assert main(['hello', '--name', 'cli']) == 3
    assert capsys.readouterr().out == 'hello cli\n'
