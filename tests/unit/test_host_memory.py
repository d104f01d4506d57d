"""keep_freed_memory: a large tensor freed and allocated again is not page-faulted in again."""
import subprocess
import sys
import textwrap

import pytest

# Each case runs in a fresh interpreter: mallopt changes the whole process, and the control needs
# glibc's defaults.
_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from pipeline.training.host_memory import keep_freed_memory
    changed = keep_freed_memory() if sys.argv[1] == "keep" else False
    n = 40 << 20  # bytes: above glibc's largest mmap threshold (32 MiB), so it is mmapped by default
    def touch():
        t = torch.empty(n // 4)
        t.fill_(1.0)  # first touch of every page
        del t
    # Warm-up: the first allocations fault their pages in; the blocks they leave are reused only
    # once neighbouring freed blocks have merged (posix_memalign asks for a little more than the size
    # freed), after a few rounds. A training step allocates the same sizes every iteration, like this.
    for _ in range(16):
        touch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        touch()
    print(changed, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5 / (n // 4096))
""")


def _faults_per_page(mode: str) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    changed, ratio = out.stdout.split()
    return changed == "True", float(ratio)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_memory_is_reused_without_page_faults():
    changed, kept = _faults_per_page("keep")
    assert changed, "mallopt was refused on this glibc"
    # In the steady state every reuse touches pages already mapped: no faults beyond a few stray ones
    # (the interpreter's own small allocations), far below one per page.
    assert kept < 0.02
    _, default = _faults_per_page("default")
    # The control: glibc's default unmaps the block on free, so every page faults again on each reuse
    # (4 KiB pages; transparent huge pages would make this a few faults per 2 MiB, hence the guard).
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp_always = "[always]" in f.read()
    if not thp_always:
        assert default > 0.9
