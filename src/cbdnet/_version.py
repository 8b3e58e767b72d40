"""The installed distribution's version, read from its metadata: a leaf module, so every layer may import it
without importing the root package (and, through it, the whole library)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cbdnet")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
