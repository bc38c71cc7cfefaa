"""Is a checkpoint whole? Judged from what its save recorded, never by unpickling anything in it.

multitune's own save path (:class:`multitune.training.checkpoints.CompleteMarker`) writes ``COMPLETE`` last,
once every rank has written its part: the batch layout and a manifest of every file in the checkpoint,
with its size and sha256. A checkpoint is complete when every file the manifest names is there with
those bytes and the manifest names what a resume reads (weights, optimizer, scheduler, RNG state,
trainer state). A checkpoint folder, on a shared volume or downloaded from the Hub, is data: nothing here
loads a pickle (a DCP ``.metadata`` is hashed like any other file).

Checkpoints written before the manifest (a ``COMPLETE`` without ``files``) are trusted as marked, and
checked as far as that is possible without unpickling: every file a resume reads is there, safetensors
hold every byte their header points to, and torch files (zip archives) pass their CRC-32 checks. Their
FSDP shards are only checked to be there (which shards a ``.metadata`` names is in the pickle).
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path

from multitune.files import atomic_write, is_temp

MARKER = "COMPLETE"
DCP_DIRS = ("pytorch_model_fsdp_0", "optimizer_0")  # FSDP sharded state dicts (torch.distributed.checkpoint)
_SAFE = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")
_RNG = re.compile(r"rng_state(_\d+)?\.pth")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def record(folder: Path) -> dict[str, dict]:
    """Name (relative, '/'-separated), size and sha256 of every file in ``folder`` but the marker."""
    # by name first: another node's marker being written (save_on_each_node on shared storage) comes and goes
    files = sorted(p for p in folder.rglob("*") if not (p.name == MARKER or is_temp(p.name, MARKER)) and p.is_file())
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)} for p in files}


def write_marker(folder: Path, info: dict) -> None:
    """``COMPLETE`` with ``info`` and the manifest of the folder, written atomically (a kill leaves none)."""
    atomic_write(folder / MARKER, json.dumps({**info, "files": record(folder)}))


def read_marker(folder: Path) -> dict | None:
    """The marker's content (None when absent or unreadable; ``{}`` for an early marker with no content)."""
    try:
        marker = json.loads((folder / MARKER).read_text() or "{}")
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def manifest_names(marker: dict) -> list[str] | None:
    """The file names a manifest lists, or None when it has none or names a path outside its folder."""
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return None
    names = list(files)
    if not all(_SAFE.fullmatch(n) and "." not in n.split("/") and ".." not in n.split("/") for n in names):
        return None
    return names


def missing_parts(names: set[str], world_size: int | None) -> str | None:
    """What a resume reads that ``names`` lacks: trainer state, weights, optimizer, scheduler, RNG state."""
    weights = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json", f"{DCP_DIRS[0]}/.metadata")
    needs = {
        "trainer_state.json": "trainer_state.json" in names,
        "weights": any(w in names for w in weights),
        # an adapter's optimizer is gathered whole (adapter_state.py): its DCP folders are never read
        "optimizer": "optimizer.pt" in names or (f"{DCP_DIRS[1]}/.metadata" in names and "adapter_model.safetensors" not in names),
        "scheduler.pt": "scheduler.pt" in names,
        # one process writes rng_state.pth; several write rng_state_<rank>.pth (a node keeps its own ranks')
        "rng_state.pth": ("rng_state.pth" in names) if world_size == 1 else any(_RNG.fullmatch(n) for n in names),
    }
    lacking = [part for part, ok in needs.items() if not ok]
    return f"no {', '.join(lacking)}" if lacking else None


def manifest_problem(folder: Path, marker: dict) -> str | None:
    """Why ``folder`` does not hold the files its manifest records (None: it does)."""
    names = manifest_names(marker)
    if names is None:
        return "its manifest is unreadable"
    for name in names:
        path, want = folder / name, marker["files"][name]
        if not path.is_file():
            return f"{name} is missing"
        if not isinstance(want, dict) or path.stat().st_size != want.get("size"):
            return f"{name} is not the size the save recorded"
        if sha256(path) != want.get("sha256"):
            return f"{name} differs from what the save wrote (sha256)"
    return None


# ---------------------------------------------------------------- checkpoints from before the manifest


def _safetensors_intact(path: Path) -> bool:
    """The header parses and the file holds every byte the header points to (catches truncation)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return False
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return 8 + n + end == size


def _zip_intact(path: Path) -> bool:
    """torch.save writes a zip archive: its directory comes last and each member carries a CRC-32."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return False


def legacy_problem(folder: Path) -> str | None:
    """Why an early-marked ``folder`` cannot be resumed, as far as that shows without unpickling (None: it can)."""
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    for name in sorted(names):
        path = folder / name
        if name.endswith(".safetensors") and not _safetensors_intact(path):
            return f"{name} is truncated or damaged"
        if (name.endswith((".pt", ".pth")) or name == "training_args.bin") and not _zip_intact(path):
            return f"{name} is truncated or damaged"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return "model.safetensors.index.json is unreadable"
        if not shards or not shards <= names:
            return "a weight shard named in model.safetensors.index.json is missing"
    for dcp in DCP_DIRS:
        if (folder / dcp).is_dir() and not any(n.startswith(f"{dcp}/") and n.endswith(".distcp") for n in names):
            return f"{dcp} holds no shard"
    return None
