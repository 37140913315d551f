"""A checkpoint of ``mambavision train`` brings its classifier (class count and names) to every command that loads
it: predict, export, validate, and ``create_model_with_weights`` beneath them."""
import json

import onnx
import pytest
import torch
from PIL import Image

from mambavision.cli import main
from mambavision.factory import create_model_with_weights
from mambavision.weights import read_state_dict

COLOURS = {'blue': (30, 40, 220), 'green': (30, 200, 40), 'red': (220, 30, 30)}  # sorted: the class order


def _colour_folders(root, per_class):
    for split, n in per_class.items():
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                shade = tuple(min(255, c + 5 * i) for c in colour)
                Image.new('RGB', (32, 32), shade).save(root / split / name / f'{i}.png')
    return root


@pytest.fixture(scope='module')
def fine_tuned(tmp_path_factory):
    """(data folder, best.pth.tar) of a 1-epoch run of the trainer on three colour classes."""
    root = tmp_path_factory.mktemp('fine_tune')
    data = _colour_folders(root / 'data', {'train': 8, 'val': 2})
    out = root / 'run'
    assert main(['train', '--data-dir', str(data), '--model', 'test_mambavision', '--img-size', '32',
                 '--batch-size', '8', '--epochs', '1', '--warmup-epochs', '0', '--workers', '0',
                 '--output', str(out)]) == 0
    return data, out / 'best.pth.tar'


def test_model_with_weights_has_the_checkpoint_classifier(fine_tuned):
    _, checkpoint = fine_tuned
    model = create_model_with_weights('predict', 'test_mambavision', str(checkpoint))
    assert model.num_classes == 3 and model.pretrained_cfg['label_names'] == sorted(COLOURS)


def test_predict_names_the_checkpoint_classes(fine_tuned, capsys):
    data, checkpoint = fine_tuned
    image = data / 'val' / 'red' / '0.png'
    argv = ['predict', str(image), '--model', 'test_mambavision', '--checkpoint', str(checkpoint), '--topk', '3']
    printed = []
    for _ in range(2):  # the same weights each run: no random head
        assert main(argv) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1]
    ranked = [line.split('%')[1].strip() for line in printed[0].splitlines() if '%' in line]
    assert sorted(ranked) == [f'{name} ({i})' for i, name in enumerate(sorted(COLOURS))]


def test_predict_refuses_a_checkpoint_without_classifier(fine_tuned, tmp_path, capsys):
    """A backbone's weights (no head.fc) would give 'class i' scores of its pooled features: refused in one line."""
    from safetensors.torch import save_file
    data, checkpoint = fine_tuned
    backbone = {k: v for k, v in read_state_dict(str(checkpoint)).items() if not k.startswith('head.fc.')}
    save_file(backbone, str(tmp_path / 'backbone.safetensors'))
    argv = ['predict', str(data / 'val' / 'red' / '0.png'), '--model', 'test_mambavision',
            '--checkpoint', str(tmp_path / 'backbone.safetensors')]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == '' and len(captured.err.strip().splitlines()) == 1
    assert 'backbone.safetensors holds no classifier' in captured.err and 'forward_features' in captured.err


def test_export_has_the_checkpoint_outputs(fine_tuned, tmp_path, capsys):
    _, checkpoint = fine_tuned
    out = tmp_path / 'fine_tuned.onnx'
    assert main(['export', '--model', 'test_mambavision', '--checkpoint', str(checkpoint), '--output', str(out),
                 '--img-size', '32']) == 0
    (logits,) = onnx.load(out).graph.output
    assert logits.name == 'logits' and [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == [
        'batch', 3]


def test_validate_checks_the_checkpoint_classes(fine_tuned, tmp_path, capsys):
    data, checkpoint = fine_tuned
    results = tmp_path / 'results.json'
    base = ['validate', '--model', 'test_mambavision', '--checkpoint', str(checkpoint), '--img-size', '32',
            '--workers', '0']
    assert main(base + ['--data-dir', str(data), '--results-file', str(results)]) == 0
    assert json.loads(results.read_text())['samples'] == 3 * 2
    assert main(base + ['--data-dir', str(data), '--num-classes', '5']) == 1
    assert 'has a 3-class classifier' in capsys.readouterr().err
    other = _colour_folders(tmp_path / 'other', {'validation': 1})
    (other / 'validation' / 'green').rename(other / 'validation' / 'cyan')  # same count, another class
    assert main(base + ['--data-dir', str(other)]) == 1
    err = capsys.readouterr().err
    assert "class 1 is 'cyan' in validation, 'green' in" in err and err.count('\n') == 1


@pytest.mark.parametrize('num_classes', [3, 1000])
def test_training_starts_from_the_checkpoint(fine_tuned, tmp_path, num_classes):
    """--pretrained-file: the same classes go on with the checkpoint's classifier, another count gets a fresh one."""
    data, checkpoint = fine_tuned
    out = tmp_path / 'again'
    assert main(['train', '--data-dir', str(data), '--model', 'test_mambavision', '--img-size', '32',
                 '--batch-size', '8', '--epochs', '1', '--warmup-epochs', '0', '--lr', '1e-9', '--min-lr', '1e-9',
                 '--workers', '0', '--pretrained', '--pretrained-file', str(checkpoint),
                 '--num-classes', str(num_classes), '--output', str(out)]) == 0
    before, after = read_state_dict(str(checkpoint)), read_state_dict(str(out / 'last.pth.tar'))
    assert after['head.fc.weight'].shape[0] == num_classes
    assert torch.allclose(after['stem.conv1.weight'], before['stem.conv1.weight'], atol=1e-6)
    if num_classes == 3:
        assert torch.allclose(after['head.fc.weight'], before['head.fc.weight'], atol=1e-6)
