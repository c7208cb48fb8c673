"""Where the compiled CPU kernels live: shared libraries built from kernels/*.c at install, in rgchat/kernels."""

from __future__ import annotations

import importlib.machinery
from pathlib import Path


def library_path(stem: str) -> Path:
    """The compiled library `stem` (e.g. "_gemv"), or OSError when the install built none."""
    import rgchat.kernels

    folder = Path(rgchat.kernels.__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (path := folder / f"{stem}{suffix}").exists():
            return path
    raise OSError(f"the compiled kernel {stem} is missing from {folder} (was rgchat installed without a C compiler?)")
