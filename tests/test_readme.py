"""Every python block of README.md runs as printed, offline, each in a fresh namespace.

The blocks run in a folder holding the files they name as a user's own (``photo.jpg``, ``room.jpg``,
``street.jpg``: the sample image; ``mambavision_tiny_1k.pth.tar``: weights). To keep this fast and offline,
every MambaVision architecture is built tiny (``test_mambavision``'s sizes), the dense models' test scale is
small, the Hugging Face cache answers every published file with random weights of the (tiny) model it belongs
to, and ``torch.compile`` returns the model as it is (compiling is tested in tests/test_compile.py).

A block that cannot run offline is preceded by the line ``<!-- readme-test: skip (why) -->``; keep them few
(``test_skipped_blocks_are_few`` pins the list).
"""
import dataclasses
import re
import shutil

import pytest
import timm
import torch

import mambavision
from mambavision import model as model_module
from mambavision import published as published_module
from mambavision.images import sample_image

from conftest import REPO

BLOCK = re.compile(r'^(?:<!-- readme-test: skip \((?P<skip>[^)]*)\) -->\n)?```python\n(?P<code>.*?)^```$', re.M | re.S)
SKIPPED = {'needs a fine-tuned checkpoint, runs/flowers/best.pth.tar, and a Hugging Face login'}


def readme_blocks():
    """[(line number, code, skip reason or None)] of README.md's python blocks."""
    text = (REPO / 'README.md').read_text()
    return [(text[:m.start('code')].count('\n') + 1, m['code'], m['skip']) for m in BLOCK.finditer(text)]


@pytest.fixture(scope='module')
def offline_world(tmp_path_factory):
    """The blocks' folder, with the tiny models and the cache of random published files in place."""
    folder = tmp_path_factory.mktemp('readme')
    files = tmp_path_factory.mktemp('published')
    tiny = model_module.ARCHS['test_mambavision']
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('HF_HUB_OFFLINE', '1')
        for name in [n for n in model_module.ARCHS if n.startswith('mambavision')]:
            mp.setitem(model_module.ARCHS, name, tiny)
        for name, entry in published_module.PUBLISHED_MODELS.items():
            mp.setitem(published_module.PUBLISHED_MODELS, name, dataclasses.replace(entry, test_scale=(96, 64)))
        mp.setattr(torch, 'compile', lambda model, *args, **kwargs: model)

        def random_published_file(repo_id, filename, *args, **kwargs):
            path = files / filename
            if not path.exists():
                torch.save({'state_dict': _model_of(repo_id).state_dict()}, path)
            return str(path)
        import huggingface_hub
        mp.setattr(huggingface_hub, 'try_to_load_from_cache', random_published_file)

        for name in ('photo.jpg', 'room.jpg', 'street.jpg'):
            shutil.copy(sample_image(), folder / name)
        shutil.copy(random_published_file('nvidia/MambaVision-T-1K', 'mambavision_tiny_1k.pth.tar'), folder)
        yield folder


def _model_of(repo_id: str) -> torch.nn.Module:
    """The (tiny) model whose published file lives in Hugging Face repo ``repo_id``."""
    for entry in published_module.PUBLISHED_MODELS.values():
        if entry.hf_repo == repo_id:
            factory = mambavision.create_detector if entry.task == 'det' else mambavision.create_segmenter
            return factory(entry.name)
    for name in timm.list_models('mambavision*', pretrained=True):
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg.hf_hub_id == repo_id and cfg.num_classes:
            return timm.create_model(name)
    raise AssertionError(f'no published model in {repo_id}')


@pytest.mark.parametrize('line, code, skip', [pytest.param(*block, id=f'line{block[0]}') for block in readme_blocks()])
def test_readme_block_runs(line, code, skip, offline_world, monkeypatch):
    if skip:
        assert skip in SKIPPED
        return
    monkeypatch.chdir(offline_world)
    torch.manual_seed(0)
    exec(compile(code, f'README.md, block at line {line}', 'exec'), {'__name__': f'readme_line{line}'})


def test_skipped_blocks_are_few():
    assert {skip for _, _, skip in readme_blocks() if skip} == SKIPPED
    assert len(readme_blocks()) >= 10
