"""Bringing a quantizer without touching the library, and validating submissions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from builtin_submission import evaluated_builtin
from conftest import TASKS
from mia_ptq_bench.cli import app
from mia_ptq_bench.extensions import import_module_or_file
from mia_ptq_bench.submission.resolve import resolve
from mia_ptq_bench.submission import validate_submission, write_manifest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "submissions" / "example-stochastic-rounding"
cli = CliRunner()

PLUGIN = '''
import torch
from mia_ptq_bench.plugin import Quantizer, QuantizerConfig, fit_grid, layer_levels

class HalfStepConfig(QuantizerConfig):
    offset: float = 0.0

class HalfStep(Quantizer):
    """Round-to-nearest with a configurable offset before rounding."""
    version = "0.1"
    Config = HalfStepConfig

    @torch.no_grad()
    def quantize(self, model, calibration, plan):
        for name, levels in layer_levels(model, plan).items():
            weight = model.get_submodule(name).weight
            grid = fit_grid(weight, levels)
            rows = weight.reshape(grid.scale.shape[0], -1)
            integers = torch.clamp(torch.round(rows / grid.scale + self.config.offset) + grid.zero_point, 0, levels - 1)
            weight.copy_(grid.dequantize(integers).view_as(weight))
        return model
'''


def evaluate(*args: str):
    return cli.invoke(app, ["evaluate", *args, "--task", "tiny-digits", "--plans", "w2", "--threat-models", "oblivious"])


@pytest.mark.parametrize("name, reason", [
    ("../../../x/escaped", "is not a quantizer name"),  # its results and cache went outside --out and the cache
    (".", "is not a quantizer name"),
    ("bad\\nname", "is not a quantizer name"),
    ("rtn", "'rtn' is already the registered quantizer 'rtn', mia_ptq_bench.quantize.builtin.RoundToNearest"),
    ("RTN", "'RTN' is already the registered quantizer 'rtn'"),  # one folder on a case-insensitive file system
])
def test_a_plugin_quantizer_name_that_is_not_a_plain_name_of_its_own_is_refused(tmp_path: Path, name: str,
                                                                                 reason: str) -> None:
    (tmp_path / "named.py").write_text(PLUGIN.replace('    version = "0.1"', f"    name = {name!r}\n    version = \"0.1\""))
    result = evaluate(f"{tmp_path / 'named.py'}:HalfStep", "--out", str(tmp_path / "a" / "b"))
    message = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "named.py:HalfStep: name: " in message and reason in message, message
    assert "Traceback" not in message and not (tmp_path / "a").exists() and not (tmp_path / "x").exists()


def test_import_path_quantizer(tmp_path: Path) -> None:
    (tmp_path / "half_step.py").write_text(PLUGIN)
    result = evaluate(f"{tmp_path / 'half_step.py'}:HalfStep", "--set", "offset=0.25", "--out", str(tmp_path / "r"))
    assert result.exit_code == 0, result.stderr
    document = json.loads(next((tmp_path / "r").rglob("w2--oblivious.json")).read_text())
    assert document["quantizer"]["config"] == {"offset": 0.25} and document["quantizer"]["version"] == "0.1"


def test_a_quantizer_from_a_file_runs_in_worker_processes_as_here(tmp_path: Path) -> None:
    """A worker imports the file under the name it has here before it receives the quantizer, or could not
    unpickle it; its numbers are the ones computed here with a worker's one thread."""
    import torch

    (tmp_path / "half_step.py").write_text(PLUGIN)
    ref = f"{tmp_path / 'half_step.py'}:HalfStep"
    threads = torch.get_num_threads()
    try:
        for name, workers in (("here", "1"), ("apart", "2")):
            torch.set_num_threads(1 if name == "here" else 2)
            result = evaluate(ref, "--set", "offset=0.25", "--workers", workers, "--out", str(tmp_path / name))
            assert result.exit_code == 0, result.stderr
    finally:
        torch.set_num_threads(threads)
    here, apart = (json.loads(next((tmp_path / name).rglob("w2--oblivious.json")).read_text()) for name in ("here", "apart"))
    assert (here["environment"]["quantize_workers"], apart["environment"]["quantize_workers"]) == (1, 2)
    assert apart["quantized"] == here["quantized"]


def test_every_file_a_quantizers_classes_come_from_is_handed_to_workers(tmp_path: Path) -> None:
    """Its class's file, its Config's from another file, and an attribute's class from a third, loaded only
    when the quantizer is made: a fresh process that imports what ``defining_files`` names unpickles it."""
    import pickle

    from mia_ptq_bench.extensions import defining_files

    (tmp_path / "settings.py").write_text(textwrap.dedent('''
        from mia_ptq_bench.plugin import QuantizerConfig

        class Settings(QuantizerConfig):
            offset: float = 0.0
    '''))
    (tmp_path / "helper.py").write_text("class Helper:\n    scale = 2\n")
    (tmp_path / "leaf.py").write_text(textwrap.dedent(f'''
        from mia_ptq_bench.extensions import import_module_or_file
        from mia_ptq_bench.plugin import Quantizer

        class Leaf(Quantizer):
            Config = import_module_or_file({str(tmp_path / "settings.py")!r}).Settings
            name, version = "leaf", "1"

            def __init__(self, config=None):
                super().__init__(config)
                self.helper = import_module_or_file({str(tmp_path / "helper.py")!r}).Helper()

            def quantize(self, model, calibration, plan):
                return model
    '''))
    leaf = import_module_or_file(str(tmp_path / "leaf.py")).Leaf({"offset": 0.5})
    files = defining_files(leaf, leaf.config)
    assert sorted(Path(f).name for f in files) == ["helper.py", "leaf.py", "settings.py"]
    assert defining_files(object(), 1.0) == ()
    (tmp_path / "quantizer.pkl").write_bytes(pickle.dumps(leaf))
    unpickled = subprocess.run([sys.executable, "-c", textwrap.dedent(f'''
        import pickle, sys
        from mia_ptq_bench.extensions import import_module_or_file
        for file in sys.argv[1:]:
            import_module_or_file(file)
        leaf = pickle.loads(open({str(tmp_path / "quantizer.pkl")!r}, "rb").read())
        print(type(leaf).__name__, leaf.config.offset, leaf.helper.scale)
    '''), *files], capture_output=True, text=True, timeout=120)
    assert unpickled.returncode == 0, unpickled.stderr
    assert unpickled.stdout.split() == ["Leaf", "0.5", "2"]


def test_a_quantizer_that_leaves_full_precision_weights_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "noop.py").write_text(textwrap.dedent('''
        from mia_ptq_bench.plugin import Quantizer

        class KeepsFloats(Quantizer):
            """Claims to quantize, returns the model as it came."""
            version = "0.1"

            def quantize(self, model, calibration, plan):
                return model
    '''))
    result = evaluate(f"{tmp_path / 'noop.py'}:KeepsFloats", "--out", str(tmp_path / "r"))
    assert result.exit_code == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "quantizer 'KeepsFloats' on pool model 0 at w2: bit-width audit failed, result refused (" in message, message
    assert "values in a channel, plan allows 4" in message
    assert not list((tmp_path / "r").rglob("*.json")) and not list((tmp_path / "r").rglob("*.npz"))


def test_a_subclass_of_a_builtin_is_its_own_quantizer_and_editing_it_invalidates_its_cache(tmp_path: Path) -> None:
    from mia_ptq_bench.quantize.builtin import RoundToNearest
    from mia_ptq_bench.quantize.plugins import load_import_path

    source = textwrap.dedent('''
        from mia_ptq_bench.quantize.builtin import RoundToNearest

        class Coarser(RoundToNearest):
            """Round-to-nearest on a grid of a quarter of the plan's levels (at least two)."""

            def quantize_prepared(self, models, originals, calibrations, levels):
                super().quantize_prepared(models, originals, calibrations, {k: max(2, v // 4) for k, v in levels.items()})
    ''')
    plugin = tmp_path / "coarser.py"
    plugin.write_text(source)
    cache = str(tmp_path / "cache")
    assert evaluate("rtn", "--cache-dir", cache, "--out", str(tmp_path / "r")).exit_code == 0
    result = evaluate(f"{plugin}:Coarser", "--cache-dir", cache, "--out", str(tmp_path / "r"))
    assert result.exit_code == 0, result.stderr
    ours = json.loads((tmp_path / "r" / "tiny-digits" / "Coarser" / "w2--oblivious.json").read_text())
    builtin = json.loads((tmp_path / "r" / "tiny-digits" / "rtn" / "w2--oblivious.json").read_text())
    assert ours["quantizer"]["name"] == "Coarser"  # not the name it inherits: its own results, its own cache
    assert {a["max_distinct"] for a in ours["audit"]} == {2} and {a["max_distinct"] for a in builtin["audit"]} == {4}
    assert RoundToNearest().code_digest() == ""  # built-ins are keyed by their version
    before = load_import_path(f"{plugin}:Coarser")().code_digest()
    plugin.write_text(source.replace("max(2, v // 4)", "v"))  # the same class, edited, its version not bumped
    sys.modules.pop(load_import_path(f"{plugin}:Coarser").__module__)
    after = load_import_path(f"{plugin}:Coarser")().code_digest()
    assert before and after and before != after
    moved = tmp_path / "elsewhere" / "coarser.py"  # the same code in another folder (a second clone)
    moved.parent.mkdir()
    moved.write_text(plugin.read_text())
    assert load_import_path(f"{moved}:Coarser")().code_digest() == after
    (moved.parent / "helper.py").write_text("FACTOR = 2\n")  # a module beside it, which it may import
    assert load_import_path(f"{moved}:Coarser")().code_digest() != after
    result = evaluate(f"{plugin}:Coarser", "--cache-dir", cache, "--out", str(tmp_path / "r2"))
    assert result.exit_code == 0, result.stderr
    edited = json.loads((tmp_path / "r2" / "tiny-digits" / "Coarser" / "w2--oblivious.json").read_text())
    assert {a["max_distinct"] for a in edited["audit"]} == {4}  # the plan's own levels: quantized again, not cached
    quantized = sorted(p.name for p in (tmp_path / "cache" / "quantized").glob("*/*"))
    assert len([name for name in quantized if name.startswith("Coarser-")]) == 2, quantized


def test_not_a_quantizer_is_refused(tmp_path: Path) -> None:
    (tmp_path / "other.py").write_text("class Thing:\n    pass\n")
    result = evaluate(f"{tmp_path / 'other.py'}:Thing", "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "is not a subclass of mia_ptq_bench.quantize.Quantizer" in result.stderr


def test_unknown_name_says_where_it_looked(tmp_path: Path) -> None:
    result = evaluate("nothing-here", "--submissions", str(REPO / "submissions"), "--out", str(tmp_path))
    assert result.exit_code == 2
    for place in ("registry (adaround", "entry points 'mia_ptq_bench.quantizers'", "submission.yaml (adaround",
                  "example-stochastic-rounding", "module:Class"):
        assert place in result.stderr


@pytest.mark.slow
def test_an_extension_entry_point_is_imported_by_its_module_in_either_form(monkeypatch) -> None:
    from importlib import metadata

    from mia_ptq_bench import extensions

    group = extensions.PLUGIN_ENTRY_POINTS
    points = metadata.EntryPoints([metadata.EntryPoint("a", "plug_a", group),
                                   metadata.EntryPoint("b", "plug_b.inner:REGISTERED", group)])
    monkeypatch.setattr(extensions.metadata, "entry_points", lambda group: points.select(group=group))
    monkeypatch.delenv("MPTQ_PLUGINS", raising=False)
    assert extensions.extension_refs() == ("plug_a", "plug_b.inner")  # "pkg:attr" is no module name


def test_the_code_digest_of_a_package_quantizer_counts_a_helper_in_a_sibling_subpackage(tmp_path: Path,
                                                                                         monkeypatch) -> None:
    package = tmp_path / "digestpkg"
    for folder in (package, package / "quant", package / "core"):
        folder.mkdir()
        (folder / "__init__.py").write_text("")
    (package / "core" / "offset.py").write_text("OFFSET = 0.0\n")
    (package / "quant" / "q.py").write_text(PLUGIN + "\nfrom digestpkg.core.offset import OFFSET\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = lambda: [m for m in sys.modules if m == "digestpkg" or m.startswith("digestpkg.")]  # noqa: E731
    try:
        from mia_ptq_bench.quantize.plugins import load_import_path

        before = load_import_path("digestpkg.quant.q:HalfStep")().code_digest()
        (package / "core" / "offset.py").write_text("OFFSET = 0.5\n")  # not beside q.py: in another subpackage
        assert load_import_path("digestpkg.quant.q:HalfStep")().code_digest() != before
        (package / "core" / "offset.py").write_text("OFFSET = 0.0\n")
        assert load_import_path("digestpkg.quant.q:HalfStep")().code_digest() == before  # content, not time
    finally:
        for name in names():
            sys.modules.pop(name)


def test_installed_entry_point_package_is_found_by_name(tmp_path: Path) -> None:
    package = tmp_path / "halfstep-plugin"
    (package / "halfstep_plugin").mkdir(parents=True)
    (package / "halfstep_plugin" / "__init__.py").write_text(PLUGIN)
    (package / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "halfstep-plugin"
        version = "0.1"
        [project.entry-points."mia_ptq_bench.quantizers"]
        half-step = "halfstep_plugin:HalfStep"
    '''))
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                              "--no-build-isolation", "--target", str(site), str(package)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), COLUMNS="200")
    listing = subprocess.run([sys.executable, "-m", "mia_ptq_bench.cli", "quantizers"], capture_output=True, text=True,
                             env=env, timeout=120)
    assert "half-step" in listing.stdout and "entry point of halfstep-plugin" in listing.stdout
    run = subprocess.run([sys.executable, "-m", "mia_ptq_bench.cli", "evaluate", "half-step", "--task", "tiny-digits",
                          "--plans", "w4", "--threat-models", "oblivious", "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "r" / "tiny-digits" / "half-step" / "w4--oblivious.json").is_file()


@pytest.fixture
def submission(tmp_path: Path) -> Path:
    """The worked example, copied into a fresh submissions folder and evaluated on tiny-digits."""
    root = tmp_path / "submissions"
    folder = root / "example-stochastic-rounding"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("results"))
    spec = yaml.safe_load((folder / "submission.yaml").read_text())
    spec["tasks"] = ["tiny-digits"]
    (folder / "submission.yaml").write_text(yaml.safe_dump(spec))
    result = cli.invoke(app, ["evaluate", "example-stochastic-rounding", "--task", "tiny-digits",
                              "--submission", str(folder)])
    assert result.exit_code == 0, result.stderr
    return folder


def test_submission_folder_is_found_and_evaluated(submission: Path) -> None:
    found = resolve("example-stochastic-rounding", submission.parent)
    assert found.cls.__name__ == "StochasticRounding" and found.config == {"seed": 0}
    names = sorted(str(p.relative_to(submission)) for p in (submission / "results").rglob("*") if p.is_file())
    assert "results/MANIFEST.json" in names and "results/tiny-digits/w4--adaptive.json" in names
    assert validate_submission(submission) == []
    listing = cli.invoke(app, ["quantizers", "--submissions", str(submission.parent)], env={"COLUMNS": "200"})
    assert "example-stochastic-rounding" in listing.output and "submission" in listing.output


def test_validate_cli_accepts_a_good_submission(submission: Path) -> None:
    result = cli.invoke(app, ["validate", str(submission.parent)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.stderr
    # a folder's numbers are checked only with --recompute, and the line says so
    assert "ok " in result.output and "(numbers not recomputed: --recompute does that, as CI does)" in result.output


def _bare_submission(tmp_path: Path, plugin: str, config: dict) -> Path:
    folder = tmp_path / "submissions" / "half-step"
    folder.mkdir(parents=True)
    (folder / "quantizer.py").write_text(plugin)
    (folder / "submission.yaml").write_text(yaml.safe_dump({
        "name": "half-step", "display_name": "Half step", "version": "1", "authors": [{"name": "A"}],
        "description": "d", "license": "MIT", "contact": "a@example.org", "tasks": ["tiny-digits"],
        "quantizer": {"file": "quantizer.py", "class": "HalfStep", "config": config}}))
    return folder


def test_a_submitted_class_that_names_itself_otherwise_is_refused_before_any_work(tmp_path: Path) -> None:
    folder = _bare_submission(tmp_path, PLUGIN.replace('    version = "0.1"', '    name = "halfstep"\n    version = "0.1"'), {})
    result = cli.invoke(app, ["evaluate", "half-step", "--task", "tiny-digits", "--submission", str(folder)])
    assert result.exit_code == 2
    assert "class HalfStep calls itself 'halfstep', but the submission is 'half-step'" in result.stderr
    assert not (folder / "results").exists()


def test_a_bad_config_in_submission_yaml_is_blamed_on_submission_yaml(tmp_path: Path) -> None:
    folder = _bare_submission(tmp_path, PLUGIN, {"offset": "half"})
    result = cli.invoke(app, ["evaluate", "half-step", "--task", "tiny-digits", "--submission", str(folder)])
    assert result.exit_code == 2
    assert f"half-step config (submission {folder}: quantizer.config): offset:" in " ".join(result.stderr.split())


def _only_problem(folder: Path, fragment: str) -> None:
    problems = validate_submission(folder)
    assert len(problems) >= 1 and all(fragment in p for p in problems), problems
    result = cli.invoke(app, ["validate", str(folder)])
    assert result.exit_code == 1 and fragment in result.stderr


def test_unknown_metadata_field_is_rejected(submission: Path) -> None:
    path = submission / "submission.yaml"
    path.write_text(path.read_text() + "homepage: https://example.org\n")
    _only_problem(submission, "submission.yaml: homepage: unknown field")


def test_a_class_name_that_no_import_can_find_is_rejected_without_running_code(submission: Path) -> None:
    # validate never imports the file, so a class no import can name once passed it, failing only in reproduce.
    path = submission / "submission.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["quantizer"]["class"] = "Stochastic Rounding()"
    path.write_text(yaml.safe_dump(spec))
    _only_problem(submission, "submission.yaml: quantizer.class: String should match pattern")


@pytest.mark.parametrize("where, value", [
    ("display_name", "Rounding \u202eQTPG"),  # shown as "GPTQ", and every tag after it in its cell reversed
    ("description", "fine\u200b"),
    ("config", {"note": "x\u2066y"}),
    ("config", {"note\x07": "bell"}),
], ids=["bidi-override", "zero-width", "config-isolate", "config-control-in-a-key"])
def test_metadata_with_invisible_characters_is_rejected(submission: Path, where: str, value) -> None:
    path = submission / "submission.yaml"
    spec = yaml.safe_load(path.read_text())
    if where == "config":
        spec["quantizer"]["config"].update(value)
    else:
        spec[where] = value
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    _only_problem(submission, "invisible characters are not allowed")


def test_joiners_and_soft_hyphens_of_honest_text_are_kept(submission: Path) -> None:
    path = submission / "submission.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["authors"][0]["name"] = "Fa\u200cdi"  # a zero-width non-joiner, as Persian spelling needs
    spec["description"] = "quanti\u00adzation, \U0001F469\u200d\U0001F52C"  # a soft hyphen; an emoji sequence
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    assert validate_submission(submission) == []


def test_bad_link_scheme_is_rejected(submission: Path) -> None:
    path = submission / "submission.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["paper"] = "javascript:alert(1)"
    path.write_text(yaml.safe_dump(spec))
    _only_problem(submission, "submission.yaml: paper: URL scheme should be 'http' or 'https'")


def test_missing_result_is_rejected(submission: Path) -> None:
    (submission / "results" / "tiny-digits" / "w4--adaptive.json").unlink()
    (submission / "results" / "tiny-digits" / "w4--adaptive.npz").unlink()
    write_manifest(submission)
    _only_problem(submission, "missing result for task tiny-digits, plan w4, threat model adaptive")
    removed = list((submission / "results" / "tiny-digits").glob("*--oblivious.json"))
    for result in removed:
        result.unlink()
    write_manifest(submission)
    problems = [p for p in validate_submission(submission) if "missing result" in p]
    command = f"`mptq-bench evaluate {submission.name} --task tiny-digits --submission {submission}` writes every plan"
    assert removed and len(problems) == 1 + len(removed), problems
    assert [command in p for p in problems] == [True] + [False] * (len(problems) - 1), problems  # said once per task


def test_stale_task_version_is_rejected(submission: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    newer = tmp_path / "newer-tasks"
    newer.mkdir()
    (newer / "tiny-digits.yaml").write_text((TASKS / "tiny-digits.yaml").read_text().replace("version: 1", "version: 2"))
    monkeypatch.setenv("MPTQ_TASKS", str(newer))
    problems = validate_submission(submission)
    assert len(problems) == 4 and all("task.hash: stale result of tiny-digits version 1" in p for p in problems)
    assert all("current task is version 2" in p for p in problems)


def test_tampered_result_is_rejected(submission: Path) -> None:
    path = submission / "results" / "tiny-digits" / "w4--oblivious.json"
    document = json.loads(path.read_text())
    document["quantized"]["attacks"]["lira-online"]["tpr_at_0_1pct_fpr"]["mean"] = 0.0
    path.write_text(json.dumps(document, indent=2))
    path.with_suffix(".npz").unlink()  # as in git, where arrays are not committed
    _only_problem(submission, "w4--oblivious.json: sha256: does not match MANIFEST.json")


def test_recorded_audit_failure_is_rejected(submission: Path) -> None:
    path = submission / "results" / "tiny-digits" / "w1.58-last8--oblivious.json"
    document = json.loads(path.read_text())
    document["audit"][0].update(passed=False, max_distinct=5)
    path.write_text(json.dumps(document, indent=2))
    path.with_suffix(".npz").unlink()
    write_manifest(submission)
    _only_problem(submission, "audit: layer 1 holds 5 values in a channel, its plan allows 3")


def test_files_outside_the_allowed_set_are_rejected(submission: Path) -> None:
    (submission / "weights.bin").write_bytes(b"\0" * 10)
    _only_problem(submission, "weights.bin: (file): not allowed in a submission")


def test_validate_never_runs_submitted_code(submission: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (submission / "quantizer.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    assert validate_submission(submission) == []
    assert not marker.exists()


def test_importing_a_plugin_file_leaves_no_bytecode_cache_beside_it(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Python writes __pycache__ beside an imported file unless told not to (PYTHONDONTWRITEBYTECODE is
    often unset on a fresh machine): a submission's folder must stay as its author wrote it."""
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    source = tmp_path / "fresh_plugin.py"
    source.write_text("VALUE = 7\n")
    assert import_module_or_file(str(source)).VALUE == 7
    assert not sys.dont_write_bytecode  # restored
    assert not list(tmp_path.rglob("__pycache__"))


def test_a_bytecode_cache_in_a_submission_is_refused_with_what_it_is(submission: Path) -> None:
    cache = submission / "__pycache__"
    cache.mkdir()
    (cache / "quantizer.cpython-311.pyc").write_bytes(b"")
    _only_problem(submission, "Python's bytecode cache, which git ignores here: delete it")


def test_adaptive_is_reported_beside_oblivious(tmp_path: Path) -> None:
    result = cli.invoke(app, ["evaluate", "rtn", "--task", "tiny-digits", "--plans", "w1.58-last8",
                              "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    rows = [line for line in result.output.splitlines() if line.strip().startswith("w1.58-last8")]
    assert any(r.split()[1] == "oblivious" for r in rows) and any(r.split()[1] == "adaptive" for r in rows)


def test_a_plugin_with_a_syntax_error_is_one_line_naming_its_file_and_line(tmp_path: Path) -> None:
    source = tmp_path / "broken.py"
    source.write_text(PLUGIN.replace("class HalfStep(Quantizer):", "class HalfStep(Quantizer)"))
    result = evaluate(f"{source}:HalfStep", "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "Traceback" not in result.output + result.stderr
    line = PLUGIN.splitlines().index("class HalfStep(Quantizer):") + 1
    assert f"cannot import: expected ':' (broken.py, line {line})" in " ".join(result.stderr.split())


@pytest.mark.parametrize("body, shown", [
    ('raise RuntimeError("the weights file is missing")', "RuntimeError: the weights file is missing"),
    ("import sys\nsys.exit(3)", "SystemExit: 3"),
    # raised deep in a library the plugin calls: the line named is still the plugin's own
    ('import numpy\nnumpy.load("/no/such/file.npy")', "FileNotFoundError: [Errno 2] No such file or directory"),
])
def test_a_plugin_that_fails_on_import_is_one_line_naming_its_file_and_line(tmp_path: Path, body: str,
                                                                            shown: str) -> None:
    source = tmp_path / "failing.py"
    source.write_text("x = 1\n" + body + "\n")
    result = evaluate(f"{source}:Anything", "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "Traceback" not in result.output + result.stderr
    line = len(("x = 1\n" + body).splitlines())
    text = " ".join(result.stderr.split())
    assert f"cannot import: {shown}" in text and text.endswith(f"(failing.py, line {line})")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("module, registry, name", [("mia_ptq_bench.data", "DATASETS", "cifar10"),
                                                    ("mia_ptq_bench.models", "MODELS", "resnet10")])
def test_a_plugin_registering_a_taken_name_is_one_line_naming_its_file(tmp_path: Path, monkeypatch, module: str,
                                                                     registry: str, name: str) -> None:
    source = tmp_path / "clashing.py"
    source.write_text(f"from {module} import {registry}\n\n@{registry}.register({name!r})\ndef mine(*args):\n"
                      "    raise NotImplementedError\n")
    monkeypatch.setenv("MPTQ_PLUGINS", str(source))
    result = cli.invoke(app, ["validate", str(TASKS / "tiny-cnn.yaml")])
    text = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "Traceback" not in result.output + result.stderr, text
    assert text.startswith(f"error: {source}: ") and f"{name!r} is already registered, as {module}." in text
    assert text.endswith(".mine needs a name of its own")


def test_a_bug_in_the_benchmark_reached_from_a_plugin_keeps_its_traceback(tmp_path: Path) -> None:
    from mia_ptq_bench.extensions import import_module_or_file

    source = tmp_path / "calls_in.py"
    source.write_text("from mia_ptq_bench.quantize.grid import fit_grid\nfit_grid(None, 3)\n")
    with pytest.raises(AttributeError):  # raised inside mia_ptq_bench: not turned into one line that hides where
        import_module_or_file(str(source))


_HIDES_THE_CLASSIFIER = """
    @torch.no_grad()
    def quantize(self, model, calibration, plan):
        model = HalfStep.quantize(self, model, calibration, plan)
        last = model[-1]  # full precision again, in a module the audit does not count as a layer
        model[-1] = Holder(last)
        return model

class Holder(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)
"""

_MOVES_THE_CLASSIFIER_FIRST = """
    @torch.no_grad()
    def quantize(self, model, calibration, plan):
        wrapped = Wrapper(model[-1], model)  # the classifier registered first: -last<b> would land elsewhere
        return HalfStep.quantize(self, wrapped, calibration, plan)

class Wrapper(torch.nn.Module):
    def __init__(self, head, net):
        super().__init__()
        self.head, self.net = head, net
    def forward(self, x):
        return self.net(x)
"""


@pytest.mark.parametrize("change, shown", [
    (_HIDES_THE_CLASSIFIER, "(1 layers, where the pool model has 2)"),
    (_MOVES_THE_CLASSIFIER_FIRST, "(layer 1 is Linear 'head' of weight [10, 8], where the pool model has Linear '1' "
                                  "of weight [8, 64])"),
], ids=["hides-a-layer", "reorders-layers"])
def test_a_quantizer_that_changes_which_layers_the_audit_sees_is_refused(tmp_path: Path, change: str,
                                                                         shown: str) -> None:
    source = tmp_path / "sly.py"
    source.write_text(PLUGIN + "\nclass Sly(HalfStep):" + change)
    result = evaluate(f"{source}:Sly", "--out", str(tmp_path / "r"))
    text = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "Traceback" not in result.output + result.stderr, text
    assert f"its model for pool model 0 does not keep the pool model's quantizable layers {shown}" in text
    assert not (tmp_path / "r").exists()


def test_a_quantize_that_returns_no_model_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    source = tmp_path / "forgetful.py"
    source.write_text(PLUGIN.replace("        return model\n", "        pass\n"))
    result = evaluate(f"{source}:HalfStep", "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "Traceback" not in result.output + result.stderr
    assert "quantize returned NoneType for pool model 0; expected the quantized model" in " ".join(result.stderr.split())
    assert not list((tmp_path / "r").rglob("*.json"))


def test_a_module_path_for_a_file_hints_at_the_file_form(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "myq.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    result = evaluate("myq:HalfStep", "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "(a file is imported as myq.py)" in " ".join(result.stderr.split())
    # found on the path but failing on its own import: no hint
    (tmp_path / "myq2.py").write_text("import a_package_nobody_has_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    failing = evaluate("myq2:HalfStep", "--out", str(tmp_path / "r"))
    assert failing.exit_code == 2 and "a_package_nobody_has_installed" in failing.stderr
    assert "a file is imported as" not in failing.stderr


def test_a_submission_run_refuses_plans_the_task_does_not_have(submission: Path) -> None:
    before = sorted(p.name for p in (submission / "results").rglob("*"))
    result = cli.invoke(app, ["evaluate", "example-stochastic-rounding", "--task", "tiny-digits", "--plans", "w4,w3",
                              "--submission", str(submission)])
    assert result.exit_code == 2
    assert "--plans w3: not among the plans this submission holds for the task (w4, w1.58-last8)" in " ".join(
        result.stderr.split())
    assert sorted(p.name for p in (submission / "results").rglob("*")) == before


def test_the_reference_submission_runs_its_own_plan(tmp_path: Path) -> None:
    folder = evaluated_builtin(tmp_path / "submissions", "fp32")  # its one plan: fp32, not the task's
    again = cli.invoke(app, ["evaluate", "fp32", "--task", "tiny-digits", "--plans", "fp32", "--submission", str(folder)])
    assert again.exit_code == 0, again.stderr
    assert validate_submission(folder) == []


def test_a_run_with_another_config_says_which_results_it_replaces(tmp_path: Path) -> None:
    source = tmp_path / "halfstep.py"
    source.write_text(PLUGIN)
    first = evaluate(f"{source}:HalfStep", "--out", str(tmp_path / "r"))
    assert first.exit_code == 0 and "another config" not in first.output
    again = evaluate(f"{source}:HalfStep", "--out", str(tmp_path / "r"))
    assert again.exit_code == 0 and "another config" not in again.output
    other = evaluate(f"{source}:HalfStep", "--out", str(tmp_path / "r"), "--set", "offset=0.25")
    assert other.exit_code == 0, other.stderr
    assert "w2--oblivious.json: made with another config (offset: 0.0 -> 0.25)" in " ".join((other.output + other.stderr).split())


def test_validate_with_recompute_says_when_it_recomputes_nothing(submission: Path) -> None:
    path = submission / "submission.yaml"
    path.write_text(path.read_text() + "homepage: https://example.org\n")
    result = cli.invoke(app, ["validate", str(submission.parent), "--recompute"])
    assert result.exit_code == 1 and "homepage: unknown field" in result.stderr
    assert "not recomputed: no number is recomputed until the problems above are fixed" in result.stderr
    assert not any(line.startswith("recomputed ") for line in result.output.splitlines())


def test_a_quantize_that_calls_exit_is_one_error_not_a_silent_success(tmp_path: Path) -> None:
    source = tmp_path / "quitter.py"
    source.write_text(PLUGIN.replace("        return model\n", "        raise SystemExit(0)\n"))
    result = evaluate(f"{source}:HalfStep", "--out", str(tmp_path / "r"))
    assert result.exit_code == 2, result.output  # it ended the run with status 0, having written nothing
    assert "quantize called exit(0); a quantizer returns its models or raises" in " ".join(result.stderr.split())
    assert not list((tmp_path / "r").rglob("*.json"))


@pytest.mark.parametrize("breakage, expected", [
    # a weight reshaped: the model no longer runs
    ("        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]\n"
     "        last.weight = torch.nn.Parameter(last.weight[:, :-1].detach())\n        return model\n",
     "its model for pool model 0 fails on the task's images: RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    # a model that runs, with one output too few per image
    ("        class DropFirst(torch.nn.Module):\n"
     "            def forward(self, logits):\n"
     "                return logits[:, 1:]\n"
     "        return torch.nn.Sequential(model, DropFirst())\n",
     "its model for pool model 0 returns outputs of shape (2, 9) for 2 images; expected a tensor of shape (2, 10)"),
    # a model whose forward returns a pair
    ("        class Pair(torch.nn.Module):\n"
     "            def forward(self, logits):\n"
     "                return logits, logits\n"
     "        return torch.nn.Sequential(model, Pair())\n",
     "its model for pool model 0 returns a tuple for 2 images; expected a tensor of shape (2, 10)"),
])
def test_a_model_a_quantizer_broke_is_one_error_naming_it(tmp_path: Path, breakage: str, expected: str) -> None:
    source = tmp_path / "breaker.py"
    source.write_text(PLUGIN.replace("        return model\n", breakage))
    result = evaluate(f"{source}:HalfStep", "--out", str(tmp_path / "r"))
    message = " ".join(result.stderr.split())
    assert result.exit_code == 2 and f"error: quantizer 'HalfStep' at w2: {expected}" in message, message
    assert "Traceback" not in message and not list((tmp_path / "r").rglob("*.json"))


def test_an_os_error_in_a_plugins_code_keeps_its_traceback(tmp_path: Path) -> None:
    # One-line OSError reports are for paths the benchmark itself touches; a plugin's own failing open()
    # would lose its file and line (and name no quantizer) as "error: /nonexistent/...: No such file".
    source = tmp_path / "reads_a_table.py"
    source.write_text(PLUGIN.replace("        return model\n", "        open('/nonexistent/calib_table.pt')\n"))
    proc = subprocess.run([sys.executable, "-m", "mia_ptq_bench", "evaluate", f"{source}:HalfStep", "--task",
                           "tiny-digits", "--plans", "w2", "--threat-models", "oblivious", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, env={**os.environ, "MPTQ_TASKS": str(TASKS), "COLUMNS": "200",
                                                               "MPTQ_CACHE": str(tmp_path / "c")}, timeout=300)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "reads_a_table.py" in proc.stderr, proc.stderr
    assert "FileNotFoundError" in proc.stderr
