"""A host where a process may not open another's descriptors through /proc/PID/fd (a hardened
kernel, a sandbox): with this folder first on PYTHONPATH, every Python process started refuses
those opens, so a task process can never map a buffer its supervisor keeps in a memfd."""

import errno
import os

_open = os.open


def _refusing_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
    text = os.fsdecode(path) if isinstance(path, (str, bytes)) else ""
    if text.startswith("/proc/") and "/fd/" in text and not text.startswith("/proc/self/"):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), text)
    return _open(path, flags, *args, **kwargs)


os.open = _refusing_open
