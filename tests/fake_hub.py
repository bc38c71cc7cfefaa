"""A Hub repo on the local disk, for tests: the HfApi methods multitune calls, applied to a folder.

Commits apply huggingface_hub's own CommitOperationAdd/Delete objects, and downloads select files with
huggingface_hub's own pattern filter, so what a test sees is what the real operations would leave on the Hub.

    python tests/fake_hub.py HUB_ROOT train CONFIG   # the CLI, its Hub calls applied to HUB_ROOT

runs a whole process against a fake Hub that outlives it (scripts/fault_matrix.py's hub-newer fault).
"""

from __future__ import annotations

import runpy
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace


class FakeHub:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.repos: dict[str, bool] = {}  # repo id -> private
        self.commits: list[tuple[str, list, str]] = []

    def repo(self, repo_id: str) -> Path:
        return self.root / repo_id

    # --- the HfApi surface
    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        self.repos.setdefault(repo_id, bool(private))
        self.repo(repo_id).mkdir(parents=True, exist_ok=True)
        return f"https://huggingface.co/{repo_id}"

    def list_repo_tree(self, repo_id, path_in_repo=None, **kwargs):
        from huggingface_hub.errors import EntryNotFoundError

        if repo_id not in self.repos:
            raise EntryNotFoundError(f"repository {repo_id} not found")
        folder = self.repo(repo_id) / (path_in_repo or "")
        if not folder.is_dir():
            raise EntryNotFoundError(f"{path_in_repo} not in {repo_id}")
        return [SimpleNamespace(path=f"{path_in_repo}/{p.name}" if path_in_repo else p.name) for p in sorted(folder.iterdir())]

    def repo_info(self, repo_id, **kwargs):
        from huggingface_hub.errors import RepositoryNotFoundError

        if repo_id not in self.repos:
            raise RepositoryNotFoundError(f"repository {repo_id} not found")
        return SimpleNamespace(id=repo_id, private=self.repos[repo_id])

    def list_repo_files(self, repo_id, **kwargs):
        assert repo_id in self.repos, f"list files of {repo_id} before create_repo"
        return self.files(repo_id)

    def hf_hub_download(self, repo_id, filename, local_dir=None, **kwargs):
        dest = Path(local_dir) / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.repo(repo_id) / filename, dest)
        return str(dest)

    def create_commit(self, repo_id, operations, commit_message="", **kwargs):
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        assert repo_id in self.repos, f"commit to {repo_id} before create_repo"
        self.commits.append((repo_id, list(operations), commit_message))
        for op in operations:
            dest = self.repo(repo_id) / op.path_in_repo
            if isinstance(op, CommitOperationAdd):
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(op.path_or_fileobj, dest)
            elif isinstance(op, CommitOperationDelete):
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/fake")

    def upload_folder(self, repo_id, folder_path, commit_message="", **kwargs):
        from huggingface_hub import CommitOperationAdd

        files = sorted(p for p in Path(folder_path).rglob("*") if p.is_file())
        ops = [CommitOperationAdd(path_in_repo=p.relative_to(folder_path).as_posix(), path_or_fileobj=str(p)) for p in files]
        return self.create_commit(repo_id, ops, commit_message)

    def snapshot_download(self, repo_id, local_dir, allow_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        repo = self.repo(repo_id)
        files = [p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()]
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns):
            dest = Path(local_dir) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(repo / rel, dest)
        return str(local_dir)

    def files(self, repo_id: str) -> list[str]:
        repo = self.repo(repo_id)
        return sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())


def install(monkeypatch, hub: FakeHub) -> FakeHub:
    """Route multitune's Hub calls (checkpoint uploads and downloads, push) to ``hub``."""
    import huggingface_hub

    from multitune.training import hub_checkpoints

    monkeypatch.setattr(hub_checkpoints, "make_api", lambda: hub)
    monkeypatch.setattr(hub_checkpoints, "snapshot_download", hub.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: hub)
    return hub


def serve(root: Path) -> FakeHub:
    """For the whole process: a FakeHub on ``root`` as an earlier process left it (each OWNER/NAME folder a private
    repo), with multitune's Hub calls routed to it."""
    hub = FakeHub(root)
    for repo in sorted(p for p in Path(root).glob("*/*") if p.is_dir()):
        hub.repos[f"{repo.parent.name}/{repo.name}"] = True
    return install(SimpleNamespace(setattr=setattr), hub)


if __name__ == "__main__":
    serve(Path(sys.argv.pop(1)))
    runpy.run_module("multitune.cli", run_name="__main__", alter_sys=True)
