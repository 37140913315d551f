"""The commands say under which licence the published weights they use come (CC-BY-NC-SA-4.0: non-commercial)."""
import json
import os

import huggingface_hub
import pytest
import timm
import torch

import mambavision  # noqa: F401
from mambavision import cli, factory

WEIGHTS_LICENCE = 'cc-by-nc-sa-4.0'


def test_every_published_weight_has_the_weights_licence():
    names = timm.list_models('*mambavision*', pretrained=True)
    assert names and {timm.models.get_pretrained_cfg(n).license for n in names} == {WEIGHTS_LICENCE}


@pytest.fixture
def stub_complexity(monkeypatch):
    monkeypatch.setattr(factory, 'model_complexity', lambda name: (10 ** 6, 10 ** 9))  # counting is tested in test_cli


def test_info_states_the_licences(stub_complexity, capsys):
    assert cli.main(['info']) == 0
    out = capsys.readouterr().out
    assert f"Licences: the published weights {WEIGHTS_LICENCE} (non-commercial), this library's code Apache-2.0." in out
    assert cli.main(['info', '--json']) == 0
    models = json.loads(capsys.readouterr().out)['models']
    assert {m['weights_license'] for m in models} == {WEIGHTS_LICENCE} and len(models) == 9


def test_predict_with_published_weights_states_their_licence(tmp_path, monkeypatch, capsys):
    """Weights of mambavision_t.nv_in1k in the local hub cache (random ones), offline."""
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    snapshot = tmp_path / 'models--nvidia--MambaVision-T-1K' / 'snapshots' / ('a' * 40)
    os.makedirs(snapshot)
    (tmp_path / 'models--nvidia--MambaVision-T-1K' / 'refs').mkdir()
    (tmp_path / 'models--nvidia--MambaVision-T-1K' / 'refs' / 'main').write_text('a' * 40)
    torch.save(timm.create_model('mambavision_t').state_dict(), snapshot / 'mambavision_tiny_1k.pth.tar')
    assert cli.main(['predict', '--model', 'mambavision_t', '--topk', '1']) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f'mambavision predict: published weights of mambavision_t.nv_in1k, licence {WEIGHTS_LICENCE}']
    assert captured.out.splitlines()[0].endswith('sample.jpg')


def test_predict_with_random_weights_states_no_licence(capsys, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    assert cli.main(['predict', '--model', 'test_mambavision', '--topk', '1']) == 0
    assert 'licence' not in capsys.readouterr().err
