"""Killing a launched job whole, for the scripts that launch training (fault_injection.py, gpu_check.py)."""

from __future__ import annotations


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, as a lost machine would, and wait until the descendants are gone
    (the process itself is reaped by its Popen).

    Killing its process group is not enough: torchrun (and accelerate launch, through it) starts each rank in
    a session of its own, and a benchmark's sides are children of children.
    """
    import psutil  # accelerate's own dependency

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]  # listed before any dies (orphans lose their parent)
    except psutil.NoSuchProcess:  # it had just exited by itself
        return
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree[1:], timeout=60)
