from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version('dagman_fast')  # settings.ini is the one source of truth; setup.py installs it
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = '0+unknown'

import warnings as _warnings

# Two deprecation notices that fastai raises inside its own import with torch >= 2.10 and pandas >= 3: fastai.layers
# scripts a function (`torch.jit.script` is deprecated) and fastai.tabular.core sets pandas' no-op
# `mode.chained_assignment`. Python's default filters hide them, `-W default` shows them, and no user of this library
# can act on them: exactly these two messages are ignored, no other warning.
_warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=DeprecationWarning,
                         module=r'torch\.jit\._script')
_warnings.filterwarnings('ignore', message=r"The 'mode\.chained_assignment' option is deprecated",
                         module=r'fastai\.tabular\.core')
