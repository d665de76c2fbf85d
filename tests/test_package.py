"""Packaging: import weight (no torchvision, no fastai.vision), the version, and the kernels subpackage."""
from __future__ import annotations

import configparser
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    "Run `code` in a fresh interpreter (so sys.modules starts empty) from the repository root; return its stdout."
    res = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_import_is_light():
    "Importing the package, the encoder, its MONAI conversion and `all` pulls in neither torchvision nor fastai.vision."
    out = _run('import json, sys\n'
               'import dagman_fast, dagman_fast.swin, dagman_fast.monai_interop, dagman_fast.all\n'
               'print(json.dumps(sorted(sys.modules)))')
    mods = json.loads(out.strip().splitlines()[-1])
    assert 'dagman_fast.swin' in mods and 'dagman_fast.all' in mods  # the probe did import what it should
    assert 'torchvision' not in mods
    assert [m for m in mods if m == 'fastai.vision' or m.startswith('fastai.vision.')] == []


def test_kernels_import_without_fastai():
    "The kernels subpackage imports on its own and brings in no fastai at all."
    out = _run('import json, sys\n'
               'import dagman_fast.kernels, dagman_fast.kernels.window_attention as w\n'
               'print(json.dumps([dagman_fast.kernels.__name__, w.__name__, '
               'sorted(m for m in sys.modules if m.split(".")[0] == "fastai")]))')
    name, wname, fastai_mods = json.loads(out.strip().splitlines()[-1])
    assert name == 'dagman_fast.kernels' and wname == 'dagman_fast.kernels.window_attention'
    assert fastai_mods == []


def test_version_matches_settings_ini():
    import dagman_fast

    cfg = configparser.ConfigParser(delimiters=['='])
    cfg.read(ROOT / 'settings.ini', encoding='utf-8')
    assert dagman_fast.__version__ == cfg['DEFAULT']['version']
    assert dagman_fast.__version__ != '0+unknown'


def test_kernels_importable_in_process():
    import dagman_fast.kernels
    from dagman_fast.kernels.window_attention import ATTN_IMPLS, window_attention

    assert dagman_fast.kernels.__name__ == 'dagman_fast.kernels'
    assert callable(window_attention) and 'sdpa' in ATTN_IMPLS


def test_all_exports_exist():
    "Every name in the `__all__` of `dagman_fast.all` and of the encoder's modules resolves."
    import dagman_fast.all
    import dagman_fast.encoder_configs
    import dagman_fast.monai_interop
    import dagman_fast.swin
    import dagman_fast.windows

    for mod in (dagman_fast.all, dagman_fast.windows, dagman_fast.encoder_configs, dagman_fast.swin,
                dagman_fast.monai_interop):
        missing = [n for n in mod.__all__ if not hasattr(mod, n)]
        assert missing == [], f'{mod.__name__}.__all__ names missing attributes: {missing}'
    assert {'SwinEncoder', 'build_encoder', 'to_monai', 'from_monai'} <= set(dagman_fast.all.__all__)


@pytest.mark.parametrize('module', [
    'dagman_fast.core',  # helpers
    'dagman_fast.windows',  # window geometry
    'dagman_fast.encoder_configs',  # encoder configs
    'dagman_fast.swin',  # encoder
    'dagman_fast.monai_interop',  # MONAI weights
    'dagman_fast.kernels.window_attention',  # kernels
])
def test_modules_import_standalone(module):
    "Each module imports first in a fresh interpreter (no hidden import-order dependence)."
    assert _run(f'import {module}; print("ok")').strip().endswith('ok')


def _layers() -> dict:
    "The README's table of layers: `{module: layer}`."
    text = (ROOT / 'README.md').read_text()
    table = text[text.index('| layer | modules |'):].split('\n\n')[0]
    out = {}
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip('|').split('|')]
        for name in cells[1].split(','):
            out[name.strip().strip('`')] = int(cells[0])
    return out


def _imports(path: Path) -> set:
    "The sibling modules that `path` imports, at the top or inside functions."
    import ast
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split('.')[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('dagman_fast.'):
            found.add(node.module.split('.')[1])
    return found


def test_every_import_points_down_the_readmes_layers():
    layers = _layers()
    mods = {p.stem: p for p in (ROOT / 'dagman_fast').glob('*.py') if not p.stem.startswith('_') and p.stem != 'all'}
    assert set(mods) | {'kernels'} == set(layers), 'the README table and the modules differ'
    wrong = [f'{m} (layer {layers[m]}) imports {d} (layer {layers[d]})' for m, p in mods.items()
             for d in _imports(p) if d in layers and layers[d] >= layers[m]]
    assert not wrong, wrong
