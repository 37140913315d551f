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


def test_predict_images_offline_name_the_file_and_the_flags(image_file, capsys):
    """Offline, predict on one's own images refuses random weights and says which file to download and where it
    goes; --random-weights runs them, said in one line."""
    rc = main(['predict', str(image_file)])
    _assert_one_line_error(
        rc, capsys.readouterr(), 'predict', 'mambavision_t.nv_in1k', 'the Hugging Face hub is unreachable',
        'download mambavision_tiny_1k.pth.tar from https://huggingface.co/nvidia/MambaVision-T-1K and pass '
        '--checkpoint mambavision_tiny_1k.pth.tar, or --random-weights')
    assert main(['predict', str(image_file), '--model', 'test_mambavision', '--topk', '2']) == 1
    _assert_one_line_error(1, capsys.readouterr(), 'predict', 'no weights are published for test_mambavision',
                           '--checkpoint FILE', '--random-weights')
    assert main(['predict', str(image_file), '--model', 'test_mambavision', '--random-weights', '--topk', '2']) == 0
    captured = capsys.readouterr()
    assert captured.err == 'mambavision predict: RANDOM weights (--random-weights): the outputs mean nothing\n'
    assert len(_topk(captured.out)) == 2


def test_predict_finds_the_published_weights_in_a_hand_made_hub_cache(tmp_path, image_file, capsys, monkeypatch):
    """The README's offline recipe: the published file copied into a hand-made Hugging Face cache entry is used
    offline, as if it had been downloaded."""
    import shutil

    model = timm.create_model('test_mambavision').eval()
    with torch.no_grad():
        model.head.fc.weight.mul_(300)
    cache = tmp_path / 'hub'
    entry = cache / 'models--nvidia--MambaVision-T-1K'
    (entry / 'snapshots' / 'local').mkdir(parents=True)
    (entry / 'refs').mkdir()
    (entry / 'refs' / 'main').write_text('local')
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'mambavision_tiny_1k.pth.tar')
    shutil.copy(tmp_path / 'mambavision_tiny_1k.pth.tar', entry / 'snapshots' / 'local')
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    # the published architecture is too slow for a test: its tag's weights go into the tiny model
    cfg = timm.models.get_pretrained_cfg('mambavision_t.nv_in1k')
    monkeypatch.setattr(factory, 'published_weights', lambda name: (cfg.hf_hub_id, cfg.hf_hub_filename))
    assert main(['predict', str(image_file), '--model', 'test_mambavision', '--topk', '3']) == 0
    captured = capsys.readouterr()
    assert 'published weights of test_mambavision' in captured.err and 'RANDOM' not in captured.err
    with torch.inference_mode():
        x = create_transform(**resolve_model_data_config(model))(Image.open(image_file).convert('RGB'))
        index = model(x[None]).argmax(-1).item()
    assert _topk(captured.out)[0][3] == index


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
    (['predict', '{tmp}'], ['is a folder without image files']),
    (['predict', '--model', 'mambavision_tt'], ["unknown model 'mambavision_tt'", 'did you mean mambavision_t']),
    (['predict', '--model', 'mambavision_t.in21k'], ['unknown model', 'mambavision_t.nv_in1k']),
    (['benchmark', '--model', 'mambvision_s'], ['unknown model', 'mambavision_s']),
    (['predict', '--checkpoint', '{tmp}/missing.pth'], ['checkpoint not found', 'missing.pth']),
    (['predict', '--model', 'test_mambavision', '--checkpoint', '{tmp}/notes.txt'],
     ['cannot read weight file', 'notes.txt', 'a weight file is written by torch.save']),
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


@pytest.mark.parametrize('argv, message', [
    (['benchmark', '--repeats', '0'], "benchmark: error: argument --repeats: expected an integer >= 1, got '0'"),
    (['predict', '--topk', 'many'], "predict: error: argument --topk: expected an integer >= 1, got 'many'"),
    (['predict', '--top-k'], 'predict: error: unrecognized arguments: --top-k'),
    (['train', '--data-dir', 'd', '--lr', 'fast'], "train: error: argument --lr: invalid float value: 'fast'"),
    ([], ': error: the following arguments are required: COMMAND'),
])
def test_usage_errors_are_one_line_naming_the_command(argv, message, capsys):
    """A misspelt flag after a command, or a bad value, is one line naming the command (not a usage block)."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    prog = ' '.join(['mambavision'] + argv[:1])
    assert captured.err == f'mambavision {message} (`{prog} --help` lists the options)\n'.replace(' :', ':')
    assert captured.out == ''


@pytest.mark.parametrize('command', ['train', 'validate'])
def test_cuda_without_cuda_is_one_line(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    argv = [command, '--model', 'test_mambavision', '--data-dir', str(tmp_path), '--device', 'cuda']
    rc = main(argv + (['--pretrained'] if command == 'validate' else []))
    _assert_one_line_error(rc, capsys.readouterr(), command, '--device cuda: no CUDA device', 'use --device cpu')


def test_model_names_and_dense_tags(image_file, capsys):
    """A misspelt L3 name suggests the L3 models; a detection backbone tag (no classifier) is refused naming
    what to run instead."""
    assert main(['predict', '--model', 'mambavision_l3']) == 1
    _assert_one_line_error(1, capsys.readouterr(), 'predict', 'did you mean mambavision_l3_256, mambavision_l3_512')
    assert main(['predict', str(image_file), '--model', 'mambavision_t.nv_coco']) == 1
    _assert_one_line_error(1, capsys.readouterr(), 'predict', 'mambavision_t.nv_coco is the backbone of a published '
                           'detector, without a classifier: `mambavision detect`', 'use mambavision_t.nv_in1k')
    assert main(['predict', str(image_file), '--model', 'mambavision_t.nv_ade20k']) == 1
    _assert_one_line_error(1, capsys.readouterr(), 'predict', '`mambavision segment`')
    assert main(['export', '--model', 'mambavision_t.nv_coco', '--random-weights', '--output', 'unused.onnx']) == 1
    _assert_one_line_error(1, capsys.readouterr(), 'export', 'mambavision_t.nv_coco is the backbone of a published '
                           'detector', 'use mambavision_t.nv_in1k')


def test_predict_folders_json_exif_device(tmp_path, capsys):
    """Folders are searched recursively for images, --json prints them all, EXIF orientation is applied."""
    model = timm.create_model('test_mambavision').eval()
    checkpoint = tmp_path / 'weights.pth'
    torch.save(model.state_dict(), checkpoint)
    pixels = torch.randint(0, 256, (40, 64, 3), dtype=torch.uint8).numpy()
    (tmp_path / 'photos' / 'day').mkdir(parents=True)
    upright = Image.fromarray(pixels)
    upright.save(tmp_path / 'photos' / 'upright.png')
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored pixels are to be turned 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / 'photos' / 'day' / 'turned.png', exif=exif)
    (tmp_path / 'photos' / 'notes.txt').write_text('not an image')
    argv = ['predict', str(tmp_path / 'photos'), '--model', 'test_mambavision', '--checkpoint', str(checkpoint),
            '--device', 'cpu', '--json', '--topk', '3']
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r['image'] for r in result['results']] == [
        str(tmp_path / 'photos' / 'day' / 'turned.png'), str(tmp_path / 'photos' / 'upright.png')]
    turned, straight = (r['top'] for r in result['results'])
    assert [t['index'] for t in turned] == [t['index'] for t in straight]
    assert [t['percent'] for t in turned] == pytest.approx([t['percent'] for t in straight], abs=1e-3)
    assert set(turned[0]) == {'index', 'label', 'percent'}


def test_image_above_the_pixel_limit_is_one_line(tmp_path, capsys, monkeypatch):
    big = tmp_path / 'big.png'
    Image.new('RGB', (300, 200)).save(big)
    monkeypatch.setenv('MAMBAVISION_MAX_IMAGE_PIXELS', '50000')
    rc = main(['predict', str(big), '--model', 'test_mambavision', '--random-weights'])
    _assert_one_line_error(rc, capsys.readouterr(), 'predict', 'big.png is 300x200 = 0 MP, above the limit',
                           'MAMBAVISION_MAX_IMAGE_PIXELS=60000')
    monkeypatch.setenv('MAMBAVISION_MAX_IMAGE_PIXELS', '60000')
    assert main(['predict', str(big), '--model', 'test_mambavision', '--random-weights', '--topk', '1']) == 0


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


def test_train_and_validate_pretrained_offline_name_their_own_flags(tmp_path, capsys):
    argv = ['--model', 'mambavision_t', '--pretrained', '--data-dir', str(tmp_path)]
    for command, flag in (('train', '--pretrained-file'), ('validate', '--checkpoint')):
        rc, captured = main([command] + argv), capsys.readouterr()
        _assert_one_line_error(rc, captured, command, 'download mambavision_tiny_1k.pth.tar from '
                               f'https://huggingface.co/nvidia/MambaVision-T-1K and pass {flag} mambavision_tiny_1k')
        assert 'pretrained_cfg_overlay' not in captured.err


def test_train_says_when_cool_down_epochs_are_added(tmp_path, capsys, monkeypatch):
    """--epochs is the cosine schedule; a config's cool-down epochs come on top, said in one line at the start."""
    import mambavision.train
    monkeypatch.setattr(mambavision.train, 'train', lambda args: 0)
    argv = ['train', '--config', str(ROOT / 'configs' / 'mambavision_t.nv_in1k.yaml'), '--data-dir', str(tmp_path),
            '--epochs', '1']
    assert main(argv) == 0
    assert capsys.readouterr().err == (
        "mambavision train: 11 epochs: --epochs 1 of the cosine schedule, then 10 cool-down epochs at min_lr "
        "(the config's cooldown_epochs; --cooldown-epochs 0 trains 1)\n")
    assert main(argv + ['--cooldown-epochs', '0']) == 0
    assert capsys.readouterr().err == ''
    (tmp_path / 'taken').write_text('a file')
    rc = main(argv + ['--output', str(tmp_path / 'taken')])
    _assert_one_line_error(rc, capsys.readouterr(), 'train', 'taken is a file; expected a folder')


def test_benchmark_warns_of_fp16_on_a_cpu(capsys):
    argv = ['benchmark', '--model', 'test_mambavision', '--device', 'cpu', '--batch-size', '1', '--img-size', '32',
            '--warmup', '0', '--repeats', '1', '--json']
    assert main(argv + ['--amp', 'fp16']) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('mambavision benchmark: warning: --amp fp16 on a CPU')
    assert 'bf16' in err[0]
    assert main(argv + ['--amp', 'bf16']) == 0
    assert 'warning' not in capsys.readouterr().err


def test_validate_classification_per_class_on_request(tmp_path, capsys):
    """Three colour classes, the classifier rigged to answer 'blue' for everything: 100 % for blue, 0 for the
    others, 1/3 overall; the per-class rows only with --per-class."""
    for name, colour in (('blue', (30, 40, 220)), ('green', (30, 200, 40)), ('red', (220, 30, 30))):
        (tmp_path / 'val' / name).mkdir(parents=True)
        for i in range(2):
            Image.new('RGB', (32, 32), colour).save(tmp_path / 'val' / name / f'{i}.png')
    model = timm.create_model('test_mambavision', num_classes=3)
    with torch.no_grad():
        model.head.fc.weight.zero_()
        model.head.fc.bias.copy_(torch.tensor([5., 0., 0.]))
    torch.save(model.state_dict(), tmp_path / 'blue.pth')
    argv = ['validate', '--model', 'test_mambavision', '--checkpoint', str(tmp_path / 'blue.pth'), '--data-dir',
            str(tmp_path), '--img-size', '32', '--workers', '0', '--device', 'cpu']
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    assert results['top1'] == pytest.approx(100 / 3) and 'per_class' not in results
    assert main(argv + ['--per-class']) == 0
    assert json.loads(capsys.readouterr().out)['per_class'] == dict(blue=100, green=0, red=0)
