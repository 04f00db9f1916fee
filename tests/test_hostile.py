"""Hostile input: task files, submission YAML, terminal markup, result files and disks, each one clear line.

Every test builds the hostile input itself (real files, the real CLI) and checks the one line that
names the file, the field and the reason, and that nothing was done or written before the refusal.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import TASKS
from mia_ptq_bench.budget import Machine, check_budget, estimate, problems
from mia_ptq_bench.cli import app
from mia_ptq_bench.data import DATASET_SHAPES
from mia_ptq_bench.errors import SpecError
from mia_ptq_bench.spec import load_task

REPO = Path(__file__).resolve().parent.parent
cli = CliRunner()


@pytest.fixture
def tiny_dict() -> dict:
    return yaml.safe_load((TASKS / "tiny-digits.yaml").read_text())


def write_task(folder: Path, data: dict) -> Path:
    path = folder / f"{data['id']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# -- 1. bounds on task specs ---------------------------------------------------------------------

@pytest.mark.parametrize("mutate, field, reason", [
    # too few shadows: n_models 4 gave AUC 0.000 and n_models 2 took 15 GB
    (lambda d: d["membership"].update(n_models=4), "membership.n_models", "greater than or equal to 8"),
    (lambda d: d["membership"].update(n_models=2), "membership.n_models", "greater than or equal to 8"),
    (lambda d: d["membership"].update(n_models=100_000), "membership.n_models", "less than or equal to 1024"),
    (lambda d: d["membership"].update(n_models=9), "membership", "4.5 is not a whole number of models"),
    # pkeep x n_models below 1 looped forever (a model with no members to train on)
    (lambda d: d["membership"].update(pkeep=0.1), "membership", "= 0.8 is not a whole number of models"),
    (lambda d: d["membership"].update(pkeep=0.125), "membership", "must be IN at least 2 and OUT of at least 2"),
    (lambda d: d["training"].update(epochs=True), "training.epochs", "valid integer (got True)"),
    (lambda d: d["training"].update(epochs=2.5), "training.epochs", "valid integer (got 2.5)"),
    (lambda d: d["training"].update(epochs=10**9), "training.epochs", "less than or equal to 10000"),
    (lambda d: d["training"].update(batch_size=0), "training.batch_size", "greater than or equal to 1"),
    (lambda d: d["training"].update(batch_size=10**8), "training.batch_size", "less than or equal to 65536"),
    (lambda d: d["training"].update(lr=float("nan")), "training.lr", "finite number"),
    (lambda d: d["training"].update(lr=1e9), "training.lr", "less than or equal to 100"),
    (lambda d: d["training"].update(seed=-1), "training.seed", "greater than or equal to 0"),
    (lambda d: d["training"].update(augment={"hflip": 1}), "training.augment.hflip", "valid boolean"),
    (lambda d: d["model"].update(width=float("inf")), "model.width", "finite number"),
    (lambda d: d["model"].update(width=1000), "model.width", "less than or equal to 64"),
    (lambda d: d["model"].update(options={"hidden": [[[[[[8]]]]]]}), "model.options", "nested deeper than 4"),
    (lambda d: d["dataset"].update(image_size=4096), "dataset.image_size", "less than or equal to 512"),
    (lambda d: d["dataset"].update(pool_size=10**12), "dataset.pool_size", "less than or equal to 10000000"),
    (lambda d: d["dataset"].update(test_size=0), "dataset.test_size", "greater than or equal to 1"),
    (lambda d: d["targets"].update(count=10**6), "targets.count", "less than or equal to 1024"),
    (lambda d: d.update(calibration={"size": 10**9}), "calibration.size", "less than or equal to 100000"),
    (lambda d: d.update(plans=["w4"] * 100), "plans", "at most 32 items"),
])
def test_every_number_in_a_task_is_bounded(tmp_path: Path, tiny_dict: dict, mutate, field: str, reason: str) -> None:
    mutate(tiny_dict)
    path = write_task(tmp_path, tiny_dict)
    with pytest.raises(SpecError) as info:
        load_task(path)
    lines = str(info.value).splitlines()
    assert any(line.startswith(f"{path}: {field}: ") and reason in line for line in lines), lines


def test_bounds_leave_every_bundled_task_and_its_hash_alone() -> None:
    # The README quotes digits-mlp's hash; bounds change what is accepted, never what a valid task is.
    assert load_task("digits-mlp").hash.startswith("51dfd4d2be43")


@pytest.mark.parametrize("options, reason", [
    ({"hidden": [1e12]}, "model.options.hidden[0]: expected an integer from 1 to 65536, got 1000000000000.0"),
    ({"hidden": [True]}, "model.options.hidden[0]: expected an integer from 1 to 65536, got True"),
    ({"hidden": 8}, "model.options.hidden: expected a list of 1 to 64 layer sizes, got 8"),
    ({"depth": 3}, "model.options: mlp does not accept these options"),
])
def test_model_options_are_checked_where_the_model_reads_them(tmp_path: Path, tiny_dict: dict, options: dict,
                                                              reason: str) -> None:
    tiny_dict["model"]["options"] = options
    path = write_task(tmp_path, tiny_dict)
    result = cli.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1 and f"invalid: {path}: {reason}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_cnn_options_are_checked_too(tmp_path: Path) -> None:
    data = yaml.safe_load((TASKS / "tiny-cnn.yaml").read_text())
    data["model"]["options"] = {"channels": [8, 8, 8, 8, 8], "batchnorm": "yes"}
    path = write_task(tmp_path, data)
    with pytest.raises(SpecError, match=r"tiny-cnn\.yaml: model\.options\.batchnorm: expected true or false"):
        check_budget(load_task(path), "cpu", tmp_path / "cache", source=str(path))
    data["model"]["options"] = {"channels": [8, 8, 8, 8, 8]}  # five poolings of 16 pixels leave none
    path = write_task(tmp_path, data)
    with pytest.raises(SpecError, match=r"model\.options\.channels: 5 pooling stages need images of at least 32"):
        check_budget(load_task(path), "cpu", tmp_path / "cache", source=str(path))


def _absurd(tiny_dict: dict) -> dict:
    """Every field in range, the whole far beyond any machine: 1024 MLPs of three 4M-unit layers."""
    tiny_dict["membership"]["n_models"] = 1024
    tiny_dict["model"].update(width=64, options={"hidden": [65536, 65536, 65536]})
    tiny_dict["training"]["epochs"] = 10_000
    return tiny_dict


def test_absurd_task_is_refused_with_its_estimate_before_any_work(tmp_path: Path, tiny_dict: dict) -> None:
    path = write_task(tmp_path, _absurd(tiny_dict))
    check = cli.invoke(app, ["validate", str(path)])
    assert check.exit_code == 1
    lines = check.stderr.strip().splitlines()
    assert any(f"invalid: {path}: budget: needs about" in line and "of memory (" in line and "this machine has" in line
               for line in lines), lines
    assert any("budget: about" in line and "more than a year even at 1e+15 FLOP/s" in line for line in lines), lines
    cache = tmp_path / "cache"
    run = cli.invoke(app, ["evaluate", "rtn", "--task", str(path), "--cache-dir", str(cache), "--out", str(tmp_path / "r")])
    assert run.exit_code == 2 and "budget: needs about" in run.stderr
    assert not (cache / "pools").exists() and not (tmp_path / "r" / "tiny-digits").exists()  # nothing trained or written


def test_estimate_needs_no_data_and_no_training(tmp_path: Path) -> None:
    """The study's CIFAR task is estimated on a machine without CIFAR: the model is built on the meta device."""
    spec = load_task("cifar10-resnet18")
    budget = estimate(spec, DATASET_SHAPES["cifar10"], "cpu", quantized_per_plan=64, plans=4, results=8)
    assert budget.model.parameters == 11_173_962  # ResNet18, CIFAR stem, 10 classes
    assert budget.memory_parts["scores"] >= 64 * 50_000 * 2 * 8  # M x N x Q float64
    assert not (tmp_path / "data").exists()
    ok = cli.invoke(app, ["validate", str(REPO / "tasks" / "digits-mlp.yaml")])
    assert ok.exit_code == 0 and "budget: about" in ok.output and "19,210 parameters per model" in ok.output


def test_a_machine_too_small_is_named_in_the_refusal() -> None:
    spec = load_task("digits-mlp")
    budget = estimate(spec, DATASET_SHAPES["digits"], "cpu", quantized_per_plan=64, plans=4, results=8)
    small = Machine(device="cpu", memory=1 << 20, device_memory=None, free_disk=1 << 20, flops=1e10)
    found = problems(budget, small)
    assert [line.split(" about")[0] for line in found] == ["budget: needs", "budget: needs"]
    assert "this machine has 1.0 MiB" in found[0] and "1.0 MiB is free" in found[1]
    assert problems(budget, Machine("cpu", 1 << 40, None, 1 << 40, 1e10)) == []


def test_heldout_calibration_larger_than_the_test_split_is_refused_before_loading(tmp_path: Path) -> None:
    data = yaml.safe_load((TASKS / "tiny-cnn.yaml").read_text())
    data["calibration"]["size"] = 100  # test_size is 100
    path = write_task(tmp_path, data)
    with pytest.raises(SpecError, match=r"tiny-cnn\.yaml: calibration\.size: 100 held-out images would leave no test"):
        check_budget(load_task(path), "cpu", tmp_path, source=str(path))


# -- 2. YAML -------------------------------------------------------------------------------------

BOMB = """\
name: bomb
display_name: Bomb
version: '1'
authors: [{name: x}]
license: MIT
contact: a@example.org
tasks: [tiny-digits]
quantizer:
  builtin: rtn
  config:
    a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
"""


def _folder(root: Path, name: str, text: str | bytes) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "submission.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    return folder


def test_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    assert len(BOMB) < 600
    folder = _folder(tmp_path / "subs", "bomb", BOMB)
    result = cli.invoke(app, ["validate", str(tmp_path / "subs")])
    assert result.exit_code == 1
    assert f"invalid: {folder / 'submission.yaml'}:11: YAML anchor &a refused" in result.stderr
    build = cli.invoke(app, ["leaderboard", "build", "--submissions", str(tmp_path / "subs"), "--out", str(tmp_path / "s")])
    assert build.exit_code == 2 and "YAML anchor &a refused" in build.stderr and not (tmp_path / "s").exists()


@pytest.mark.parametrize("text, reason", [
    (b"name: x\ndisplay_name: \"caf\xe9\"\n", "submission.yaml: not UTF-8 text (byte 0xe9 at offset 26)"),
    (("a: " + "[" * 40 + "]" * 40 + "\n").encode(), "submission.yaml:1: nested deeper than 16 levels"),
    (("description: '" + "x" * 70_000 + "'\n").encode(), "submission.yaml: 68.4 KiB, larger than the 64.0 KiB allowed"),
    (b"name: a\nname: b\n", "submission.yaml:2: not valid YAML: duplicate key 'name'"),
    (b"quantizer: !!python/object/apply:os.system [echo hi]\n", "submission.yaml:1: not valid YAML:"),
    (b"quantizer: {builtin: rtn, config: {when: 2024-01-01}}\n", "quantizer.config: Value error, when: date is not plain data"),
])
def test_bad_submission_yaml_is_one_line(tmp_path: Path, text: bytes, reason: str) -> None:
    _folder(tmp_path / "subs", "x", text)
    result = cli.invoke(app, ["validate", str(tmp_path / "subs")])
    assert result.exit_code == 1 and reason in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert "Traceback" not in cli.invoke(app, ["quantizers", "--submissions", str(tmp_path / "subs")]).output


def test_task_files_get_the_same_reader(tmp_path: Path, tiny_dict: dict) -> None:
    path = write_task(tmp_path, tiny_dict)
    path.write_text(path.read_text().replace("training:", "training: &t") + "again: *t\n")
    with pytest.raises(SpecError, match=r"tiny-digits\.yaml:\d+: YAML anchor &t refused"):
        load_task(path)
    path.write_bytes(b"id: tiny-digits\ndescription: \xff\xfe\n")
    with pytest.raises(SpecError, match=r"tiny-digits\.yaml: not UTF-8 text \(byte 0xff at offset 29\)"):
        load_task(path)


def test_config_as_rendered_on_the_site_is_bounded(tmp_path: Path) -> None:
    spec = {"name": "big", "display_name": "Big", "version": "1", "authors": [{"name": "x"}], "license": "MIT",
            "contact": "a@example.org", "tasks": ["tiny-digits"],
            "quantizer": {"builtin": "rtn", "config": {f"k{i}": "v" * 100 for i in range(100)}}}
    folder = _folder(tmp_path / "subs", "big", yaml.safe_dump(spec))
    result = cli.invoke(app, ["validate", str(folder)])
    assert result.exit_code == 1 and "submission.yaml: quantizer.config: Value error" in result.stderr
    assert "more than the 8192 allowed" in result.stderr


# -- 3. rich markup --------------------------------------------------------------------------------

def test_markup_in_user_text_prints_literally(tmp_path: Path) -> None:
    spec = {"name": "markup", "display_name": "[/]", "version": "1", "authors": [{"name": "x"}], "license": "MIT",
            "contact": "a@example.org", "tasks": ["tiny-digits"], "quantizer": {"builtin": "rtn"}}
    folder = _folder(tmp_path / "subs", "markup", yaml.safe_dump(spec))
    listing = cli.invoke(app, ["quantizers", "--submissions", str(tmp_path / "subs")], env={"COLUMNS": "200"})
    assert listing.exit_code == 0, listing.output
    assert "[/]" in listing.output
    (folder / "results" / "tiny-digits" / "a[").mkdir(parents=True)  # a[/b]--c.json: [/b] closes a tag in rich
    (folder / "results" / "tiny-digits" / "a[/b]--c.json").write_text("{}")
    (folder / "results" / "tiny-digits" / "stray[red]--x.json").write_text("{}")
    check = cli.invoke(app, ["validate", str(tmp_path / "subs")], env={"COLUMNS": "300"})
    assert check.exit_code == 1 and "MarkupError" not in repr(check.exception)
    assert "a[/b]--c.json" in check.stderr and "stray[red]--x.json" in check.stderr


def test_emoji_codes_in_user_text_are_not_rendered(tmp_path: Path) -> None:
    result = cli.invoke(app, ["evaluate", "nosuch.py:x", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "error: nosuch.py:x: nosuch.py: no such file" in result.stderr
    assert "\N{CROSS MARK}" not in result.stderr
