"""Builds cputune._bwprobe. Metadata lives in pyproject.toml.

The extension is compiled for the baseline ISA; its AVX2/AVX-512 kernels are selected at
import time, so a wheel built on one box runs at full speed on another (no -march=native).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from glob import glob

from setuptools import Extension, setup

APT_HINT = "sudo apt-get install -y build-essential python3-dev libnuma-dev"


def _compiles(source: str, extra_args=(), libs=()) -> bool:
    """Try to compile and link a tiny program, as psutil probes for ethtool.h."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cc = cc.split()
    if not shutil.which(cc[0]):
        return False
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        cmd = cc + [src, "-o", os.path.join(d, "probe"), *extra_args, *libs]
        return subprocess.run(cmd, capture_output=True).returncode == 0


def _fail(what: str) -> None:
    sys.stderr.write(f"\nerror: cputune needs {what} to build its C extension.\n"
                     f"  On Debian/Ubuntu: {APT_HINT}\n\n")
    sys.exit(1)


def _extension() -> Extension:
    building = any(a in sys.argv for a in ("build_ext", "bdist_wheel", "build", "install",
                                           "develop", "editable_wheel", "bdist"))
    macros, libs = [], []
    if building:
        if not _compiles("int main(void){return 0;}\n"):
            _fail("a C compiler (gcc)")
        inc = sysconfig.get_paths()["include"]
        if not os.path.exists(os.path.join(inc, "Python.h")):
            _fail(f"the Python headers (Python.h, not found in {inc})")
        if not _compiles("#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n",
                         ["-fopenmp"]):
            _fail("OpenMP (gcc's libgomp: package libgomp1 / gcc)")
        if _compiles("#include <numaif.h>\nint main(void){return 0;}\n", libs=["-lnuma"]):
            macros.append(("HAVE_NUMAIF_H", "1"))
            libs.append("numa")
    return Extension(
        "cputune._bwprobe",
        sources=sorted(glob("native/*.c")),
        define_macros=macros,
        libraries=libs,
        extra_compile_args=["-O2", "-fopenmp", "-std=gnu11", "-Wall"],
        extra_link_args=["-fopenmp"],
    )


setup(ext_modules=[_extension()])
