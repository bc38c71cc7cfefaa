"""The bundle half of `make gpu-bundle` / `make gpu-check`: wheels installed with no index and no resolver into a
folder that then shadows the machine's own packages (the GPU machine's transformers is older than ours)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_check  # noqa: E402


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel, built by hand (no build backend, no network)."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", f"VERSION = {version!r}\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"{name}/__init__.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return path


def test_bundle_wheels_install_offline_and_shadow_the_machines_packages(tmp_path):
    bundle, site, out = tmp_path / "bundle", tmp_path / "site", tmp_path / "out"
    (bundle / "wheels").mkdir(parents=True)
    out.mkdir()
    _wheel(bundle / "wheels", "mt_probe", "2.0")
    record = gpu_check.install(bundle, site, out)
    assert record["installed"] == ["mt_probe-2.0-py3-none-any.whl"]
    # an older copy elsewhere on the path loses to the bundle's, as the GPU machine's transformers 5.17 must
    older = tmp_path / "machine"
    (older / "mt_probe").mkdir(parents=True)
    (older / "mt_probe" / "__init__.py").write_text("VERSION = '1.0'\n")
    env = gpu_check.section_env(site, tmp_path)
    env["PYTHONPATH"] += f":{older}"
    probe = subprocess.run([sys.executable, "-c", "import mt_probe; print(mt_probe.VERSION)"], capture_output=True, text=True,
                           env=env, check=True)
    assert probe.stdout.strip() == "2.0"


def test_a_broken_bundle_stops_with_its_pip_log(tmp_path):
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    (bundle / "wheels").mkdir(parents=True)
    out.mkdir()
    (bundle / "wheels" / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(SystemExit, match="installing the bundle failed"):
        gpu_check.install(bundle, tmp_path / "site", out)
    assert (out / "install-error.txt").read_text()


def test_no_bundle_uses_the_machines_packages(tmp_path):
    assert gpu_check.install(None, tmp_path / "site", tmp_path)["installed"] == []


def test_a_child_killed_at_its_deadline_leaves_what_it_printed(tmp_path):
    """A section's child streams into out/logs as it runs: killed at the timeout, its output is still there (and so it
    comes back from a device call whose limit kills the whole check), and the step says it timed out."""
    section = gpu_check.Section("z", tmp_path, timeout=3, env=dict(os.environ))
    code = "import time; print('loaded the model', flush=True); time.sleep(60)"
    with pytest.raises(TimeoutError):
        section.run("slow side", [sys.executable, "-c", code])
    step = section.record["steps"][-1]
    assert step["timed_out"] and "loaded the model" in step["tail"]
    assert (tmp_path / "logs" / step["log"]).read_text() == "loaded the model\n"
