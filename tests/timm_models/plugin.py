"""pytest plugin that runs timm's own model tests (its tests/test_models.py) on the MambaVision models.

Loaded with ``-p plugin`` by ``run.py``, before the test file is imported: it registers the models,
selects which of timm's tests run on which of our models (``SELECTION``), and serves the weights of
the pretrained tests from a local Hugging Face cache of random weights, offline (no network at all).
"""
import atexit
import fnmatch
import os
import shutil
import socket
import tempfile

# an empty hub cache of our own, offline, before huggingface_hub is first imported (it reads these at import)
os.environ['HF_HOME'] = tempfile.mkdtemp(prefix='mambavision-timm-tests-hf-')
atexit.register(shutil.rmtree, os.environ['HF_HOME'], True)
os.environ.pop('HF_HUB_CACHE', None)
os.environ['HF_HUB_OFFLINE'] = '1'

import torch  # noqa: E402

import mambavision  # noqa: E402,F401  (registers the models with timm)

# timm test -> our model names it runs on (fnmatch patterns, tags included where the test lists tags).
# On 2 CPU cores the whole selection takes a few minutes: every test runs on the tiny test model and on
# mambavision_t (all its weight tags); the config test (on the meta device, no weights allocated) on every
# model and tag; mambavision_b adds the layer-scale blocks to forward, backward, TorchScript and fx.
_SMALL = ['test_mambavision', 'mambavision_t', 'mambavision_t.*']
SELECTION = {
    'test_model_default_cfgs': ['*mambavision*'],
    'test_model_forward': _SMALL + ['mambavision_b'],
    'test_model_backward': _SMALL + ['mambavision_b'],
    'test_model_forward_torchscript': _SMALL + ['mambavision_b'],
    'test_model_forward_fx': _SMALL + ['mambavision_b'],
    'test_model_backward_fx': _SMALL,
    'test_model_forward_fx_torchscript': _SMALL,
    'test_model_forward_features': _SMALL,
    'test_model_forward_intermediates_features': _SMALL,
    'test_model_forward_intermediates': _SMALL,
    'test_prune_intermediate_layers_contract': _SMALL,
    'test_model_load_pretrained': _SMALL,
    'test_model_features_pretrained': _SMALL,
}
# tests that load weights from the hub: their models get random weights in the local cache
_PRETRAINED_TESTS = ('test_model_load_pretrained', 'test_model_features_pretrained')
_TIMM_MARKERS = ('base', 'forward', 'backward', 'cfg', 'cfg_nonstd', 'torchscript', 'features', 'fxforward',
                 'fxbackward', 'timeout(seconds): per-test time limit (pytest-timeout, when installed)')


def _no_network(*args, **kwargs):
    raise OSError('timm model tests: the network is switched off')


def pytest_configure(config):
    socket.create_connection = _no_network
    for marker in _TIMM_MARKERS:
        config.addinivalue_line('markers', marker)


def _model_name(item):
    callspec = getattr(item, 'callspec', None)
    return callspec.params.get('model_name') if callspec else None


def _selected(item) -> bool:
    name = _model_name(item)
    patterns = SELECTION.get(item.originalname)
    return bool(name and patterns and any(fnmatch.fnmatchcase(name, p) for p in patterns))


def pytest_collection_modifyitems(config, items):
    deselected = [item for item in items if not _selected(item)]
    items[:] = [item for item in items if _selected(item)]
    config.hook.pytest_deselected(items=deselected)
    missing = sorted(set(SELECTION) - {item.originalname for item in items})
    if missing:  # a renamed or removed test in another timm version must not pass unnoticed
        raise RuntimeError(f"timm's test_models.py has no test {', '.join(missing)} for our models")
    _cache_random_weights({_model_name(item) for item in items if item.originalname in _PRETRAINED_TESTS})


def _cache_random_weights(names):
    """Random weights of each model in ``names`` as its hub file in the local cache (huggingface_hub's layout)."""
    import timm
    from huggingface_hub import constants
    for name in sorted(names):
        cfg = timm.models.get_pretrained_cfg(name)
        snapshot = os.path.join(constants.HF_HUB_CACHE, 'models--' + cfg.hf_hub_id.replace('/', '--'))
        os.makedirs(os.path.join(snapshot, 'refs'), exist_ok=True)
        with open(os.path.join(snapshot, 'refs', 'main'), 'w') as f:
            f.write('0' * 40)
        os.makedirs(os.path.join(snapshot, 'snapshots', '0' * 40), exist_ok=True)
        torch.save(timm.create_model(name).state_dict(),
                   os.path.join(snapshot, 'snapshots', '0' * 40, cfg.hf_hub_filename))


def pytest_terminal_summary(terminalreporter):
    ran = {}
    for report in terminalreporter.stats.get('passed', []):
        test, _, params = report.nodeid.split('::')[-1].partition('[')
        ran.setdefault(test, []).append(params.rstrip(']').split('-')[-1])
    terminalreporter.section('timm tests passed, per MambaVision model')
    for test, names in sorted(ran.items()):
        terminalreporter.write_line(f'{test}: {", ".join(sorted(names))}')
