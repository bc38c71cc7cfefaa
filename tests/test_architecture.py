"""The layers and the module map: import-linter's contracts hold, and ARCHITECTURE.md names only modules that exist
and every module there is."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "multitune"


def test_import_contracts_hold():
    """An upward import or a cycle among one package's modules fails here with the offending line."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "import-linter is a dev dependency: pip install -e '.[dev]' -c constraints.txt"
    done = subprocess.run([lint, "--config", str(REPO / ".importlinter")], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO / "src"), "PATH": str(Path(sys.executable).parent)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def _named_modules() -> set[str]:
    table = (REPO / "ARCHITECTURE.md").read_text().split("## One line a module", 1)[1]
    return set(re.findall(r"^\| `([\w/]+\.py)` \|", table, flags=re.M))


def test_architecture_names_every_module_and_only_modules_that_exist():
    named = _named_modules()
    actual = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert named - actual == set(), f"ARCHITECTURE.md names modules that do not exist: {sorted(named - actual)}"
    assert actual - named == set(), f"modules missing from ARCHITECTURE.md: {sorted(actual - named)}"


def test_every_layer_of_the_picture_is_a_contract_layer():
    config = (REPO / ".importlinter").read_text()
    for package in ("commands", "launch", "publishing", "training", "results", "scoring", "modeling", "data", "tasks"):
        assert f"multitune.{package}\n" in config and (PACKAGE / package / "__init__.py").exists(), package
