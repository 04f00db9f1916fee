"""The files of a submission folder, as a pull request brings them: checked before any is read.

A submission is a pull request's folder: a symbolic link in it can point anywhere on the machine that
validates or builds the site (``results/x.json -> /etc/passwd``, a folder link to ``/``), a FIFO blocks
a reader forever, and the number and size of files are whatever the contributor chose. The walk here
never follows a link, stops after ``SUBMISSION_FILES`` entries, and names every problem on one line.
Temporary files left by a writer killed mid-write (``atomic.write_atomic``) are not part of the
submission: they are never read and are reported as nothing.
"""

from __future__ import annotations

import itertools
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import is_temporary
from ..errors import printable as shown
from ..limits import SUBMISSION_DEPTH, SUBMISSION_FILES, SUBMISSION_TOTAL_BYTES, size_text, submission_file_limit


@dataclass
class Inventory:
    files: list[Path] = field(default_factory=list)  # regular files, relative to the folder, sorted
    problems: list[str] = field(default_factory=list)


def scan(folder: Path) -> Inventory:
    """Every regular file under ``folder`` (links not followed), and every link, special file or excess.

    The walk keeps its own stack (no recursion, so no depth exhausts it), counts folders with files
    against ``SUBMISSION_FILES`` and refuses folders nested deeper than ``SUBMISSION_DEPTH`` and names
    holding control characters."""
    folder = Path(folder)
    found = Inventory()
    if folder.is_symlink():
        found.problems.append(f"{folder}: (folder): is a symbolic link to {shown(os.readlink(folder))}; refused")
        return found
    total, seen = 0, 0

    def refuse(path: Path, reason: str) -> None:
        found.problems.append(f"{shown(str(path))}: (file): {reason}")

    stack = [(folder, 0)]
    while stack:
        here, depth = stack.pop()
        try:
            with os.scandir(here) as listing:  # one entry past the cap is enough to refuse: read no more
                entries = sorted(itertools.islice(listing, SUBMISSION_FILES - seen + 1), key=lambda e: e.name,
                                 reverse=True)
        except OSError as exc:
            found.problems.append(f"{shown(str(here))}: (folder): cannot be read: {exc.strerror or exc}")
            continue
        for entry in entries:
            path = here / entry.name
            seen += 1
            if seen > SUBMISSION_FILES:
                found.problems.append(f"{folder}: (folder): more than {SUBMISSION_FILES} files and folders; refused")
                found.files.sort()
                return found
            if shown(entry.name) != entry.name:
                refuse(path, "a name with control or invisible characters is not allowed in a submission")
                continue
            try:
                info = path.lstat()
            except OSError as exc:
                refuse(path, f"cannot be read: {exc.strerror or exc}")
                continue
            if stat.S_ISLNK(info.st_mode):
                refuse(path, f"a symbolic link (to {shown(os.readlink(path))}) is not allowed in a submission")
                continue
            if stat.S_ISDIR(info.st_mode):
                if depth + 1 > SUBMISSION_DEPTH:
                    found.problems.append(f"{path}: (folder): nested more than {SUBMISSION_DEPTH} folders deep; refused")
                else:
                    stack.append((path, depth + 1))
                continue
            if not stat.S_ISREG(info.st_mode):
                refuse(path, "not a regular file")
                continue
            total += info.st_size
            limit = submission_file_limit(path.relative_to(folder).parts, path.suffix)
            if info.st_size > limit:  # a temporary name does not lift the bound: it is a name anyone can give
                refuse(path, f"{size_text(info.st_size)}, larger than the {size_text(limit)} allowed for this kind of file")
                continue
            if is_temporary(entry.name):
                continue
            found.files.append(path.relative_to(folder))
    if total > SUBMISSION_TOTAL_BYTES:
        found.problems.append(f"{folder}: (folder): {size_text(total)} in all, more than the "
                              f"{size_text(SUBMISSION_TOTAL_BYTES)} allowed")
    found.files.sort()
    return found


def remove_temporaries(folder: Path, older_than: float | None = None) -> list[Path]:
    """Delete the temporary files a killed writer left under ``folder``: all of them, or only those last
    written before ``older_than`` (a time.time()), so that a run finishing beside another one that is still
    writing (say, another task of the same submission) leaves the other's files in flight alone."""
    removed = []
    for root, _, names in os.walk(folder, followlinks=False):
        for name in names:
            path = Path(root) / name
            if not is_temporary(name) or path.is_symlink():
                continue
            try:
                if older_than is not None and path.stat().st_mtime >= older_than:
                    continue
                path.unlink()
            except FileNotFoundError:  # renamed into place by its writer meanwhile
                continue
            removed.append(path)
    return removed
