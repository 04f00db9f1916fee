"""``results/MANIFEST.json``: the sha256 of every result document of a submission."""

from __future__ import annotations

from pathlib import Path

from ..atomic import sha256_file, write_json_atomic
from .files import remove_temporaries

MANIFEST = "MANIFEST.json"


def manifest_path(folder: Path) -> Path:
    return Path(folder) / "results" / MANIFEST


def write_manifest(folder: Path) -> Path:
    """Record the sha256 of every result document under ``folder/results``."""
    results = Path(folder) / "results"
    remove_temporaries(results)  # left by a writer killed mid-write; the run that calls this has finished
    entries = {str(p.relative_to(results)): sha256_file(p) for p in sorted(results.rglob("*.json")) if p.name != MANIFEST}
    write_json_atomic(manifest_path(folder), {"files": entries})
    return manifest_path(folder)
