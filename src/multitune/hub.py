"""Where datasets and models come from: a local path, a local Hub-shaped mirror, or the Hub itself.

All loading goes through the real ``datasets.load_dataset`` / ``from_pretrained`` code paths; this
module only decides *what* to pass them and turns their failures into one-line user errors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import datasets

from multitune.errors import UserError

MIRROR_ENV = "MULTITUNE_HUB_MIRROR"
PARQUET_REVISION = "refs/convert/parquet"
_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def mirror_root(configured: Path | str | None) -> Path | None:
    root = configured or os.environ.get(MIRROR_ENV)
    return Path(root).expanduser() if root else None


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or Path(ref).suffix.lower() in _FILE_BUILDERS or ref.count("/") > 1


def is_hub_id(ref: str | None) -> bool:
    """Whether ``ref`` names a Hub repo (``org/name``, by huggingface_hub's own rules) and not a local path
    or file (an existing path, or one shaped like a path). Dots and digits are fine: ``org/Llama-3.1-8B``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not ref or ref.count("/") != 1 or _looks_like_path(ref) or Path(ref).expanduser().exists():
        return False
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return True


def resolve(ref: str, kind: str, mirror: Path | None) -> str:
    """Map a Hub id to a local directory when one exists (the path itself, or ``MIRROR/<kind>s/<id>``)."""
    local = Path(ref).expanduser()
    if local.exists():
        return str(local)
    if mirror is not None:
        mirrored = mirror / f"{kind}s" / ref
        if mirrored.exists():
            return str(mirrored)
    if _looks_like_path(ref):
        where = f" (nor under the mirror {mirror}/{kind}s/)" if mirror else ""
        raise UserError(f"{kind} path not found: {ref}{where}; " + (
            f"build it with `{build}`" if (build := build_command(ref)) else "check the path or use a Hub id like org/name"))
    return ref


# A shipped config's header line that builds its local model: `#   multitune make-tiny-model DIR --config ...`
# or `#   multitune demo ...` (a trailing `# comment` is not part of the command).
_BUILD_LINE = re.compile(r"^#\s+(multitune (?:make-tiny-model|demo)\b[^#\n]*?)\s*(?:#[^\n]*)?$", re.MULTILINE)


def build_command(ref: str, configs: Path = Path("configs")) -> str | None:
    """The command that builds the local model ``ref``, as a config in ./configs documents it (the shipped
    tiny configs do); None when none names ``ref``."""
    named = re.compile(rf"(?<![\w/.-]){re.escape(ref.rstrip('/'))}(?![\w/.-])")
    for path in sorted(configs.glob("*.yaml")) if configs.is_dir() else []:
        for line in _BUILD_LINE.finditer(path.read_text(errors="replace")):
            if named.search(line.group(0)):
                return line.group(1)
    return None


def load_rows(ref: str, *, subset: str | None, split: str, mirror: Path | None, revision: str | None = None) -> datasets.Dataset:
    """Load one split of a dataset as a ``datasets.Dataset``; ``revision`` pins a Hub dataset (local copies
    and mirrors are what they are)."""
    source = resolve(ref, "dataset", mirror)
    path = Path(source)
    try:
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise UserError(f"unsupported dataset file {path}; use .csv, .json, .jsonl or .parquet")
            return datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
        if path.is_dir():
            return datasets.load_dataset(str(path), subset, split=split)
        return _load_from_hub(source, subset, split, revision)
    except UserError:
        raise
    except ValueError as e:
        if "corresponds to no data" in str(e):
            raise UserError(f"dataset {ref} is empty (split {split!r} has no rows)") from None
        if "split" in str(e).lower():
            raise UserError(f"dataset {ref} has no split {split!r}: {str(e).splitlines()[0]}") from None
        raise
    except datasets.exceptions.DatasetGenerationError as e:
        raise UserError(unreadable_data(ref, e)) from None
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(
            f"cannot load dataset {ref}: {str(e).splitlines()[0]}; pass a local path, set hub_mirror "
            f"(or {MIRROR_ENV}), or check the id and your network"
        ) from None


def unreadable_data(ref: str, err: BaseException) -> str:
    """One line for a data file the builder could not parse: the cause (not UTF-8, a malformed row), not its traceback."""
    cause = err
    while cause.__cause__ or cause.__context__:
        cause = cause.__cause__ or cause.__context__
        if isinstance(cause, UnicodeDecodeError):
            return f"dataset {ref} is not UTF-8 text{_where_not_utf8(ref)}; re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`"
    detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return f"cannot read dataset {ref}: {type(cause).__name__}: {detail[:200]}; check that the file is well-formed"


def _where_not_utf8(ref: str) -> str:
    path = Path(ref).expanduser()
    if not path.is_file():
        return ""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        return f" (line {line}: byte {data[e.start:e.start + 1]!r}, {e.reason})"
    return ""


def _load_from_hub(repo_id: str, subset: str | None, split: str, revision: str | None = None) -> datasets.Dataset:
    try:
        return datasets.load_dataset(repo_id, subset, split=split, revision=revision)
    except RuntimeError as e:
        # datasets >= 4 refuses legacy loading scripts (PolyAI/banking77 is one); the Hub keeps an automatic
        # parquet conversion of every public dataset on a separate revision, which loads without the script.
        if "Dataset scripts are no longer supported" not in str(e):
            raise
        pinned = f" (revision {revision} is a loading script too; the split's content fingerprint guards the rows)" if revision else ""
        print(f"notice: {repo_id} is a loading-script repo; using its {PARQUET_REVISION} revision{pinned}")
        return datasets.load_dataset(repo_id, subset or "default", split=split, revision=PARQUET_REVISION)


def explain_model_load_error(ref: str, err: Exception) -> UserError | None:
    """Turn the Hub's gated / missing-repo failures into actionable messages; None if it is something else."""
    text = f"{type(err).__name__}: {err}"
    if "gated" in text.lower() or "GatedRepoError" in text:
        has_token = bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
        step = (
            "your token has no access yet" if has_token else "no Hugging Face token was found: export HF_TOKEN=... or run `hf auth login`"
        )
        return UserError(
            f"model {ref} is gated: {step}, and accept its licence at https://huggingface.co/{ref}"
        )
    build = build_command(ref)
    fix = f"build it with `{build}`" if build else "pass a local directory or set hub_mirror"
    if "RepositoryNotFoundError" in text or "is not a local folder and is not a valid model identifier" in text:
        return UserError(f"model {ref} not found: no local directory {ref} and no Hub model id {ref} you can access; {fix}")
    if "offline" in text.lower() or "couldn't connect" in text.lower() or "LocalEntryNotFoundError" in text:
        # `runs/x` is shaped like a Hub `org/name` id: which one was meant cannot be known, so say both
        return UserError(f"model {ref}: no local directory {ref} (from {Path.cwd()}), and the Hub id {ref} could not be "
                         f"reached (offline or no network); {fix}")
    return None
