from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from mia_ptq_bench.errors import SpecError
from mia_ptq_bench.runner import check_task
from mia_ptq_bench.spec import available_tasks, load_task
from mia_ptq_bench.spec.loader import TASKS_ENV

BUNDLED = ["digits-mlp", "fashion-mnist-cnn", "fashion-mnist-resnet18", "cifar10-resnet18", "cifar100-resnet18",
           "tinyimagenet-resnet18", "cifar10-resnet50", "cifar100-resnet50", "cifar10-densenet121",
           "cifar100-densenet121"]


def write_task(folder: Path, data: dict) -> Path:
    path = folder / f"{data['id']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def tiny_dict() -> dict:
    return yaml.safe_load((Path(__file__).parent / "tasks" / "tiny-digits.yaml").read_text())


@pytest.mark.parametrize("task_id", BUNDLED)
def test_bundled_tasks_load(task_id: str) -> None:
    spec = load_task(task_id)
    assert spec.id == task_id
    assert len(spec.hash) == 64
    assert spec.membership.n_models >= spec.targets.count


def test_study_tasks_follow_protocol() -> None:
    spec = load_task("cifar100-resnet18")
    t = spec.training
    assert (t.lr, t.momentum, t.weight_decay, t.batch_size, t.schedule) == (0.1, 0.9, 5e-4, 128, "cosine")
    assert (t.augment.crop_padding, t.augment.hflip) == (4, True)
    assert (spec.membership.n_models, spec.membership.pkeep, spec.targets.count) == (64, 0.5, 10)
    assert spec.queries == ["identity", "hflip"] and spec.calibration.size == 1024
    assert set(spec.plans) == {"w4", "w2", "w1.58", "w1.58-last8"}
    assert all(p.endswith("-last8") for p in load_task("tinyimagenet-resnet18").plans)


def test_default_task_is_bundled_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TASKS_ENV)
    assert "digits-mlp" in available_tasks() and "tiny-digits" not in available_tasks()


def test_hash_is_canonical_and_content_sensitive(tmp_path: Path, tiny_dict: dict) -> None:
    a = load_task(write_task(tmp_path, tiny_dict))
    reordered = dict(reversed(list(tiny_dict.items())))
    reordered["membership"] = {"n_models": 8, "pkeep": 0.5}  # spelling out a default changes nothing
    b = load_task(write_task(tmp_path, reordered))
    assert a.hash == b.hash
    changed = dict(tiny_dict, version=2)
    assert load_task(write_task(tmp_path, changed)).hash != a.hash


def test_pool_hash_ignores_plans_but_not_training(tmp_path: Path, tiny_dict: dict) -> None:
    base = load_task(write_task(tmp_path, tiny_dict))
    more_plans = load_task(write_task(tmp_path, dict(tiny_dict, plans=["w2"])))
    assert more_plans.pool_hash == base.pool_hash and more_plans.hash != base.hash
    retrained = load_task(write_task(tmp_path, dict(tiny_dict, training=dict(tiny_dict["training"], epochs=5))))
    assert retrained.pool_hash != base.pool_hash


@pytest.mark.parametrize("mutate, field, reason", [
    (lambda d: d.update(colour="blue"), "colour", "unknown field"),
    (lambda d: d["training"].update(lr="fast"), "training.lr", "valid number"),
    (lambda d: d["training"].update(lr=-1), "training.lr", "greater than 0"),
    (lambda d: d["training"].update(optimiser="adam"), "training.optimiser", "unknown field"),
    (lambda d: d.update(plans=["w4", "w3.5"]), "plans", "cannot parse precision plan"),
    (lambda d: d.update(plans=["w4", "w4"]), "plans", "duplicate"),
    (lambda d: d["targets"].update(count=99), "(document)", "exceeds membership.n_models"),
    # 3 targets of 8 models: a stand-in is attacked with the quantized shadows left once the 3 and it are out
    (lambda d: d.update(adaptive={"shadows": 6}), "(document)", "adaptive.shadows (6) must lie between 7 and"),
    (lambda d: d.pop("training"), "training", "Field required"),
])
def test_bad_specs_name_file_field_and_reason(tmp_path: Path, tiny_dict: dict, mutate, field: str, reason: str) -> None:
    mutate(tiny_dict)
    path = write_task(tmp_path, tiny_dict)
    with pytest.raises(SpecError) as info:
        load_task(path)
    message = str(info.value)
    assert str(path) in message and f": {field}:" in message and reason in message


@pytest.mark.parametrize("mutate, field, reason", [
    (lambda d: d.update(attacks=["lira-online", "lira-sideways"]), "attacks[1]",
     "unknown attack 'lira-sideways'; known: global-threshold, lira-offline"),
    (lambda d: d.update(queries=["rotate"]), "queries[0]", "unknown query 'rotate'; known: hflip, identity"),
    (lambda d: d.update(threat_models=["psychic"]), "threat_models[0]", "unknown threat model 'psychic'; known: adaptive"),
    (lambda d: d["dataset"].update(name="mnist"), "dataset.name", "unknown dataset 'mnist'; known: cifar10"),
    (lambda d: d["model"].update(arch="vit"), "model.arch", "unknown model 'vit'; known: cnn"),
])
def test_names_are_checked_against_their_registries(tmp_path: Path, tiny_dict: dict, mutate, field: str,
                                                    reason: str) -> None:
    mutate(tiny_dict)
    path = write_task(tmp_path, tiny_dict)
    with pytest.raises(SpecError) as info:
        check_task(load_task(path), str(path))
    assert f"{path}: {field}: {reason}" in str(info.value)


def test_extends_merges_mappings_and_replaces_lists(tmp_path: Path, tiny_dict: dict) -> None:
    parent = load_task(write_task(tmp_path, tiny_dict))
    child = {"id": "child", "extends": "tiny-digits.yaml", "plans": ["w2"], "training": {"epochs": 7}}
    (tmp_path / "child.yaml").write_text(yaml.safe_dump(child))
    loaded = load_task(tmp_path / "child.yaml")
    assert loaded.plans == ["w2"] and loaded.training.epochs == 7
    assert loaded.training.lr == parent.training.lr and loaded.dataset == parent.dataset  # inherited
    # identity is the resolved content: the same spec written out in full has the same hash
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "child.yaml").write_text(yaml.safe_dump(loaded.model_dump(mode="json")))
    assert load_task(tmp_path / "flat" / "child.yaml").hash == loaded.hash


def test_extends_finds_a_parent_named_with_an_upper_case_suffix_beside_the_child(tmp_path: Path, tiny_dict: dict,
                                                                                monkeypatch) -> None:
    tiny_dict.update(id="base")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "base.YAML").write_text(yaml.safe_dump(tiny_dict))
    (tmp_path / "tasks" / "child.yaml").write_text("id: child\nextends: base.YAML\nplans: [w2]\n")
    monkeypatch.chdir(tmp_path)  # not the child's folder: the parent is looked up beside the child, not here
    loaded = load_task(tmp_path / "tasks" / "child.yaml")
    assert loaded.plans == ["w2"] and loaded.training == load_task(tmp_path / "tasks" / "base.YAML").training


def test_an_error_is_reported_in_the_file_that_sets_the_field(tmp_path: Path, tiny_dict: dict) -> None:
    # The parent sets a bad epochs and a bad plan list, the child a bad learning rate and no more: each line
    # names the file to edit (the parent's with the child that inherits them).
    tiny_dict.update(id="base")
    tiny_dict["training"]["epochs"] = -1
    tiny_dict["plans"] = ["w4", "bogus"]
    base = write_task(tmp_path, tiny_dict)
    (tmp_path / "middle.yaml").write_text("id: middle\nextends: base.yaml\n")
    child = tmp_path / "child.yaml"
    child.write_text("id: child\nextends: middle.yaml\ntraining:\n  lr: -1\n")
    with pytest.raises(SpecError) as info:
        load_task(child)
    lines = str(info.value).splitlines()
    assert any(line.startswith(f"{base}: training.epochs: ") and line.endswith(f"(inherited by {child})")
               for line in lines), lines
    assert any(line.startswith(f"{base}: plans: ") for line in lines), lines
    assert any(line.startswith(f"{child}: training.lr: ") and "inherited" not in line for line in lines), lines


@pytest.mark.parametrize("parent, make, reason", [
    ("a\0b.yaml", None, r"extends: 'a\\x00b\.yaml' cannot be read \(.*null"),
    ("loop.yaml", lambda folder: (folder / "loop.yaml").symlink_to(folder / "loop.yaml"),
     r"extends: 'loop\.yaml' cannot be read"),
    ("pipe.yaml", lambda folder: os.mkfifo(folder / "pipe.yaml"), r"extends: .*pipe\.yaml is not a regular file"),
    ("dir.yaml", lambda folder: (folder / "dir.yaml").mkdir(), r"extends: .*dir\.yaml is not a regular file"),
    ("a" * 300 + ".yaml", None, r"extends: 'a{200}' cannot be read \(.*File name too long"),
], ids=["nul byte", "symlink loop", "fifo", "folder", "name too long"])
def test_an_extends_the_file_system_refuses_is_one_clear_error(tmp_path: Path, parent: str, make, reason: str) -> None:
    if make is not None:
        make(tmp_path)
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"id": "child", "extends": parent}))
    with pytest.raises(SpecError, match=reason):
        load_task(child)


def test_extends_cycles_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("id: a\nextends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("id: b\nextends: a.yaml\n")
    with pytest.raises(SpecError, match=r"a\.yaml: extends: 'b\.yaml' makes a cycle: b\.yaml -> a\.yaml -> b\.yaml"):
        load_task(tmp_path / "b.yaml")


@pytest.mark.parametrize("parent, reason", [
    ("nowhere.yaml", r"c\.yaml: extends: .*nowhere\.yaml not found"),
    ('""', r"c\.yaml: extends: expected a task id or a \.yaml path, got an empty string"),
    ("no-such-task", r"c\.yaml: extends: unknown task 'no-such-task'"),
], ids=["missing-file", "empty", "unknown-id"])
def test_missing_or_empty_parents_name_the_file_and_the_field(tmp_path: Path, parent: str, reason: str) -> None:
    (tmp_path / "c.yaml").write_text(f"id: c\nextends: {parent}\n")
    with pytest.raises(SpecError, match=reason):
        load_task(tmp_path / "c.yaml")


def test_a_task_id_is_never_read_from_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tiny-digits").mkdir()  # what evaluate leaves in its output folder: <out>/<task id>/
    monkeypatch.chdir(tmp_path)
    assert load_task("tiny-digits").id == "tiny-digits"
    (tmp_path / "here.yaml").write_text("id: here\nextends: tiny-digits\n")
    assert load_task("here.yaml").id == "here"  # a file name is still a file
    # and so is a path with a folder in it (here the results folder: there, but no file), or an upper-case suffix
    for path, reason in (("./tiny-digits", "not a regular file"), ("HERE.YAML", "task file not found")):
        with pytest.raises(SpecError, match=reason):
            load_task(path)


def test_bundled_study_tasks_state_only_their_differences() -> None:
    text = (Path(__file__).parent.parent / "tasks" / "cifar100-resnet50.yaml").read_text()
    assert "extends: cifar100-resnet18" in text and len(text.splitlines()) < 10
    spec = load_task("cifar100-resnet50")
    assert (spec.dataset.name, spec.model.arch, spec.training.epochs, spec.membership.n_models) == (
        "cifar100", "resnet50", 100, 64)


def test_id_must_match_file_name(tmp_path: Path, tiny_dict: dict) -> None:
    path = tmp_path / "other-name.yaml"
    path.write_text(yaml.safe_dump(tiny_dict))
    with pytest.raises(SpecError, match="must match the file name"):
        load_task(path)


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("id: broken\nplans: [w4\n")
    with pytest.raises(SpecError, match=r"broken\.yaml:\d+: not valid YAML"):
        load_task(path)


def test_unknown_task_id_lists_known() -> None:
    with pytest.raises(SpecError, match="unknown task 'nope'.*digits-mlp"):
        load_task("nope")


def test_optional_extensions_leave_existing_hashes_alone(tmp_path: Path, tiny_dict: dict) -> None:
    plain = load_task(write_task(tmp_path, tiny_dict))
    assert "hub" not in plain.canonical()
    pinned = load_task(write_task(tmp_path, dict(tiny_dict, hub={"repo": "org/pool", "revision": "abc"})))
    assert pinned.hash != plain.hash and pinned.pool_hash == plain.pool_hash
