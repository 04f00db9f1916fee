"""HELM-style smoke tests: the whole pipeline on a tiny task, through the CLI, checked from the outside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import independent
from conftest import TASKS
from mia_ptq_bench import runner as runner_module
from mia_ptq_bench.cli import app
from mia_ptq_bench.quantize.builtin import RoundToNearest
from mia_ptq_bench.results.io import load_result
from mia_ptq_bench.runner import RunOptions, evaluate
from mia_ptq_bench.spec import load_task

cli = CliRunner()


def run_cli(*args: str):
    return cli.invoke(app, list(args))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory):
    """One real evaluation of rtn on tiny-digits, shared by the read-only checks below."""
    root = tmp_path_factory.mktemp("e2e")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPTQ_TASKS", str(TASKS))
        mp.setenv("MPTQ_CACHE", str(root / "cache"))
        result = run_cli("evaluate", "rtn", "--task", "tiny-digits", "--out", str(root / "results"))
    assert result.exit_code == 0, result.output + result.stderr
    return root / "results" / "tiny-digits" / "rtn", result.output


def test_evaluate_writes_one_result_per_plan_and_threat_model(evaluated) -> None:
    folder, output = evaluated
    names = sorted(p.name for p in folder.glob("*.json"))
    assert names == ["w1.58-last8--adaptive.json", "w1.58-last8--oblivious.json", "w4--adaptive.json",
                     "w4--oblivious.json"]
    assert all((folder / n).with_suffix(".npz").is_file() for n in names)
    assert "fp32 (ref)" in output and "w1.58-last8 adaptive" in output and "TPR@.1%" in output


def test_tables_fit_an_80_column_terminal(evaluated) -> None:
    from rich.console import Console

    from mia_ptq_bench.report import attacks_table, results_table

    folder, _ = evaluated
    results = [load_result(p) for p in sorted(folder.glob("*.json"))]
    # the longest label a bundled task makes: w1.58-last8 with the adaptive-rtn attacker
    results += [r.model_copy(update={"threat_model": "adaptive-rtn"}) for r in results if r.plan == "w1.58-last8"]
    console = Console(width=80, record=True, color_system=None)
    console.print(results_table(results, "lira-online"))
    console.print(attacks_table(results))
    text = console.export_text()
    assert "…" not in text and "w1.58-last8 adaptive-rtn" in text
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80


def test_results_validate(evaluated) -> None:
    folder, _ = evaluated
    result = run_cli("validate", *[str(p) for p in sorted(folder.glob("*.json"))], str(TASKS / "tiny-digits.yaml"))
    assert result.exit_code == 0, result.stderr
    assert result.output.count("ok ") == 5


def test_result_names_task_quantizer_and_environment(evaluated) -> None:
    folder, _ = evaluated
    result = load_result(folder / "w4--oblivious.json")
    spec = load_task("tiny-digits")
    assert (result.task.id, result.task.hash, result.task.pool_hash) == (spec.id, spec.hash, spec.pool_hash)
    assert result.quantizer.name == "rtn" and len(result.quantizer.config_hash) == 64
    assert result.environment.packages["torch"] != "absent" and result.environment.device.startswith("cpu")
    assert [t.index for t in result.quantized.targets] == [0, 1, 2]
    assert all(a.passed for a in result.audit) and result.audit[-1].allowed_levels == 16


def test_every_metric_is_recomputed_by_an_independent_lira(evaluated) -> None:
    folder, _ = evaluated
    for path in sorted(folder.glob("*.json")):
        result = load_result(path)
        with np.load(path.with_suffix(".npz")) as archive:
            arrays = {k: archive[k] for k in archive.files}
        keep = arrays["keep"]
        shadow_scores = arrays[f"shadows__{result.threat_model}__scores"]
        shadow_models = arrays[f"shadows__{result.threat_model}__models"]
        assert list(shadow_models) == result.shadow_models
        for row, target in enumerate(arrays["targets"]):
            others = shadow_models != target  # each target's shadows: the others (leave-one-out)
            shadows, shadow_in = shadow_scores[others], keep[shadow_models[others]]
            recomputed = {
                "lira-online": independent.lira(shadows, shadow_in, arrays["target_scores"][row]),
                "lira-offline-fixed": independent.lira(shadows, shadow_in, arrays["target_scores"][row],
                                                       online=False, fixed=True),
                "global-threshold": arrays["target_scores"][row].mean(axis=1),
            }
            stored = result.quantized.targets[row]
            chosen = arrays["strongest_membership"][row]  # the strongest strategy's scores, measured independently
            assert stored.strongest.tpr_at_0_1pct_fpr.tpr == pytest.approx(
                independent.tpr_at(keep[target], chosen, 0.001), abs=1e-9)
            assert stored.strongest.attack in recomputed or stored.strongest.attack.startswith("rmia")
            for attack, scores in recomputed.items():
                np.testing.assert_allclose(arrays[f"membership__{attack}"][row], scores, rtol=0, atol=1e-9)
                labels = keep[target]
                assert stored.attacks[attack].auc == pytest.approx(independent.auc(labels, scores), abs=1e-9)
                assert stored.attacks[attack].tpr_at_0_1pct_fpr.tpr == pytest.approx(
                    independent.tpr_at(labels, scores, 0.001), abs=1e-9)
                assert stored.attacks[attack].tpr_at_1pct_fpr.tpr == pytest.approx(
                    independent.tpr_at(labels, scores, 0.01), abs=1e-9)
            accuracy = np.mean(arrays["test_predictions"][row] == arrays["test_labels"])
            assert stored.test_accuracy == pytest.approx(accuracy, abs=1e-12)
        tprs = [t.attacks["lira-online"].tpr_at_1pct_fpr.tpr for t in result.quantized.targets]
        low, high = independent.t_interval(tprs)
        summary = result.quantized.attacks["lira-online"].tpr_at_1pct_fpr
        assert summary.mean == pytest.approx(np.mean(tprs), abs=1e-12)
        assert summary.ci_low == pytest.approx(max(0.0, low), abs=1e-9)
        assert summary.ci_high == pytest.approx(min(1.0, high), abs=1e-9)


def test_oblivious_and_adaptive_use_different_shadows(evaluated) -> None:
    folder, _ = evaluated
    with np.load(folder / "w1.58-last8--oblivious.npz") as a, np.load(folder / "w1.58-last8--adaptive.npz") as b:
        assert np.array_equal(a["target_scores"], b["target_scores"])
        assert not np.array_equal(a["shadows__oblivious__scores"], b["shadows__adaptive__scores"])
        np.testing.assert_array_equal(a["shadows__oblivious__scores"][a["targets"]], a["reference_scores"])
        np.testing.assert_array_equal(b["shadows__adaptive__scores"][b["targets"]], b["target_scores"])
    oblivious = load_result(folder / "w1.58-last8--oblivious.json").quantized.attacks["lira-online"].auc.mean
    adaptive = load_result(folder / "w1.58-last8--adaptive.json").quantized.attacks["lira-online"].auc.mean
    assert oblivious != adaptive


def _validate_copy(folder: Path, tmp_path: Path, document: dict | None = None, arrays_suffix: bytes = b""):
    """Validate a copy of w4--oblivious, its document or its arrays altered as given."""
    name = "w4--oblivious"
    text = json.dumps(document) if document is not None else (folder / f"{name}.json").read_text()
    (tmp_path / f"{name}.json").write_text(text)
    (tmp_path / f"{name}.npz").write_bytes((folder / f"{name}.npz").read_bytes() + arrays_suffix)
    return run_cli("validate", str(tmp_path / f"{name}.json"))


def test_tampered_arrays_are_rejected(evaluated, tmp_path: Path) -> None:
    folder, _ = evaluated
    result = _validate_copy(folder, tmp_path, arrays_suffix=b"\0")
    assert result.exit_code == 1
    assert "arrays.sha256" in result.stderr and "w4--oblivious.json" in result.stderr


def test_tampered_numbers_are_rejected(evaluated, tmp_path: Path) -> None:
    folder, _ = evaluated
    document = json.loads((folder / "w4--oblivious.json").read_text())
    document["quantized"]["targets"][1]["attacks"]["lira-online"]["auc"] += 0.01
    result = _validate_copy(folder, tmp_path, document=document)
    assert result.exit_code == 1
    assert "quantized.targets[1].attacks.lira-online.auc" in result.stderr and "do not match" in result.stderr


@pytest.mark.parametrize("field, value, message", [
    ("n_models", 10**18, "n_models: 1000000000000000000 in the document, but the arrays hold 8"),
    ("n_test", 7, "n_test: 7 in the document, but the arrays hold"),
    ("config", {"search": "minmax"}, "quantizer.config_hash: not the hash of the quantizer's name, version and config"),
])
def test_counts_and_config_the_arrays_or_hash_contradict_are_rejected(evaluated, tmp_path: Path, field: str, value,
                                                                       message: str) -> None:
    # These passed validate as ok: no number depends on them, but the site shows them.
    folder, _ = evaluated
    document = json.loads((folder / "w4--oblivious.json").read_text())
    if field == "config":
        document["quantizer"]["config"] = {**document["quantizer"]["config"], **value}
    else:
        document[field] = value
    result = _validate_copy(folder, tmp_path, document=document)
    assert result.exit_code == 1 and message in " ".join(result.stderr.split()), result.stderr


def test_the_reproduction_table_fits_an_80_column_terminal() -> None:
    from rich.console import Console

    from mia_ptq_bench.report import reproduction_table
    from mia_ptq_bench.reproduce import Reproduction
    from mia_ptq_bench.results.compare import Comparison

    # the widest cells: the longest plan and threat model, the longest metric, a failed row, a large number
    rows = [Comparison("w1.58-last8--adaptive-rtn", "lira-online-fixed TPR@0.1%", 0.123456, 123.456789, 1e-3),
            Comparison("w4--oblivious", "test accuracy", 0.9, 0.9, 0.0)]
    console = Console(width=80, record=True, color_system=None)
    console.print(reproduction_table([Reproduction(Path("r.json"), "same pool", rows)], show="all"))
    text = console.export_text()
    assert "…" not in text and "OUTSIDE" in text and "adaptive-rtn" in text and "123.456789" in text
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80


def test_the_attack_table_of_digits_mlp_lists_rmia() -> None:
    # What `mptq-bench evaluate rtn` prints on its default task, from the committed reference results.
    from rich.console import Console

    from mia_ptq_bench.report import attacks_table

    folder = Path(__file__).parents[1] / "submissions" / "rtn" / "results" / "digits-mlp"
    results = [load_result(p) for p in sorted(folder.glob("*--*.json"))]
    console = Console(width=80, record=True, color_system=None)
    console.print(attacks_table(results))
    header = " ".join(console.export_text().splitlines()[:4])
    assert set(load_task("digits-mlp").attacks) >= {"rmia-online", "rmia-offline"}
    assert header.count("rmia") == 2 and "online" in header and "offline" in header


def test_a_stage_with_nothing_to_do_is_finished_at_once() -> None:
    from io import StringIO

    from rich.console import Console

    from mia_ptq_bench.report import RichProgress

    with RichProgress(Console(file=StringIO(), width=80)) as progress:
        progress.start("cached", "rtn w4: quantize + score 0 of 16 models", 0)
        progress.start("work", "rtn w2: quantize + score 2 of 16 models", 2)
        bars = {key: progress.bars.tasks[index] for key, index in progress.tasks.items()}
        assert bars["cached"].finished and not bars["work"].finished  # its clock stopped; the other runs on
        progress.advance("work", 2)
        assert bars["work"].finished


def test_failed_audit_in_a_result_is_rejected(evaluated, tmp_path: Path) -> None:
    folder, _ = evaluated
    document = json.loads((folder / "w4--oblivious.json").read_text())
    document["audit"][0]["passed"] = False
    (tmp_path / "r.json").write_text(json.dumps(document))
    result = run_cli("validate", str(tmp_path / "r.json"))
    assert result.exit_code == 1 and "audit" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["evaluate", "nope", "--task", "tiny-digits"], "unknown quantizer 'nope'; looked in the registry (adaround, "
                                                    "brecq, fp32, gptq, obc, rtn), entry points"),
    (["evaluate", "rtn", "--task", "tiny-digits", "--plans", "w4,w3.5"], "cannot parse precision plan 'w3.5'"),
    (["evaluate", "fp32", "--task", "tiny-digits", "--plans", "w4"], "fp32 serves only the fp32 plan"),
    (["evaluate", "rtn", "--task", "no-such-task"], "unknown task 'no-such-task'"),
    (["evaluate", "rtn", "--task", "tiny-digits", "--threat-models", "psychic"], "unknown threat model 'psychic'"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli(*args, "--out", str(tmp_path / "results"))
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr + result.output
    assert not (tmp_path / "results").exists()


def test_bad_task_file_names_file_and_field(tmp_path: Path) -> None:
    task = tmp_path / "broken.yaml"
    task.write_text((TASKS / "tiny-digits.yaml").read_text().replace("id: tiny-digits", "id: broken")
                    .replace("lr: 0.1", "lr: 0.1\n  warmup: 3"))
    result = run_cli("evaluate", "rtn", "--task", str(task), "--out", str(tmp_path / "results"))
    assert result.exit_code == 2
    assert f"{task}: training.warmup: unknown field" in result.stderr
    assert not (tmp_path / "results").exists()


def test_missing_dataset_is_one_clear_error(tmp_path: Path) -> None:
    result = run_cli("evaluate", "rtn", "--task", "fashion-mnist-cnn", "--data-root", str(tmp_path / "empty"),
                     "--out", str(tmp_path / "results"))
    assert result.exit_code == 2
    assert "Fashion-MNIST not found" in result.stderr and "--download" in result.stderr
    assert not (tmp_path / "results").exists()


def _numbers(result) -> dict:
    dumped = result.model_dump(mode="json")
    for volatile in ("started_at", "finished_at", "seconds", "arrays"):
        dumped.pop(volatile)
    return dumped


def test_interrupted_quantization_resumes_to_identical_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_task("tiny-digits")
    plain = evaluate("rtn", spec, options=RunOptions(out_dir=tmp_path / "a", cache_dir=tmp_path / "cache-a",
                                                     quantize_group=4))

    saves = []
    original = runner_module.OutputStore.save

    def save_then_die(self, index, outputs):
        original(self, index, outputs)
        saves.append(index)
        if len(saves) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner_module.OutputStore, "save", save_then_die)
    options = RunOptions(out_dir=tmp_path / "b", cache_dir=tmp_path / "cache-b", quantize_group=4)
    with pytest.raises(KeyboardInterrupt):
        evaluate("rtn", spec, options=options)
    assert not (tmp_path / "b").exists()  # nothing half-written
    monkeypatch.setattr(runner_module.OutputStore, "save", original)

    quantized = []

    real = RoundToNearest.quantize_prepared
    monkeypatch.setattr(RoundToNearest, "quantize_prepared",
                        lambda self, models, *a: quantized.extend(models) or real(self, models, *a))
    resumed = evaluate("rtn", spec, options=options)
    # The first plan's first group of 4 was saved whole and is not redone; the group the interruption cut
    # is quantized whole again, as the models it was made with (a batched method's bits depend on them).
    assert len(quantized) == 2 * 8 - 4
    assert [_numbers(r) for r in resumed.results] == [_numbers(r) for r in plain.results]
    for a, b in zip(plain.paths, resumed.paths, strict=True):
        with np.load(a.with_suffix(".npz")) as x, np.load(b.with_suffix(".npz")) as y:
            assert x.files == y.files and all(np.array_equal(x[k], y[k]) for k in x.files)


def test_a_threat_models_result_does_not_depend_on_the_others_asked_with_it(tmp_path: Path) -> None:
    # tiny-digits' threat models leave out adaptive-rtn: asked beside adaptive, it once became a strategy the
    # adaptive attacker could choose, so adaptive's numbers changed with the run (and validate --recompute,
    # which reruns one document, refused them). GPTQ: its adaptive shadows differ from the RTN ones.
    spec = load_task("tiny-digits")
    assert "adaptive-rtn" not in spec.threat_models
    cache = tmp_path / "cache"
    together = evaluate("gptq", spec, plans=["w2"], threat_models=["adaptive", "adaptive-rtn"],
                        options=RunOptions(out_dir=tmp_path / "together", cache_dir=cache))
    alone = evaluate("gptq", spec, plans=["w2"], threat_models=["adaptive"],
                     options=RunOptions(out_dir=tmp_path / "alone", cache_dir=cache))
    (asked_with,) = [r for r in together.results if r.threat_model == "adaptive"]
    assert _numbers(asked_with) == _numbers(alone.results[0])
    assert {t.strongest.threat_model for t in asked_with.quantized.targets} <= {"oblivious", "adaptive"}
    # rerunning the plan for fewer threat models removes the other one's document and its arrays
    evaluate("gptq", spec, plans=["w2"], threat_models=["adaptive"],
             options=RunOptions(out_dir=tmp_path / "together", cache_dir=cache))
    assert sorted(p.name for p in (tmp_path / "together" / "tiny-digits" / "gptq").glob("w2--*")) == \
        ["w2--adaptive.json", "w2--adaptive.npz"]


def test_corrupted_quantized_cache_is_redone(tmp_path: Path) -> None:
    spec = load_task("tiny-digits")
    options = RunOptions(out_dir=tmp_path / "r", cache_dir=tmp_path / "cache")
    first = evaluate("rtn", spec, plans=["w4"], threat_models=["oblivious"], options=options)
    cached = next((tmp_path / "cache" / "quantized").rglob("model-0001.npz"))
    cached.write_bytes(cached.read_bytes()[:50])
    result = run_cli("evaluate", "rtn", "--task", "tiny-digits", "--plans", "w4", "--threat-models", "oblivious",
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r2"))
    assert result.exit_code == 0 and "model-0001.npz: corrupted cache file" in result.output
    again = load_result(tmp_path / "r2" / "tiny-digits" / "rtn" / "w4--oblivious.json")
    assert _numbers(again) == _numbers(first.results[0])


def test_cached_outputs_with_too_few_test_predictions_are_redone(tmp_path: Path) -> None:
    spec = load_task("tiny-digits")
    options = RunOptions(out_dir=tmp_path / "r", cache_dir=tmp_path / "cache")
    first = evaluate("rtn", spec, plans=["w4"], threat_models=["oblivious"], options=options)
    cached = next((tmp_path / "cache" / "quantized").rglob("model-0001.npz"))
    with np.load(cached) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["test_predictions"] = arrays["test_predictions"][:5]  # under the right key, but short
    np.savez(cached, **arrays)
    result = run_cli("evaluate", "rtn", "--task", "tiny-digits", "--plans", "w4", "--threat-models", "oblivious",
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r2"))
    assert result.exit_code == 0 and "model-0001.npz: test_predictions: int64 (5,), expected" in result.output
    again = load_result(tmp_path / "r2" / "tiny-digits" / "rtn" / "w4--oblivious.json")
    assert _numbers(again) == _numbers(first.results[0])


def test_a_fifo_or_folder_in_the_quantized_cache_neither_blocks_nor_crashes(tmp_path: Path) -> None:
    spec = load_task("tiny-digits")
    options = RunOptions(out_dir=tmp_path / "r", cache_dir=tmp_path / "cache")
    first = evaluate("rtn", spec, plans=["w4"], threat_models=["oblivious"], options=options)
    cached = next((tmp_path / "cache" / "quantized").rglob("model-0001.npz"))
    cached.unlink()
    os.mkfifo(cached)  # np.load used to wait on it forever
    args = ("evaluate", "rtn", "--task", "tiny-digits", "--plans", "w4", "--threat-models", "oblivious",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r2"))
    result = run_cli(*args)
    assert result.exit_code == 0 and "model-0001.npz: not a regular file" in " ".join(result.output.split())
    assert cached.is_file()
    again = load_result(tmp_path / "r2" / "tiny-digits" / "rtn" / "w4--oblivious.json")
    assert _numbers(again) == _numbers(first.results[0])
    cached.unlink()
    cached.mkdir()
    result = run_cli(*args)
    assert result.exit_code == 2 and "model-0001.npz: a folder where model 1's quantized outputs belong" in \
        " ".join(result.output.split())


@pytest.mark.parametrize("damage, reason", [
    ("moved", "made under another key (quantizer, config, plan, calibration or environment)"),
    ("nan", "scores: float64"),
], ids=["another-plan-s-file", "non-finite-scores"])
def test_a_cache_file_that_is_not_this_plan_s_outputs_is_redone(tmp_path: Path, damage: str, reason: str) -> None:
    # A file copied from w4's folder into w1.58-last8's was read as w1.58-last8's outputs (its audit
    # said 4 bits); a NaN score ended in a traceback from the attack.
    spec = load_task("tiny-digits")
    options = RunOptions(out_dir=tmp_path / "r", cache_dir=tmp_path / "cache")
    first = evaluate("rtn", spec, plans=["w4", "w1.58-last8"], threat_models=["oblivious"], options=options)
    quantized = tmp_path / "cache" / "quantized"
    target = next(quantized.rglob("w1.58-last8-*/model-0001.npz"))
    if damage == "moved":
        target.write_bytes(next(quantized.rglob("w4-*/model-0001.npz")).read_bytes())
    else:
        with np.load(target) as archive:
            arrays = {k: archive[k] for k in archive.files}
        arrays["scores"][0, 0] = np.nan
        np.savez(target, **arrays)
    result = run_cli("evaluate", "rtn", "--task", "tiny-digits", "--plans", "w1.58-last8", "--threat-models",
                     "oblivious", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r2"))
    assert result.exit_code == 0, result.output
    assert f"redoing model 1: {target}: {reason}" in " ".join(result.output.split())
    again = load_result(tmp_path / "r2" / "tiny-digits" / "rtn" / "w1.58-last8--oblivious.json")
    assert _numbers(again) == _numbers(first.results[1])


def test_fp32_reference_and_heldout_calibration(tmp_path: Path) -> None:
    options = RunOptions(out_dir=tmp_path / "r", cache_dir=tmp_path / "cache")
    outcome = evaluate("fp32", load_task("tiny-cnn"), options=options)
    (result,) = outcome.results
    assert result.plan == "fp32" and result.n_test == 100 - 16  # held-out calibration images leave the test split
    assert _numbers(result)["quantized"] == _numbers(result)["reference"]
    assert all(a.bits is None for a in result.audit)


@pytest.mark.slow
def test_console_script_runs(tmp_path: Path) -> None:
    env = dict(os.environ, COLUMNS="120")
    proc = subprocess.run([sys.executable, "-m", "mia_ptq_bench.cli", "evaluate", "rtn", "--task", "tiny-digits",
                           "--plans", "w2", "--threat-models", "oblivious", "--out", str(tmp_path / "results")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "w2" in proc.stdout and (tmp_path / "results" / "tiny-digits" / "rtn" / "w2--oblivious.json").is_file()


@pytest.mark.parametrize("method, settings", [
    ("adaround", ["--set", "iters=200"]), ("brecq", ["--set", "iters=200"]),
    ("obc", ["--set", "calibration=64", "--set", "rounds=2"]), ("gptq", []),
])
def test_every_method_evaluates_end_to_end(tmp_path: Path, method: str, settings: list[str]) -> None:
    result = run_cli("evaluate", method, "--task", "tiny-digits", "--out", str(tmp_path / "results"), *settings)
    assert result.exit_code == 0, result.stderr
    written = sorted((tmp_path / "results" / "tiny-digits" / method).glob("*.json"))
    assert len(written) == 4
    check = run_cli("validate", *map(str, written))
    assert check.exit_code == 0, check.stderr
    config = load_result(written[0]).quantizer.config
    assert all(config[k.split("=")[0]] == int(k.split("=")[1]) for k in settings if "=" in k)


def test_bad_quantizer_setting_is_one_clear_error(tmp_path: Path) -> None:
    result = run_cli("evaluate", "adaround", "--task", "tiny-digits", "--set", "iters=-5", "--out", str(tmp_path))
    assert result.exit_code == 2 and "adaround config (--set): iters: Input should be greater than or equal to 1" in result.stderr
