"""Whole-or-nothing writes: two writers of one file (each node's writer with save_on_each_node on shared storage)
never make each other fail, and a write that fails leaves the earlier file, or none, and no temporary file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

HAMMER = """
import sys
from pathlib import Path
kind, target, me, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if kind == "file":
    from multitune.files import atomic_write
    write = lambda: atomic_write(target, f"written by {me}\\n" * 400)
else:
    from multitune.training.manifest import write_marker
    write = lambda: write_marker(target, {"writer": me})
print("ready", flush=True)
sys.stdin.readline()  # both start together
for _ in range(n):
    write()
"""


def _hammer(kind: str, target: Path, writes: int) -> None:
    """Two processes write ``target`` ``writes`` times each, started at one moment; both must finish cleanly."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    procs = [subprocess.Popen([sys.executable, "-c", HAMMER, kind, str(target), me, str(writes)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for me in ("a", "b")]
    for p in procs:
        assert p.stdout.readline() == "ready\n", p.stderr.read()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0 and "Traceback" not in err, err[-2000:]


def test_two_writers_of_one_file_never_fail_each_other(tmp_path):
    """Each used `<name>.tmp`: the loser's os.replace found the file gone (FileNotFoundError) about 1 in 100 writes."""
    target = tmp_path / "config.yaml"
    _hammer("file", target, 3000)
    assert target.read_text() in (f"written by {me}\n" * 400 for me in ("a", "b"))
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left behind


def test_two_writers_of_one_checkpoints_marker_never_fail_each_other(tmp_path):
    """Each node's first process writes COMPLETE with save_on_each_node on shared storage; neither writer's
    temporary file may appear in the other's manifest."""
    from multitune.training.manifest import MARKER, manifest_problem, read_marker

    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    (folder / "trainer_state.json").write_text("{}")
    _hammer("marker", folder, 1000)
    marker = read_marker(folder)
    assert marker["writer"] in ("a", "b") and sorted(marker["files"]) == ["adapter_model.safetensors", "trainer_state.json"]
    assert manifest_problem(folder, marker) is None
    assert sorted(p.name for p in folder.iterdir()) == sorted([MARKER, "adapter_model.safetensors", "trainer_state.json"])


def test_a_failed_write_leaves_the_earlier_file_and_no_temporary_one(tmp_path, monkeypatch):
    from multitune import files

    target = tmp_path / "metrics.json"
    target.write_text(json.dumps({"accuracy": 0.5}))

    def replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError):
        files.atomic_write(target, json.dumps({"accuracy": 0.9}))
    assert json.loads(target.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# A done marker cut short by a full disk (here a real partial write: RLIMIT_FSIZE, as `ulimit -f`) must not pass
# for a finished part: the relaunch would skip training it and then fail to parse it.
CUT_SHORT = """
import json, resource, signal, sys
from pathlib import Path
from types import SimpleNamespace
from multitune.modeling.heads import Heads
from multitune.rundir import RunDir
from multitune.training import stages
from multitune.training.parts import HeadParts, LmParts

root = Path(sys.argv[1])
big = "x" * 20000  # well past the file-size limit: the write stops part-way
stages.save_final = lambda trainer, path: path.mkdir(parents=True, exist_ok=True)
stages.launch_facts = lambda trainer: {"world_size": 1}
stages.cost_facts = lambda trainer: {"train_seconds": 1.0, "trainable_params": 8, "tokens_seen": 64, "note": big}
trainer = SimpleNamespace(args=SimpleNamespace(should_save=True), state=SimpleNamespace(save_to_json=lambda p: None))
tokenizer = SimpleNamespace(save_pretrained=lambda p: None)
lm, heads = RunDir(root / "lm"), RunDir(root / "heads")
lm.root.mkdir()
heads.final.mkdir(parents=True)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the limit then fails the write with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
failed = {}
try:
    stages.save_outputs(trainer, lm, tokenizer)
except OSError as e:
    failed["lm"] = e.errno
try:
    Heads({"claims": ["Claim", big]}).save(heads.final)
except OSError as e:
    failed["heads"] = e.errno
print(json.dumps({"failed": failed, "lm_done": LmParts().is_done(lm), "heads_done": HeadParts().is_done(heads)}))
"""


def test_a_done_marker_cut_short_by_a_full_disk_does_not_mark_the_part_trained(tmp_path):
    """cost.json (head: lm) and heads.json (head: classifier) mark a part trained: a write that stops part-way
    leaves none, so the relaunch trains the part again instead of skipping it and failing to parse the marker."""
    import errno

    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run([sys.executable, "-c", CUT_SHORT, str(tmp_path)], capture_output=True, text=True, env=env, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["failed"] == {"lm": errno.EFBIG, "heads": errno.EFBIG}  # the premise: both writes really failed
    assert out == {**out, "lm_done": False, "heads_done": False}
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["lm/launch.json"]  # no partial marker, no temporary file
