"""The one table of published dense models (mambavision/published.py) against the published facts and everything
that reads it: timm's dense backbone tags, the factories, ``mambavision info`` and the README's table."""
import json

import pytest
import timm

import mambavision  # noqa: F401  (registers the models)
from conftest import DENSE_FIXTURES, REPO
from mambavision.cli.info import gather_info
from mambavision.dense import list_detectors, list_segmenters
from mambavision.model import ARCHS
from mambavision.published import PUBLISHED_MODELS, published_by_backbone_tag, published_models


@pytest.fixture(scope='module')
def published_keys():
    """The published state dicts' backbone settings (tests/fixtures/dense/downstream_state_dict_keys.json)."""
    return json.loads((DENSE_FIXTURES / 'downstream_state_dict_keys.json').read_text())


def _published_backbone(entry, published_keys):
    """The fixture's backbone settings of ``entry``'s file (its key drops the file's '-512x512'/'-640x640')."""
    stem = entry.hf_file.removesuffix('.pth')
    key = stem if stem in published_keys else stem.replace('-512x512', '').replace('-640x640', '')
    return published_keys[key]['backbone']


@pytest.mark.parametrize('entry', PUBLISHED_MODELS.values(), ids=list(PUBLISHED_MODELS))
def test_entry_matches_the_published_file(entry, published_keys):
    backbone = _published_backbone(entry, published_keys)
    arch = ARCHS[entry.arch]
    assert tuple(backbone['window_size']) == entry.window_size
    assert (backbone['dim'], backbone['in_dim'], tuple(backbone['depths'])) == (arch.dim, arch.in_dim, arch.depths)
    assert entry.hf_file == entry.hf_repo.split('/')[1] + '.pth'


@pytest.mark.parametrize('entry', PUBLISHED_MODELS.values(), ids=list(PUBLISHED_MODELS))
def test_timm_tag_is_made_from_the_entry(entry):
    cfg = timm.models.get_pretrained_cfg(entry.backbone_tag)
    assert (cfg.hf_hub_id, cfg.hf_hub_filename, cfg.license) == (entry.hf_repo, entry.hf_file, entry.license)
    assert cfg.input_size == (3, *entry.input_size)
    assert published_by_backbone_tag(entry.backbone_tag) is entry


def test_factories_info_and_readme_list_the_same_models():
    assert list_detectors() == [m.name for m in published_models('det')]
    assert list_segmenters() == [m.name for m in published_models('seg')]
    assert len(list_detectors()) == 3 and len(list_segmenters()) == 4
    info = {m['name']: m for m in gather_info()['dense_models']}
    assert list(info) == list(PUBLISHED_MODELS)
    readme = (REPO / 'README.md').read_text()
    for entry in PUBLISHED_MODELS.values():
        row = next((line for line in readme.splitlines() if line.startswith(f'| `{entry.name}` |')), None)
        assert row is not None, f'README has no table row for {entry.name}'
        assert entry.hf_repo in row and ','.join(map(str, entry.window_size)) in row
        assert all(f'{value}' in row for value in entry.metrics.values()), row
        assert info[entry.name]['metrics'] == entry.metrics
