from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version('dagman_fast')  # settings.ini is the one source of truth; setup.py installs it
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = '0+unknown'
