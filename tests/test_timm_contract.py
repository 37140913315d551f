"""timm's model contract beyond plain forward: factory device/dtype, fx / TorchScript / tracing without the
eager input check, and fine-tuned models shared the timm way (``save_for_hf``, ``push_to_hf_hub``) loading back
through ``local-dir:`` and ``hf-hub:``. timm's own model tests run on our models via tests/timm_models/run.py."""
import io
import shutil
import socket
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from huggingface_hub.utils import EntryNotFoundError
from torchvision.models.feature_extraction import create_feature_extractor

import mambavision  # noqa: F401
from timm.models import push_to_hf_hub, save_for_hf


def _model(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('test_mambavision', **kwargs).eval()


@pytest.mark.parametrize('name', ['test_mambavision', 'mambavision_l3_512', 'mambavision_t.nv_coco'])
def test_factory_builds_on_the_meta_device(name):
    model = timm.create_model(name, device='meta')
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {'meta'}


def test_factory_dtype_and_forward_in_it():
    model = _model(dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = _model()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, expected = model(x.bfloat16()), reference(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_reset_classifier_keeps_device_dtype_and_frozen():
    model = _model().to(torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(7)
    assert model.head.fc.weight.dtype == torch.float64 and model(torch.randn(1, 3, 64, 64).double()).shape == (1, 7)
    model.requires_grad_(False)
    model.reset_classifier(0, '')
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize('x, got', [
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), '(1, 3, 64, 64) torch.uint8'),
    (torch.zeros(3, 64, 64), '(3, 64, 64) torch.float32'),
    (torch.zeros(1, 4, 64, 64), '(1, 4, 64, 64) torch.float32'),
    ([[0.]], 'list'),
])
@pytest.mark.parametrize('method', ['forward', 'forward_features', 'forward_intermediates'])
def test_eager_bad_input_is_one_line(x, got, method):
    with pytest.raises(ValueError) as info:
        getattr(_model(), method)(x)
    message = str(info.value)
    assert message == f'MambaVision expects a float tensor of shape (B, 3, H, W), got {got}'


def test_torchvision_feature_extractor_traces_the_model():
    """torchvision's fx feature extraction on the plain model: stage outputs equal, the scan one opaque call."""
    model = _model()
    nodes = {f'stages.{i}': f'stage{i}' for i in range(4)}
    extractor = create_feature_extractor(model, return_nodes=nodes)
    x = torch.randn(2, 3, 72, 88)  # padded windows: the shape arithmetic is traced, not frozen
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        got = extractor(x)
    for i, tensor in enumerate(expected):
        torch.testing.assert_close(got[f'stage{i}'], tensor)
    assert sum('_mixer_scan' in str(node.target) for node in extractor.graph.nodes) == 2  # one mixer per windowed stage


def test_timm_fx_features_only():
    torch.manual_seed(0)  # the weights of _model(num_classes=0): features_only models have no classifier
    features = timm.create_model('test_mambavision', features_only=True, feature_cls='fx').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = _model(num_classes=0).forward_intermediates(x, intermediates_only=True)
        for got, tensor in zip(features(x), expected, strict=True):
            torch.testing.assert_close(got, tensor)


def test_torchscript_saves_loads_and_matches():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit is deprecated, still used by timm users
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(model), buffer)
        buffer.seek(0)
        scripted = torch.jit.load(buffer)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_tracing_runs_no_input_check():
    """torch.jit.trace (the TorchScript-based ONNX exporter's tracer) meets none of the check's Python-level
    shape tests: no TracerWarning comes from model.py, and the trace matches eager."""
    model = _model()
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter('always')
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), model(x))
    tracer_warnings = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    assert not [w for w in tracer_warnings if w.filename.endswith('model.py')]


# ---------------------------------------------------------------------------------------------
# sharing fine-tuned models


def _fine_tuned():
    """A 'fine-tuned' model: published architecture and tag, new class count, weights moved off the init."""
    torch.manual_seed(0)
    model = timm.create_model(
        'mambavision_t.nv_in1k', num_classes=5, depths=(1, 1, 2, 2), dim=16, in_dim=8, num_heads=(1, 1, 2, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _assert_same_model(loaded, model):
    assert loaded.num_classes == 5 and loaded.pretrained_cfg['num_classes'] == 5
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)


@pytest.fixture
def no_network(monkeypatch):
    def connect(*args, **kwargs):
        raise AssertionError('the network was touched')
    monkeypatch.setattr(socket, 'create_connection', connect)


@pytest.mark.parametrize('safe_serialization', [True, False])
def test_save_for_hf_loads_back_from_local_dir(tmp_path, no_network, safe_serialization):
    model = _fine_tuned()
    save_for_hf(model, tmp_path / 'fine-tuned', safe_serialization=safe_serialization)
    loaded = timm.create_model(f'local-dir:{tmp_path / "fine-tuned"}', pretrained=True)
    assert loaded.pretrained_cfg['license'] == 'cc-by-nc-sa-4.0'  # a model trained from the published weights
    _assert_same_model(loaded, model)


class FakeHub:
    """The Hugging Face hub as a folder per repo: what ``push_to_hf_hub`` and ``create_model('hf-hub:...')`` call."""

    def __init__(self, root: Path):
        self.root = root

    def create_repo(self, repo_id, **kwargs):
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id)

    def file_exists(self, repo_id, filename, **kwargs):
        return (self.root / repo_id / filename).is_file()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)

    def download(self, repo_id, filename, **kwargs):
        path = self.root / repo_id / filename
        if not path.is_file():
            raise EntryNotFoundError(f'{repo_id}/{filename}')
        return str(path)


def test_push_to_hub_loads_back_from_hf_hub(tmp_path, no_network, monkeypatch):
    hub = FakeHub(tmp_path / 'hub')
    monkeypatch.setattr(timm.models._hub, 'HfApi', lambda **kwargs: hub)
    monkeypatch.setattr(timm.models._hub, 'hf_hub_download', hub.download)
    model = _fine_tuned()
    # the model card's licence defaults to apache-2.0: a model fine-tuned from the published weights passes theirs
    push_to_hf_hub(model, 'someone/mambavision-t-flowers', model_card=dict(license=model.pretrained_cfg['license']))
    repo = tmp_path / 'hub/someone/mambavision-t-flowers'
    assert {'config.json', 'model.safetensors', 'README.md'} <= {p.name for p in repo.iterdir()}
    assert 'license: cc-by-nc-sa-4.0' in (repo / 'README.md').read_text().splitlines()
    _assert_same_model(timm.create_model('hf-hub:someone/mambavision-t-flowers', pretrained=True), model)


def test_readme_recipe_shares_a_training_checkpoint(tmp_path, no_network):
    """README: a checkpoint written by ``mambavision train`` -> create_model(file=...) -> save_for_hf -> local-dir:."""
    model = _fine_tuned()
    checkpoint = tmp_path / 'best.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'state_dict_ema': {}, 'epoch': 3}, checkpoint)
    small = dict(depths=(1, 1, 2, 2), dim=16, in_dim=8, num_heads=(1, 1, 2, 2))
    trained = timm.create_model('mambavision_t.nv_in1k', num_classes=5, pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(checkpoint)), **small)
    save_for_hf(trained, tmp_path / 'mambavision-t-flowers')
    _assert_same_model(timm.create_model(f'local-dir:{tmp_path / "mambavision-t-flowers"}', pretrained=True), model)
