"""``results/MANIFEST.json``: the sha256 of every result document and evidence file of a submission."""

from __future__ import annotations

from pathlib import Path

from ..atomic import sha256_file, write_json_atomic
from .files import remove_temporaries

MANIFEST = "MANIFEST.json"
EVIDENCE_SUFFIX = ".models.safetensors"  # <task>/<plan>.models.safetensors: a plan's quantized weights


def manifest_path(folder: Path) -> Path:
    return Path(folder) / "results" / MANIFEST


def manifested(results: Path) -> list[Path]:
    """The files a manifest covers: every result document and every plan's quantized weights."""
    files = [*results.rglob("*.json"), *results.rglob(f"*{EVIDENCE_SUFFIX}")]
    return sorted(p for p in files if p.name != MANIFEST)


def write_manifest(folder: Path, started: float | None = None) -> Path:
    """Record the sha256 of every result document and evidence file under ``folder/results``.

    Temporary files left by a writer killed mid-write are deleted first: those last written before
    ``started`` (the calling run's start, a time.time()), or all of them without it."""
    results = Path(folder) / "results"
    remove_temporaries(results, started)
    entries = {str(p.relative_to(results)): sha256_file(p) for p in manifested(results)}
    write_json_atomic(manifest_path(folder), {"files": entries})
    return manifest_path(folder)
