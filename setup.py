"""Builds the native CPU kernels (kernels/*.c). The build is optional: without a C compiler rgchat installs
anyway and falls back to PyTorch's scan and matrix products."""

import glob
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# No -ffast-math: it would reassociate the carefully ordered float arithmetic of the kernels. Without traps
# (never looked at), loops that clamp and round, as the inlined exp does, become vector selects.
FAST_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-march=native", "-mprefer-vector-width=512"]
SAFE_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
LINK = ["-lm", "-lpthread"] if sys.platform != "win32" else []


class OptionalFastBuild(build_ext):
    """Try each extension's flag sets in turn (widest vectors first), then give up quietly."""

    def build_extension(self, ext):
        for flags in ext.flag_sets:
            ext.extra_compile_args = flags
            try:
                return super().build_extension(ext)
            except Exception as e:  # compiler missing or flag refused
                print(f"rgchat: building {ext.name} with {' '.join(flags)} failed: {e}", file=sys.stderr)
        print(f"rgchat: {ext.name} not built; PyTorch's version will be used", file=sys.stderr)


def kernel(name: str, source: str, flag_sets: list[list[str]]) -> Extension:
    ext = Extension(name, sources=[source], depends=glob.glob("kernels/*.h"), extra_link_args=LINK, optional=True)
    ext.flag_sets = flag_sets
    return ext


native_scan = kernel("rgchat.kernels._rglru", "kernels/rglru_scan.c", [FAST_FLAGS, SAFE_FLAGS])
# The matrix products pick their instruction set at run time (every path is tested by forcing it), so they
# are built for any CPU of the architecture.
native_gemv = kernel("rgchat.kernels._gemv", "kernels/gemv.c", [SAFE_FLAGS])

# The decode step's element-wise work: loops the compiler vectorises for this CPU, as the scan's.
native_step = kernel("rgchat.kernels._step", "kernels/step.c", [FAST_FLAGS, SAFE_FLAGS])

setup(ext_modules=[native_scan, native_gemv, native_step], cmdclass={"build_ext": OptionalFastBuild})
