from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version('dagman_fast')  # settings.ini is the one source of truth; setup.py installs it
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = '0+unknown'

import sys as _sys
import warnings as _warnings


class _QuietFastaiLayers:
    """fastai.layers scripts a function with `torch.jit.script` when it is imported, which torch >= 2.10 deprecates;
    Python's default filters hide that notice, `-W default` shows it, and no user of this library can act on it. This
    import hook ignores exactly that message while fastai.layers itself runs (a filter by module cannot: torch says it
    from its own frame), and removes itself; the user's own `torch.jit.script` calls still warn."""

    def find_spec(self, name, path=None, target=None):
        if name != 'fastai.layers':
            return None
        _sys.meta_path.remove(self)
        import importlib.util
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            with _warnings.catch_warnings():
                _warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated',
                                         category=DeprecationWarning)
                run(module)
        spec.loader.exec_module = exec_module
        return spec


if 'fastai.layers' not in _sys.modules:
    _sys.meta_path.insert(0, _QuietFastaiLayers())
# fastai.tabular.core sets pandas' `mode.chained_assignment`, deprecated (and a no-op) since pandas 3: attributed to
# fastai's own line, so this filter touches nothing else.
_warnings.filterwarnings('ignore', message=r"The 'mode\.chained_assignment' option is deprecated",
                         module=r'fastai\.tabular\.core')
