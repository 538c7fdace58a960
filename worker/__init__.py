"""retrain's worker: the core (this package's modules), its adapters and its entry points."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("retrain")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"
