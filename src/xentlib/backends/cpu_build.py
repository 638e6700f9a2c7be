"""Building, caching and loading xentlib's compiled CPU kernel (the library behind backends/cpu_kernel.py).

How it is built, and the rule for the instruction set: at first use, with the C compiler on the machine (`$CC`,
else `cc`, else `gcc`) and `-O3 -march=native`, i.e. for every instruction set extension of the CPU it is built
on. A library built elsewhere is never loaded: the cache name is a hash of the sources, the flags, the compiler's
path and `--version`, and the CPU (machine, processor and the `flags` line of /proc/cpuinfo). The cache folder is
`$XENTLIB_CACHE_DIR`, else `~/.cache/xentlib`.

The cache is verified: a build is written to a temporary file, its sha256 to `<library>.sha256`, and both are
renamed into place (atomic: another process sees the old files or the new ones, never a half-written one).
Before loading, the library's bytes must match the checksum (a truncated or emptied file would otherwise crash
the process with SIGBUS, or fail inside a loss); on a mismatch, or when the library does not load or lacks the
entry point, it is rebuilt once. Where that fails, or no compiler works, the PyTorch ops run instead, with one
RuntimeWarning saying why; `XENTLIB_CPU_KERNEL=0` turns the kernel off without a warning. `status()` says which
and why.

Threads: where torch runs on GNU OpenMP and the compiler is GCC, the library is built with -fopenmp and its
`libgomp.so.1` is the one torch loaded, so a call's rows run on torch's own OpenMP team (`_flag_sets`); elsewhere,
or where that build fails (remembered in the cache), the C code starts and joins pthreads.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

# The library's sources: cross-entropy rows and the common call, the post-training kernels, and the toolkit both
# include (the build key hashes all three)
SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_rows.c", "cpu_post_training.c"))
HEADER = Path(__file__).with_name("cpu_rows.h")
_NAMES_OF_SOURCES = ", ".join(source.name for source in SOURCES)
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-pthread", "-fno-math-errno", "-std=gnu11"]


def _cpu_signature() -> str:
    """What -march=native depends on: a cached library built for another CPU must not be loaded here."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _cache_dir() -> Path:
    root = os.environ.get("XENTLIB_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "xentlib")
    return Path(root)


def _checksum_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _verified(library: Path) -> bool:
    """Whether `library` and its checksum file exist and agree (sha256 of the library's bytes)."""
    try:
        expected = _checksum_path(library).read_text().strip()
        return hashlib.sha256(library.read_bytes()).hexdigest() == expected
    except OSError:
        return False


def _compile(compiler: str, target: Path, flags: list[str]) -> str | None:
    """Build into a temporary folder beside `target`, write the checksum, rename both into place (the library
    first: a reader between the two renames sees a mismatch and rebuilds). Returns None, or why it failed."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            command = [compiler, *flags, "-o", str(built), *map(str, SOURCES), "-lm"]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                return f"building {_NAMES_OF_SOURCES} failed: {result.stderr.strip()[:500]}"
            checksum = Path(tmp) / _checksum_path(target).name
            checksum.write_text(hashlib.sha256(built.read_bytes()).hexdigest() + "\n")
            os.replace(built, target)
            os.replace(checksum, _checksum_path(target))
    except (OSError, subprocess.SubprocessError) as error:
        return f"building {_NAMES_OF_SOURCES} failed: {error}"
    return None


def _open(target: Path, entry_points):
    """Load the library: its functions for `entry_points` ((function, structure, layout, ctypes structure) each) and
    whether it runs on OpenMP threads; raise OSError, AttributeError or ValueError when it is not the kernel the
    caller was written for (closing what was opened, so that a rebuilt file at the same path is read anew)."""
    library = ctypes.CDLL(str(target))
    try:
        functions = [_entry_point(library, *entry) for entry in entry_points]
        openmp = bool(ctypes.c_int.in_dll(library, "xent_openmp").value)
    except (AttributeError, ValueError):
        _close(library)
        raise
    return (*functions, openmp)


def _entry_point(library: ctypes.CDLL, name: str, struct: str, layout: str, structure: type):
    """`name(struct *)`, after checking that the library's declaration of the structure is `layout`, the one this
    module passes."""
    declared = ctypes.string_at(ctypes.addressof(ctypes.c_char.in_dll(library, f"{struct}_layout"))).decode()
    size = ctypes.c_int64.in_dll(library, f"{struct}_size").value
    if declared != layout or size != ctypes.sizeof(structure):
        raise ValueError(f"its {struct} is {declared!r} ({size} bytes), this module passes {layout!r}")
    fn = getattr(library, name)
    fn.argtypes = [ctypes.POINTER(structure)]
    fn.restype = None
    return fn


def _close(library: ctypes.CDLL) -> None:
    try:
        import _ctypes

        _ctypes.dlclose(library._handle)
    except (ImportError, AttributeError, OSError):
        pass


def _flag_sets(version: str) -> list[list[str]]:
    """The flags to build with, best first. With -fopenmp where the compiler is GCC and torch runs its threads on
    GNU OpenMP, already loaded in this process: the library's libgomp.so.1 then resolves to torch's (the dynamic
    loader reuses a loaded library of the same soname), so `run_rows` runs on torch's own team, the threads that
    just ran the matmuls. Any other runtime (clang's libomp, or a libgomp torch does not use) would start a second
    team, whose waiting threads compete with torch's for the cores: there, and where the OpenMP build fails, the
    kernel starts its own pthreads per call. (On a 2-core Xeon, pthreads next to torch's waiting team made the
    distillation rows of a 2048 x 1024 x 32000 bfloat16 step 30 ms slower, 6% of the step.)"""
    if "Free Software Foundation" in version and _torch_on_gnu_openmp():
        return [[*FLAGS, "-fopenmp"], FLAGS]
    return [FLAGS]


def _torch_on_gnu_openmp() -> bool:
    """Whether torch's threads are GNU OpenMP's and the libgomp.so.1 in this process is torch's: a wheel that bundles
    the runtime under another name (libgomp-<hash>.so.1) would leave a libgomp.so.1 loaded by someone else."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    bundled = {path.name for path in (Path(torch.__file__).parent / "lib").glob("libgomp*")}
    if bundled and "libgomp.so.1" not in bundled:
        return False
    try:  # RTLD_NOLOAD: a handle only if the library is already in the process
        ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except (OSError, AttributeError):
        return False
    return True


def build(entry_points):
    """(the functions of `entry_points` and whether they run on OpenMP threads, or None; why), building or loading
    the library from the cache."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler found (set CC or install gcc); the PyTorch ops run instead"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"the C compiler {compiler!r} does not run ({error}); the PyTorch ops run instead"
    for number, flags in enumerate(sets := _flag_sets(version)):
        functions, why = _build_with(compiler, version, flags, entry_points, remember_failure=number < len(sets) - 1)
        if functions is not None:
            threads = "the OpenMP threads of torch" if functions[-1] else "pthreads of its own"
            return functions, f"compiled C row kernel ({why}), on {threads}"
    return None, f"{why}; the PyTorch ops run instead"


def _build_with(compiler: str, version: str, flags: list[str], entry_points, remember_failure: bool = False):
    """(kernel functions or None, the library's path or why it failed). `remember_failure`: a build that fails
    leaves `<library>.failed` with the reason, and is not tried again (the OpenMP build, which has a fallback: a
    compiler without OpenMP would otherwise fail again in every process)."""
    sources = [path.read_bytes() for path in (*SOURCES, HEADER)]
    parts = [*sources, " ".join(flags).encode(), compiler.encode(), version.encode()]
    key = hashlib.sha256(b"\0".join([*parts, _cpu_signature().encode()]))
    target = _cache_dir() / f"cpu_rows-{key.hexdigest()[:16]}.so"
    failed = target.with_name(target.name + ".failed")
    if remember_failure and failed.is_file():
        return None, failed.read_text()
    failure = None
    for attempt in range(2):  # the cached library, else a fresh build; a failing fresh build gets one more
        if attempt > 0 or not _verified(target):
            failure = _compile(compiler, target, flags)
            if failure is not None:
                if remember_failure:
                    with contextlib.suppress(OSError):
                        failed.write_text(failure)
                return None, failure
        try:
            return _open(target, entry_points), str(target)
        except (OSError, AttributeError, ValueError) as error:
            failure = f"{target} does not load ({error})"
    return None, f"{failure}, even after a rebuild"
