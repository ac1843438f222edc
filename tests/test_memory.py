"""keep_freed_memory: a large buffer freed and allocated again reuses its pages (no fresh page faults),
where glibc's default hands it back to the kernel and faults it in again. Run in fresh processes."""

import subprocess
import sys

import pytest

SIZE = 64 * 2**20  # above glibc's largest mmap threshold (32 MB)
SCRIPT = f"""
import ctypes, resource
from gptsan.memory import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = libc.malloc({SIZE})
    ctypes.memset(buffer, 1, {SIZE})  # what XLA does to a fresh output buffer: write every page
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(buffer)
print(applied, faults)
"""


def second_allocation_faults(keep: str) -> tuple[bool, int]:
    env = {"GPTSAN_KEEP_FREED_MEMORY": keep, "PATH": ""}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_memory_is_reused_without_page_faults():
    applied, kept_faults = second_allocation_faults("1")
    assert applied
    default_applied, default_faults = second_allocation_faults("0")
    assert not default_applied
    pages = SIZE // 4096
    assert default_faults > pages // 2  # the kernel hands the pages back and zeroes them again
    assert kept_faults < pages // 20
