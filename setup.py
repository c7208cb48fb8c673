"""Builds the native CPU scan (kernels/rglru_scan.c). The build is optional: without a C compiler rgchat
installs anyway and falls back to the PyTorch scan."""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# No -ffast-math: it would reassociate the carefully ordered float arithmetic of the kernel.
FAST_FLAGS = ["-O3", "-fno-math-errno", "-march=native", "-mprefer-vector-width=512"]
SAFE_FLAGS = ["-O3", "-fno-math-errno"]


class OptionalFastBuild(build_ext):
    """Try the flags for this CPU's widest vectors first, then portable ones, then give up quietly."""

    def build_extension(self, ext):
        for flags in (FAST_FLAGS, SAFE_FLAGS):
            ext.extra_compile_args = flags
            try:
                return super().build_extension(ext)
            except Exception as e:  # compiler missing or flag refused
                print(f"rgchat: building {ext.name} with {' '.join(flags)} failed: {e}", file=sys.stderr)
        print("rgchat: native scan not built; the PyTorch scan will be used", file=sys.stderr)


native_scan = Extension(
    "rgchat.kernels._rglru",
    sources=["kernels/rglru_scan.c"],
    extra_link_args=["-lm", "-lpthread"] if sys.platform != "win32" else [],
    optional=True,
)

setup(ext_modules=[native_scan], cmdclass={"build_ext": OptionalFastBuild})
