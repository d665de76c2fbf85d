from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version('dagman_fast')  # settings.ini is the one source of truth; setup.py installs it
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = '0+unknown'

import warnings as _warnings

# fastai.tabular.core sets pandas' `mode.chained_assignment`, deprecated (and a no-op) since pandas 3: attributed to
# fastai's own line, so this filter touches nothing else.
_warnings.filterwarnings('ignore', message=r"The 'mode\.chained_assignment' option is deprecated",
                         module=r'fastai\.tabular\.core')
