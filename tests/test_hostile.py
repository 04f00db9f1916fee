"""Hostile input: task files, submission YAML, terminal markup, result files and disks, each one clear line.

Every test builds the hostile input itself (real files, the real CLI) and checks the one line that
names the file, the field and the reason, and that nothing was done or written before the refusal.
"""

from __future__ import annotations

import contextlib
import errno
import json
import struct
import os
import re
import shutil
import signal
import stat
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import TASKS
from mia_ptq_bench.atomic import sha256_file, write_bytes_atomic
from mia_ptq_bench.budget import Machine, check_budget, estimate, problems
from mia_ptq_bench.cli import app
from mia_ptq_bench.data import DATASET_SHAPES
from mia_ptq_bench.errors import BenchError, SpecError, WriteError
from mia_ptq_bench.results.io import load_result
from mia_ptq_bench.spec import load_task
from mia_ptq_bench.submission import MANIFEST, validate_submission, write_manifest

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
    (lambda d: d["membership"].update(pkeep=0.125), "membership", "must be IN at least 3 and OUT of at least 3"),
    # 2 IN of 8: leave-one-out kept one IN shadow for the target's members, no spread (LiRA's AUC fell to 0)
    (lambda d: d["membership"].update(pkeep=0.25), "membership", "must be IN at least 3 and OUT of at least 3"),
    (lambda d: d["membership"].update(pkeep=0.75), "membership", "must be IN at least 3 and OUT of at least 3"),
    (lambda d: d["training"].update(epochs=True), "training.epochs", "valid integer (got True)"),
    (lambda d: d["training"].update(epochs=2.5), "training.epochs", "valid integer (got 2.5)"),
    (lambda d: d["training"].update(epochs=10**9), "training.epochs", "less than or equal to 10000"),
    (lambda d: d["training"].update(batch_size=0), "training.batch_size", "greater than or equal to 1"),
    # [] meant every attack, as leaving it out does, under another task hash
    (lambda d: d.update(strongest={"attacks": []}), "strongest.attacks", "at least 1 item"),
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
    # The README quotes digits-mlp's hash in its sample output; bounds change what is accepted, never what a
    # valid task is, so the quoted hash is the task's.
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    quoted = re.search(r"digits-mlp v(\d+) \(task hash ([0-9a-f]{12})\)", readme)
    spec = load_task("digits-mlp")
    assert quoted and (int(quoted.group(1)), quoted.group(2)) == (spec.version, spec.hash[:12])


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


def test_a_batch_larger_than_a_models_members_is_refused_before_training(tmp_path: Path, tiny_dict: dict) -> None:
    # 100 examples, each IN 4 of 8 models: about 50 members per model. A batch of one more than the
    # fewest would repeat a member in every step; a batch of exactly the fewest is accepted.
    from mia_ptq_bench.pool.build import membership_masks

    tiny_dict["dataset"]["pool_size"] = 100
    tiny_dict["membership"] = {**tiny_dict.get("membership", {}), "n_models": 8, "pkeep": 0.5}
    path = write_task(tmp_path, tiny_dict)
    counts = membership_masks(load_task(path), 100).sum(axis=1)
    fewest, model = int(counts.min()), int(counts.argmin())
    tiny_dict["training"]["batch_size"] = fewest + 1
    write_task(tmp_path, tiny_dict)
    result = cli.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1, result.output
    message = " ".join(result.stderr.split())
    assert (f"invalid: {path}: training.batch_size: {fewest + 1} is more than the {fewest} members of pool model "
            f"{model} (a pool of 100 examples") in message
    assert "use a smaller batch, or a larger dataset.pool_size" in message and "Traceback" not in result.stderr
    tiny_dict["training"]["batch_size"] = fewest
    write_task(tmp_path, tiny_dict)
    assert cli.invoke(app, ["validate", str(path)]).exit_code == 0
    # Without a pool_size the pool is the whole split, whose registered size validate checks too
    # (digits: 1,297 training images, so about 648 members per model).
    del tiny_dict["dataset"]["pool_size"]
    tiny_dict["training"]["batch_size"] = 1024
    write_task(tmp_path, tiny_dict)
    result = cli.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1, result.output
    assert "training.batch_size: 1024 is more than the" in " ".join(result.stderr.split())
    assert "(a pool of 1297 examples" in " ".join(result.stderr.split())


def test_a_pool_too_small_for_every_model_to_have_members_is_refused_before_training(tmp_path: Path,
                                                                                     tiny_dict: dict) -> None:
    # 5 examples, each IN 32 of 64 models: some model trains on nothing, and its data order looped forever.
    tiny_dict["dataset"]["pool_size"] = 5
    tiny_dict["membership"] = {**tiny_dict.get("membership", {}), "n_models": 64, "pkeep": 0.5}
    path = write_task(tmp_path, tiny_dict)
    result = cli.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1, result.output
    assert f"invalid: {path}: dataset.pool_size: a pool of 5 examples" in " ".join(result.stderr.split())
    assert "with no member to train on" in " ".join(result.stderr.split())
    from mia_ptq_bench.pool.train import make_schedule

    def endless(signum, frame):
        raise TimeoutError("make_schedule looped for 30 s on a model without members")

    previous = signal.signal(signal.SIGALRM, endless)  # the old loop never ended: fail instead of hanging
    signal.alarm(30)
    try:
        with pytest.raises(ValueError, match="pool model 3 has no members"):
            make_schedule(load_task(path), np.array([], dtype=np.int64), 5, 3)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_huge_pool_is_refused_by_its_size_without_drawing_its_masks(tmp_path: Path, tiny_dict: dict) -> None:
    from mia_ptq_bench.runner import check_task

    # 1,024 models x 10^7 examples: the masks alone would take 80 GB to draw
    tiny_dict["dataset"]["pool_size"] = 10_000_000
    tiny_dict["membership"] = {**tiny_dict.get("membership", {}), "n_models": 1024, "pkeep": 0.5}
    tiny_dict["targets"] = {**tiny_dict.get("targets", {}), "count": 16}
    path = write_task(tmp_path, tiny_dict)
    spec = load_task(path)
    check_task(spec, str(path))  # no masks drawn for a pool this large
    with pytest.raises(SpecError, match=r"dataset\.pool_size: 10000000 images asked for, but the digits training split"):
        check_budget(spec, "cpu", tmp_path / "cache", source=str(path))


@pytest.mark.parametrize("field", ["pool_size", "test_size"])
def test_a_subset_larger_than_the_split_is_refused_not_the_whole_split(tmp_path: Path, tiny_dict: dict,
                                                                       field: str) -> None:
    from mia_ptq_bench.data import load_dataset
    from mia_ptq_bench.errors import DataError

    tiny_dict["dataset"][field] = 1_000_000  # sklearn's digits: 1,797 images in all
    path = write_task(tmp_path, tiny_dict)
    spec = load_task(path)
    with pytest.raises(DataError, match=rf"dataset\.{field}: 1000000 images asked for, but the digits \w+ split holds \d+"):
        load_dataset(spec.dataset)
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}: dataset\.{field}: 1000000 images asked for"):
        check_budget(spec, "cpu", tmp_path / "cache", source=str(path))


def test_a_task_path_that_is_there_but_not_a_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "folder.yaml").mkdir()
    os.mkfifo(tmp_path / "pipe.yaml")
    for name in ("folder.yaml", "pipe.yaml"):
        with pytest.raises(SpecError, match=rf"{name}: not a regular file$"):
            load_task(tmp_path / name)
    with pytest.raises(SpecError, match=r"absent\.yaml: task file not found$"):
        load_task(tmp_path / "absent.yaml")


@pytest.mark.parametrize("option, value, message", [
    ("--plans", "w4,w4", "--plans: w4 given twice"),
    ("--plans", ",", "--plans: no item in ','"),
    ("--plans", "w4,,w2", "--plans: an empty item in 'w4,,w2'"),
    ("--threat-models", "oblivious,", "--threat-models: an empty item in 'oblivious,'"),
    ("--threat-models", "oblivious,oblivious", "--threat-models: oblivious given twice"),
])
def test_evaluate_refuses_a_list_option_with_an_item_twice_or_none(tmp_path: Path, option: str, value: str,
                                                                   message: str) -> None:
    result = cli.invoke(app, ["evaluate", "rtn", "--task", "tiny-digits", option, value, "--out", str(tmp_path / "r"),
                              "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output + result.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


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


def test_worker_processes_count_their_copies_of_the_data_and_scores() -> None:
    spec = load_task("cifar10-resnet18")
    one = estimate(spec, DATASET_SHAPES["cifar10"], "cpu", quantized_per_plan=64, plans=4, results=8)
    two = estimate(spec, DATASET_SHAPES["cifar10"], "cpu", quantized_per_plan=64, plans=4, results=8, workers=2)
    copies = two.memory_parts["copies for 2 worker processes"]
    assert not any(name.startswith("copies") for name in one.memory_parts)
    # each worker's two (handed pickled, and unpickled) and the driver's two while it hands them out:
    # 6 x (the 32x32x3 images of both splits + M x N x Q scores)
    assert copies >= 6 * ((50_000 + 10_000) * 3 * 32 * 32 + 64 * 50_000 * 2 * 8)
    assert two.memory == one.memory + copies
    # a machine that holds the run in one process is told how to run it there
    fits_one = Machine("cpu", one.memory, None, 1 << 50, 1e10)
    found = problems(two, fits_one)
    assert len(found) == 1 and "copies for 2 worker processes" in found[0] and found[0].endswith("(--workers 1 keeps one copy)")
    assert problems(one, fits_one) == []
    assert "--workers 1" not in problems(two, Machine("cpu", one.memory // 2, None, 1 << 50, 1e10))[0]


def test_the_budget_counts_worker_copies_only_where_the_automatic_choice_starts_workers() -> None:
    shape, threads = DATASET_SHAPES["cifar10"], torch.get_num_threads()

    def copies(spec, **kwargs) -> int:
        budget = estimate(spec, shape, "cpu", quantized_per_plan=64, plans=4, results=8, workers=None, **kwargs)
        return sum(n for name, n in budget.memory_parts.items() if name.startswith("copies"))

    big, small = load_task("cifar10-resnet18"), load_task("tiny-cnn")
    try:
        torch.set_num_threads(2)
        assert copies(big) > 0  # its pool trains in workers
        assert copies(big, pool_cached=True) == 0  # nothing to train; a method that is not long quantizes here
        assert copies(big, pool_cached=True, quantize_grid=(4, 64)) > 0
        assert copies(small) == copies(small, quantize_grid=(4, 64)) == 0  # too little work to start workers for
        assert estimate(big, shape, "cuda", quantized_per_plan=64, plans=4, results=8, workers=None).memory_parts.keys() \
            == estimate(big, shape, "cuda", quantized_per_plan=64, plans=4, results=8).memory_parts.keys()
        torch.set_num_threads(1)
        assert copies(big) == copies(big, quantize_grid=(4, 64)) == 0  # one thread is not shared out
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("task", ["tiny-cnn", "tiny-digits"])
def test_the_budget_counts_the_copies_of_exactly_the_training_workers_build_pool_starts(
        task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget counts on the meta model what build_pool counts on the real one (pool_training_work of
    training_flops): with the threshold at that work the copies are counted, just above it they are not."""
    from mia_ptq_bench.budget import measure_model
    from mia_ptq_bench.data import load_dataset
    from mia_ptq_bench.pool import train

    spec = load_task(task)
    data = load_dataset(spec.dataset)
    real = train.task_training_flops(spec, data)
    assert measure_model(spec, tuple(data.input_shape), data.num_classes).training_flops == real
    work = train.pool_training_work(spec, len(data.pool), real)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for threshold, workers in ((work, 2), (work * 1.001, 1)):
            monkeypatch.setattr(train, "WORKER_WORK", threshold)
            assert train.auto_workers(torch.device("cpu"), 2, work) == workers  # build_pool's choice
            budget = check_budget(spec, "cpu", tmp_path / "cache", dataset=lambda: data)
            assert [n for n in budget.memory_parts if n.startswith("copies")] == \
                (["copies for 2 worker processes"] if workers == 2 else [])
    finally:
        torch.set_num_threads(threads)


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
    (b"version: 2020-13-45\n", "submission.yaml: not valid YAML: a value cannot be read (month must be in 1..12)"),
    (b"version: " + b"9" * 5000 + b"\n", "submission.yaml: not valid YAML: a value cannot be read (Exceeds the limit"),
    (b'version: !!float "abc"\n', "submission.yaml: not valid YAML: a value cannot be read (could not convert"),
    # hex is read without the decimal digit limit, and an int that long cannot be printed in the message
    (b"version: 0x" + b"f" * 20_000 + b"\n", "version: Input should be a valid string (got an integer of 80000 bits)"),
], ids=["latin-1", "deep", "large", "duplicate-key", "python-tag", "timestamp", "bad-date", "long-int", "bad-float",
        "long-hex-int"])
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


# -- shared: three evaluated submissions on tiny-digits (the references and one entry) ----------------

def _metadata(name: str, quantizer: dict, tasks: list[str], display: str | None = None) -> str:
    return yaml.safe_dump({"name": name, "display_name": display or name, "version": "1", "authors": [{"name": "t"}],
                           "license": "MIT", "contact": "t@example.org", "quantizer": quantizer, "tasks": tasks})


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """submissions/{fp32, rtn, mine} evaluated on tiny-digits, with their arrays; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("evaluated")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPTQ_CACHE", str(root / "cache"))
        mp.setenv("MPTQ_TASKS", str(TASKS))
        for name, quantizer in (("fp32", {"builtin": "fp32"}), ("rtn", {"builtin": "rtn"}),
                                ("mine", {"builtin": "rtn", "config": {"search": "minmax"}})):
            folder = root / "submissions" / name
            folder.mkdir(parents=True)
            (folder / "submission.yaml").write_text(_metadata(name, quantizer, ["tiny-digits"]))
            result = cli.invoke(app, ["evaluate", name, "--task", "tiny-digits", "--submission", str(folder)])
            assert result.exit_code == 0, result.stderr
    return root / "submissions"


@pytest.fixture
def subs(evaluated: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "submissions"
    shutil.copytree(evaluated, copy)
    return copy


def _rewrite_arrays(document: Path, change) -> None:
    """What a hostile author can do: change the arrays, and record their new sha256 in the document."""
    arrays_path = document.with_suffix(".npz")
    with np.load(arrays_path, allow_pickle=True) as archive:  # the test's own file, possibly already hostile
        arrays = {key: archive[key] for key in archive.files}
    arrays = change(arrays)
    np.savez(arrays_path, **arrays)  # pickles object arrays: what a hostile file may hold
    data = json.loads(document.read_text())
    data["arrays"]["sha256"] = sha256_file(arrays_path)
    document.write_text(json.dumps(data))


def _name_file(document: Path, section: str, name: str) -> None:
    """What a hostile author can write: any name as the document's ``arrays`` or ``evidence`` file."""
    data = json.loads(document.read_text())
    data[section]["file"] = name
    document.write_text(json.dumps(data))


def _validate_one(path: Path) -> list[str]:
    result = cli.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.stderr, (result.stderr, result.exception)
    return result.stderr.strip().splitlines()


# -- 4. result files ------------------------------------------------------------------------------------

def test_result_arrays_with_a_damaged_deflate_stream_are_one_line(subs: Path) -> None:
    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    arrays_path = document.with_suffix(".npz")
    with np.load(arrays_path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    np.savez_compressed(arrays_path, **arrays)
    raw = bytearray(arrays_path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", raw[26:30])  # the first member's local header
    start = 30 + name_length + extra_length
    raw[start:start + 40] = b"\xff" * 40  # its compressed bytes: zipfile raises zlib.error, not BadZipFile
    arrays_path.write_bytes(bytes(raw))
    data = json.loads(document.read_text())
    data["arrays"]["sha256"] = sha256_file(arrays_path)
    document.write_text(json.dumps(data))
    (line,) = _validate_one(document)
    assert line.startswith(f"invalid: {arrays_path}: arrays: unreadable .npz file (error: Error -3 while decompressing")


def test_result_arrays_missing_a_key_or_holding_objects_are_one_line(subs: Path) -> None:
    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    assert cli.invoke(app, ["validate", str(document)]).exit_code == 0
    _rewrite_arrays(document, lambda a: {k: v for k, v in a.items() if k != "keep"})
    assert _validate_one(document) == [f"invalid: {document}: arrays: keep is missing from w4--oblivious.npz"]
    _rewrite_arrays(document, lambda a: dict(a, keep=np.ones((8, 400), bool), targets=np.array([0, "x", None], object)))
    assert _validate_one(document) == [f"invalid: {document.with_suffix('.npz')}: arrays: targets holds object values; "
                                       "only numbers and booleans are accepted (object arrays are never unpickled)"]
    _rewrite_arrays(document, lambda a: dict(a, targets=np.array([0, 1, 2]), test_predictions=np.zeros((3, 7), int)))
    assert _validate_one(document) == [f"invalid: {document}: arrays: test_predictions has shape (3, 7), expected "
                                       "(3, 200) (targets x examples, or targets x test images)"]


@pytest.mark.parametrize("change, reason", [
    (lambda a: dict(a, shadows__oblivious__models=np.where(np.arange(a["shadows__oblivious__models"].size) == 0, np.inf,
                                                           a["shadows__oblivious__models"].astype(float))),
     "shadows__oblivious__models holds float64, expected int values"),
    (lambda a: dict(a, shadows__oblivious__models=a["shadows__oblivious__models"] + 100),
     "shadows__oblivious__models must be pool model indices below 8, one-dimensional"),
    (lambda a: dict(a, shadows__oblivious__scores=a["shadows__oblivious__scores"][:, :3]),
     "shadows__oblivious__scores has shape"),
    (lambda a: {k: v for k, v in a.items() if k != "shadows__oblivious__models"},
     "shadows__oblivious__models is missing (the shadows of 'oblivious' come as a pair)"),
], ids=["inf-index", "index-out-of-range", "short-scores", "unpaired"])
def test_shadow_arrays_are_checked_before_the_attacks_read_them(subs: Path, change, reason: str) -> None:
    # An infinite model index once ended in OverflowError's traceback, aborting the whole folder's validation.
    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    _rewrite_arrays(document, change)
    (line,) = _validate_one(document)
    assert line.startswith(f"invalid: {document}: arrays: {reason}"), line


def test_the_reference_is_attacked_once_per_content_and_a_changed_one_afresh(subs: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Every result of a task holds the same reference scores: validate attacks them once, not once per result.
    # The memo is keyed by content, so a result whose reference scores were changed is attacked (and caught) anew.
    from mia_ptq_bench.metrics import select as select_module
    from mia_ptq_bench.results import verify as verify_module

    real, attacked = select_module.attack_targets, []

    def spy(spec, keep, targets, scores, *rest, **options):
        attacked.append(scores.tobytes())
        return real(spec, keep, targets, scores, *rest, **options)

    monkeypatch.setattr(verify_module, "attack_targets", spy)  # the quantized evaluations'
    monkeypatch.setattr(select_module, "attack_targets", spy)  # the reference's, through attack_reference
    monkeypatch.setattr(verify_module, "_references", {})
    folder = subs / "mine" / "results" / "tiny-digits"
    documents = sorted(folder.glob("*.json"))
    assert validate_submission(subs / "mine") == []
    with np.load(documents[0].with_suffix(".npz")) as arrays:
        reference = arrays["reference_scores"].tobytes()
    assert attacked.count(reference) == 1 and len(attacked) == len(documents) + 1

    attacked.clear()
    changed = documents[-1]
    _rewrite_arrays(changed, lambda a: dict(a, reference_scores=a["reference_scores"] + 0.5))
    write_manifest(subs / "mine")
    problems = validate_submission(subs / "mine")
    assert problems == [f"{changed}: arrays.reference_membership__lira-online: the saved membership scores are not "
                        "what the attack gives on the saved scores"], problems
    assert attacked.count(reference) == 0 and len(attacked) == len(documents) + 1  # the changed one's, afresh


@pytest.mark.parametrize("change, reason", [
    (lambda d: d.update(plan="w99x"), "plan: cannot parse precision plan 'w99x'"),
    (lambda d: d.update(threat_model="nosuch"), "threat_model: unknown threat model 'nosuch'"),
    (lambda d: d.update(audit=[]), "audit: no bit-width audit evidence"),
    (lambda d: d["audit"][0].update(bits=32, allowed_levels=65536, max_distinct=65536),
     "audit: layer 1 records 32.0 bits (65536 values); plan w4 gives it 4.0 bits (16 values)"),
    (lambda d: d["audit"][0].update(max_distinct=200), "audit: layer 1: passed is true for 200 values in a channel "
                                                        "where 16 are allowed"),
], ids=["unknown-plan", "unknown-threat", "no-audit", "audit-off-plan", "audit-passed-wrongly"])
def test_a_result_file_alone_is_held_to_its_plan_and_threat_model(subs: Path, change, reason: str) -> None:
    # `validate FILE.json` once printed ok for all of these (it read only the audit's own passed flags),
    # and --recompute then stopped on an error naming no file.
    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    data = json.loads(document.read_text())
    change(data)
    document.write_text(json.dumps(data))
    (line,) = _validate_one(document)
    assert line.startswith(f"invalid: {document}: {reason}"), line


@pytest.mark.parametrize("change, field", [
    (lambda q: q["attacks"]["lira-online"]["tpr_at_0_1pct_fpr"].update(negatives=10**400),
     "quantized.attacks.lira-online.tpr_at_0_1pct_fpr.negatives"),
    (lambda q: q["attacks"]["lira-online"]["tpr_at_0_1pct_fpr"].update(true_positives=10**6),
     "quantized.attacks.lira-online.tpr_at_0_1pct_fpr"),
    (lambda q: q["test_accuracy"].update(mean=1.0, ci_low=0.0, ci_high=0.5), "quantized.test_accuracy"),
    (lambda q: q["attacks"]["lira-online"].update(roc_tpr=[0.5] * 5000), "quantized.attacks.lira-online.roc_tpr"),
    (lambda q: q["attacks"]["lira-online"].update(roc_tpr=[0.5] * 7), "quantized"),
], ids=["huge-count", "more-hits-than-members", "interval-without-its-mean", "long-roc", "roc-off-its-grid"])
def test_numbers_no_evaluation_gives_are_refused_on_reading(subs: Path, change, field: str) -> None:
    # A self-reported document's numbers reach the site as written: a count of 10**400 once crashed the
    # whole build (OverflowError) and a stretched interval moved every plot's axes.
    # (Checked where a document is read, whether or not arrays come with it: the site reads it alone.)
    from mia_ptq_bench.errors import SpecError

    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    data = json.loads(document.read_text())
    change(data["quantized"])
    document.write_text(json.dumps(data))
    with pytest.raises(SpecError) as refused:
        load_result(document)
    assert str(refused.value).startswith(f"{document}: {field}"), str(refused.value)


def test_a_key_repeated_in_a_result_document_is_refused(subs: Path) -> None:
    # json keeps the last of two keys: a reader would see the first plan, the checks the second.
    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    text = document.read_text()
    document.write_text('{"plan": "w1.58", ' + text.lstrip()[1:])
    assert _validate_one(document) == [f"invalid: {document}: not a readable JSON document: the key 'plan' appears "
                                       "twice in one object"]


def _npz_with_header_length(path: Path, length: int) -> None:
    """One .npy member in format 2.0 with a valid header padded to ``length`` bytes, then its one value."""
    header = repr({"descr": "<f8", "fortran_order": False, "shape": (1,)}).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("keep.npy", "w") as member:
        member.write(np.lib.format.magic(2, 0) + length.to_bytes(4, "little") + header.ljust(length - 1) + b"\n"
                     + np.zeros(1).tobytes())


def test_an_npz_header_is_bounded_before_it_is_read(tmp_path: Path) -> None:
    # numpy reads a header of any length the file claims (up to 4 GiB) before it applies its own bound.
    from mia_ptq_bench.errors import SpecError
    from mia_ptq_bench.limits import NPY_HEADER_BYTES
    from mia_ptq_bench.results.io import read_npz

    path = tmp_path / "a.npz"
    _npz_with_header_length(path, NPY_HEADER_BYTES)
    assert read_npz(path)["keep"].shape == (1,)
    _npz_with_header_length(path, 2 * NPY_HEADER_BYTES)  # numpy itself reads this one (its bound: 10,000 bytes)
    with zipfile.ZipFile(path) as archive, archive.open("keep.npy") as member:
        assert np.lib.format.read_array(member).shape == (1,)
    with pytest.raises(SpecError, match="'keep.npy' claims a 8.0 KiB header, more than the 4.0 KiB a .npy header "
                                        "needs; refused"):
        read_npz(path)


def test_an_npz_of_too_many_arrays_is_refused_before_zipfile_lists_them(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from mia_ptq_bench.errors import SpecError
    from mia_ptq_bench.limits import RESULT_ARRAYS_MEMBERS
    from mia_ptq_bench.results import io as result_io

    path = tmp_path / "many.npz"
    np.savez(path, **{f"a{i}": np.zeros(1) for i in range(RESULT_ARRAYS_MEMBERS)})
    assert len(result_io.read_npz(path)) == RESULT_ARRAYS_MEMBERS
    np.savez(path, **{f"a{i}": np.zeros(1) for i in range(RESULT_ARRAYS_MEMBERS + 1)})

    def unreachable(*args, **kwargs):  # zipfile builds the whole listing in memory when it opens a file
        raise AssertionError("zipfile opened the archive before its listing was bounded")

    monkeypatch.setattr(result_io.zipfile, "ZipFile", unreachable)
    with pytest.raises(SpecError, match=f"the zip lists {RESULT_ARRAYS_MEMBERS + 1} members, more than the "
                                        f"{RESULT_ARRAYS_MEMBERS} arrays a result holds; refused"):
        result_io.read_npz(path)


def test_an_npz_claiming_a_huge_array_is_refused_from_its_header(subs: Path) -> None:
    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    arrays_path = document.with_suffix(".npz")
    with zipfile.ZipFile(arrays_path, "w") as archive, archive.open("keep.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)})
    data = json.loads(document.read_text())
    data["arrays"]["sha256"] = sha256_file(arrays_path)
    document.write_text(json.dumps(data))
    assert _validate_one(document) == [f"invalid: {arrays_path}: arrays: more than 4.0 GiB of arrays; refused"]


@pytest.mark.parametrize("name, reason", [
    ("../../../../etc/passwd", "is not a plain .npz file name beside the document; refused"),
    ("/etc/passwd.npz", "is not a plain .npz file name beside the document; refused"),
    ("sub/w4--oblivious.npz", "is not a plain .npz file name beside the document; refused"),
    ("linked.npz", "is a symbolic link; refused"),
])
def test_arrays_file_must_be_a_plain_file_beside_the_document(subs: Path, name: str, reason: str) -> None:
    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    (document.parent / "linked.npz").symlink_to(document.with_suffix(".npz"))
    _name_file(document, "arrays", name)
    # refused before reading: a sha256 mismatch would mean the file named was read
    assert _validate_one(document) == [f"invalid: {document}: arrays.file: {name!r} {reason}" if "plain" in reason
                                       else f"invalid: {document}: arrays.file: {document.parent / name} {reason}"]


@pytest.mark.parametrize("name", ["x" * 300 + ".npz", "../w4--oblivious.npz"])
def test_arrays_file_is_checked_as_a_name_before_the_disk_when_arrays_are_optional(subs: Path, name: str) -> None:
    # validate --recompute reads a document without arrays: a name no file system holds was an OSError
    # naming no field, which ended the run before the other files were checked
    from mia_ptq_bench.results.verify import verify_result

    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    _name_file(document, "arrays", name)
    with pytest.raises(SpecError, match=rf"^{re.escape(str(document))}: arrays\.file: .* is not a plain \.npz file "
                                        r"name beside the document; refused$"):
        verify_result(document, arrays_required=False)


def _write_npz(path: Path, members: list[tuple[str, dict]]) -> None:
    """A zip of .npy members written by hand: headers that claim what the test wants, data or none."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, header in members:
            data = b"\0" * header.get("data_bytes", 0)
            with archive.open(name, "w") as member:
                np.lib.format.write_array_header_1_0(member, {k: v for k, v in header.items() if k != "data_bytes"})
                member.write(data)


@pytest.mark.parametrize("members, reason", [
    ([("z.npy", {"descr": "<f8", "fortran_order": False, "shape": (-1, 2**50)}),
      ("a.npy", {"descr": "<f8", "fortran_order": False, "shape": (2**47,)})],
     "z claims a negative shape (-1, 1125899906842624); refused"),
    ([("keep.npy", {"descr": "|b1", "fortran_order": False, "shape": (1,), "data_bytes": 1}),
      ("keep.npy", {"descr": "<f8", "fortran_order": False, "shape": (2**27,)})],
     "'keep.npy' appears twice; refused"),
], ids=["negative-shape", "duplicate-name"])
def test_an_npz_that_hides_its_size_is_refused_from_its_headers(subs: Path, members: list, reason: str) -> None:
    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    arrays_path = document.with_suffix(".npz")
    with pytest.warns(UserWarning, match="Duplicate name") if "twice" in reason else contextlib.nullcontext():
        _write_npz(arrays_path, members)
    data = json.loads(document.read_text())
    data["arrays"]["sha256"] = sha256_file(arrays_path)
    document.write_text(json.dumps(data))
    assert _validate_one(document) == [f"invalid: {arrays_path}: arrays: {reason}"]


def test_an_npz_reads_exactly_the_members_whose_headers_were_counted(tmp_path: Path) -> None:
    from mia_ptq_bench.results.io import read_npz

    # np.load would answer the key "x.npy" with member x.npy (counted once) instead of x.npy.npy
    path = tmp_path / "a.npz"
    _write_npz(path, [("x.npy", {"descr": "|u1", "fortran_order": False, "shape": (8000,), "data_bytes": 8000}),
                      ("x.npy.npy", {"descr": "|u1", "fortran_order": False, "shape": (8,), "data_bytes": 8})])
    arrays = read_npz(path, max_bytes=10_000)
    assert {k: v.nbytes for k, v in arrays.items()} == {"x": 8000, "x.npy": 8}


@pytest.mark.parametrize("change, reason", [
    (lambda info: setattr(info, "flag_bits", info.flag_bits | 0x1), "encrypted"),  # "password required" to read
    (lambda info: setattr(info, "compress_type", 99), "compression 99"),  # zipfile: "not supported"
], ids=["encrypted", "unknown-compression"])
def test_an_npz_that_zipfile_cannot_read_is_one_line(subs: Path, change, reason: str) -> None:
    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    arrays_path = document.with_suffix(".npz")
    with zipfile.ZipFile(arrays_path) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(arrays_path, "w") as archive:
        for info, data in members:
            archive.writestr(info, data)
    with zipfile.ZipFile(arrays_path, "a") as archive:  # the flag as a hostile author's zip tool would set it
        change(archive.infolist()[0])
        archive.comment = b"rewritten"  # makes zipfile rewrite the central directory with the changed entry
    with zipfile.ZipFile(arrays_path) as archive:
        with pytest.raises((RuntimeError, NotImplementedError)):  # what reading it raises, unguarded
            archive.read(archive.infolist()[0])
    data = json.loads(document.read_text())
    data["arrays"]["sha256"] = sha256_file(arrays_path)
    document.write_text(json.dumps(data))
    assert _validate_one(document) == [
        f"invalid: {arrays_path}: arrays: {members[0][0].filename!r} is encrypted or compressed other than as numpy "
        "writes it (stored or deflate); refused"]


def test_arrays_with_an_empty_test_split_are_one_line(subs: Path) -> None:
    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    _rewrite_arrays(document, lambda a: dict(a, test_labels=a["test_labels"][:0], test_predictions=a["test_predictions"][:, :0],
                                             reference_test_predictions=a["reference_test_predictions"][:, :0]))
    assert _validate_one(document) == [f"invalid: {document}: arrays: test_labels and targets must not be empty (no "
                                       "accuracy or attack without them)"]


def test_a_lone_surrogate_in_a_document_is_one_line_and_the_site_still_builds(subs: Path, tmp_path: Path) -> None:
    folder = subs / "mine"
    document = folder / "results" / "tiny-digits" / "w4--oblivious.json"
    text = document.read_text()
    document.write_text(text.replace('"search": "minmax"', '"search": "minmax", "note": "\\ud800"', 1))
    assert '"\\ud800"' in document.read_text()  # valid JSON, but half a character: no UTF-8 page can hold it
    write_manifest(folder)
    assert validate_submission(folder) == [
        f"{document}: not a readable JSON document: a string holds a lone surrogate (an escape between \\ud800 and "
        "\\udfff that is not half of a pair), which is not text"]
    build = cli.invoke(app, ["leaderboard", "build", "--submissions", str(subs), "--out", str(tmp_path / "site")])
    assert build.exit_code == 0, build.stderr
    assert "mine: " in build.stderr and "lone surrogate" in build.stderr  # left out, with its reason


def test_a_validator_failure_costs_one_submission_not_the_site(subs: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from mia_ptq_bench.board import collect as collect_module

    real = collect_module.validate_submission

    def broken_on_mine(folder: Path, stale: set[Path] | None = None) -> list[str]:
        if folder.name == "mine":
            raise RuntimeError("an unforeseen input")
        return real(folder, stale)

    monkeypatch.setattr(collect_module, "validate_submission", broken_on_mine)
    collected = collect_module.collect(subs)
    assert collected.skipped == ["mine: the validator failed on it (RuntimeError: an unforeseen input)"]
    assert set(collected.submissions) == {"fp32", "rtn"}


def test_a_folder_name_cannot_forge_a_line_of_output(tmp_path: Path) -> None:
    root = tmp_path / "subs"
    (root / "x\n::error title=forged::all submissions passed").mkdir(parents=True)
    _folder(root, "good", "name: good\n")
    result = cli.invoke(app, ["validate", str(root)])
    assert result.exit_code == 1
    lines = (result.stdout + result.stderr).splitlines()
    assert not [line for line in lines if line.startswith("::")]
    assert any("x\\x0a::error title=forged::all submissions passed: submission.yaml: missing" in line for line in lines)


def test_a_result_cannot_restate_its_task_s_version(subs: Path) -> None:
    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    data = json.loads(document.read_text())
    data["task"]["version"] = 10**30  # the site shows it
    document.write_text(json.dumps(data))
    write_manifest(subs / "mine")
    assert validate_submission(subs / "mine") == [
        f"{document}: task.version: the task of this hash is version 1 with pool hash "
        f"{data['task']['pool_hash'][:12]}…, the result records version 10000000000000000000 and "
        f"{data['task']['pool_hash'][:12]}…"]


def test_arrays_of_the_right_names_but_wrong_shapes_are_one_line(subs: Path) -> None:
    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    key = "shadows__oblivious__models"
    _rewrite_arrays(document, lambda a: dict(a, **{key: a[key].reshape(1, -1).repeat(2, axis=0)}))
    (line,) = _validate_one(document)
    assert line == f"invalid: {document}: arrays: {key} must be pool model indices below 8, one-dimensional"
    _rewrite_arrays(document, lambda a: dict(a, **{key: a[key][0]}))  # back to one row
    # a query more in the reference's scores than in the shadows': caught where the attacks run
    _rewrite_arrays(document, lambda a: dict(a, reference_scores=np.concatenate([a["reference_scores"]] * 2, axis=2)))
    (line,) = _validate_one(document)
    assert line.startswith(f"invalid: {document}: arrays: cannot rerun the attacks from the saved arrays (")


def test_numbers_outside_zero_to_one_are_refused_on_reading(subs: Path) -> None:
    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    data = json.loads(document.read_text())
    data["quantized"]["test_accuracy"].update(ci_low=-1e306, ci_high=1e306)  # overflowed the site's plots
    document.write_text(json.dumps(data))
    assert _validate_one(document) == [
        f"invalid: {document}: quantized.test_accuracy.ci_low: Input should be greater than or equal to 0 (got -1e+306)",
        f"invalid: {document}: quantized.test_accuracy.ci_high: Input should be less than or equal to 1 (got 1e+306)"]


def test_many_small_lists_are_refused_before_parsing(tmp_path: Path) -> None:
    many = tmp_path / "many.json"
    many.write_text("[" + ",".join(["{}"] * 600_000) + "]")  # 2 MiB of text, hundreds of MiB parsed
    assert _validate_one(many) == [f"invalid: {many}: not a readable JSON document: more than 500000 lists and "
                                   "objects"]


def test_huge_or_deeply_nested_json_is_refused_before_parsing(tmp_path: Path) -> None:
    huge = tmp_path / "huge.json"
    huge.write_text('{"pad": "' + "x" * (33 << 20) + '"}')
    assert _validate_one(huge) == [f"invalid: {huge}: 33.0 MiB, larger than the 32.0 MiB allowed; refused"]
    for depth in (100, 200_000):  # below and above the parser's recursion limit
        deep = tmp_path / f"deep{depth}.json"
        deep.write_text("[" * depth + "]" * depth)
        assert _validate_one(deep) == [f"invalid: {deep}: not a readable JSON document: nested deeper than 32 levels"]


# -- 5. files and disk ------------------------------------------------------------------------------

def _succeeds(command: list[str]) -> bool:
    try:
        return subprocess.run(command, capture_output=True).returncode == 0
    except FileNotFoundError:  # the tool is not installed
        return False


@pytest.fixture
def read_only_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A folder nobody may write in, root included: chmod (non-root), else the immutable flag, else a read-only
    tmpfs; in a container that allows none of them (root, no CAP_SYS_ADMIN, as CI's), the kernel's answer is
    played by refusing, with EACCES, every file created in the folder through the tempfile module (which
    every writer of the benchmark uses)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if _succeeds(["chattr", "+i", str(folder)]):
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
        return
    if _succeeds(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)]):
        yield folder
        subprocess.run(["umount", str(folder)], check=True)
        return
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def refused_inside(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve().is_relative_to(folder.resolve()):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refused_inside)
    yield folder


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A 512 KiB file system: a real tmpfs where one can be mounted; elsewhere (no CAP_SYS_ADMIN, as in CI)
    a folder whose reported free space is 512 KiB and where a write beyond it fails with ENOSPC at fsync."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if _succeeds(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)]):
        yield folder
        subprocess.run(["umount", str(folder)], check=True)
        return
    capacity = 512 << 10
    real_usage, real_fsync = shutil.disk_usage, os.fsync

    def inside(path) -> bool:
        return Path(path).resolve().is_relative_to(folder.resolve())

    def usage(path):
        if inside(path):
            used = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            return shutil._ntuple_diskusage(capacity, used, max(capacity - used, 0))
        return real_usage(path)

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if inside(name) and os.fstat(fd).st_size + sum(f.stat().st_size for f in folder.rglob("*")
                                                          if f.is_file() and not f.samefile(name)) > capacity:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    monkeypatch.setattr(os, "fsync", fsync)
    yield folder


def test_read_only_results_folder_fails_before_any_compute(read_only_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = cli.invoke(app, ["evaluate", "rtn", "--task", "tiny-digits", "--out", str(read_only_folder / "results"),
                              "--cache-dir", str(cache)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {read_only_folder / 'results' / 'tiny-digits' / 'rtn'}: results folder: "
                                    f"cannot write in {read_only_folder}: ")
    assert not cache.exists()  # no pool trained, nothing cached: the check came first


def test_a_run_refused_for_its_data_leaves_no_cache_folder(tmp_path: Path) -> None:
    empty, cache = tmp_path / "data", tmp_path / "cache"
    empty.mkdir()
    result = cli.invoke(app, ["evaluate", "rtn", "--task", "fashion-mnist-cnn", "--data-root", str(empty),
                              "--cache-dir", str(cache), "--out", str(tmp_path / "results")])
    assert result.exit_code == 2 and "fashion-mnist" in result.stderr
    assert not cache.exists()  # refused before the run took hold of the cache


def test_full_disk_is_one_clear_error_and_leaves_nothing(small_disk: Path, tmp_path: Path) -> None:
    target = small_disk / "results" / "big.json"
    with pytest.raises(WriteError, match=r"big\.json: cannot write: No space left on device"):
        write_bytes_atomic(target, b"x" * (1 << 20))
    assert not target.exists() and list((small_disk / "results").iterdir()) == []  # no temporary left behind
    # an evaluation whose pool cannot fit is refused from its estimate, before training
    run = cli.invoke(app, ["evaluate", "rtn", "--task", "tiny-digits", "--cache-dir", str(small_disk / "cache"),
                           "--out", str(tmp_path / "r")])
    assert run.exit_code == 2 and "budget: needs about" in run.stderr and "of disk for the pool" in run.stderr
    assert not (small_disk / "cache").exists()


def test_a_failing_write_is_one_error_wherever_it_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same without mounting: the disk fills at fsync, the last step before the rename."""
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match=r"out\.json: cannot write: No space left on device"):
        write_bytes_atomic(tmp_path / "out.json", b"{}")
    assert list(tmp_path.iterdir()) == []


def test_a_write_flushes_the_file_then_its_folder_after_the_rename(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the folder's flush a power cut after the rename could bring back the old file, or none."""
    synced = []
    real = os.fsync

    def record(fd: int) -> None:
        status = os.fstat(fd)
        synced.append(("folder" if stat.S_ISDIR(status.st_mode) else "file", status.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    write_bytes_atomic(tmp_path / "out.json", b"{}")
    assert synced == [("file", (tmp_path / "out.json").stat().st_ino), ("folder", tmp_path.stat().st_ino)]


@pytest.mark.parametrize("where", ["notes", "cwd", "parent", "submissions", "inside-submissions"])
def test_the_site_never_replaces_a_folder_it_did_not_build(subs: Path, tmp_path: Path, where: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # --out was replaced whole, whatever it held: a folder of notes, the submissions it was built from, or
    # (with --out ..) the folder above the current one.
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("mine")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    out = {"notes": notes, "cwd": Path("."), "parent": Path(".."), "submissions": subs,
           "inside-submissions": subs / "site"}[where]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    result = cli.invoke(app, ["leaderboard", "build", "--submissions", str(subs), "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: {out}: the site would ") or \
        result.stderr.startswith(f"error: {out}: a folder that holds files but no .mptq-site"), result.stderr
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing removed, nothing left behind


def test_the_site_folder_problems_are_one_line_and_a_killed_swap_is_recovered(
        subs: Path, tmp_path: Path, live_and_gone_pids: tuple[int, int]) -> None:
    from mia_ptq_bench.board import build as build_module

    blocker = tmp_path / "afile"
    blocker.write_text("")
    result = cli.invoke(app, ["leaderboard", "build", "--submissions", str(subs), "--out", str(blocker / "site")])
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    out = tmp_path / "site"
    build_module.build_site(subs, out)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # as mkdir makes it, not mkdtemp's 0700
    pages = sorted(p.relative_to(out) for p in out.rglob("*"))
    (out / build_module.SITE_MARKER).unlink()  # a site built before the marker existed is still a site
    build_module.build_site(subs, out)
    # a build killed between its two renames: the old site set aside, no site in place, a staging folder left
    out.rename(tmp_path / ".site.old-k2j4h")
    (tmp_path / ".site.building-x9").mkdir()
    result = cli.invoke(app, ["leaderboard", "build", "--submissions", str(subs), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == pages
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "site", "submissions"]
    # A concurrent build's staging folder (its process alive) is left alone; a killed one's (process gone) goes.
    # (One build used to delete another's folder mid-build, which then failed.)
    live_pid, gone_pid = live_and_gone_pids
    live, dead = f".site.building-{live_pid}-ab12", f".site.building-{gone_pid}-cd34"
    (tmp_path / live).mkdir()
    (tmp_path / dead).mkdir()
    build_module.build_site(subs, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["afile", "site", "submissions", live])
    # ...unless older than any build runs: then its process id has been taken by another process
    stale = time.time() - (build_module.BUILD_HOURS + 1) * 3600
    os.utime(tmp_path / live, (stale, stale))
    build_module.build_site(subs, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "site", "submissions"]


def test_a_site_is_replaced_by_the_next_build_and_kept_if_the_swap_fails(
        subs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mia_ptq_bench.board import build as build_module

    out = tmp_path / "site"
    build_module.build_site(subs, out)
    (out / "stale.html").write_text("from an older build")
    build_module.build_site(subs, out)  # a site this built (its marker) is replaced whole
    assert (out / build_module.SITE_MARKER).is_file() and not (out / "stale.html").exists()
    pages = sorted(p.relative_to(out) for p in out.rglob("*"))
    real_rename = Path.rename

    def staging_cannot_move(self: Path, target):  # e.g. a permission error once the old site is set aside
        if ".building-" in self.name:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", staging_cannot_move)
    with pytest.raises(WriteError, match="Permission denied"):
        build_module.build_site(subs, out)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == pages
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site", "submissions"]


def test_a_site_build_that_fails_half_way_leaves_the_old_site_and_no_debris(
        subs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mia_ptq_bench.board.build import build_site

    out = tmp_path / "site"
    build_site(subs, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    calls = {"n": 0}
    real_fsync = os.fsync

    def fills_up(fd: int) -> None:  # the disk fills after a few pages
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fills_up)
    with pytest.raises(WriteError, match="cannot write: No space left on device"):
        build_site(subs, out)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site", "submissions"]  # no site.building left


def test_temporaries_of_a_killed_writer_are_not_part_of_a_submission(subs: Path, tmp_path: Path) -> None:
    folder = subs / "mine"
    stray = folder / "results" / "tiny-digits" / ".w4--oblivious.json.k2j4h_x9.tmp"  # as mkstemp names them
    stray.write_text('{"half": ')
    assert validate_submission(folder) == []
    build = cli.invoke(app, ["leaderboard", "build", "--submissions", str(subs), "--out", str(tmp_path / "site")])
    assert build.exit_code == 0 and "left out" not in build.stderr
    write_manifest(folder)  # the writer (evaluate --submission) cleans them when its run is done
    assert not stray.exists()


def test_a_finishing_run_leaves_another_run_s_file_in_flight(subs: Path) -> None:
    # Two evaluate --submission runs of one folder (two tasks): the first to finish writes the manifest,
    # and once deleted every temporary file, the other's half-written one included.
    folder = subs / "mine"
    left, in_flight = (folder / "results" / "tiny-digits" / f".w4--{name}.json.k2j4h_x9.tmp" for name in ("a", "b"))
    left.write_text('{"half": ')
    os.utime(left, (1_000_000, 1_000_000))  # written long before the run that now finishes started
    started = time.time() - 60
    in_flight.write_text('{"half": ')  # written during it, by a run still writing
    write_manifest(folder, started)
    assert not left.exists() and in_flight.exists()


def test_a_run_killed_while_rewriting_a_plan_leaves_no_document_pointing_at_new_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mia_ptq_bench import runner
    from mia_ptq_bench.quantize import QUANTIZERS

    spec, out = load_task("tiny-digits"), tmp_path / "results"
    options = runner.RunOptions(out_dir=out, cache_dir=tmp_path / "cache")
    runner.evaluate("rtn", spec, plans=["w4"], options=options)
    folder = out / "tiny-digits" / "rtn"
    before = (folder / "w4.models.safetensors").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the run dies after the plan's evidence, before its first document

    monkeypatch.setattr(runner, "write_result", killed)
    with pytest.raises(KeyboardInterrupt):  # the same plan again, another config: other weights, same file names
        runner.evaluate(QUANTIZERS.get("rtn")({"search": "minmax"}), spec, plans=["w4"], options=options)
    assert (folder / "w4.models.safetensors").read_bytes() != before  # rewritten under the old documents' names
    for document in folder.glob("w4--*.json"):  # whatever is left must still agree with its files
        result = load_result(document)
        assert result.evidence.sha256 == sha256_file(folder / result.evidence.file), document.name
    assert not list(folder.glob("w4--*.json"))
    monkeypatch.undo()
    # Not killed, but for fewer threat models: the evidence then holds the targets only, and the
    # other threat's document from an earlier run must not stay behind pointing at it.
    runner.evaluate("rtn", spec, plans=["w4"], options=options)
    runner.evaluate("rtn", spec, plans=["w4"], threat_models=["oblivious"], options=options)
    assert sorted(p.name for p in folder.glob("w4--*.json")) == ["w4--oblivious.json"]
    result = load_result(folder / "w4--oblivious.json")
    assert result.evidence.sha256 == sha256_file(folder / result.evidence.file)


# -- 6. submission folders ----------------------------------------------------------------------------

def test_a_temporary_name_does_not_lift_the_size_bound(subs: Path) -> None:
    folder = subs / "mine"
    big = folder / ".payload.exe.abcdefgh.tmp"  # named as mkstemp would, 2 MiB against the 1 MiB for other files
    big.write_bytes(b"\0" * (2 << 20))
    assert validate_submission(folder) == [f"{big}: (file): 2.0 MiB, larger than the 1.0 MiB allowed for this kind of file"]


def test_nothing_but_submission_folders_and_the_readme_sits_in_the_submissions_folder(subs: Path) -> None:
    (subs / "README.md").write_text("# submissions\n")
    assert cli.invoke(app, ["validate", str(subs)]).exit_code == 0
    (subs / "blob.bin").write_bytes(b"\0" * 1000)
    os.mkfifo(subs / "pipe")
    result = cli.invoke(app, ["validate", str(subs)])
    assert result.exit_code == 1
    for name in ("blob.bin", "pipe"):
        assert f"{subs / name}: (file): only submission folders and README.md may sit in {subs}; refused" in \
            result.stderr.replace("\n", ""), result.stderr


@pytest.mark.parametrize("kind", ["folder", "link"])
def test_a_submission_yaml_beside_the_submissions_that_is_no_file_does_not_lift_that_check(subs: Path,
                                                                                          kind: str) -> None:
    # It once made the root count as one submission's own folder here, and as none when finding submissions:
    # whatever sat beside the submissions then went unchecked.
    (subs / "blob.bin").write_bytes(b"\0" * 1000)
    odd = subs / "submission.yaml"
    odd.mkdir() if kind == "folder" else odd.symlink_to("/")
    result = cli.invoke(app, ["validate", str(subs)])
    errors = result.stderr.replace("\n", "")
    assert result.exit_code == 1
    assert f"{subs / 'blob.bin'}: (file): only submission folders and README.md may sit in {subs}; refused" in errors
    assert str(odd) + (": submission.yaml: missing" if kind == "folder" else ": (folder): is a symbolic link") in errors


def test_symlinks_anywhere_in_a_submission_are_refused(subs: Path, tmp_path: Path) -> None:
    folder = subs / "mine"
    result = folder / "results" / "tiny-digits" / "w4--oblivious.json"
    result.unlink()
    result.symlink_to("/etc/hostname")
    (folder / "pkg").symlink_to("/etc", target_is_directory=True)
    problems = validate_submission(folder)
    assert f"{result}: (file): a symbolic link (to /etc/hostname) is not allowed in a submission" in problems
    assert f"{folder / 'pkg'}: (file): a symbolic link (to /etc) is not allowed in a submission" in problems
    (folder / "submission.yaml").rename(tmp_path / "elsewhere.yaml")
    (folder / "submission.yaml").symlink_to(tmp_path / "elsewhere.yaml")
    problems = validate_submission(folder)
    assert f"{folder / 'submission.yaml'}: is a symbolic link; refused (commit the file itself)" in problems
    linked = subs / "linked"
    linked.symlink_to(subs / "rtn", target_is_directory=True)
    check = cli.invoke(app, ["validate", str(subs)])
    assert check.exit_code == 1 and f"invalid: {linked}: (folder): is a symbolic link to {subs / 'rtn'}; refused" in check.stderr


def test_submission_files_are_bounded_in_number_size_and_kind(subs: Path) -> None:
    folder = subs / "mine"
    (folder / "README.md").write_bytes(b"x" * (2 << 20))
    os.mkfifo(folder / "LICENSE")  # a reader would block on it forever
    many = folder / "pkg"
    many.mkdir()
    for i in range(1001):
        (many / f"m{i}.py").write_text("")
    problems = validate_submission(folder)
    assert f"{folder / 'README.md'}: (file): 2.0 MiB, larger than the 1.0 MiB allowed for this kind of file" in problems
    assert f"{folder / 'LICENSE'}: (file): not a regular file" in problems
    assert f"{folder}: (folder): more than 1000 files and folders; refused" in problems


def test_deep_folders_and_control_characters_in_names_are_refused_in_one_line_each(subs: Path) -> None:
    folder = subs / "mine"
    deep = folder.joinpath(*["d"] * 12)  # empty folders count too: their number and depth are the author's
    deep.mkdir(parents=True)
    forged = "x\n::error title=forged::validation passed\x1b[2K.py"  # a CI log line of its own, a terminal escape
    (folder / forged).write_text("")
    problems = validate_submission(folder)
    assert f"{folder.joinpath(*['d'] * 9)}: (folder): nested more than 8 folders deep; refused" in problems
    shown = f"{folder}/x\\x0a::error title=forged::validation passed\\x1b[2K.py"
    assert f"{shown}: (file): a name with control or invisible characters is not allowed in a submission" in problems
    assert not any("\n" in line or "\x1b" in line for line in problems)


@pytest.mark.parametrize("name, shown", [
    ("notes\u202etxt.py", "notes\\u202etxt.py"),  # a bidi override: what follows it is shown reversed
    ("notes\udcff.py", "notes\\udcff.py"),  # the byte 0xff, which is not UTF-8
    ("notes\u200b.py", "notes\\u200b.py"),  # a zero-width space
], ids=["bidi-override", "not-utf8", "zero-width"])
def test_names_with_invisible_characters_are_refused_and_shown_escaped(subs: Path, name: str, shown: str) -> None:
    folder = subs / "mine"
    (folder / name).write_text("")
    problems = validate_submission(folder)
    assert f"{folder}/{shown}: (file): a name with control or invisible characters is not allowed in a submission" in problems


def test_evidence_has_its_own_size_limit(subs: Path) -> None:
    # Evidence of 16 small ResNet targets is a little over 1 MiB: above the limit for a README, well
    # within the one for evidence; beyond that limit it is refused before it is read.
    from mia_ptq_bench.limits import EVIDENCE_FILE_BYTES
    from mia_ptq_bench.submission.files import scan

    folder = subs / "mine"
    results = folder / "results" / "tiny-digits"
    fits, too_big = results / "fits.models.safetensors", results / "big.models.safetensors"
    fits.write_bytes(b"\0" * ((1 << 20) + (100 << 10)))
    with too_big.open("wb") as handle:  # sparse: no 128 MiB written
        handle.truncate(EVIDENCE_FILE_BYTES + 1)
    found = scan(folder)
    assert Path("results/tiny-digits/fits.models.safetensors") in found.files
    assert Path("results/tiny-digits/big.models.safetensors") not in found.files
    assert any(p.startswith(f"{too_big}: (file): 128.0 MiB, larger than the 128.0 MiB allowed") for p in found.problems)


@pytest.mark.parametrize("name", ["LICENSE.npz", "LICENSE.json", "notes.models.safetensors", "pkg/blob.npz"])
def test_result_sized_files_are_allowed_under_results_only(subs: Path, name: str) -> None:
    # A file's limit follows where it is: beside submission.yaml a .npz is not a result's arrays.
    from mia_ptq_bench.submission.files import scan

    path = subs / "mine" / name
    path.parent.mkdir(exist_ok=True)
    with path.open("wb") as handle:  # sparse: nothing written
        handle.truncate(3 << 20)
    found = scan(subs / "mine")
    assert f"{path}: (file): 3.0 MiB, larger than the 1.0 MiB allowed for this kind of file" in found.problems


# -- 10. what the site publishes is what validate accepts -------------------------------------------------

def test_a_quantized_result_without_its_evidence_is_refused(subs: Path) -> None:
    folder = subs / "mine"
    (folder / "results" / "tiny-digits" / "w4.models.safetensors").unlink()
    write_manifest(folder)  # an author who leaves the weights out and rewrites the manifest to match
    assert validate_submission(folder) == [
        f"{folder / 'results' / 'tiny-digits' / 'w4.models.safetensors'}: (file): missing: plan w4's quantized weights "
        "for task tiny-digits, from which every number of its results is recomputed"]


def test_the_pull_request_reruns_every_listed_task_however_its_id_is_spelled(
        subs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mia_ptq_bench.submission import load

    monkeypatch.setattr(load, "REPRODUCED_IN_PULL_REQUESTS", ("tiny-digits",))
    folder = subs / "mine"
    text = (folder / "submission.yaml").read_text().replace("- tiny-digits", '- "tiny\\x2ddigits"')
    (folder / "submission.yaml").write_text(text)
    assert "tiny-digits" not in text  # what matching the file's text (grep) would have missed
    assert load.rerun_tasks(folder) == ["tiny-digits"]
    assert validate_submission(folder) == []  # the same task for validate


def test_the_pull_request_installs_a_package_quantizer_at_its_pinned_version(subs: Path) -> None:
    from mia_ptq_bench.submission import load

    folder = subs / "mine"
    assert load.requirement(folder) == ""  # a file of the folder: nothing to install
    text = (folder / "submission.yaml").read_text()
    quantizer = re.search(r"quantizer:\n(  .*\n)+", text)[0]
    (folder / "submission.yaml").write_text(text.replace(
        quantizer, "quantizer:\n  requirement: my-ptq[extra]==1.2.0\n  entry: my_ptq.quant:MyQuantizer\n"))
    assert load.requirement(folder) == "my-ptq[extra]==1.2.0"


def test_a_document_s_task_id_is_never_read_as_a_path(subs: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from mia_ptq_bench.spec import loader

    elsewhere = tmp_path / "elsewhere" / "tiny-digits.yaml"
    elsewhere.parent.mkdir()
    shutil.copy(TASKS / "tiny-digits.yaml", elsewhere)
    read = []
    monkeypatch.setattr(loader, "read_yaml", lambda path, *a, real=loader.read_yaml, **k: read.append(Path(path))
                        or real(path, *a, **k))
    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    data = json.loads(document.read_text())
    data["task"]["id"] = str(elsewhere)
    document.write_text(json.dumps(data))
    write_manifest(subs / "mine")
    assert f"{document}: task.id: {str(elsewhere)!r} in the folder of task 'tiny-digits'" in \
        validate_submission(subs / "mine")
    assert cli.invoke(app, ["validate", str(document)]).exit_code == 0  # its arithmetic alone: no task to rerun with
    assert read and elsewhere not in read


def test_task_ids_from_documents_are_looked_up_never_read_as_paths(tmp_path: Path) -> None:
    from mia_ptq_bench.spec import load_registered_task

    for ref in (str(TASKS / "tiny-digits.yaml"), "../tasks/digits-mlp.yaml", "digits-mlp.yaml"):
        with pytest.raises(SpecError, match="unknown task"):
            load_registered_task(ref)
    assert load_registered_task("digits-mlp").id == "digits-mlp"


def test_unexpected_result_files_are_refused_and_never_published(subs: Path, tmp_path: Path) -> None:
    folder = subs / "mine"
    (folder / "results" / "tiny-digits" / "a--b.json").write_text("{}\n")
    write_manifest(folder)
    problems = validate_submission(folder)
    assert problems == [f"{folder / 'results' / 'tiny-digits' / 'a--b.json'}: (file): not an expected result of this "
                        "submission (results/ holds exactly <task>/<plan>--<threat>.json for the tasks it lists: "
                        "tiny-digits, their .npz and <task>/<plan>.models.safetensors)",
                        f"{folder / 'results' / MANIFEST}: files.tiny-digits/a--b.json: not an expected result of this "
                        "submission"]
    build = cli.invoke(app, ["leaderboard", "build", "--submissions", str(subs), "--out", str(tmp_path / "site")])
    assert build.exit_code == 0, build.stderr
    assert "left out: mine: " in build.stderr and "a--b.json: (file): not an expected result" in build.stderr
    assert not (tmp_path / "site" / "entries" / "mine.html").exists()
    assert "mine" not in (tmp_path / "site" / "results.csv").read_text()


def test_results_of_a_task_without_references_leave_its_boards_out(subs: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = tmp_path / "tasks"
    shutil.copytree(TASKS, tasks)
    other = yaml.safe_load((TASKS / "tiny-digits.yaml").read_text())
    (tasks / "tiny-other.yaml").write_text(yaml.safe_dump(dict(other, id="tiny-other", plans=["w4"],
                                                               threat_models=["oblivious"])))
    monkeypatch.setenv("MPTQ_TASKS", str(tasks))
    folder = subs / "mine"
    (folder / "submission.yaml").write_text(_metadata("mine", {"builtin": "rtn", "config": {"search": "minmax"}},
                                                      ["tiny-digits", "tiny-other"], display='=HYPERLINK("http://x")'))
    run = cli.invoke(app, ["evaluate", "mine", "--task", "tiny-other", "--submission", str(folder)])
    assert run.exit_code == 0, run.stderr
    assert validate_submission(folder) == []
    build = cli.invoke(app, ["leaderboard", "build", "--submissions", str(subs), "--out", str(tmp_path / "site")])
    assert build.exit_code == 0, build.stderr
    assert ("left out: board tiny-other/oblivious/w4: no result from the reference submission(s) fp32, rtn; every "
            "board shows fp32 and rtn") in build.stderr
    assert sorted(p.name for p in (tmp_path / "site" / "boards").glob("*.html")) == sorted(
        f"tiny-digits--{t}--{p}{view}.html" for t in ("adaptive", "oblivious") for p in ("w1.58-last8", "w4")
        for view in ("", "--strongest"))
    # 9. the display name is a formula to a spreadsheet: neutralised in every CSV, numbers left as numbers
    board = (tmp_path / "site" / "boards" / "tiny-digits--oblivious--w4.csv").read_text()
    assert "'=HYPERLINK" in board and ',=HYPERLINK' not in board
    table = pd.read_csv(tmp_path / "site" / "results.csv")
    assert table.tpr_at_0_1pct_fpr.dtype == float and set(table.display_name) >= {"'=HYPERLINK(\"http://x\")"}


def test_only_the_reference_entries_publish_reference_rows(subs: Path) -> None:
    folder = subs / "mine"
    # a non-reference entry that publishes fp32--oblivious.json, and a result claiming the fp32 quantizer
    shutil.copy(subs / "fp32" / "results" / "tiny-digits" / "fp32--oblivious.json", folder / "results" / "tiny-digits")
    document = folder / "results" / "tiny-digits" / "w4--oblivious.json"
    data = json.loads(document.read_text())
    data["quantizer"]["name"] = "fp32"
    document.write_text(json.dumps(data))
    write_manifest(folder)
    problems = validate_submission(folder)
    assert any(p.startswith(f"{folder / 'results' / 'tiny-digits' / 'fp32--oblivious.json'}: (file): not an expected "
                            "result") for p in problems)
    assert (f"{document}: quantizer.name: claims the fp32 reference quantizer, which only the reference entry "
            "submissions/fp32 may publish") in problems
    (folder / "submission.yaml").write_text(_metadata("mine", {"builtin": "fp32"}, ["tiny-digits"]))
    assert (f"{folder / 'submission.yaml'}: quantizer.builtin: 'fp32' publishes the full-precision reference rows, "
            "which only the reference entry submissions/fp32 may do") in validate_submission(folder)


# -- 1. a result must be what the submission's own quantizer made, audited as its plan allows ------------

def _edit(document: Path, change) -> None:
    """Change a result document and rewrite the manifest, as a hostile author would."""
    data = json.loads(document.read_text())
    change(data)
    document.write_text(json.dumps(data))
    write_manifest(document.parents[2])


def test_a_result_of_another_quantizer_or_config_is_not_this_submissions(subs: Path) -> None:
    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    # rtn's own result (default config) copied into "mine" (whose metadata says search: minmax)
    shutil.copy(subs / "rtn" / "results" / "tiny-digits" / "w4--oblivious.json", document)
    write_manifest(subs / "mine")
    problems = validate_submission(subs / "mine")
    assert (f"{document}: quantizer.config: search: 'minmax' in submission.yaml, 'lp' in the result (results must be "
            "made with the config the metadata records: fix submission.yaml, or rerun `mptq-bench evaluate mine --task "
            f"tiny-digits --submission {subs / 'mine'}`)") in problems

    def rename(data: dict) -> None:
        data["quantizer"]["name"] = "gptq"

    _edit(document, rename)
    assert f"{document}: quantizer.name: made by 'gptq', but this submission's quantizer is 'rtn'" \
        in validate_submission(subs / "mine")


def test_a_config_hash_that_is_not_the_configs_is_refused(subs: Path) -> None:
    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"

    def forge(data: dict) -> None:  # keep the hash, claim another config value the metadata does not name
        data["quantizer"]["config"]["steps"] = 1

    _edit(document, forge)
    assert f"{document}: quantizer.config_hash: is not the hash of the recorded name, version and config" \
        in validate_submission(subs / "mine")


def test_every_result_of_a_submission_comes_from_one_config(subs: Path) -> None:
    # A key submission.yaml does not name, changed in one result with its hash made to match: only
    # digits-mlp is ever rerun, so a plan's config of its own would go unseen elsewhere.
    from mia_ptq_bench.atomic import content_hash

    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    assert validate_submission(subs / "mine") == []

    def own_config(data: dict) -> None:
        data["quantizer"]["config"]["levels_hack"] = 7
        data["quantizer"]["config_hash"] = content_hash({k: data["quantizer"][k] for k in ("name", "version", "config")})

    _edit(document, own_config)
    problems = validate_submission(subs / "mine")
    assert len(problems) == 1 and problems[0].startswith(f"{document}: quantizer: version ") \
        and problems[0].endswith("(every result of a submission comes from one version and config)"), problems


def test_a_stale_result_of_an_older_version_leaves_the_current_ones_published(subs: Path) -> None:
    # After a task's version changes, a submitter reruns it with a newer quantizer version; the
    # results still at the old task version are left out one by one, and are not "another config".
    from mia_ptq_bench.atomic import content_hash
    from mia_ptq_bench.board.collect import validated

    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"

    def older(data: dict) -> None:
        data["task"]["hash"] = "0" * 64
        data["quantizer"]["version"] = "0-old"
        data["quantizer"]["config_hash"] = content_hash({k: data["quantizer"][k] for k in ("name", "version", "config")})

    _edit(document, older)
    assert validated(subs / "mine") == ([], {document})


def test_a_problem_quoting_the_stale_marker_still_leaves_the_submission_out(subs: Path) -> None:
    # The site once told stale results from other problems by the text ": task.hash: stale" in a
    # problem's line, and lines quote what submitters write (here an audit's layer name).
    from mia_ptq_bench.board.collect import collect

    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"

    def forge(data: dict) -> None:
        data["audit"][0].update(layer="1: task.hash: stale", max_distinct=200)

    _edit(document, forge)
    problems = validate_submission(subs / "mine")
    assert any(": task.hash: stale" in p for p in problems)
    collected = collect(subs)
    assert "mine" not in set(collected.rows.get("entry", [])), collected.rows
    # (the first problem: the forged name is no layer of the task's model)
    assert any(line.startswith("mine: ") and "entry 0 is '1: task.hash: stale'" in line for line in collected.skipped)


def test_a_forged_audit_is_refused_without_recomputing(subs: Path) -> None:
    document = subs / "mine" / "results" / "tiny-digits" / "w1.58-last8--oblivious.json"
    layer = json.loads(document.read_text())["audit"][0]["layer"]

    def claim_pass(data: dict) -> None:  # 9999 values in a channel, yet "passed"
        data["audit"][0].update(max_distinct=9999, passed=True)

    _edit(document, claim_pass)
    assert (f"{document}: audit: layer {layer}: passed is true for 9999 values in a channel where 3 are allowed"
            in validate_submission(subs / "mine"))

    def allow_more(data: dict) -> None:  # and a plan that "allows" them
        data["audit"][0].update(max_distinct=9999, allowed_levels=10000, passed=True)

    _edit(document, allow_more)
    assert (f"{document}: audit: layer {layer} records 1.58 bits (10000 values); plan w1.58-last8 gives it 1.58 bits (3 values)"
            in validate_submission(subs / "mine"))


@pytest.mark.parametrize("change, entry, found", [
    (lambda audit: audit[0].update(layer="renamed"), 0, "'renamed'"),
    (lambda audit: audit.pop(), -1, "nothing"),  # the last layer's entry left out
    (lambda audit: audit.append(dict(audit[0])), None, None),  # one more entry than the model has layers
], ids=["renamed", "one-left-out", "one-too-many"])
def test_an_audit_must_list_the_task_model_s_layers_without_recomputing(subs: Path, change, entry, found) -> None:
    # Only validate --recompute counted the evidence's layers: an audit that leaves out a layer (one holding
    # more values than its plan allows, say) passed plain validation and the site.
    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    layers = [a["layer"] for a in json.loads(document.read_text())["audit"]]
    _edit(document, lambda data: change(data["audit"]))
    listed = len(json.loads(document.read_text())["audit"])
    entry = len(layers) - 1 if entry == -1 else len(layers) if entry is None else entry
    found = found or repr(layers[0])
    model = repr(layers[entry]) if entry < len(layers) else "no more layers"
    problem = (f"audit: lists {listed} layers, the task's mlp has {len(layers)} quantizable layers; entry {entry} is "
               f"{found}, the model's is {model}")
    assert f"{document}: {problem}" in validate_submission(subs / "mine")
    (line,) = _validate_one(document)  # the file alone, too
    assert line == f"invalid: {document}: {problem}", line


def test_an_audit_that_leaves_out_the_classifier_is_told_so_first(subs: Path) -> None:
    # Left out, the classifier's 8 bits would be checked against the layer before it: the layer list comes first.
    document = subs / "mine" / "results" / "tiny-digits" / "w1.58-last8--oblivious.json"
    layers = [a["layer"] for a in json.loads(document.read_text())["audit"]]
    _edit(document, lambda data: data["audit"].pop())
    (line,) = _validate_one(document)
    assert line.startswith(f"invalid: {document}: audit: lists {len(layers) - 1} layers, the task's mlp has "
                           f"{len(layers)} quantizable layers"), line
    assert validate_submission(subs / "mine")[0].startswith(f"{document}: audit: lists {len(layers) - 1} layers")


def test_a_model_this_process_cannot_build_leaves_the_layer_list_to_recompute(subs: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A task whose model a plugin registers, validated without --plugin: the layers cannot be listed here, and
    # validate must neither crash nor refuse the result for it (validate --recompute audits the weights).
    from mia_ptq_bench import models
    from mia_ptq_bench.errors import UnknownNameError
    from mia_ptq_bench.results import verify as verify_module

    def unknown(*_args):
        raise UnknownNameError("unknown model 'deep-mlp'")

    monkeypatch.setattr(models, "quantizable_layer_names", unknown)
    monkeypatch.setattr(verify_module, "_LAYER_NAMES", {})
    assert validate_submission(subs / "mine") == []
    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    assert cli.invoke(app, ["validate", str(document)]).exit_code == 0


def test_a_quantized_result_without_evidence_is_refused(subs: Path) -> None:
    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"

    def drop(data: dict) -> None:  # no weights to recompute from: the numbers would be taken on trust
        data["evidence"] = None

    _edit(document, drop)
    assert (f"{document}: evidence: missing: a quantized result names its plan's quantized weights "
            "(w4.models.safetensors), from which every number is recomputed") in validate_submission(subs / "mine")


@pytest.mark.parametrize("name", ["../../../../etc/hostname", "w2.models.safetensors", "/etc/hostname"])
def test_evidence_is_only_the_plans_own_file_beside_the_document(subs: Path, name: str) -> None:
    from mia_ptq_bench.results.io import load_evidence

    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    _name_file(document, "evidence", name)
    with pytest.raises(BenchError, match=rf"evidence\.file: {re.escape(repr(name))} is not w4\.models\.safetensors "
                                         "beside the document; refused"):
        load_evidence(document, load_result(document))


def test_evidence_that_is_a_link_is_never_read(subs: Path, tmp_path: Path) -> None:
    from mia_ptq_bench.results.io import load_evidence

    document = subs / "mine" / "results" / "tiny-digits" / "w4--oblivious.json"
    evidence = document.parent / "w4.models.safetensors"
    moved = tmp_path / "elsewhere.safetensors"
    evidence.rename(moved)
    evidence.symlink_to(moved)
    with pytest.raises(BenchError, match="is not a regular file"):
        load_evidence(document, load_result(document))


def test_evaluate_into_a_submission_refuses_a_task_it_does_not_list(tmp_path: Path) -> None:
    # Its results and manifest entries used to be written, and validate then refused the folder.
    folder = tmp_path / "rtn"
    folder.mkdir()
    (folder / "submission.yaml").write_text(_metadata("rtn", {"builtin": "rtn"}, ["tiny-digits"]))
    result = cli.invoke(app, ["evaluate", "rtn", "--task", "tiny-cnn", "--plans", "w4", "--submission", str(folder)])
    message = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "--task tiny-cnn: not among the tasks" in message
    assert "lists (tiny-digits); add it there first" in message
    assert sorted(p.name for p in folder.iterdir()) == ["submission.yaml"]
