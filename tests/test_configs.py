"""configs/*.yaml: one per published checkpoint, matching the registered model, its weights and preprocessing."""
import argparse
import importlib
from pathlib import Path

import pytest
import timm
import torch
import yaml
from timm.data.transforms import str_to_interp_mode
from timm.layers import DropPath
from timm.models import split_model_name_tag

import mambavision  # noqa: F401  (registers the models)
from mambavision.cli import COMMANDS
from mambavision.model import _arch_args
from mambavision.train import INTERPOLATIONS, resolve_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / 'configs').glob('*.yaml'))
# the recipe every published ImageNet-1K config shares (weight decay, warm-up and drop path vary by variant)
PUBLISHED_RECIPE = dict(
    opt='lamb', lr=0.005, epochs=310, batch_size=128, mixup=0.8, cutmix=1.0, smoothing=0.1,
    aa='rand-m9-mstd0.5-inc1', model_ema_decay=0.9998, clip_grad=5.0)


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _train_parser() -> argparse.ArgumentParser:
    """The parser of `mambavision train`, built as the CLI builds it."""
    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS['train'][0]).add_arguments_train(parser)
    return parser


def test_every_published_checkpoint_has_a_config():
    # the ImageNet checkpoints; the dense backbone tags (detection, segmentation) are trained by mmdet/mmseg recipes
    classification = [t for t in timm.list_pretrained('mambavision*') if timm.models.get_pretrained_cfg(t).num_classes]
    assert len(classification) == 11
    assert sorted(_load(p)['model'] for p in CONFIGS) == sorted(classification)
    assert all(p.name == f'{_load(p)["model"]}.yaml' for p in CONFIGS)


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_matches_registered_model(path):
    config = _load(path)
    name = config['model']
    arch = dict(config['architecture'], drop_path_rate=config['train']['drop_path'])
    expected = _arch_args(split_model_name_tag(name)[0])
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items() if k in expected} == expected
    # built from the config and as registered, on the meta device: the same tensors and drop-path rates
    with torch.device('meta'):
        ours = timm.create_model(name, **config['architecture'], drop_path_rate=config['train']['drop_path'])
        registered = timm.create_model(name)
    assert [(n, t.shape) for n, t in ours.state_dict().items()] == \
        [(n, t.shape) for n, t in registered.state_dict().items()]

    def rates(m):
        return [d.drop_prob for d in m.modules() if isinstance(d, DropPath)]

    assert rates(ours) == rates(registered) and rates(ours)
    # weights and eval preprocessing: the pretrained cfg timm uses for this checkpoint
    cfg = timm.models.get_pretrained_cfg(name)
    assert config['weights'] == dict(
        hf_hub_id=cfg.hf_hub_id, hf_hub_filename=cfg.hf_hub_filename, num_classes=cfg.num_classes)
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in config['data'].items()}
    assert data == {k: getattr(cfg, k) for k in data} and set(data) == {
        'input_size', 'crop_pct', 'crop_mode', 'interpolation', 'mean', 'std'}
    assert {k: config['train'][k] for k in PUBLISHED_RECIPE} == PUBLISHED_RECIPE


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_train_accepts_config_and_options_override_it(path):
    config = _load(path)
    args = _train_parser().parse_args(['--config', str(path), '--data-dir', 'unused'])
    resolved = resolve_config(args)
    assert resolved['model'] == config['model']
    assert resolved['architecture'] == config['architecture'] and resolved['weights'] == config['weights']
    assert resolved['data'] == config['data'] and resolved['train'] == config['train']
    args = _train_parser().parse_args([
        '--config', str(path), '--data-dir', 'unused', '--lr', '0.001', '--epochs', '3', '--img-size', '96',
        '--aa', 'none', '--crop-pct', '0.9'])
    resolved = resolve_config(args)
    assert resolved['train'] == dict(config['train'], lr=0.001, epochs=3, aa=None)
    assert resolved['data'] == dict(config['data'], input_size=[3, 96, 96], crop_pct=0.9)


def test_bad_configs_are_refused(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('model: mambavision_t\ntrain:\n  learning_rate: 0.1\n')
    with pytest.raises(ValueError, match=r'unknown keys: train\.learning_rate'):
        resolve_config(_train_parser().parse_args(['--config', str(bad), '--data-dir', 'x']))
    with pytest.raises(ValueError, match='contradicts the config'):
        resolve_config(_train_parser().parse_args(
            ['--config', str(CONFIGS[0]), '--model', 'test_mambavision', '--data-dir', 'x']))
    with pytest.raises(FileNotFoundError, match='config file not found'):
        resolve_config(_train_parser().parse_args(['--config', str(tmp_path / 'none.yaml'), '--data-dir', 'x']))


def test_interpolations_are_timms_and_others_are_refused(tmp_path, capsys):
    for name in INTERPOLATIONS:
        str_to_interp_mode(name)  # timm knows every name we offer
    bad = tmp_path / 'bad.yaml'
    bad.write_text('model: mambavision_t\ndata:\n  interpolation: cubic\n')
    with pytest.raises(ValueError, match=r"data\.interpolation is 'cubic'; expected one of nearest, bilinear"):
        resolve_config(_train_parser().parse_args(['--config', str(bad), '--data-dir', 'x']))
    bad.write_text('model: mambavision_t\ntrain:\n  train_interpolation: cubic\n')
    with pytest.raises(ValueError, match=r"train\.train_interpolation is 'cubic'; expected one of .*, random"):
        resolve_config(_train_parser().parse_args(['--config', str(bad), '--data-dir', 'x']))
    with pytest.raises(SystemExit):
        _train_parser().parse_args(['--model', 'mambavision_t', '--data-dir', 'x', '--interpolation', 'cubic'])
    assert "invalid choice: 'cubic'" in capsys.readouterr().err
