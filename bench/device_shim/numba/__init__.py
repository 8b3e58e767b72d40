"""A stand-in for numba, for bench/device_issue12.sh on a lent machine without it (numba's llvmlite wheel is
60 MB, over what can be carried there): ``njit`` returns the function unchanged, so a kernel would run as plain
Python. Never on the path of cbdnet itself: the script puts this folder on PYTHONPATH only when ``import numba``
fails. The paths that script measures (load, the int8 runtime, ONNX export, RTN compression) run no numba
kernel; with CBDNET_NUMBA_SHIM_LOG=1 each kernel's first call is printed to stderr, so a log would show one."""

import functools
import os
import sys

__version__ = "0+shim"
_LOG = os.environ.get("CBDNET_NUMBA_SHIM_LOG") == "1"
_seen: set[str] = set()


def njit(*args, **kwargs):
    def wrap(func):
        if not _LOG:
            return func

        @functools.wraps(func)
        def logged(*a, **k):
            if func.__qualname__ not in _seen:
                _seen.add(func.__qualname__)
                print(f"numba shim: {func.__module__}.{func.__qualname__} runs as plain Python", file=sys.stderr)
            return func(*a, **k)

        return logged

    if len(args) == 1 and callable(args[0]) and not kwargs:
        return wrap(args[0])
    return wrap


jit = njit
