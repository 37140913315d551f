"""Weight files: every published and local form loads through timm, unsafe or broken files are refused clearly."""
import argparse
import json
import os
import pickle
import pickletools
import socket
import sys
import time
import types

import huggingface_hub
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models._manipulate import adapt_input_conv

import mambavision.weights
from mambavision import checkpoint_filter_fn, read_state_dict
from mambavision.dense.detection import create_detector
from mambavision.dense.segmentation import create_segmenter
from mambavision.train import save_checkpoint
from mambavision.weights import checkpoint_classes, load_pretrained_file, model_args_from_checkpoint, read_checkpoint

from conftest import FIXTURES

TOL = 1e-4


def _optimizer_state() -> dict:
    param = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([param], lr=1e-3)
    param.sum().backward()
    opt.step()
    return opt.state_dict()


def _training_checkpoint(state_dict: dict, prefix: str = '') -> dict:
    """The published ``.pth.tar`` form: weights under 'state_dict', beside a different EMA copy and training state."""
    return {
        'epoch': 309,
        'arch': 'mamba_vision_T',
        'state_dict': {prefix + k: v for k, v in state_dict.items()},
        'state_dict_ema': {prefix + k: v + 1 if v.is_floating_point() else v for k, v in state_dict.items()},
        'optimizer': _optimizer_state(),
        'args': argparse.Namespace(model='mamba_vision_T', lr=1e-3, drop_path=0.2, mesa=False, input_size=None),
        'metric': 82.3,
        'version': 2,
    }


def _write(path, obj):
    if str(path).endswith('.safetensors'):
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return str(path)


def _create(fixture, path, **kwargs):
    kwargs = dict(fixture.arch, **kwargs)
    return timm.create_model(
        'test_mambavision', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


def _assert_fixture_logits(model, fixture):
    """Logits of the published code on the odd-sized input (the other input: test_exactness)."""
    with torch.no_grad():
        assert (model(fixture['input.1']) - fixture['logits.1']).abs().max() <= TOL


FORMS = {  # file name -> its content, from a fixture
    'published.pth.tar': lambda f: _training_checkpoint(f.state_dict),
    'published_ddp.pth.tar': lambda f: _training_checkpoint(f.state_dict, prefix='module.'),
    'plain.pth': lambda f: dict(f.state_dict),
    'plain.bin': lambda f: dict(f.state_dict),
    'plain.safetensors': lambda f: dict(f.state_dict),
    'transformers.safetensors': lambda f: {'model.' + k: v for k, v in f.state_dict.items()},
    'transformers.bin': lambda f: {'model.' + k: v for k, v in f.state_dict.items()},
    'ours.pth': lambda f: f.our_state_dict,
    'ours.safetensors': lambda f: f.our_state_dict,
}


@pytest.mark.parametrize('filename', list(FORMS))
def test_every_weight_form_reproduces_the_fixture(tiny_b, filename, tmp_path):
    path = _write(tmp_path / filename, FORMS[filename](tiny_b))
    _assert_fixture_logits(_create(tiny_b, path), tiny_b)


def test_training_checkpoint_takes_state_dict_not_ema(tiny_a, tmp_path):
    path = _write(tmp_path / 'published.pth.tar', _training_checkpoint(tiny_a.state_dict))
    weights = read_state_dict(path)
    assert set(weights) == set(tiny_a.state_dict)
    for k, v in tiny_a.state_dict.items():
        assert torch.equal(weights[k], v), k


class _Opener:
    """Unpickling this calls ``open(marker, 'w')``: it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


class _Custom:
    pass


@pytest.mark.parametrize('payload', ['code', 'custom_class'])
def test_unsafe_pickle_is_refused_without_running(tiny_a, payload, tmp_path):
    marker = tmp_path / 'payload_ran'
    obj = _Opener(marker) if payload == 'code' else _Custom()
    path = _write(tmp_path / 'evil.pth.tar', {'state_dict': tiny_a.state_dict, 'extra': obj})
    for load in (lambda: read_state_dict(path), lambda: _create(tiny_a, path)):
        with pytest.raises(RuntimeError) as info:
            load()
        message = str(info.value)
        assert 'evil.pth.tar' in message and 'not allowed' in message and '\n' not in message
        assert not marker.exists(), 'the pickle payload ran'


@pytest.mark.parametrize('filename', ['published.pth.tar', 'plain.safetensors'])
@pytest.mark.parametrize('keep', [0, 9, 4096])
def test_truncated_file_is_refused(tiny_a, filename, keep, tmp_path):
    good = _write(tmp_path / f'good_{filename}', FORMS[filename](tiny_a))
    path = tmp_path / filename
    path.write_bytes(open(good, 'rb').read()[:keep])
    _assert_broken(lambda: _create(tiny_a, path), filename)


@pytest.mark.parametrize('content', [bytes(range(256)) * 4, b'\x80\x02garbage', b'PK\x03\x04' + bytes(500)])
def test_garbage_file_is_refused(tiny_a, content, tmp_path):
    path = tmp_path / 'garbage.pth'
    path.write_bytes(content)
    _assert_broken(lambda: _create(tiny_a, path), 'garbage.pth')


def _assert_broken(load, filename):
    with pytest.raises(RuntimeError) as info:
        load()
    message = str(info.value)
    assert filename in message and 'truncated, corrupt or not a weight file' in message, message
    assert 'not allowed' not in message and '\n' not in message


def test_non_dict_pickle_is_refused(tiny_a, tmp_path):
    path = _write(tmp_path / 'list.pth', [torch.zeros(1)])
    with pytest.raises(RuntimeError, match='list.pth'):
        _create(tiny_a, path)


def _published_with(fixture, edit) -> dict:
    sd = dict(fixture.state_dict)
    edit(sd)
    return sd


@pytest.mark.parametrize('edit, problem, name', [
    (lambda sd: sd.pop('levels.2.blocks.0.mixer.A_log'), 'missing', 'stages.2.blocks.0.mixer.A_log'),
    (lambda sd: sd.pop('patch_embed.conv_down.1.running_var'), 'missing', 'stem.norm1.running_var'),
    (lambda sd: sd.pop('head.weight'), 'missing', 'head.fc.weight'),
    (lambda sd: sd.update({'levels.3.blocks.0.mixer.extra': torch.zeros(2)}),
     'unexpected', 'stages.3.blocks.0.mixer.extra'),
    (lambda sd: sd.update({'levels.2.blocks.1.mixer.D': torch.zeros(3)}), 'wrong shape', 'stages.2.blocks.1.mixer.D'),
])
def test_checkpoint_that_does_not_fit_names_the_tensor(tiny_a, edit, problem, name, tmp_path):
    path = _write(tmp_path / 'bad.pth.tar', {'state_dict': _published_with(tiny_a, edit)})
    with pytest.raises(RuntimeError) as info:
        _create(tiny_a, path)
    message = str(info.value)
    assert 'bad.pth.tar' in message and f'{problem}: {name}' in message and '\n' not in message


@pytest.mark.parametrize('num_classes', [3, 0])
def test_other_class_count_keeps_fresh_classifier(tiny_b, num_classes, tmp_path):
    tiny = tiny_b
    path = _write(tmp_path / 'published.pth.tar', _training_checkpoint(tiny.state_dict))
    model = _create(tiny, path, num_classes=num_classes)
    assert model.num_classes == num_classes
    loaded = tiny.our_state_dict
    for name, value in model.state_dict().items():
        if name.startswith('head.fc.'):
            assert value.shape[0] == num_classes
            assert not value.any() if name.endswith('bias') else value.std() < 0.03  # trunc_normal(.02) init
        else:
            assert torch.equal(value, loaded[name]), name
    assert set(model.state_dict()) == set(tiny.create_model(num_classes=num_classes).state_dict())
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(tiny['input.1']), pre_logits=True)
    assert (pooled - tiny['pooled.1']).abs().max() <= TOL


def test_file_without_classifier_loads_as_backbone(tiny_a, tmp_path):
    backbone = {k: v for k, v in tiny_a.state_dict.items() if not k.startswith('head.')}
    path = _write(tmp_path / 'backbone.safetensors', backbone)
    with pytest.raises(RuntimeError, match='missing: head.fc.weight, head.fc.bias'):
        _create(tiny_a, path)
    model = _create(tiny_a, path, num_classes=0)
    with torch.no_grad():
        assert (model(tiny_a['input.0']) - tiny_a['pooled.0']).abs().max() <= TOL


@pytest.mark.parametrize('in_chans', [1, 4])
def test_other_input_channels_adapt_first_conv(tiny_a, in_chans, tmp_path):
    path = _write(tmp_path / 'published.pth.tar', _training_checkpoint(tiny_a.state_dict))
    model = _create(tiny_a, path, in_chans=in_chans)
    conv = tiny_a.state_dict['patch_embed.conv_down.0.weight']
    assert torch.equal(model.stem.conv1.weight, adapt_input_conv(in_chans, conv))
    assert torch.equal(model.stem.conv2.weight, tiny_a.state_dict['patch_embed.conv_down.3.weight'])
    assert model(torch.randn(1, in_chans, 40, 40)).shape == (1, tiny_a.arch['num_classes'])


# --- a checkpoint of ours brings its classifier: class count and class names ---

CLASSES = ['cat', 'dog', 'fox']


def _our_checkpoint(tiny, path, classes=CLASSES, num_classes=None) -> str:
    """What ``mambavision train`` writes after a fine-tune on a folder of ``classes`` (``num_classes`` outputs)."""
    num_classes = num_classes or len(classes)
    torch.manual_seed(0)
    model = tiny.create_model(num_classes=num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = dict(model='test_mambavision', architecture=_architecture(tiny), num_classes=num_classes, classes=classes,
                  data=dict(input_size=[3, 32, 32]), train=dict(epochs=1, lr=1e-3))
    save_checkpoint(dict(
        arch='test_mambavision', epoch=0, state_dict=model.state_dict(), state_dict_ema=None,
        optimizer=optimizer.state_dict(), scheduler=dict(t_initial=1), scaler=None, config=config,
        metrics=dict(epoch=0, top1=50.), best_top1=50.), str(path))
    return str(path)


def _architecture(tiny) -> dict:
    return {k: v for k, v in tiny.arch.items() if k != 'num_classes'}


def test_checkpoint_of_ours_builds_its_own_classifier(tiny_a, tmp_path):
    path = _our_checkpoint(tiny_a, tmp_path / 'best.pth.tar')
    assert checkpoint_classes(read_checkpoint(path)) == (3, CLASSES)
    model = timm.create_model('test_mambavision', **model_args_from_checkpoint(path), **_architecture(tiny_a)).eval()
    assert model.num_classes == 3 and model.pretrained_cfg['label_names'] == CLASSES
    _assert_weights(model, read_state_dict(path))
    x = tiny_a['input.0']
    with torch.no_grad():
        assert model(x).shape == (len(x), 3)


def test_class_names_travel_with_a_shared_model(tiny_a, tmp_path):
    """timm's save_for_hf keeps them (pretrained_cfg label_names), so local-dir: and hf-hub: loads name the classes."""
    from timm.models import save_for_hf

    path = _our_checkpoint(tiny_a, tmp_path / 'best.pth.tar')
    model = timm.create_model('test_mambavision', **model_args_from_checkpoint(path), **_architecture(tiny_a))
    save_for_hf(model, str(tmp_path / 'shared'))
    again = timm.create_model(f'local-dir:{tmp_path / "shared"}', pretrained=True)
    assert again.num_classes == 3 and again.pretrained_cfg['label_names'] == CLASSES
    _assert_weights(again, model.state_dict())


def test_checkpoint_names_fewer_classes_than_outputs(tiny_a, tmp_path):
    path = _our_checkpoint(tiny_a, tmp_path / 'best.pth.tar', classes=['cat', 'dog'], num_classes=4)
    overlay = model_args_from_checkpoint(path)['pretrained_cfg_overlay']
    assert overlay['num_classes'] == 4 and overlay['label_names'] == ['cat', 'dog', 'class 2', 'class 3']


@pytest.mark.parametrize('form, num_classes', [('published.pth.tar', 10), ('plain.safetensors', 10), ('backbone', 0)])
def test_other_files_give_their_classifier_rows(tiny_a, form, num_classes, tmp_path):
    if form == 'backbone':
        backbone = {k: v for k, v in tiny_a.state_dict.items() if not k.startswith('head.')}
        path = _write(tmp_path / 'backbone.pth', backbone)
    else:
        path = _write(tmp_path / form, FORMS[form](tiny_a))
    assert checkpoint_classes(read_checkpoint(path)) == (num_classes, None)
    args = model_args_from_checkpoint(path)
    assert args['pretrained_cfg_overlay'] == dict(file=path, num_classes=num_classes)
    model = timm.create_model('test_mambavision', **args, **_architecture(tiny_a))
    assert model.num_classes == num_classes and model.pretrained_cfg.get('label_names') is None


def test_classifier_that_does_not_fit_is_an_error(tiny_a, tmp_path):
    """The model's class count as its config declares (nobody asked for another): never a silent fresh head."""
    path = _our_checkpoint(tiny_a, tmp_path / 'best.pth.tar')
    with pytest.raises(RuntimeError) as info:
        timm.create_model('test_mambavision', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                          **_architecture(tiny_a))
    message = str(info.value)
    assert 'best.pth.tar has a 3-class classifier, the model 1000 classes' in message and 'num_classes=3' in message
    assert '\n' not in message
    bare = timm.create_model('test_mambavision', **_architecture(tiny_a))
    del bare.pretrained_cfg  # a model that declares nothing about the file
    with pytest.raises(RuntimeError, match='has a 3-class classifier'):
        load_pretrained_file(bare, path)


def test_another_class_count_asked_for_fine_tunes(tiny_a, tmp_path):
    """Asking for another class count than the file's is timm's fine-tuning: the file's classifier is left out."""
    path = _our_checkpoint(tiny_a, tmp_path / 'best.pth.tar')
    model = timm.create_model('test_mambavision', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                              num_classes=5, **_architecture(tiny_a))
    assert model.num_classes == 5
    loaded = read_state_dict(path)
    for name, value in model.state_dict().items():
        if not name.startswith('head.fc.'):
            assert torch.equal(value, loaded[name]), name


# --- checkpoints as mmengine 0.10.7's runner writes them (pickle protocol 2, as torch.save) ---

HISTORY_BUFFER_MODULE = 'mmengine.logging.history_buffer'


class HistoryBuffer:
    """Stands in for mmengine's ``HistoryBuffer`` (0.10.7) and pickles as it does: its ``__getstate__`` adds
    ``statistics_methods``, its methods, which protocol 2 writes as ``builtins.getattr(HistoryBuffer, 'min')``."""
    _statistics_methods: dict = {}

    def __init__(self, log_history=(), count_history=(), max_length=1000000):
        self.max_length = max_length
        for name in ('min', 'max', 'current', 'mean'):
            self._statistics_methods.setdefault(name, getattr(HistoryBuffer, name))
        self._log_history = np.array(log_history)
        self._count_history = np.array(count_history)

    def mean(self):
        return self._log_history.sum() / self._count_history.sum()

    def max(self):
        return self._log_history.max()

    def min(self):
        return self._log_history.min()

    def current(self):
        return self._log_history[-1]

    def __getstate__(self):
        self.__dict__.update(statistics_methods=self._statistics_methods)
        return self.__dict__


for _obj in (HistoryBuffer, *vars(HistoryBuffer).values()):
    if callable(_obj):
        _obj.__module__ = HISTORY_BUFFER_MODULE


@pytest.fixture
def mmengine_names(monkeypatch):
    """``HistoryBuffer`` importable under mmengine's module name while pickling, as in a training run."""
    names = HISTORY_BUFFER_MODULE.split('.')
    for i in range(1, len(names) + 1):
        monkeypatch.setitem(sys.modules, '.'.join(names[:i]), types.ModuleType('.'.join(names[:i])))
    monkeypatch.setattr(sys.modules[HISTORY_BUFFER_MODULE], 'HistoryBuffer', HistoryBuffer, raising=False)


def runner_checkpoint(state_dict: dict) -> dict:
    """What mmengine's ``Runner.save_checkpoint`` writes: meta, weights, message hub, optimizer, schedulers."""
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([param], lr=1e-4)
    param.sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=2)
    meta = dict(epoch=1, iter=4, cfg="model = dict(type='CascadeRCNN')\n", seed=0, experiment_name='x',
                time='20261206_220018', mmengine_version='0.10.7', dataset_meta=dict(classes=('a', 'b')))
    scalars = {name: HistoryBuffer([value] * 2, [1] * 2) for name, value in (('train/lr', 1e-4), ('train/loss', .14))}
    return dict(
        meta=meta, state_dict=state_dict,
        message_hub=dict(log_scalars=scalars, runtime_info=dict(meta, iter=np.int64(4)), resumed_keys=dict(iter=True)),
        optimizer=optimizer.state_dict(), param_schedulers=[scheduler.state_dict()])


def save_runner_checkpoint(checkpoint: dict, path, zip_format: bool) -> str:
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zip_format)
    return str(path)


def test_runner_checkpoint_holds_getattr_of_history_buffer(mmengine_names):
    """The stand-in pickles as the runner's file does (the failure this reader once had)."""
    data = pickle.dumps(HistoryBuffer([1.5], [1]), protocol=2)
    globals_ = [arg for op, arg, _ in pickletools.genops(data) if op.name == 'GLOBAL']
    assert globals_[0] == f'{HISTORY_BUFFER_MODULE} HistoryBuffer' and globals_.count('__builtin__ getattr') == 1
    assert data.count(b'h\x00X') == 4  # getattr(<memoised HistoryBuffer>, name), once per statistics method


ZIP_FORMATS = pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])


@ZIP_FORMATS
def test_runner_checkpoint_loads(tiny_a, mmengine_names, zip_format, tmp_path):
    path = save_runner_checkpoint(runner_checkpoint(dict(tiny_a.state_dict)), tmp_path / 'epoch_1.pth', zip_format)
    checkpoint = read_checkpoint(path)
    assert list(checkpoint) == ['meta', 'state_dict', 'message_hub', 'optimizer', 'param_schedulers']
    assert checkpoint['meta']['dataset_meta'] == dict(classes=('a', 'b'))
    assert all(isinstance(b, mambavision.weights.Inert) for b in checkpoint['message_hub']['log_scalars'].values())
    weights = read_state_dict(path)
    assert weights.keys() == tiny_a.state_dict.keys()
    assert all(torch.equal(weights[k], v) for k, v in tiny_a.state_dict.items())
    _assert_fixture_logits(_create(tiny_a, path), tiny_a)  # timm's pretrained_cfg_overlay file


def _tiny_backbone():
    return dict(backbone_kwargs=dict(dim=16, in_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)))


@ZIP_FORMATS
@pytest.mark.parametrize('create, name, kwargs', [
    (create_segmenter, 'upernet_mambavision_t.nv_ade20k', dict(channels=16, aux_channels=8, num_classes=5)),
    (create_detector, 'cascade_mask_rcnn_mambavision_t.nv_coco', dict(channels=16, fc_channels=16, num_classes=3)),
], ids=['segmenter', 'detector'])
def test_runner_checkpoint_loads_into_dense_models(mmengine_names, create, name, kwargs, zip_format, tmp_path):
    torch.manual_seed(0)
    source = create(name, **_tiny_backbone(), **kwargs)
    path = save_runner_checkpoint(runner_checkpoint(source.state_dict()), tmp_path / 'iter_4.pth', zip_format)
    loaded = create(name, checkpoint_path=path, **_tiny_backbone(), **kwargs)
    for (key, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize('filename', ['mmengine_runner_zip.pth', 'mmengine_runner_legacy.pth'])
def test_checkpoint_written_by_mmengine_runner_loads(filename):
    """Files mmengine 0.10.7's runner wrote (tests/fixtures/make_mmengine_runner_checkpoints.py)."""
    path = str(FIXTURES / filename)
    assert open(path, 'rb').read().count(b'getattr') == 1  # HistoryBuffer's statistics_methods, memoised once
    checkpoint = read_checkpoint(path)
    assert sorted(checkpoint) == ['message_hub', 'meta', 'optimizer', 'param_schedulers', 'state_dict']
    assert checkpoint['meta']['mmengine_version'].startswith('0.10.7') and checkpoint['meta']['dataset_meta'] == dict(
        classes=('a', 'b'))
    assert set(checkpoint['message_hub']['log_scalars']) >= {'train/loss', 'train/lr'}
    weights = read_state_dict(path)
    assert weights.keys() == {'fc.weight', 'fc.bias'} and weights['fc.weight'].shape == (2, 4)
    assert weights['fc.bias'].tolist() == pytest.approx([0.4760401248931885, -0.17636080086231232])


class _Call:
    """Pickles as ``func(*args)``: a plain unpickler would run it."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __call__(self, *args):  # pickle wants a callable; only the unpickler's call would matter
        raise AssertionError('never called')

    def __reduce__(self):
        return self.func, self.args


def _getattr_payload(start, marker):
    """``start.__globals__.get('os').system('touch marker')`` as a chain of ``getattr`` and calls."""
    module_globals = _Call(getattr, _Call(getattr, start, '__globals__'), 'get')
    return _Call(_Call(getattr, _Call(module_globals, 'os'), 'system'), f'touch {marker}')


GETATTR_PAYLOADS = {  # each, unpickled for real, creates the marker file
    'getattr chain from a torch function to os': lambda m: _getattr_payload(torch._utils._rebuild_tensor_v2, m),
    'getattr(builtins, eval)': lambda marker: _Call(
        _Call(getattr, _Call(getattr, getattr, '__self__'), 'eval'), f'open({str(marker)!r}, "w")'),
    'getattr chain from HistoryBuffer to os': lambda marker: _getattr_payload(HistoryBuffer.__init__, marker),
}


@ZIP_FORMATS
@pytest.mark.parametrize('payload', list(GETATTR_PAYLOADS))
def test_getattr_beyond_inert_stand_ins_is_refused_without_running(
        tiny_a, mmengine_names, payload, zip_format, tmp_path):
    marker = tmp_path / 'payload_ran'
    checkpoint = runner_checkpoint(dict(tiny_a.state_dict))
    checkpoint['message_hub']['runtime_info']['hook'] = GETATTR_PAYLOADS[payload](marker)
    path = save_runner_checkpoint(checkpoint, tmp_path / 'evil.pth', zip_format)
    for load in (lambda: read_checkpoint(path), lambda: _create(tiny_a, path),
                 lambda: create_segmenter('upernet_mambavision_t.nv_ade20k', checkpoint_path=path, **_tiny_backbone())):
        with pytest.raises(RuntimeError) as info:
            load()
        message = str(info.value)
        assert 'evil.pth' in message and 'not allowed' in message and '\n' not in message, message
        assert not marker.exists(), 'the pickle payload ran'
    torch.load(path, weights_only=False)  # the payload is real: a reader that honours getattr runs it
    assert marker.exists()


# --- the Hugging Face hub path, on the real mambavision_t registration (never touching the network) ---

HUB_REPO, HUB_FILE = 'nvidia/MambaVision-T-1K', 'mambavision_tiny_1k.pth.tar'


@pytest.fixture(scope='module')
def full_size_t(tmp_path_factory):
    """A random mambavision_t checkpoint in the published form: (path, weights in our names)."""
    keys = json.loads((FIXTURES / 'official_state_dict_keys.json').read_text())['mamba_vision_T']
    g = torch.Generator().manual_seed(0)
    published = {
        name: torch.tensor(7) if name.endswith('num_batches_tracked') else torch.rand(shape, generator=g) - 0.5
        for name, shape in keys}
    path = tmp_path_factory.mktemp('hub') / HUB_FILE
    torch.save(_training_checkpoint(published, prefix='module.'), path)
    return str(path), checkpoint_filter_fn(published)


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty Hugging Face cache, and any network connection fails the test."""
    def connect(*args, **kwargs):
        raise AssertionError('the network was touched')

    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hf_cache'))
    monkeypatch.setattr(socket, 'create_connection', connect)
    monkeypatch.setattr(timm.models._hub, 'hf_hub_download', connect)


def _assert_weights(model, weights):
    own = model.state_dict()
    assert set(own) == set(weights)
    for k, v in weights.items():
        assert torch.equal(own[k], v), k


def test_hub_download_goes_through_hf_hub_download(full_size_t, no_network, monkeypatch):
    path, weights = full_size_t
    calls = []

    def download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return path

    monkeypatch.setattr(mambavision.weights, '_hub_reachable', lambda *a, **k: True)
    monkeypatch.setattr(timm.models._hub, 'hf_hub_download', download)
    model = timm.create_model('mambavision_t.nv_in1k', pretrained=True)
    assert calls == [(HUB_REPO, HUB_FILE)]
    _assert_weights(model, weights)


def _fake_hub_cache(cache_dir, path):
    """``path`` as the cached hub file of the mambavision_t.nv_in1k weights, in huggingface_hub's cache layout."""
    repo, commit = os.path.join(cache_dir, 'models--nvidia--MambaVision-T-1K'), 'a' * 40
    os.makedirs(f'{repo}/refs')
    os.makedirs(f'{repo}/snapshots/{commit}')
    with open(f'{repo}/refs/main', 'w') as f:
        f.write(commit)
    os.symlink(path, f'{repo}/snapshots/{commit}/{HUB_FILE}')


@pytest.mark.parametrize('where', ['default', 'cache_dir'])
def test_hub_cache_hit_loads_offline(full_size_t, no_network, monkeypatch, where, tmp_path):
    path, weights = full_size_t
    kwargs = dict(cache_dir=str(tmp_path / 'own_cache')) if where == 'cache_dir' else {}
    _fake_hub_cache(kwargs.get('cache_dir', huggingface_hub.constants.HF_HUB_CACHE), path)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    _assert_weights(timm.create_model('mambavision_t.nv_in1k', pretrained=True, **kwargs), weights)


def test_hub_through_proxy(full_size_t, no_network, monkeypatch):
    """Behind an HTTPS proxy (direct connections blocked) the download still goes ahead."""
    path, weights = full_size_t
    probed = []

    class Connection:
        def close(self):
            pass

    def connect(address, *args, **kwargs):
        probed.append(address)
        if address != ('proxy.example', 3128):
            raise OSError('Network is unreachable')
        return Connection()

    monkeypatch.setenv('HTTPS_PROXY', 'http://proxy.example:3128')
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(socket, 'create_connection', connect)
    monkeypatch.setattr(timm.models._hub, 'hf_hub_download', lambda repo_id, filename, **kwargs: path)
    _assert_weights(timm.create_model('mambavision_t.nv_in1k', pretrained=True), weights)
    assert probed == [('proxy.example', 3128)]


@pytest.mark.parametrize('why', ['HF_HUB_OFFLINE', 'unreachable'])
def test_offline_fails_fast_with_one_line(why, no_network, monkeypatch):
    if why == 'HF_HUB_OFFLINE':
        monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    else:
        def refuse(*args, **kwargs):
            raise OSError('Network is unreachable')

        monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
        monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
        monkeypatch.setattr(socket, 'create_connection', refuse)
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        timm.create_model('mambavision_t.nv_in1k', pretrained=True)
    assert time.perf_counter() - start < 2
    message = str(info.value)
    assert HUB_REPO in message and 'pretrained_cfg_overlay' in message and '\n' not in message
