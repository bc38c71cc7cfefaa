"""Read back what an offline wandb run wrote, for tests: the history rows in its `run-*.wandb` file.

wandb 0.31's Python package no longer ships a reader for its own record file, so this parses it: a
7-byte header (`:W&B`, magic, version) followed by LevelDB-log blocks of 32 KiB, each record a
`wandb_internal_pb2.Record` protobuf (the schema that ships with wandb).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb record file"
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


def history(run_dir: Path) -> list[dict]:
    """Every `wandb.log` row of the offline run(s) under ``run_dir``, values decoded from JSON."""
    rows = []
    for file in sorted(Path(run_dir).rglob("run-*.wandb")):
        for rec in records(file):
            if rec.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows
