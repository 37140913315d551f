"""The library's layers run one way: the command line (``mambavision.cli``) imports the library, never the reverse."""
import ast
import subprocess
import sys
from pathlib import Path

import mambavision

PACKAGE = Path(mambavision.__file__).parent


def _imported_modules(path: Path, source: str = None):
    """Absolute names of the modules that file ``path`` of the package imports (relative imports resolved)."""
    package = ['mambavision', *path.relative_to(PACKAGE).parent.parts]
    for node in ast.walk(ast.parse(source if source is not None else path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = '.'.join(base + ([node.module] if node.module else []))
            yield module
            yield from (f'{module}.{alias.name}' for alias in node.names)


def test_no_library_module_imports_the_command_line():
    library = [p for p in PACKAGE.rglob('*.py') if 'cli' not in p.relative_to(PACKAGE).parts
               and p.name != '__main__.py']
    assert len(library) > 20
    offenders = {str(p.relative_to(PACKAGE)): m for p in library for m in _imported_modules(p)
                 if m == 'mambavision.cli' or m.startswith('mambavision.cli.')}
    assert not offenders, f'library modules import the command line: {offenders}'


def test_the_graph_check_sees_relative_imports():
    """The check above resolves ``from ..cli import x`` inside a sub-package to mambavision.cli."""
    names = set(_imported_modules(PACKAGE / 'dense' / 'probe.py', 'from ..cli import main\nfrom . import image\n'))
    assert {'mambavision.cli', 'mambavision.cli.main', 'mambavision.dense.image'} <= names


def test_importing_the_library_loads_no_command_line_module():
    code = 'import sys, mambavision; print(sorted(m for m in sys.modules if m.startswith("mambavision.cli")))'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == '[]'
