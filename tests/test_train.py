"""``mambavision train`` / ``validate``: two-process DDP on CPU, a real kill mid-epoch and an exact resume,
clear errors."""
import argparse
import json
import math
import pickle
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image, ImageDraw

import mambavision  # noqa: F401  (registers the models)
from mambavision.cli import main
from mambavision.train import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHAPES = {'circle': (220, 40, 40), 'square': (40, 200, 40), 'triangle': (40, 60, 220), 'bar': (230, 210, 30)}
EPOCHS, LR, MIN_LR, STEPS = 5, 2e-3, 1e-6, 6  # 96 training images / (2 ranks x batch 8) = 6 steps per epoch


def make_shapes(root: Path, n_train: int = 24, n_val: int = 8, size: int = 32, seed: int = 0) -> Path:
    """An ImageFolder (train/, val/) of coloured shapes on grey: one class per shape and colour."""
    rng = random.Random(seed)
    for split, n in (('train', n_train), ('val', n_val)):
        for name, colour in SHAPES.items():
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(n):
                grey = rng.randint(60, 160)
                img = Image.new('RGB', (size, size), (grey, grey, grey))
                draw = ImageDraw.Draw(img)
                r = rng.randint(size // 5, size // 3)
                cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
                fill = tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in colour)
                if name == 'circle':
                    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
                elif name == 'square':
                    draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
                elif name == 'triangle':
                    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
                else:
                    draw.rectangle((cx - r, cy - r // 3, cx + r, cy + r // 3), fill=fill)
                img.save(root / split / name / f'{i}.png')
    return root


def _torchrun(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'mambavision',
        'train', '--data-dir', str(data), '--model', 'test_mambavision', '--img-size', '32', '--batch-size', '8',
        '--epochs', str(EPOCHS), '--lr', str(LR), '--min-lr', str(MIN_LR), '--warmup-epochs', '0',
        '--model-ema-decay', '0.999', '--workers', '0', '--output', str(out), *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


class _Output:
    """Collects a process's output in the background (progress bars end lines with '\\r')."""

    def __init__(self, proc: subprocess.Popen):
        self.text = ''
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc):
        for chunk in iter(lambda: os.read(proc.stdout.fileno(), 4096), b''):
            self.text += chunk.decode(errors='replace')

    def join(self) -> str:
        self._thread.join(timeout=30)
        return self.text


def _rows(out: Path) -> list:
    return [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]


def _kill_ranks(proc: subprocess.Popen) -> list:
    """SIGKILL the ranks, as a crash would: they are torchrun's children, each in its own session."""
    pids = [int(pid) for pid in Path(f'/proc/{proc.pid}/task/{proc.pid}/children').read_text().split()]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def _finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            _kill_ranks(proc)
            proc.kill()


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """Train on 2 ranks, SIGKILL both ranks in the middle of epoch 2, resume from last.pth.tar to the end."""
    root = tmp_path_factory.mktemp('train')
    data, out = make_shapes(root / 'data'), root / 'out'
    proc = _torchrun(data, out)
    output = _Output(proc)
    mid_epoch_2 = re.compile(r'train 2:[^\r\n]*loss=')  # rank 0's bar shows the loss once the first step is done
    deadline = time.time() + 120
    while not mid_epoch_2.search(output.text) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    killed_pids = _kill_ranks(proc) if proc.poll() is None else []
    assert _finish(proc, 60) != 0 and len(killed_pids) == 2, f'not killed in epoch 2:\n{output.join()[-3000:]}'
    killed_output, killed_rows, killed_ckpt = output.join(), _rows(out), root / 'epoch1.pth.tar'
    shutil.copy(out / 'last.pth.tar', killed_ckpt)

    proc = _torchrun(data, out, '--resume', str(out / 'last.pth.tar'))
    output = _Output(proc)
    assert _finish(proc, 180) == 0, output.join()[-3000:]
    return dict(out=out, data=data, killed_rows=killed_rows, killed_ckpt=killed_ckpt,
                killed_output=killed_output, resumed_output=output.join())


def test_both_ranks_train_and_loss_falls(run):
    rows = _rows(run['out'])
    assert [r['epoch'] for r in rows] == list(range(EPOCHS))
    for r in rows:
        assert r['world_size'] == 2
        assert r['samples_per_rank'] == [STEPS * 8, STEPS * 8]  # each rank its own half of the 96 images
        assert r['images_per_s'] > 0 and r['top5'] >= r['top1']
    assert rows[-1]['train_loss'] < rows[0]['train_loss']
    assert rows[-1]['val_loss'] < rows[0]['val_loss']
    assert (run['out'] / 'last.pth.tar').is_file() and (run['out'] / 'best.pth.tar').is_file()
    assert not list(run['out'].glob('*.tmp'))
    best = load_checkpoint(str(run['out'] / 'best.pth.tar'), 'test_mambavision')
    assert best['metrics']['top1'] == max(r['top1'] for r in rows)


def test_killed_mid_epoch_resumes_at_next_epoch_with_its_state(run):
    assert [r['epoch'] for r in run['killed_rows']] == [0, 1]  # killed in epoch 2, before it ended
    killed = load_checkpoint(str(run['killed_ckpt']), 'test_mambavision')
    assert killed['epoch'] == 1
    assert 'resumed from' in run['resumed_output'] and 'continuing at epoch 2' in run['resumed_output']
    assert 'schedule differs' not in run['resumed_output']  # the rebuilt scheduler equals the saved one
    rows = _rows(run['out'])
    for r in rows:  # the cosine schedule over all updates, uninterrupted: the scheduler resumed at its step
        expected = MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * r['epoch'] / EPOCHS))
        assert r['lr'] == pytest.approx(expected, rel=1e-6)
    final = load_checkpoint(str(run['out'] / 'last.pth.tar'), 'test_mambavision')
    assert final['epoch'] == EPOCHS - 1
    # the optimizer state was restored: AdamW counts every update of both runs
    assert {int(s['step']) for s in final['optimizer']['state'].values()} == {EPOCHS * STEPS}
    # the EMA was restored: with decay 0.999 it barely moves from the saved EMA, far less than to the raw weights
    names = [n for n, t in killed['state_dict_ema'].items() if t.is_floating_point()]
    moved = sum((final['state_dict_ema'][n] - killed['state_dict_ema'][n]).norm() ** 2 for n in names) ** 0.5
    gap = sum((killed['state_dict'][n] - killed['state_dict_ema'][n]).norm() ** 2 for n in names) ** 0.5
    assert moved < 0.1 * gap


def test_validate_on_the_trained_checkpoint(run, tmp_path):
    results = tmp_path / 'results.json'
    rc = main(['validate', '--data-dir', str(run['data']), '--model', 'test_mambavision', '--checkpoint',
               str(run['out'] / 'best.pth.tar'), '--img-size', '32', '--workers', '0', '--results-file', str(results)])
    assert rc == 0
    res = json.loads(results.read_text())
    assert res['samples'] == 4 * 8 and res['top1'] > 50  # chance: 25
    # the same weights and eval preprocessing as the validation of the best epoch during training
    best = max(_rows(run['out']), key=lambda r: r['top1'])
    assert res['top1'] == pytest.approx(best['top1']) and res['loss'] == pytest.approx(best['val_loss'], rel=1e-4)
    rc = main(['validate', '--data-dir', str(run['data']), '--model', 'test_mambavision', '--checkpoint',
               str(run['out'] / 'best.pth.tar'), '--ema', '--img-size', '32', '--workers', '0',
               '--results-file', str(results)])
    res = json.loads(results.read_text())
    assert rc == 0 and res['ema'] and res['top1'] == pytest.approx(best['ema_top1'])
    # a folder whose sub-folders are the classes (no split folder) validates the same images
    rc = main(['validate', '--data-dir', str(run['data'] / 'val'), '--model', 'test_mambavision', '--checkpoint',
               str(run['out'] / 'best.pth.tar'), '--img-size', '32', '--workers', '0', '--results-file', str(results)])
    res = json.loads(results.read_text())
    assert rc == 0 and res['samples'] == 4 * 8 and res['top1'] == pytest.approx(best['top1'])


def test_single_process_fine_tune_from_published_weights(tmp_path, capsys):
    """`--pretrained --num-classes K` without torchrun: the backbone starts from the file, the head is new."""
    data = make_shapes(tmp_path / 'data', n_train=8, n_val=2)
    published = timm.create_model('test_mambavision').state_dict()  # 1000 classes
    weights = tmp_path / 'published.pth.tar'
    torch.save({'state_dict': published, 'epoch': 309}, weights)
    out = tmp_path / 'out'
    rc = main(['train', '--data-dir', str(data), '--model', 'test_mambavision', '--pretrained', '--pretrained-file',
               str(weights), '--num-classes', '4', '--img-size', '32', '--batch-size', '8', '--epochs', '1',
               '--lr', '1e-5', '--workers', '0', '--amp', 'bf16', '--grad-checkpointing', '--output', str(out),
               '--aa', 'rand-m9-mstd0.5-inc1', '--mixup', '0.8', '--cutmix', '1.0', '--reprob', '0.25',
               '--clip-grad', '5'])
    assert rc == 0
    ckpt = load_checkpoint(str(out / 'last.pth.tar'), 'test_mambavision')
    assert ckpt['state_dict']['head.fc.weight'].shape == (4, published['head.fc.weight'].shape[1])
    assert ckpt['config']['num_classes'] == 4 and ckpt['config']['classes'] == sorted(SHAPES)
    stem = ckpt['state_dict']['stem.conv1.weight']
    assert (stem - published['stem.conv1.weight']).abs().max() < 1e-3 < published['stem.conv1.weight'].abs().max()
    assert _rows(out)[0]['world_size'] == 1 and _rows(out)[0]['samples_per_rank'] == [32]
    # validate reads the published form too, and refuses a class count that does not fit the folders
    assert main(['validate', '--data-dir', str(data), '--model', 'test_mambavision', '--checkpoint', str(weights),
                 '--img-size', '32', '--workers', '0']) == 1
    assert 'has 4 class folders in validation, the model 1000 classes' in capsys.readouterr().err


def _train_error(capsys, *argv) -> str:
    assert main(['train', '--model', 'test_mambavision', '--workers', '0', *argv]) == 1
    return capsys.readouterr().err


def test_clear_errors(tmp_path, capsys):
    data = make_shapes(tmp_path / 'data', n_train=2, n_val=1)
    out = ['--output', str(tmp_path / 'out')]
    assert 'data folder not found' in _train_error(capsys, '--data-dir', str(tmp_path / 'nothing'), *out)
    shutil.rmtree(data / 'val' / 'bar')
    err = _train_error(capsys, '--data-dir', str(data), *out)
    assert 'same class folders as train' in err and 'missing from it: bar' in err
    shutil.rmtree(data / 'val')
    assert f'no validation folder in {data}' in _train_error(capsys, '--data-dir', str(data), *out)
    (tmp_path / 'empty' / 'train' / 'a').mkdir(parents=True)
    assert 'Found 0 images' in _train_error(capsys, '--data-dir', str(tmp_path / 'empty'), *out)
    # a checkpoint of another model, and a weight file that is no training checkpoint
    other = tmp_path / 'other.pth.tar'
    save_checkpoint(dict(epoch=0, state_dict={}, optimizer={}, scheduler={}, config=dict(model='mambavision_t')),
                    str(other))
    err = _train_error(capsys, '--data-dir', str(data), '--resume', str(other), *out)
    assert f'checkpoint {other} was written for model mambavision_t, not test_mambavision' in err
    torch.save({'state_dict': {}, 'arch': 'mamba_vision_T', 'epoch': 309}, other)  # published form
    assert 'is not a training checkpoint' in _train_error(capsys, '--data-dir', str(data), '--resume', str(other), *out)


def test_unreadable_images_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    from mambavision.train import _dataset
    data = make_shapes(tmp_path / 'data', n_train=2, n_val=1)
    garbage, truncated = data / 'train' / 'bar' / '0.png', data / 'train' / 'circle' / '1.png'
    garbage.write_bytes(b'not an image')
    truncated.write_bytes(truncated.read_bytes()[:80])
    ds = _dataset(argparse.Namespace(data_dir=str(data), dataset=''), 'train', is_training=True)
    items = [ds[i] for i in range(len(ds))]
    assert all(isinstance(img, Image.Image) for img, _ in items)
    files = [f for f, _ in ds.reader.samples]
    bad = {files.index(str(garbage)), files.index(str(truncated))}
    assert [t for _, t in items] == [ds.reader.samples[i + (i in bad)][1] for i in range(len(ds))]  # the next image
    warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    both = warnings[0] + warnings[1] if len(warnings) == 2 else ''
    assert len(warnings) == 2 and str(garbage) in both and str(truncated) in both


def test_checkpoints_are_written_atomically(tmp_path):
    path = str(tmp_path / 'last.pth.tar')
    save_checkpoint(dict(arch='test_mambavision', epoch=3, w=torch.ones(2)), path)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # pickle's error for a lambda differs by target
        save_checkpoint(dict(arch='test_mambavision', epoch=4, w=lambda: 0), path)  # fails while writing
    assert load_checkpoint(path)['epoch'] == 3 and os.listdir(tmp_path) == ['last.pth.tar']


def test_randaugment_top_magnitude_works_on_any_pillow():
    """timm's RandAugment keeps 0 bits in posterize at magnitude 10 (a black image); Pillow >= 13 refuses 0 bits."""
    from timm.data import auto_augment
    from mambavision.train import _posterize_zero_bits
    _posterize_zero_bits()
    img = Image.new('RGB', (8, 8), (200, 100, 50))
    assert max(auto_augment.AugmentOp('PosterizeIncreasing', prob=1., magnitude=10)(img).getextrema()) == (0, 0)
    two_bits = auto_augment.AugmentOp('PosterizeIncreasing', prob=1., magnitude=5)(img)
    assert two_bits.getpixel((0, 0)) == (192, 64, 0)  # 2 bits kept
