"""Reading submission folders: the metadata, and where submissions are."""

from __future__ import annotations

from pathlib import Path

from ..errors import BenchError
from ..limits import SUBMISSION_YAML_BYTES
from ..spec.loader import read_yaml, validate_document
from .schema import REPRODUCED_IN_PULL_REQUESTS, SubmissionSpec

METADATA = "submission.yaml"


def load_submission(folder: Path) -> SubmissionSpec:
    path = Path(folder) / METADATA
    # a pull request's file: bounded, and never a symbolic link (it could point anywhere on the machine)
    data = read_yaml(path, SUBMISSION_YAML_BYTES, follow_symlinks=False)
    spec: SubmissionSpec = validate_document(SubmissionSpec, data, str(path))
    if spec.name != Path(folder).name:
        raise BenchError(f"{path}: name: {spec.name!r} must equal the folder name {Path(folder).name!r}")
    return spec


def is_submission_folder(folder: Path) -> bool:
    """Whether ``folder`` holds its own submission.yaml (a regular file, not a link to one)."""
    metadata = Path(folder) / METADATA
    return metadata.is_file() and not metadata.is_symlink()


def find_submissions(root: Path) -> list[Path]:
    """A folder with submission.yaml is one submission; otherwise each such folder below it."""
    root = Path(root)
    if is_submission_folder(root):
        return [root]
    return sorted(p.parent for p in root.glob(f"*/{METADATA}"))


def requirement(folder: Path) -> str:
    """The pinned pip requirement (``name==version``, as the schema allows it) whose class the submission
    names, or "" for a built-in or a file of the folder: what the pull-request job installs before a rerun."""
    return load_submission(folder).quantizer.requirement or ""


def rerun_tasks(folder: Path) -> list[str]:
    """The tasks the pull-request job reruns this submission's code on: those its metadata lists (parsed,
    as validate reads them, never matched as text) that are cheap enough (``REPRODUCED_IN_PULL_REQUESTS``)."""
    return [task for task in load_submission(folder).tasks if task in REPRODUCED_IN_PULL_REQUESTS]

