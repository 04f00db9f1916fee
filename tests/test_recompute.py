"""Recomputing committed results from their quantized weights: what CI checks without running submitted code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load, save
from typer.testing import CliRunner

from conftest import TASKS
from mia_ptq_bench.atomic import sha256_bytes
from mia_ptq_bench.cli import app
from mia_ptq_bench.quantize.evidence import decode_weight, encode_weight
from mia_ptq_bench.runner import RunOptions, evaluate
from mia_ptq_bench.spec import load_task
from builtin_submission import evaluated_builtin

cli = CliRunner()


@pytest.fixture(scope="module")
def committed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rtn on tiny-digits as git holds it: documents and quantized weights, no arrays."""
    root = tmp_path_factory.mktemp("recompute")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPTQ_TASKS", str(TASKS))
        evaluate("rtn", load_task("tiny-digits"), options=RunOptions(out_dir=root / "results", cache_dir=root / "cache"))
    folder = root / "results" / "tiny-digits" / "rtn"
    for arrays in folder.glob("*.npz"):
        arrays.unlink()
    return folder


def copy_of(committed: Path, tmp_path: Path) -> Path:
    shutil.copytree(committed, tmp_path / "rtn")
    return tmp_path / "rtn"


def validate(folder: Path, tmp_path: Path):
    return cli.invoke(app, ["validate", "--recompute", "--cache-dir", str(tmp_path / "cache"),
                            *map(str, sorted(folder.glob("*.json")))], env={"COLUMNS": "250"})


def test_every_result_is_recomputed_from_its_weights(committed: Path, tmp_path: Path) -> None:
    result = validate(committed, tmp_path)  # a fresh cache: the pool is trained again, as in CI
    assert result.exit_code == 0, result.output + result.stderr
    assert result.output.count("recomputed ") == 4


def test_a_changed_number_is_caught(committed: Path, tmp_path: Path) -> None:
    folder = copy_of(committed, tmp_path)
    path = folder / "w4--oblivious.json"
    document = json.loads(path.read_text())
    document["quantized"]["attacks"]["lira-online"]["tpr_at_1pct_fpr"]["mean"] = 0.0  # leak less than measured
    path.write_text(json.dumps(document))
    result = validate(folder, tmp_path)
    assert result.exit_code == 1
    assert "w4--oblivious.json: recomputed from its evidence: w4--oblivious: lira-online TPR@1%: committed 0.000000" \
        in result.stderr


def test_a_document_cannot_loosen_its_own_recomputation(committed: Path, tmp_path: Path) -> None:
    # Claims of another machine and pool, a tiny test split and a wide spread, around a forged accuracy.
    folder = copy_of(committed, tmp_path)
    path = folder / "w4--oblivious.json"
    document = json.loads(path.read_text())
    document["environment"]["processor"] = "another CPU"
    document["pool_digest"] = "0" * 64
    document["pool_source"] = {"repo": "someone/pool", "revision": "abc"}
    document["n_test"] = 1
    document["quantized"]["test_accuracy"].update(mean=0.0, std=10.0, ci_low=0.0, ci_high=1.0)
    del document["quantized"]["attacks"]["lira-offline-fixed"]  # and an attack left out
    path.write_text(json.dumps(document))
    result = validate(folder, tmp_path)
    assert result.exit_code == 1
    assert "w4--oblivious.json: recomputed from its evidence: w4--oblivious: test accuracy: committed 0.000000" \
        in result.stderr
    document["quantized"]["test_accuracy"] = json.loads((committed / path.name).read_text())["quantized"]["test_accuracy"]
    path.write_text(json.dumps(document))
    result = validate(folder, tmp_path)
    assert result.exit_code == 1 and "lira-offline-fixed AUC (not in the document)" in result.stderr


def _rewrite_evidence(folder: Path, plan: str, change) -> None:
    path = folder / f"{plan}.models.safetensors"
    tensors = load(path.read_bytes())
    change(tensors)
    data = save(tensors)
    path.write_bytes(data)
    for doc in folder.glob(f"{plan}--*.json"):  # a forger updates the checksum too
        document = json.loads(doc.read_text())
        document["evidence"]["sha256"] = sha256_bytes(data)
        doc.write_text(json.dumps(document))


def test_weights_with_more_values_than_the_plan_fail_the_audit(committed: Path, tmp_path: Path) -> None:
    folder = copy_of(committed, tmp_path)
    held = []

    def finer_grid(tensors: dict) -> None:  # channel 0 of target 0's first layer gets five more values at w1.58
        key = "0::1.weight"
        weight, _ = decode_weight({part: tensors[f"{key}::{part}"] for part in ("codebook", "sizes", "codes", "shape",
                                                                             "bits")})
        weight[0, :5] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
        held.append(len(torch.unique(weight[0])))
        for part, value in encode_weight(weight).items():
            tensors[f"{key}::{part}"] = value

    _rewrite_evidence(folder, "w1.58-last8", finer_grid)
    result = validate(folder, tmp_path)
    assert held[0] > 3
    assert result.exit_code == 1 and f"audit: layer 1 holds {held[0]} values in a channel, its plan allows 3" \
        in result.stderr


def test_weights_that_do_not_give_the_numbers_are_caught(committed: Path, tmp_path: Path) -> None:
    folder = copy_of(committed, tmp_path)

    def swap_targets(tensors: dict) -> None:  # target 0's weights replaced by target 1's: same grid, other model
        for key in [k for k in tensors if k.startswith("1::")]:
            tensors["0::" + key[3:]] = tensors[key]

    _rewrite_evidence(folder, "w4", swap_targets)
    result = validate(folder, tmp_path)
    assert result.exit_code == 1 and "w4--oblivious.json: recomputed from its evidence" in result.stderr


def test_codebook_round_trip_is_exact() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(0, 5, (6, 3, 3, 3), generator=generator).float() * 0.125 - 0.25
    weight[2] = 0.0  # a channel with one value
    parts = encode_weight(weight)
    back, distinct = decode_weight(parts)
    assert torch.equal(back, weight) and distinct.tolist() == [len(torch.unique(w)) for w in weight]
    assert int(parts["bits"][0]) == 3 and parts["codes"].dtype == np.uint8  # 5 values need 3 bits
    broken = dict(parts, sizes=np.maximum(parts["sizes"] - 1, 1))  # a code now points past its codebook
    with pytest.raises(ValueError, match="points past"):
        decode_weight(broken)


def _submission(root: Path, name: str) -> Path:
    folder = evaluated_builtin(root, name)
    for arrays in folder.rglob("*.npz"):  # as git holds it
        arrays.unlink()
    return folder


@pytest.mark.slow
def test_the_site_labels_recomputed_results_and_leaves_out_forged_ones(tmp_path: Path) -> None:
    import pandas as pd

    from mia_ptq_bench.submission import write_manifest

    subs = tmp_path / "submissions"
    _submission(subs, "fp32")
    _submission(subs, "rtn")
    gptq = _submission(subs, "gptq")
    build = cli.invoke(app, ["leaderboard", "build", "--recompute", "--submissions", str(subs), "--out",
                             str(tmp_path / "site")])
    assert build.exit_code == 0, build.stderr
    board = pd.read_csv(tmp_path / "site" / "boards" / "tiny-digits--adaptive--w4.csv")
    assert set(board.check) == {"recomputed"}
    assert 'class="tag check-recomputed"' in (tmp_path / "site" / "boards" / "tiny-digits--adaptive--w4.html").read_text()
    plain = cli.invoke(app, ["leaderboard", "build", "--submissions", str(subs), "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.stderr
    assert set(pd.read_csv(tmp_path / "plain" / "boards" / "tiny-digits--adaptive--w4.csv").check) == {"unchecked"}
    # a forged number, its manifest rewritten to match: validate cannot tell without recomputing; the site can
    path = gptq / "results" / "tiny-digits" / "w4--oblivious.json"
    document = json.loads(path.read_text())
    document["quantized"]["test_accuracy"]["mean"] = 0.999
    path.write_text(json.dumps(document))
    write_manifest(gptq)
    build = cli.invoke(app, ["leaderboard", "build", "--recompute", "--submissions", str(subs), "--out",
                             str(tmp_path / "site2")])
    assert build.exit_code == 0, build.stderr
    assert "left out: gptq: " in build.stderr and "recomputed from its evidence" in build.stderr
    assert not (tmp_path / "site2" / "entries" / "gptq.html").exists()
    assert (tmp_path / "site2" / "entries" / "rtn.html").exists()
