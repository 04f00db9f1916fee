"""A reference submission folder of a built-in quantizer, evaluated on a test task through the CLI."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from mia_ptq_bench.cli import app


def evaluated_builtin(root: Path, name: str, task: str = "tiny-digits") -> Path:
    """``root/name`` with a submission.yaml for built-in ``name`` and its results on ``task``."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "submission.yaml").write_text(
        f"name: {name}\ndisplay_name: {name}\nversion: '1'\nauthors: [{{name: t}}]\nlicense: MIT\n"
        f"contact: t@example.org\nquantizer: {{builtin: {name}}}\ntasks: [{task}]\n")
    result = CliRunner().invoke(app, ["evaluate", name, "--task", task, "--submission", str(folder)])
    assert result.exit_code == 0, result.stderr
    return folder
