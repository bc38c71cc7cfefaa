"""Writing files: whole or not at all, strict JSON, and the one error line of a failed write (full disk, lost errno)."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import uuid
from pathlib import Path

from multitune.errors import UserError


def temp_path(path: Path) -> Path:
    """A name beside ``path`` that no other writer uses. With save_on_each_node on shared storage each node's writer
    writes the same files at the same moment; a shared temporary name let one's rename take the other's file
    (FileNotFoundError on one rank, the others left waiting). Not tempfile.mkstemp: its files are private (0600)."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def is_temp(name: str, of: str) -> bool:
    """Whether ``name`` is a temporary file of a write of ``of`` (``<of>.tmp``: an earlier version's)."""
    return name == f"{of}.tmp" or name.startswith(f".{of}.") and name.endswith(".tmp")


def atomic_write(path: Path, text: str) -> None:
    """The whole text or the old file, never half of it (a full disk leaves no partial file behind)."""
    tmp = temp_path(path)
    try:
        with open(tmp, "x") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# how a full disk shows: OSError ENOSPC, safetensors' Rust IoError
DISK_FULL = ("No space left on device", "StorageFull")
# torch's zip writer loses the errno and says it three ways: a failed write, or, when writing to a file name, its C++
# stream failing and then the archive ending short when closed. A full disk (scripts/fault_injection.py --matrix),
# a file-size limit (EFBIG), a quota or an I/O error all read the same, so the free space there decides (write_error)
ERRNO_LOST = ("PytorchStreamWriter failed writing file", "basic_ios::clear: iostream error", "unexpected pos ")
NEARLY_FULL = 16 * 2**20  # free bytes under which a write failure without errno is taken for a full disk


def _chain(err: BaseException | None):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` (or what caused it) says that the disk ran out of space."""
    return any(isinstance(e, OSError) and e.errno == errno.ENOSPC or any(m in str(e) for m in DISK_FULL) for e in _chain(err))


def write_failed(err: BaseException | None) -> bool:
    """Whether ``err`` is the OS refusing a write: a full disk, or torch's writer failing with the errno lost."""
    return disk_full(err) or any(m in str(e) for e in _chain(err) for m in ERRNO_LOST)


def write_error(err: BaseException, folder: Path, needed: int | None = None, what: str = "") -> UserError:
    """The one line for a failed write (``write_failed(err)``) into ``folder``: a full disk when the error says so, or
    when torch lost the errno and less than ``needed`` (at least a few MB) is free there; else what it could be."""
    if disk_full(err) or _free(folder) < max(needed or 0, NEARLY_FULL):
        return no_space(folder, needed, what)
    return UserError(f"writing {folder} failed; torch lost the OS error (full disk, file-size/quota limit or I/O error): "
                     "check `df -h`, `ulimit -f` and the volume, then relaunch (nothing half-written was marked complete)")


def size_text(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _free(folder: Path) -> int:
    """Free bytes on the disk that holds ``folder`` (its nearest existing parent)."""
    return shutil.disk_usage(next((p for p in (folder, *folder.parents) if p.exists()), Path("."))).free


def no_space(folder: Path, needed: int | None = None, what: str = "") -> UserError:
    """The one line for a full disk: where, how much is free there and (when known) how much is needed."""
    free = _free(folder)
    need = f", about {size_text(needed)} needed{what}" if needed else ""
    return UserError(f"No space left on device while writing {folder}: {size_text(free)} free there{need}; free some space "
                     "or point run_dir at a larger disk, then relaunch (nothing half-written was marked complete)")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def strict_json(obj, indent: int | None = 2) -> str:
    """JSON that every reader accepts: a non-finite number (NaN, inf) is written as null, never as `NaN`."""
    return json.dumps(_finite(obj), indent=indent, allow_nan=False)
