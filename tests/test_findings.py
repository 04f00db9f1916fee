from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from mia_ptq_bench.cli import app
from builtin_submission import evaluated_builtin

cli = CliRunner()


def test_findings_are_generated_from_results(tmp_path: Path) -> None:
    submissions = tmp_path / "submissions"
    for name in ("fp32", "rtn"):
        evaluated_builtin(submissions, name)
    out = tmp_path / "findings.md"
    result = cli.invoke(app, ["findings", "--task", "tiny-digits", "--submissions", str(submissions), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    text = out.read_text()
    for heading in ("## 1.", "## 4.", "## 5.", "## 6.", "## Wall time"):
        assert heading in text
    # tiny-digits has no plain w1.58 plan and no plain offline attack: those questions are left out, not faked
    assert "## 2." not in text and "## 3." not in text
    # answers are sentences with their paired intervals, and the study's numbers beside them
    assert "- **rtn** at w1.58-last8: the study's attacker falls from" in text and " pp [" in text
    assert "*Study*" in text and "PROTOCOL" not in text and "fp32 fp32" not in text and "% kept" not in text
    wall = text.split("## Wall time", 1)[1]
    per_method = [int(line.split(": ")[1].split(" s")[0]) for line in wall.splitlines() if " s on " in line]
    together = int(wall.split("- All together: ")[1].split(" s")[0])
    assert len(per_method) == 2 and abs(together - sum(per_method)) <= 1  # each line rounds on its own
    figures = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert figures == ["tiny-digits-accuracy-vs-leakage.png", "tiny-digits-attackers.png",
                       "tiny-digits-leakage-vs-bits.png"]
    assert all(f"](figures/{name})" in text for name in figures)
    missing = cli.invoke(app, ["findings", "--task", "tiny-cnn", "--submissions", str(submissions), "--out", str(out)])
    assert missing.exit_code == 2 and "no current results for task 'tiny-cnn'" in missing.stderr
