"""Floor 4 of cbdnet: the ``.cbd`` file (container, writer, reader, verify). Knows codes and modules, not
architectures: a loader that builds models by name passes a builder (see :func:`cbdnet.load`)."""

from .cbdfile import FORMAT_VERSION, CBDFile, atomic_write, check_writable, encode_file, load, parse, read, save, verify
from .fit import compress, compress_encoded

__all__ = ["FORMAT_VERSION", "CBDFile", "atomic_write", "check_writable", "compress", "compress_encoded", "encode_file",
           "load", "parse", "read", "save", "verify"]
