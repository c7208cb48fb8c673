"""Matrix products for decode on the CPU, through the native kernels of kernels/gemv.c.

int8 and int4 weights multiply activation rows quantized to int8 (one scale a row: the numbers
`quant.int8_reference` computes with torch._int_mm), bf16 weights multiply bf16 rows; MAX_ROWS rows a call,
more taken MAX_ROWS at a time. On the AVX-512 path int8 weights are first packed into blocks of output rows
(`pack_int8`), and one call then takes any number of rows (prefill chunks too) while reading the weights
once. Each row's result is the same whatever rows come with it. The library is
optional: `cpu_kernels()` is None without it (with one notice on stderr) or with RGCHAT_GEMV=torch, and
quant.py then uses torch's products (int4 chooses its layout when its weights are readied).
RGCHAT_GEMV=portable|avx2|avx512 forces one path of the kernels. "The same numbers" holds for finite
activations: a row holding NaN or infinity gives what the kernel's clamping makes of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import sys
import threading

import torch

from rgchat.errors import RGChatError
from rgchat.native import library_path

ENV_VAR = "RGCHAT_GEMV"
# avx512-float: bf16 alone, the AVX-512 path of CPUs without AVX-512 BF16 (bfloat16 widened to float)
PATHS = {"portable": 1, "avx2": 2, "avx512": 3, "avx512-float": 4}
PATH_NAMES = {1: "portable C", 2: "AVX2", 3: "AVX-512", 4: "AVX-512 (float)"}
KINDS = {"int8": 0, "int4": 1, "bf16": 2}
MAX_ROWS = 8  # activation rows one call takes
MAX_K = 65536  # input width up to which every integer sum is exact
PACK_ROWS = 32  # output rows of one block of the packed int8 layout (`pack_int8`)
MAX_PACKED_ROWS = 4096  # activation rows one packed int8 call takes
_ERRORS = {1: "bad arguments", 2: "path not supported by this CPU", 3: "out of memory"}


def _find_library():
    return library_path("_gemv")


def _load_library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_find_library()))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures = {
        "gemv_int8": [p, p, i64, i64, p, i32, i64, p, i32, i32],
        "gemv_int8_packed": [p, p, i64, i64, p, i32, i64, p, i32, i32],
        "gemv_packs_int8": [i32],
        "gemv_pack_int8": [p, i64, i64, p, i32],
        "gemv_int4": [p, p, p, i64, i64, i64, p, i32, i64, p, i32, i32],
        "gemv_bf16": [p, i64, i64, i64, p, i64, p, i32, i32],
        "gemv_read": [p, i64, p, i32],
        "gemv_best_path": [i32],
        "gemv_supported": [i32, i32],
        "gemv_use_openmp": [p, p, p],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib


def _torch_openmp() -> tuple[int, int, int] | None:
    """GOMP_parallel, omp_get_thread_num and omp_get_num_threads of the OpenMP runtime torch loaded (GNU,
    Intel and LLVM runtimes all export them), found in this process's memory map (Linux); else None."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            maps = f.read()
    except OSError:
        return None
    own = os.path.dirname(torch.__file__)  # torch's own copy first, where another is loaded too
    found = set(re.findall(r"(/\S*lib(?:gomp|iomp5|omp)[^/\s]*\.so[^/\s]*)", maps))
    for path in sorted(found, key=lambda p: (not p.startswith(own), p)):
        try:
            runtime = ctypes.CDLL(path)  # already loaded: the same runtime, not a second one
            return tuple(ctypes.cast(getattr(runtime, name), ctypes.c_void_p).value
                         for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads"))
        except (OSError, AttributeError):
            continue
    return None


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"native {what} kernel failed: {_ERRORS.get(status, status)}")


class CpuKernels:
    """The loaded library with, per kind of product, the path it runs (the best this CPU has, or forced)."""

    def __init__(self, lib: ctypes.CDLL, forced: int | None = None):
        self.lib = lib
        self.paths = {kind: forced if forced is not None else lib.gemv_best_path(code)
                      for kind, code in KINDS.items() if forced is None or lib.gemv_supported(forced, code)}
        # int8 runs from the packed layout on the AVX-512 path, where one activation load then serves 32
        # output rows (kernels/gemv.c); elsewhere from the stored one
        self.int8_packs = self.paths.get("int8") == PATHS["avx512"] and bool(lib.gemv_packs_int8(PATHS["avx512"]))
        self.owned_threads = 0  # while a step owns the cores (`owning_the_cores`): the products' threads
        self._owner = threading.Lock()  # one step owns the cores at a time; others run as they are
        self.openmp = _torch_openmp()  # torch's OpenMP runtime, or None: the library's own threads
        self.share_torch_threads(True)

    def share_torch_threads(self, share: bool) -> None:
        """Run the products on torch's own OpenMP threads (where torch's runtime is found), or on the
        library's pool. A second pool would compete with torch's threads, which spin for a while after
        each of torch's operations, for the same cores. Process-wide: the library is loaded once."""
        self.lib.gemv_use_openmp(*(self.openmp if share and self.openmp else (None, None, None)))

    def threads(self) -> int:
        return self.owned_threads or torch.get_num_threads()

    @contextlib.contextmanager
    def owning_the_cores(self):
        """Within it, the products run on all of torch's threads and torch's own operations on one. For
        decode steps: their other operations are hundreds of small ones, for which a team of threads costs
        more than it saves, and which slow the products around them down (docs/kernels.md)."""
        threads = torch.get_num_threads()
        if threads == 1 or not self._owner.acquire(blocking=False):
            yield
            return
        self.owned_threads = threads
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            self.owned_threads = 0
            self._owner.release()

    def detail(self) -> str:
        """What runs, for `rgchat doctor`."""
        packed = {"int8": " (packed weights)"} if self.int8_packs else {}
        kinds = ", ".join(f"{kind} {PATH_NAMES[path]}{packed.get(kind, '')}" for kind, path in self.paths.items())
        pool = "torch's OpenMP" if self.openmp else "own pool"
        return f"C, {kinds}; {self.threads()} threads ({pool})"

    def _takes(self, kind: str, x: torch.Tensor, width: int) -> bool:
        return kind in self.paths and x.device.type == "cpu" and x.dim() == 2 and x.shape[-1] == width <= MAX_K

    def _rows(self, x: torch.Tensor, n: int, dtype: torch.dtype, call) -> torch.Tensor:
        """call(x_ptr, rows, out_ptr) for each slice of up to MAX_ROWS rows of x [rows, width]."""
        x = x if x.is_contiguous() else x.contiguous()
        out = torch.empty(x.shape[0], n, dtype=dtype)
        x_ptr, out_ptr, rows = x.data_ptr(), out.data_ptr(), x.shape[0]
        x_step, out_step = x.shape[1] * x.element_size() * MAX_ROWS, n * out.element_size() * MAX_ROWS
        for i in range(0, rows, MAX_ROWS):
            call(x_ptr + i // MAX_ROWS * x_step, min(MAX_ROWS, rows - i), out_ptr + i // MAX_ROWS * out_step)
        return out

    def int8(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
        """x [rows, K] (float32 or bfloat16) times int8 q [N, K] with bfloat16 scale [N], in x's dtype; None
        where the kernel does not take these tensors."""
        if (not self._takes("int8", x, q.shape[1]) or x.dtype not in (torch.float32, torch.bfloat16)
                or q.dtype != torch.int8 or scale.dtype != torch.bfloat16 or not q.is_contiguous()
                or scale.shape != q.shape[:1] or not scale.is_contiguous()):
            return None
        n, k, threads, path = q.shape[0], q.shape[1], self.threads(), self.paths["int8"]
        bf16 = int(x.dtype == torch.bfloat16)

        def call(xp, rows, outp):
            _check(self.lib.gemv_int8(q.data_ptr(), scale.data_ptr(), n, k, xp, bf16, rows, outp, threads, path),
                   "int8")
        return self._rows(x, n, x.dtype, call)

    def packs_int8(self, q: torch.Tensor) -> bool:
        """Whether int8 weights q [N, K] run from the packed layout (`pack_int8`)."""
        n, k = q.shape
        return (self.int8_packs and q.device.type == "cpu" and q.dtype == torch.int8 and n % PACK_ROWS == 0 and n > 0
                and k % 4 == 0 and 0 < k <= MAX_K)

    def int8_packed(self, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
        """x [rows, K] (float32 or bfloat16) times the int8 weights `pack_int8` made, any number of rows: the
        numbers `int8` gives on the unpacked weights. None for other activations."""
        n, k = packed.shape
        if (not self._takes("int8", x, k) or x.dtype not in (torch.float32, torch.bfloat16)
                or scale.shape != (n,) or scale.dtype != torch.bfloat16 or not scale.is_contiguous()):
            return None
        x = x if x.is_contiguous() else x.contiguous()
        out = torch.empty(x.shape[0], n, dtype=x.dtype)
        for i in range(0, x.shape[0], MAX_PACKED_ROWS):
            rows = min(MAX_PACKED_ROWS, x.shape[0] - i)
            _check(self.lib.gemv_int8_packed(packed.data_ptr(), scale.data_ptr(), n, k, x[i].data_ptr(),
                                             int(x.dtype == torch.bfloat16), rows, out[i].data_ptr(),
                                             self.threads(), self.paths["int8"]), "int8")
        return out

    def takes_int4(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> bool:
        """Whether the int4 kernel reads these weights as they are stored (uint8 packed [N, K/2], bfloat16
        scale and zero [N, K/group], group 32 times a power of two)."""
        k, groups = packed.shape[1] * 2, scale.shape[1] if scale.dim() == 2 else 0
        group = k // groups if groups else 0
        return ("int4" in self.paths and packed.device.type == "cpu" and 0 < k <= MAX_K and group >= 32
                and group % 32 == 0 and group * groups == k and (group // 32) & (group // 32 - 1) == 0
                and packed.dtype == torch.uint8 and packed.is_contiguous() and zero.shape == scale.shape
                and scale.shape[0] == packed.shape[0]
                and all(t.is_contiguous() and t.dtype == torch.bfloat16 for t in (scale, zero)))

    def int4(self, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
             zero: torch.Tensor) -> torch.Tensor | None:
        """x [rows, K] times int4 weights that `takes_int4`, in x's dtype; None for other activations."""
        k = packed.shape[1] * 2
        if not self._takes("int4", x, k) or x.dtype not in (torch.float32, torch.bfloat16):
            return None
        n, group, threads, path = packed.shape[0], k // scale.shape[1], self.threads(), self.paths["int4"]
        bf16 = int(x.dtype == torch.bfloat16)

        def call(xp, rows, outp):
            _check(self.lib.gemv_int4(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), n, k, group, xp, bf16,
                                      rows, outp, threads, path), "int4")
        return self._rows(x, n, x.dtype, call)

    def bf16(self, x: torch.Tensor, w: torch.Tensor, heads: int = 1) -> torch.Tensor | None:
        """x [rows, heads * K] times w [N, K], both bfloat16, summed in float32. With heads > 1, w holds a
        block-diagonal matrix: head h's N / heads rows multiply inputs h * K .. (h + 1) * K."""
        n, k = w.shape
        if (not self._takes("bf16", x, k * heads) or k > MAX_K or n % heads or x.dtype != torch.bfloat16
                or w.dtype != torch.bfloat16 or not w.is_contiguous()):
            return None
        threads, path = self.threads(), self.paths["bf16"]

        def call(xp, rows, outp):
            _check(self.lib.gemv_bf16(w.data_ptr(), n, k, heads, xp, rows, outp, threads, path), "bf16")
        return self._rows(x, n, torch.bfloat16, call)

    def read(self, buf: torch.Tensor) -> int:
        """Read a contiguous CPU tensor once with the products' threads (the benchmark's yardstick); returns
        a checksum of its words. Reads whole 64-byte lines: a shorter tail is left out."""
        checksum = ctypes.c_uint64(0)
        _check(self.lib.gemv_read(buf.data_ptr(), buf.numel() * buf.element_size() // 64, ctypes.byref(checksum),
                                  self.threads()), "read")
        return checksum.value


def _blocks(q: torch.Tensor) -> torch.Tensor:
    """The packed layout's view of int8 [N, K] as [N / PACK_ROWS, PACK_ROWS, K / 4, 4]."""
    n, k = q.shape
    return q.view(n // PACK_ROWS, PACK_ROWS, k // 4, 4)


def pack_int8(*parts: torch.Tensor) -> torch.Tensor:
    """int8 weights [N, K] in the layout `CpuKernels.int8_packed` reads (N a multiple of PACK_ROWS, K of 4):
    blocks of PACK_ROWS rows, in each block four inputs of every row, then the next four. Same shape. Given
    several matrices (each of whole blocks), the packed form of their rows joined, built without joining
    them first. The native library packs on the products' threads; torch where it is absent."""
    k = parts[0].shape[1]
    packed = torch.empty(sum(q.shape[0] for q in parts), k, dtype=torch.int8)
    kernels, row = cpu_kernels(), 0
    for q in parts:
        out = packed[row:row + q.shape[0]]  # whole blocks: a contiguous slice
        if kernels and q.is_contiguous() and q.device.type == "cpu":
            _check(kernels.lib.gemv_pack_int8(q.data_ptr(), q.shape[0], k, out.data_ptr(), kernels.threads()),
                   "int8 packing")
        else:
            _blocks(out).view(q.shape[0] // PACK_ROWS, k // 4, PACK_ROWS, 4).copy_(_blocks(q).transpose(1, 2))
        row += q.shape[0]
    return packed


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    """The [N, K] matrix that `pack_int8` packed."""
    n, k = packed.shape
    return packed.view(n // PACK_ROWS, k // 4, PACK_ROWS, 4).transpose(1, 2).reshape(n, k)


def packed_int8_rows(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of the original [N, K] matrix read back from its packed form (the embedding's token lookups)."""
    n, k = packed.shape
    blocks = packed.view(n // PACK_ROWS, k // 4, PACK_ROWS, 4)
    return blocks[rows // PACK_ROWS, :, rows % PACK_ROWS, :].reshape(*rows.shape, k)


@functools.cache
def _kernels_for(choice: str) -> CpuKernels | None:
    if choice not in ("auto", "native", "torch", *PATHS):
        raise RGChatError(f"{ENV_VAR}={choice!r}: use native, torch or one of {', '.join(PATHS)}")
    if choice == "torch":
        return None
    try:
        kernels = CpuKernels(_load_library(), PATHS.get(choice))
    except (OSError, AttributeError) as e:
        if choice != "auto":
            raise RGChatError(f"{ENV_VAR}={choice}, but the native CPU products are unavailable: "
                              f"{str(e).splitlines()[0]}")
        print(f"rgchat: native CPU products unavailable ({str(e).splitlines()[0]}); using torch's",
              file=sys.stderr)
        return None
    if not kernels.paths:
        raise RGChatError(f"{ENV_VAR}={choice}: this CPU does not run that path")
    return kernels


def cpu_kernels() -> CpuKernels | None:
    """The native products as RGCHAT_GEMV chooses (read at each call; loaded once per choice). None while
    torch.compile traces: the compiler cannot see into a ctypes call, and fuses torch's products instead."""
    if torch.compiler.is_compiling():
        return None
    return _kernels_for(os.environ.get(ENV_VAR, "auto"))


def owning_the_cores():
    """`CpuKernels.owning_the_cores` of the native products where they run, else nothing."""
    kernels = cpu_kernels()
    return kernels.owning_the_cores() if kernels else contextlib.nullcontext()
