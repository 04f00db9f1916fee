"""Recomputing committed results from their quantized weights: what CI checks without running submitted code."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.numpy import load, save
from typer.testing import CliRunner

from conftest import TASKS, HeldClear
from mia_ptq_bench.atomic import sha256_bytes
from mia_ptq_bench import recompute as recompute_module
from mia_ptq_bench.cli import app
from mia_ptq_bench.quantize.evidence import decode_weight, encode_weight
from mia_ptq_bench.results.compare import RETRAINED_POOL, allowed_change, headline_stats
from mia_ptq_bench.results import jackknife as jackknife_module
from mia_ptq_bench.results.io import load_result as load_result_file
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


def test_every_result_is_recomputed_from_its_weights(committed: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # A `cache clear` of the task runs as validate starts: validate says it waits, and goes on when it ends.
    HeldClear(tmp_path / "cache", task="tiny-digits").ends_when_the_cli_says_it_waits(monkeypatch)
    result = validate(committed, tmp_path)  # a fresh cache: the pool is trained again, as in CI
    assert result.exit_code == 0, result.output + result.stderr
    assert result.output.count("recomputed ") == 4
    assert "a `cache clear --task tiny-digits` holds this task's cached work; waiting for it to finish" \
        in " ".join(result.stderr.split())


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


def test_against_another_pool_a_number_outside_the_spread_over_targets_gets_the_jackknife(
        committed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A document of another CPU and pool (the checker trains its own): the retrained case. Where a number lies
    # outside the spread over targets, the rerun's jackknife over its models (quantized targets and reference)
    # decides; it is measured only then. The rerun here is bit-identical to the committed run.
    real, spreads = recompute_module.pool_standard_errors, []

    def spy(*args):
        spreads.append(real(*args))
        return spreads[-1]

    monkeypatch.setattr(recompute_module, "pool_standard_errors", spy)
    monkeypatch.setattr(jackknife_module, "pool_standard_errors", spy)  # the reference's, via reference_standard_errors
    name = "w4--oblivious.json"
    result = load_result_file(committed / name)
    stats = {metric: (stat, resolution, floor)
             for metric, _, stat, resolution, floor in headline_stats(result.quantized, result.quantized, result.n_test)}
    plain = {m: allowed_change(stat, res, RETRAINED_POOL, floor) for m, (stat, res, floor) in stats.items()}

    def validate_moved(metric: str, by: float):
        folder = tmp_path / f"moved-{len(list(tmp_path.glob('moved-*')))}"
        shutil.copytree(committed, folder)
        document = json.loads((folder / name).read_text())
        document["environment"]["processor"] = "another CPU"
        document["pool_digest"] = "0" * 64
        where = document["quantized"]["attacks"][metric.split(" ")[0]]
        key = {"AUC": "auc", "TPR@0.1%": "tpr_at_0_1pct_fpr", "TPR@1%": "tpr_at_1pct_fpr"}[metric.split(" ")[1]]
        for end in ("mean", "ci_low", "ci_high"):
            where[key][end] += by
        (folder / name).write_text(json.dumps(document))
        return cli.invoke(app, ["validate", "--recompute", "--cache-dir", str(tmp_path / "cache"),
                                str(folder / name)], env={"COLUMNS": "250"})

    auc = stats["lira-online AUC"][0]
    far = 0.25 if auc.ci_high < 0.7 else -0.25  # away from the nearer bound: the document stays well-formed
    assert validate_moved("lira-online AUC", 0.0).exit_code == 0 and spreads == []  # within: no jackknife
    outside = validate_moved("lira-online AUC", far)
    assert outside.exit_code == 1 and "lira-online AUC: committed" in outside.stderr
    assert len(spreads) == 2  # outside: measured for the quantized targets and the reference
    widened = {m: allowed_change(stat, res, RETRAINED_POOL, floor, spreads[0][m]) for m, (stat, res, floor) in stats.items()}
    metric = max((m for m in stats if m.startswith("lira")), key=lambda m: widened[m] / plain[m])
    assert widened[metric] > 1.2 * plain[metric]
    assert validate_moved(metric, (plain[metric] + widened[metric]) / 2).exit_code == 0  # inside only by the jackknife
    beyond = validate_moved(metric, 1.1 * widened[metric])
    assert beyond.exit_code == 1 and f"{metric}: committed" in beyond.stderr


def test_the_reference_s_attacks_and_jackknife_are_measured_once_for_all_results_of_a_pool(
        committed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every result of a pool has the same full-precision reference: a run that needs the jackknife for several
    # results attacks the reference and measures its jackknife once, and each result's quantized targets' once.
    real, calls = jackknife_module.pool_standard_errors, []

    def spy(*args):
        calls.append(args[3])  # the target scores the jackknife was measured on
        return real(*args)

    monkeypatch.setattr(recompute_module, "pool_standard_errors", spy)
    monkeypatch.setattr(jackknife_module, "pool_standard_errors", spy)
    real_reference, references = recompute_module.attack_reference, []

    def reference_spy(*args):
        references.append(args)
        return real_reference(*args)

    monkeypatch.setattr(recompute_module, "attack_reference", reference_spy)
    folder = copy_of(committed, tmp_path)
    names = sorted(path.name for path in folder.glob("*.json"))
    for name in names:  # another CPU's pool, each document's AUC moved outside the plain tolerance
        document = json.loads((folder / name).read_text())
        document["environment"]["processor"] = "another CPU"
        document["pool_digest"] = "0" * 64
        auc = document["quantized"]["attacks"]["lira-online"]["auc"]
        far = 0.25 if auc["ci_high"] < 0.7 else -0.25
        for end in ("mean", "ci_low", "ci_high"):
            auc[end] += far
        (folder / name).write_text(json.dumps(document))
    result = validate(folder, tmp_path)
    assert result.exit_code == 1 and result.stderr.count("lira-online AUC: committed") == len(names) == 4
    # Two plans with two threat models each: each plan's targets measured twice (once per result), the
    # reference once (without the memo: once per result, 4 times).
    times_measured = Counter(scores.tobytes() for scores in calls)
    assert sorted(times_measured.values()) == [1, 2, 2]
    assert len(references) == 1  # the reference's attacks too: once for the four results


def test_a_document_cannot_loosen_its_own_recomputation(committed: Path, tmp_path: Path) -> None:
    # Claims of another machine and pool, a tiny test split and a wide spread, around a forged accuracy.
    folder = copy_of(committed, tmp_path)
    path = folder / "w4--oblivious.json"
    document = json.loads(path.read_text())
    document["environment"]["processor"] = "another CPU"
    document["pool_digest"] = "0" * 64
    document["pool_source"] = {"repo": "someone/pool", "revision": "abc"}
    document["n_test"] = 1
    document["quantized"]["test_accuracy"].update(mean=0.0, std=1.0, ci_low=0.0, ci_high=1.0)
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


def test_in_the_same_environment_every_number_must_be_equal(committed: Path, tmp_path: Path) -> None:
    # The means left alone, an interval narrowed and a count changed: in the same environment the
    # rerun is bit-identical, so every number of the evaluation is held to it, not only the headline.
    folder = copy_of(committed, tmp_path)
    path = folder / "w4--oblivious.json"
    document = json.loads(path.read_text())
    accuracy = document["quantized"]["test_accuracy"]
    assert accuracy["ci_low"] < accuracy["mean"]
    accuracy.update(ci_low=accuracy["mean"], ci_high=accuracy["mean"])
    path.write_text(json.dumps(document))
    result = validate(folder, tmp_path)
    assert result.exit_code == 1
    assert (f"w4--oblivious: test_accuracy.ci_low: stored {accuracy['mean']!r}, recomputed "
            f"{json.loads((committed / path.name).read_text())['quantized']['test_accuracy']['ci_low']!r} "
            "(must be identical)") in result.stderr
    document = json.loads((committed / path.name).read_text())
    counted = document["reference"]["targets"][0]["attacks"]["lira-online"]["tpr_at_1pct_fpr"]
    counted["true_positives"] += 1
    path.write_text(json.dumps(document))
    result = validate(folder, tmp_path)
    assert result.exit_code == 1 and ("(fp32 ref): targets[0].attacks.lira-online.tpr_at_1pct_fpr.true_positives: "
                                      f"stored {counted['true_positives']}, recomputed {counted['true_positives'] - 1} "
                                      "(must be identical)") in result.stderr


def test_the_attacker_has_the_task_s_shadows_whatever_the_document_says(committed: Path, tmp_path: Path) -> None:
    folder = copy_of(committed, tmp_path)
    path = folder / "w4--adaptive.json"
    document = json.loads(path.read_text())
    task_shadows = document["shadow_models"]
    document["shadow_models"] = task_shadows[:2]  # fewer quantized shadows: a weaker attack, a rosier result
    path.write_text(json.dumps(document))
    result = validate(folder, tmp_path)
    assert result.exit_code == 1
    assert (f"w4--adaptive.json: recomputed from its evidence: shadow_models: the document names 2 shadow models, "
            f"the task's adaptive attacker uses {len(task_shadows)}") in result.stderr


def test_evidence_that_cannot_be_rebuilt_is_refused_before_it_is_unpacked(committed: Path, tmp_path: Path) -> None:
    folder = copy_of(committed, tmp_path)

    def huge_claim(tensors: dict) -> None:  # a 40-byte record claiming a 2**45-weight layer
        tensors["0::1.weight::shape"] = np.array([1, 2**45], dtype=np.int64)

    _rewrite_evidence(folder, "w4", huge_claim)
    result = validate(folder, tmp_path)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "w4--oblivious.json: recomputed from its evidence: the evidence cannot be rebuilt into models: the weight " \
           "record claims shape (1, 35184372088832), the architecture has" in result.stderr


@pytest.mark.parametrize("kept, reason", [
    (lambda model, targets: model not in targets,
     "w4--adaptive.json: recomputed from its evidence: the evidence lacks targets [0, 1, 2]"),
    (lambda model, targets: model in targets,  # the shadows left out: a self-reported adaptive result?
     "w4--adaptive.json: recomputed from its evidence: the evidence lacks the quantized shadows [3, 4, 5, 6, 7], "
     "which an honest run commits"),
], ids=["no-targets", "no-shadows"])
def test_evidence_cannot_leave_out_what_it_is_checked_by(committed: Path, tmp_path: Path, kept, reason: str) -> None:
    folder = copy_of(committed, tmp_path)
    document = json.loads((folder / "w4--adaptive.json").read_text())
    targets = {t["index"] for t in document["quantized"]["targets"]}
    assert targets == {0, 1, 2} and len(document["shadow_models"]) > len(targets)

    def leave_out(tensors: dict) -> None:
        for key in [k for k in tensors if not kept(int(k.split("::")[0]), targets)]:
            del tensors[key]

    _rewrite_evidence(folder, "w4", leave_out)
    result = validate(folder, tmp_path)
    assert result.exit_code == 1 and reason in result.stderr, result.stderr
    assert "self-reported" not in result.output


def test_shadows_too_large_to_commit_leave_a_result_self_reported(committed: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Where all the models' weights would pass the cap, the runner commits the targets' alone: such an
    # adaptive result cannot be recomputed and is labelled so, never refused.
    from mia_ptq_bench import recompute

    monkeypatch.setattr(recompute, "EVIDENCE_CAP", 1024)
    folder = copy_of(committed, tmp_path)
    _rewrite_evidence(folder, "w4", lambda tensors: [tensors.pop(k) for k in list(tensors) if int(k.split("::")[0]) > 2])
    result = validate(folder, tmp_path)
    assert result.exit_code == 0, result.stderr
    assert f"self-reported {folder / 'w4--adaptive.json'}: the evidence lacks the quantized shadows [3, 4, 5, 6, 7] " \
           "(too large to commit: about" in result.output
    assert result.output.count("recomputed ") == 3  # the oblivious attacker needs no quantized shadows


def test_targets_that_fail_the_audit_cannot_pass_as_self_reported(committed: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The shadows left out as if too large, and target 0's first layer unquantized in one channel: an
    # encoding made large by weights off the grid must not buy the "self-reported" label.
    from mia_ptq_bench import recompute

    monkeypatch.setattr(recompute, "EVIDENCE_CAP", 1024)
    folder = copy_of(committed, tmp_path)

    def off_the_grid(tensors: dict) -> None:
        for key in [k for k in tensors if int(k.split("::")[0]) > 2]:
            del tensors[key]
        key = "0::1.weight"
        weight, _ = decode_weight({part: tensors[f"{key}::{part}"] for part in ("codebook", "sizes", "codes", "shape",
                                                                             "bits")})
        weight[0] = torch.linspace(-0.5, 0.5, weight.shape[1])
        for part, value in encode_weight(weight).items():
            tensors[f"{key}::{part}"] = value

    _rewrite_evidence(folder, "w4", off_the_grid)
    result = validate(folder, tmp_path)
    assert result.exit_code == 1, result.output
    assert "w4--adaptive.json: recomputed from its evidence: audit: layer 1 holds 64 values in a channel, its plan " \
           "allows 16" in result.stderr.replace("\n", "")
    assert "self-reported" not in result.output


def test_a_file_the_recomputation_cannot_start_on_is_refused_alone(committed: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # An unknown plan once raised out of recompute_files, ending the run with a line naming no file.
    folder = copy_of(committed, tmp_path)
    bad = folder / "w4--oblivious.json"
    document = json.loads(bad.read_text())
    document["plan"] = "w99x"
    bad.write_text(json.dumps(document))
    monkeypatch.setenv("MPTQ_TASKS", str(TASKS))
    first, second = recompute_module.recompute_files([bad, folder / "w4--adaptive.json"], tmp_path / "cache")
    assert (first.status, first.reason.split(":")[0]) == ("refused", "cannot parse precision plan 'w99x'")
    assert second.status == "recomputed", second.reason


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


def _swap_targets(tensors: dict) -> None:  # target 0's weights replaced by target 1's: same grid, other model
    for key in [k for k in tensors if k.startswith("1::")]:
        tensors["0::" + key[3:]] = tensors[key]


def test_weights_that_do_not_give_the_numbers_are_caught(committed: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    folder = copy_of(committed, tmp_path)
    _rewrite_evidence(folder, "w4", _swap_targets)
    monkeypatch.setattr(recompute_module, "identity_problem", lambda *args: None)  # the numbers alone catch this one
    result = validate(folder, tmp_path)
    assert result.exit_code == 1
    assert "w4--oblivious.json: recomputed from its evidence: w4--oblivious: " in result.stderr


def test_another_pool_model_s_weights_are_refused_even_with_numbers_to_match(committed: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A forger commits target 1's quantized weights as target 0 and rewrites the document with the
    # numbers those weights give (computed here by the checker itself, its identity check switched
    # off): without that check the result would be recomputed and published.
    folder = copy_of(committed, tmp_path)
    _rewrite_evidence(folder, "w4", _swap_targets)
    paths = sorted(folder.glob("w4--*.json"))  # every document of the plan reads the forged weights
    with monkeypatch.context() as patched:
        patched.setenv("MPTQ_TASKS", str(TASKS))
        patched.setattr(recompute_module, "identity_problem", lambda *args: None)
        patched.setattr(recompute_module, "compare_results", lambda *args: [])  # to get the rerun's numbers
        forged = recompute_module.recompute_files(paths, tmp_path / "cache")
    honest = json.loads(paths[0].read_text())["quantized"]["test_accuracy"]["mean"]
    assert forged[0].rerun.quantized.test_accuracy.mean != honest  # the swap moves the numbers
    for path, outcome in zip(paths, forged):
        path.write_text(outcome.rerun.model_dump_json(indent=2) + "\n")
    with monkeypatch.context() as patched:
        patched.setattr(recompute_module, "identity_problem", lambda *args: None)
        result = validate(folder, tmp_path)
        assert result.exit_code == 0 and "recomputed " in result.output, result.stderr  # the forgery would pass
    result = validate(folder, tmp_path)
    assert result.exit_code == 1
    found = re.search(r"w4--\w+\.json: recomputed from its evidence: model 0 of the evidence is not recognisably "
                      r"pool model 0: it resembles it ([\d.]+) and pool model 1 ([\d.]+) \(mean \|cosine\|",
                      result.stderr.replace("\n", ""))
    assert found, result.stderr
    assert float(found[1]) < 0.5 < 0.9 < float(found[2])  # target 1's weights, quantized at 4 bits


def test_a_channel_equalised_model_is_still_recognised_as_its_own(committed: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A quantizer may rescale channels without changing the function (cross-layer equalisation: a hidden
    unit's weights times s, the next layer's matching column divided by s, s > 0, through the ReLU).
    The identity check must still recognise the model; swapping models must still fail it."""
    from mia_ptq_bench.data import load_dataset
    from mia_ptq_bench.pool import build_pool
    from mia_ptq_bench.recompute import IDENTITY_RATIO, _channel_rows, _resemblance

    monkeypatch.setenv("MPTQ_TASKS", str(TASKS))
    spec = load_task("tiny-digits")
    data = load_dataset(spec.dataset)
    pool = build_pool(spec, data, committed.parents[2] / "cache")  # the fixture's pool, already trained
    pool_rows = [_channel_rows(pool.load_model(j)) for j in range(spec.membership.n_models)]
    x = data.normalize(data.test.images[:64])
    for index in range(spec.membership.n_models):
        model = pool.load_model(index)
        hidden, out = model[1], model[3]  # Flatten, Linear, ReLU, Linear
        s = torch.logspace(-2, 2, hidden.out_features)[torch.randperm(hidden.out_features,
                                                                       generator=torch.Generator().manual_seed(index))]
        before = model(x)
        with torch.no_grad():
            hidden.weight.mul_(s[:, None])
            hidden.bias.mul_(s)
            out.weight.div_(s[None, :])
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)  # the same function
        rows = _channel_rows(model)
        resemblance = [_resemblance(rows, other) for other in pool_rows]
        closest_other = max(r for j, r in enumerate(resemblance) if j != index)
        assert resemblance[index] >= IDENTITY_RATIO * closest_other, (index, resemblance)


def test_weights_that_give_non_finite_scores_are_refused(committed: Path, tmp_path: Path) -> None:
    folder = copy_of(committed, tmp_path)
    nan_biases = []

    def nan_bias(tensors: dict) -> None:  # target 0's biases stored raw, as NaN: the weights still pass their audit
        for key in [k for k in tensors if k.startswith("0::") and k.endswith(".bias::raw")]:
            tensors[key] = np.full_like(tensors[key], np.nan)
            nan_biases.append(key)

    _rewrite_evidence(folder, "w4", nan_bias)
    assert nan_biases
    result = validate(folder, tmp_path)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "w4--adaptive.json: recomputed from its evidence: the evidence's models [0] give non-finite scores" \
        in result.stderr.replace("\n", ""), result.stderr


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
    rtn = _submission(subs, "rtn")
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
    # From another environment only the headline means are held to a tolerance: the site then shows the
    # checker's own numbers, never an interval the document states.
    path = rtn / "results" / "tiny-digits" / "w4--adaptive.json"
    document = json.loads(path.read_text())
    honest = dict(document["quantized"]["test_accuracy"])
    assert honest["ci_low"] < honest["mean"] < honest["ci_high"]
    document["environment"]["processor"] = "another CPU"
    document["quantized"]["test_accuracy"].update(ci_low=honest["mean"], ci_high=honest["mean"])
    path.write_text(json.dumps(document))
    write_manifest(rtn)
    build = cli.invoke(app, ["leaderboard", "build", "--recompute", "--submissions", str(subs), "--out",
                             str(tmp_path / "site1")])
    assert build.exit_code == 0, build.stderr
    shown = pd.read_csv(tmp_path / "site1" / "results.csv")
    shown = shown[(shown.entry == "rtn") & (shown.plan == "w4") & (shown.threat_model == "adaptive")]
    assert len(shown) and set(shown.check) == {"recomputed"}
    assert set(shown.test_accuracy_low) == {honest["ci_low"]} and set(shown.test_accuracy_high) == {honest["ci_high"]}
    # a forged number, its manifest rewritten to match: validate cannot tell without recomputing; the site can
    path = gptq / "results" / "tiny-digits" / "w4--oblivious.json"
    document = json.loads(path.read_text())
    accuracy = document["quantized"]["test_accuracy"]  # a higher mean, still inside its interval (else refused on reading)
    accuracy["mean"] = (accuracy["mean"] + accuracy["ci_high"]) / 2
    assert accuracy["ci_low"] < accuracy["mean"] < accuracy["ci_high"]
    path.write_text(json.dumps(document))
    write_manifest(gptq)
    build = cli.invoke(app, ["leaderboard", "build", "--recompute", "--submissions", str(subs), "--out",
                             str(tmp_path / "site2")])
    assert build.exit_code == 0, build.stderr
    assert "left out: gptq: " in build.stderr and "recomputed from its evidence" in build.stderr
    assert not (tmp_path / "site2" / "entries" / "gptq.html").exists()
    assert (tmp_path / "site2" / "entries" / "rtn.html").exists()


def test_evidence_for_a_model_that_cannot_fold_gets_the_mismatch_not_fold_s_advice(monkeypatch) -> None:
    """A BatchNorm without running statistics has no folded form: evidence whose tensors do not fit the
    unfolded model is refused for that, not with a hint about the quantizer's ``bn`` policy."""
    def unfoldable(spec, dataset, index):
        return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2, track_running_stats=False),
                                   torch.nn.Flatten(), torch.nn.Linear(2, 3))

    monkeypatch.setattr(recompute_module, "init_model", unfoldable)
    pool = SimpleNamespace(spec=None, dataset=None)
    with pytest.raises(ValueError, match="that the architecture does not"):
        recompute_module.rebuild(pool, 0, {"0::nothing::raw": np.zeros(1, dtype=np.float32)}, "cpu")
