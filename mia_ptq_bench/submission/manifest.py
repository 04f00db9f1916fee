"""``results/MANIFEST.json``: the sha256 of every result document of a submission."""

from __future__ import annotations

from pathlib import Path

from ..atomic import sha256_file, write_json_atomic

MANIFEST = "MANIFEST.json"


def manifest_path(folder: Path) -> Path:
    return Path(folder) / "results" / MANIFEST


def manifested(results: Path) -> list[Path]:
    """The files a manifest covers: every result document and every plan's quantized weights."""
    files = [*results.rglob("*.json"), *results.rglob("*.models.safetensors")]
    return sorted(p for p in files if p.name != MANIFEST)


def write_manifest(folder: Path) -> Path:
    """Record the sha256 of every result document and evidence file under ``folder/results``."""
    results = Path(folder) / "results"
    entries = {str(p.relative_to(results)): sha256_file(p) for p in manifested(results)}
    write_json_atomic(manifest_path(folder), {"files": entries})
    return manifest_path(folder)
