"""What CPU a benchmark ran on, and what it can do, measured in the same run.

The machines here change between sessions (a Zen 3 EPYC without AVX-512 one week, a Zen 5 with
AVX-512 VNNI the next), and int8 and float32 speed depend on exactly those features. So every
figure names the CPU it came from, and the float32 figures are set against peaks measured in the
same run: the float32 FMA peak (`fma_peak_gflops`: a loop of independent FMAs at the widest
vector the compiler targets, on every core; a VM shows neither the boost clock nor the FMA width)
and a float32 matrix product (`sgemm_gflops`, numpy's BLAS).
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_facts() -> dict:
    """Model, family, clock, cores and the SIMD features that decide int8 / float32 speed."""
    facts = {"model": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return facts
    first = text.split("\n\n")[0]
    fields = dict(
        (k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)
    )
    flags = set(fields.get("flags", "").split())
    facts.update(
        model=fields.get("model name", facts["model"]),
        family=f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
        mhz=float(fields.get("cpu MHz", "nan")),
        features=[f for f in FEATURES if f in flags],
    )
    return facts


def describe(facts: dict) -> str:
    """One line: ``AMD EPYC (family 26/2), 2 cores at 2596 MHz; avx2 fma avx512f avx512_vnni``."""
    features = " ".join(facts.get("features", [])) or "no AVX2"
    family = f" (family {facts['family']})" if "family" in facts else ""
    clock = f" at {facts['mhz']:.0f} MHz" if "mhz" in facts else ""
    return f"{facts['model']}{family}, {facts['cores']} cores{clock}; {features}"


def sgemm_gflops(n: int = 2048, repeats: int = 8) -> float:
    """Median GFLOP/s of an ``n x n`` float32 matrix product (numpy's BLAS, all cores)."""
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    a @ b  # warm-up: thread pool, page faults
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


# 12 independent chains hide the FMA latency (4 cycles x 2 pipes needs 8); the empty asm makes
# each chain opaque, or the compiler folds identical chains into one.
_FMA_SOURCE = r"""
typedef float v16 __attribute__((vector_size(64)));
#define OPAQUE(a, b, c, d, e, f) __asm__ volatile("" : "+v"(a), "+v"(b), "+v"(c), "+v"(d), "+v"(e), "+v"(f))
double fma_loop(long iters) {
    v16 x, y, a[12];
    for (int i = 0; i < 16; i++) { x[i] = 1.0000001f; y[i] = 1e-7f; }
    for (int j = 0; j < 12; j++) a[j] = y * (float)j;
    v16 a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3], a4 = a[4], a5 = a[5];
    v16 a6 = a[6], a7 = a[7], a8 = a[8], a9 = a[9], a10 = a[10], a11 = a[11];
    for (long k = 0; k < iters; k++) {
        a0 = a0 * x + y; a1 = a1 * x + y; a2 = a2 * x + y; a3 = a3 * x + y;
        a4 = a4 * x + y; a5 = a5 * x + y; a6 = a6 * x + y; a7 = a7 * x + y;
        a8 = a8 * x + y; a9 = a9 * x + y; a10 = a10 * x + y; a11 = a11 * x + y;
        OPAQUE(a0, a1, a2, a3, a4, a5);
        OPAQUE(a6, a7, a8, a9, a10, a11);
    }
    v16 s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
    double t = 0;
    for (int i = 0; i < 16; i++) t += s[i];
    return t;
}
"""
_FLOPS_PER_ITER = 12 * 16 * 2


def fma_peak_gflops(iters: int = 100_000_000, repeats: int = 3) -> float | None:
    """Best float32 GFLOP/s of the FMA loop on all cores at once (one thread each), compiled here
    with ``cc -O2 -march=native``; None without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source, lib = Path(tmp) / "fma.c", Path(tmp) / "fma.so"
        source.write_text(_FMA_SOURCE)
        built = subprocess.run(
            [compiler, "-O2", "-march=native", "-shared", "-fPIC", str(source), "-o", str(lib)],
            capture_output=True,
        )
        if built.returncode != 0:
            return None
        loop = ctypes.CDLL(str(lib)).fma_loop
    loop.restype, loop.argtypes = ctypes.c_double, [ctypes.c_long]
    cores = os.cpu_count() or 1
    best = 0.0
    for _ in range(repeats):  # ctypes releases the GIL: the threads run on every core
        threads = [threading.Thread(target=loop, args=(iters,)) for _ in range(cores)]
        t = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        best = max(best, cores * iters * _FLOPS_PER_ITER / (time.perf_counter() - t) / 1e9)
    return best
