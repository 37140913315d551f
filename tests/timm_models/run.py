"""Run timm's own model tests (tests/test_models.py of the installed timm version) on the MambaVision models.

    python tests/timm_models/run.py [--timm-source DIR] [pytest arguments]

The test file is not in timm's wheel: it is taken from timm's source release of the installed
version (``pip download --no-deps --no-binary :all: timm==VERSION``), or from ``--timm-source``,
an unpacked source release. ``plugin.py`` registers the models, picks the tests per model and keeps
the network off. Exits with pytest's status.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

import timm

HERE = os.path.dirname(os.path.abspath(__file__))
TEST_FILES = ('tests/test_models.py', 'tests/conftest.py')
# timm lists the models of its forward_intermediates tests by module (the file that registers them);
# ours are registered from mambavision/model.py, module 'model'
FEATURE_MODULES_ANCHOR = 'FEAT_INTER_FILTERS = ['


def fetch_source(version: str, into: str) -> str:
    """timm's source release ``version``, from PyPI, unpacked under ``into``; returns its root."""
    subprocess.run(
        [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--no-binary', ':all:',
         f'timm=={version}', '--dest', into], check=True)
    archive, = glob.glob(os.path.join(into, f'timm-{version}.tar.gz'))
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter='data')
    return os.path.join(into, f'timm-{version}')


def prepare_tests(source: str, into: str) -> str:
    """Copy timm's model tests into ``into``, with our models' module among the forward_intermediates ones."""
    for name in TEST_FILES:
        shutil.copy(os.path.join(source, name), into)
    path = os.path.join(into, 'test_models.py')
    with open(path) as f:
        text = f.read()
    if text.count(FEATURE_MODULES_ANCHOR) != 1:
        raise SystemExit(f"{path}: cannot find {FEATURE_MODULES_ANCHOR!r} once; timm's test file has changed")
    with open(path, 'w') as f:
        f.write(text.replace(FEATURE_MODULES_ANCHOR, FEATURE_MODULES_ANCHOR + "'model', "))
    with open(os.path.join(into, 'pytest.ini'), 'w') as f:  # none of our settings (addopts) apply
        f.write('[pytest]\n')
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--timm-source', metavar='DIR', help=f'unpacked timm-{timm.__version__} source release')
    args, pytest_args = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix='mambavision-timm-tests-') as tmp:
        source = args.timm_source or fetch_source(timm.__version__, tmp)
        tests = os.path.join(tmp, 'tests')
        os.makedirs(tests)
        test_file = prepare_tests(source, tests)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get('PYTHONPATH')])))
        env.pop('GITHUB_ACTIONS', None)  # timm's GitHub settings drop tests our selection runs (pretrained loading)
        command = [sys.executable, '-m', 'pytest', test_file, '-p', 'plugin', '-p', 'no:cacheprovider',
                   '--rootdir', tests, '-c', os.path.join(tests, 'pytest.ini'), *pytest_args]
        return subprocess.run(command, env=env, cwd=tests).returncode


if __name__ == '__main__':
    sys.exit(main())
