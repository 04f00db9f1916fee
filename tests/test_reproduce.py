"""The reproducibility contract: bit-identical reruns here, bounded differences elsewhere (same or retrained pool)."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TASKS
from mia_ptq_bench.cache_admin import list_cache
from mia_ptq_bench import reproduce as reproduce_module
from mia_ptq_bench.cache import in_use
from mia_ptq_bench.cli import app
from mia_ptq_bench.errors import SpecError
from mia_ptq_bench.results.compare import (IDENTICAL, RETRAINED_POOL, SAME_POOL, PoolSpread, allowed_change,
                                           compare_results, headline_numbers, headline_stats, regime, same_environment,
                                           sparse_count_spread)
from mia_ptq_bench.results.io import load_arrays, load_result
from mia_ptq_bench.results.jackknife import result_pool_spread
from mia_ptq_bench.results.schema import LowFprSummary, PoolSourceRef, Stat
from mia_ptq_bench.runner import RunOptions, evaluate
from mia_ptq_bench.spec import load_task

cli = CliRunner()
VOLATILE = ("started_at", "finished_at", "seconds")
# The portable kernels instead of this CPU's vector ones: float rounding as on another machine.
ANOTHER_CPU = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"}


@pytest.fixture(scope="module")
def committed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rtn on tiny-digits, written as results a reader would find committed."""
    root = tmp_path_factory.mktemp("committed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPTQ_TASKS", str(TASKS))
        evaluate("rtn", load_task("tiny-digits"), plans=["w1.58-last8"],
                 options=RunOptions(out_dir=root / "results", cache_dir=root / "cache"))
    return root / "results" / "tiny-digits" / "rtn"


def test_two_cold_runs_give_byte_equal_arrays_and_documents(committed: Path, tmp_path: Path) -> None:
    again = evaluate("rtn", load_task("tiny-digits"), plans=["w1.58-last8"],
                     options=RunOptions(out_dir=tmp_path / "results", cache_dir=tmp_path / "fresh-cache"))
    for path in again.paths:  # a new pool trained from scratch, new quantization, new attacks
        first = committed / path.name
        assert path.with_suffix(".npz").read_bytes() == first.with_suffix(".npz").read_bytes()
        a, b = json.loads(path.read_text()), json.loads(first.read_text())
        for key in VOLATILE:
            a.pop(key), b.pop(key)
        assert a == b  # arrays' sha256 included


def test_reproduce_on_the_same_machine_requires_identity(committed: Path, tmp_path: Path) -> None:
    result = cli.invoke(app, ["reproduce", str(committed / "w1.58-last8--adaptive.json"), "--cache-dir",
                              str(tmp_path / "cache"), "--show", "all"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output + result.stderr
    assert "1 of 1 results reproduced within tolerance" in result.output
    assert "0.00e+00" in result.output and "OUTSIDE" not in result.output


def test_reproduce_flags_a_number_that_was_changed(committed: Path, tmp_path: Path) -> None:
    forged = tmp_path / "forged.json"
    document = json.loads((committed / "w1.58-last8--oblivious.json").read_text())
    document["quantized"]["test_accuracy"]["mean"] += 0.02
    forged.write_text(json.dumps(document))
    result = cli.invoke(app, ["reproduce", str(forged), "--cache-dir", str(tmp_path / "cache"), "--show", "failed"],
                        env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "OUTSIDE" in result.output and "test accuracy" in result.output
    assert "0 of 1 results reproduced within tolerance" in result.output


def test_reproduce_refuses_a_stale_result(committed: Path, tmp_path: Path) -> None:
    stale = tmp_path / "stale.json"
    document = json.loads((committed / "w1.58-last8--oblivious.json").read_text())
    document["task"]["hash"] = "0" * 64
    stale.write_text(json.dumps(document))
    result = cli.invoke(app, ["reproduce", str(stale)])
    assert result.exit_code == 2 and "a stale result cannot be reproduced" in result.stderr


def test_reproduce_refuses_a_config_the_quantizer_does_not_accept(committed: Path, tmp_path: Path) -> None:
    odd = tmp_path / "odd.json"
    document = json.loads((committed / "w1.58-last8--oblivious.json").read_text())
    document["quantizer"]["config"]["steps"] = 0  # rtn's search runs at least one step
    odd.write_text(json.dumps(document))
    result = cli.invoke(app, ["reproduce", str(odd)], env={"COLUMNS": "250"})
    message = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "Traceback" not in message, message
    assert f"{odd}: quantizer.config: steps:" in message, message


def reproduce_with_other_kernels(committed: Path, cache: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """``mptq-bench reproduce`` of every committed result, in a process on torch's portable kernels."""
    env = {**os.environ, **ANOTHER_CPU, "MPTQ_TASKS": str(TASKS), "MPTQ_CACHE": str(cache), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "mia_ptq_bench.cli", "reproduce",
                           *map(str, sorted(committed.glob("*.json"))), "--show", "all"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return proc, env


@pytest.mark.slow
def test_reproduce_on_another_cpu_stays_within_tolerance(committed: Path, tmp_path: Path) -> None:
    proc, env = reproduce_with_other_kernels(committed, tmp_path / "cache")
    assert "2 of 2 results reproduced within tolerance" in proc.stdout
    capability = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                                capture_output=True, text=True, env=env).stdout.strip()
    assert capability == "DEFAULT"  # the rerun really used other kernels, so the tolerances applied
    if load_result(committed / "w1.58-last8--oblivious.json").environment.cpu_capability != "DEFAULT":
        rows = [line.split() for line in proc.stdout.splitlines() if line.rstrip().endswith(" ok")]
        assert rows and all(float(row[-2]) > 0 for row in rows)  # another environment: tolerances, not identity


@pytest.mark.slow
def test_reproduce_on_another_cpu_with_the_same_pool_keeps_the_quarter(committed: Path, tmp_path: Path) -> None:
    # The committed pool (as pulled from the Hub would give it), everything after it redone by other kernels.
    shutil.copytree(committed.parents[2] / "cache" / "pools", tmp_path / "cache" / "pools")
    proc, _ = reproduce_with_other_kernels(committed, tmp_path / "cache")
    assert "2 of 2 results reproduced within tolerance" in proc.stdout
    assert "2 result(s): another environment, the same pool" in proc.stdout
    assert "retrained" not in proc.stdout


def test_tolerance_is_a_quarter_of_the_interval_with_a_floor() -> None:
    stat = Stat(mean=0.5, std=0.1, ci_low=0.46, ci_high=0.54, n=16)
    assert allowed_change(stat, resolution=0.001) == pytest.approx(0.01)
    assert allowed_change(stat, resolution=0.05) == 0.05
    clipped = Stat(mean=0.0, std=0.0, ci_low=0.0, ci_high=0.0, n=16)
    assert allowed_change(clipped, resolution=0.002) == 0.002


def test_same_environment_ignores_only_the_cpus_device_string(committed: Path) -> None:
    env = load_result(committed / "w1.58-last8--oblivious.json").environment
    assert same_environment(env, env.model_copy(update={"device": "cpu: another name"}))
    gpu = env.model_copy(update={"device": "cuda: NVIDIA A100-SXM4-40GB"})
    assert not same_environment(env, gpu) and same_environment(gpu, gpu)
    assert not same_environment(gpu, gpu.model_copy(update={"device": "cuda: NVIDIA H100 80GB HBM3"}))
    assert not same_environment(env, env.model_copy(update={"cpu_capability": "DEFAULT" if env.cpu_capability != "DEFAULT" else "AVX2"}))
    assert not same_environment(env, env.model_copy(update={"torch_threads": env.torch_threads + 1}))
    assert env.processor and not same_environment(env, env.model_copy(update={"processor": "another CPU"}))
    # a result written before the processor was recorded: no rerun can claim its environment
    assert not same_environment(env.model_copy(update={"processor": None}), env)
    # nor one written before the torch settings were recorded; and other settings are another environment
    assert env.torch_settings and not same_environment(env.model_copy(update={"torch_settings": None}), env)
    assert not same_environment(env, env.model_copy(update={"torch_settings": {**env.torch_settings,
                                                                                "default_dtype": "torch.float64"}}))


def test_a_committed_result_from_before_the_torch_settings_were_recorded_is_never_rerun_identically() -> None:
    from mia_ptq_bench.environment import recorded_torch_settings

    written = load_result(Path(__file__).parents[1] / "submissions" / "rtn" / "results" / "digits-mlp"
                          / "w4--oblivious.json")
    assert written.environment.torch_settings is None
    rerun = written.environment.model_copy(update={"torch_settings": recorded_torch_settings()})
    assert not same_environment(written.environment, rerun)
    assert regime(written, written.model_copy(update={"environment": rerun})) != IDENTICAL


def test_a_documents_environment_dicts_are_bounded() -> None:
    from pydantic import ValidationError

    from mia_ptq_bench.environment import environment
    from mia_ptq_bench.results.schema import Environment

    recorded = environment("cpu")
    Environment(**recorded)
    for field, bloated in (("torch_settings", {f"flag{i}": "ieee" for i in range(65)}),
                           ("torch_settings", {"x" * 129: "ieee"}),
                           ("packages", {"torch": "2." + "1" * 127}),
                           ("packages", {f"package{i}": "1.0" for i in range(65)})):
        with pytest.raises(ValidationError, match=field):
            Environment(**{**recorded, field: bloated})


def test_a_result_records_the_torch_settings_it_is_computed_under_and_the_cache_keeps_them_apart() -> None:
    import torch

    from mia_ptq_bench.environment import environment
    from mia_ptq_bench.executor import apply_torch_settings, torch_settings
    from mia_ptq_bench.quantize.outputs import environment_key
    from mia_ptq_bench.results.schema import Environment

    before, key = torch_settings(), environment_key("cpu")
    recorded = Environment(**environment("cpu")).torch_settings
    assert recorded["default_dtype"] == "torch.float32" and recorded["mkldnn.enabled"] is True
    try:
        torch.backends.mkldnn.enabled = False
        changed = Environment(**environment("cpu")).torch_settings
        assert changed == {**recorded, "mkldnn.enabled": False}
        assert environment_key("cpu") != key  # outputs computed under other settings are never reused
    finally:
        apply_torch_settings(before)
    assert environment_key("cpu") == key


def test_the_tolerance_follows_from_environment_and_pool(committed: Path) -> None:
    result = load_result(committed / "w1.58-last8--oblivious.json")
    assert result.pool_digest is not None
    elsewhere = result.environment.model_copy(update={"processor": "another CPU"})
    assert regime(result, result) == IDENTICAL
    assert regime(result, result.model_copy(update={"environment": elsewhere})) == SAME_POOL
    retrained = result.model_copy(update={"environment": elsewhere, "pool_digest": "f" * 64})
    assert regime(result, retrained) == RETRAINED_POOL
    # The same environment on another pool (trained elsewhere, or under bfloat16 autocast) cannot give the same bits.
    assert result.pool_arithmetic == "float32"
    other_pool = result.model_copy(update={"pool_digest": "e" * 64, "pool_arithmetic": "bfloat16-autocast"})
    assert regime(result, other_pool) == RETRAINED_POOL
    pulled = other_pool.model_copy(update={"pool_source": PoolSourceRef(repo="someorg/pool", revision="0" * 40)})
    assert regime(result, pulled) == SAME_POOL
    # A result that names no pool (from before digests) is judged by its environment alone, as before.
    assert regime(result.model_copy(update={"pool_digest": None}), other_pool) == IDENTICAL
    # A result from before pool digests: its full-precision reference depends on the pool alone.
    older = result.model_copy(update={"pool_digest": None})
    assert regime(older, result.model_copy(update={"environment": elsewhere})) == SAME_POOL
    accuracy = result.reference.test_accuracy
    moved = result.reference.model_copy(
        update={"test_accuracy": accuracy.model_copy(update={"mean": accuracy.mean + 1e-9})})
    assert regime(older, result.model_copy(update={"environment": elsewhere, "reference": moved})) == RETRAINED_POOL

    stat = Stat(mean=0.8, std=0.08, ci_low=0.76, ci_high=0.84, n=16)
    assert [allowed_change(stat, 1e-4, case) for case in (IDENTICAL, SAME_POOL, RETRAINED_POOL)] == \
        [0.0, pytest.approx(0.01), pytest.approx(6 * 0.08 * (2 / 16) ** 0.5)]
    flat = Stat(mean=0.001, std=0.0, ci_low=0.001, ci_high=0.001, n=16)
    assert allowed_change(flat, 1e-4, RETRAINED_POOL) == allowed_change(flat, 1e-4, SAME_POOL) == 1e-4
    rerun_stat = stat.model_copy(update={"mean": 0.85})
    for digest, ok in ((result.pool_digest, False), ("f" * 64, True)):  # 0.05 from the committed 0.8
        committed = result.model_copy(update={"pool_digest": digest, "quantized": result.quantized.model_copy(
            update={"test_accuracy": stat.model_copy(update={"mean": 0.8})})})
        rerun = result.model_copy(update={"environment": elsewhere,
                                          "quantized": result.quantized.model_copy(update={"test_accuracy": rerun_stat})})
        row = next(c for c in compare_results(committed, rerun) if c.metric == "test accuracy")
        assert row.ok is ok


def test_a_retrained_pool_takes_a_sparse_tpr_at_least_its_binomial_spread() -> None:
    # 16 targets of 2,000 members, no true positive at all: the rerun's spread over targets is 0, but 16
    # zero counts only say the rate is below ln(20) / 32,000 (P(0 | mean ln 20) = 5%, the one-sided 95%
    # Poisson upper bound), and a target's count at that rate spreads by sqrt(p (1 - p) / 2000).
    zero = LowFprSummary(mean=0.0, std=0.0, ci_low=0.0, ci_high=0.0, n=16, true_positives=0,
                         positives=32000, false_positives=16, negatives=32000)
    rate = math.log(20) / 32000
    assert sparse_count_spread(zero) == pytest.approx(math.sqrt(rate * (1 - rate) / 2000))
    floor = sparse_count_spread(zero)
    assert allowed_change(zero, 5 / 32000, RETRAINED_POOL, floor) == pytest.approx(6 * floor * (2 / 16) ** 0.5)
    assert allowed_change(zero, 5 / 32000, RETRAINED_POOL) == 5 / 32000  # without it: the resolution alone
    assert allowed_change(zero, 5 / 32000, SAME_POOL, floor) == allowed_change(zero, 5 / 32000, SAME_POOL)
    # A TPR whose own spread is the larger keeps it: 1,600 true positives spread by 0.01 over targets.
    strong = zero.model_copy(update={"mean": 0.05, "std": 0.01, "ci_high": 0.055, "true_positives": 1600})
    assert sparse_count_spread(strong) < 0.01
    assert allowed_change(strong, 5 / 32000, RETRAINED_POOL, sparse_count_spread(strong)) == pytest.approx(6 * 0.01 * (2 / 16) ** 0.5)


def test_the_retrained_rows_take_their_floor_from_the_rerun_s_counts_only(committed: Path) -> None:
    # End to end through compare_results: a TPR row's tolerance is the rerun's spread or its count floor,
    # and a document that claims other counts (16 hits of 32 members: a floor taken from them would be far wider)
    # moves nothing.
    result = load_result(committed / "w1.58-last8--oblivious.json")
    elsewhere = result.environment.model_copy(update={"processor": "another CPU"})
    rerun = result.model_copy(update={"environment": elsewhere})
    document = result.model_copy(update={"pool_digest": "0" * 64})
    assert regime(document, rerun) == RETRAINED_POOL
    tpr = rerun.quantized.attacks["lira-online"].tpr_at_0_1pct_fpr
    rows = {c.metric: c for c in compare_results(document, rerun) if not c.result.endswith("(fp32 ref)")}
    assert rows["lira-online TPR@0.1%"].tolerance == allowed_change(tpr, 5 / tpr.positives, RETRAINED_POOL,
                                                                    sparse_count_spread(tpr))
    auc = rerun.quantized.attacks["lira-online"].auc
    assert rows["lira-online AUC"].tolerance == allowed_change(auc, 1e-4, RETRAINED_POOL)
    shrunk = tpr.model_copy(update={"true_positives": 16, "positives": 32})
    assert sparse_count_spread(shrunk) > 10 * max(sparse_count_spread(tpr), tpr.std)
    attacks = {**document.quantized.attacks, "lira-online": document.quantized.attacks["lira-online"].model_copy(
        update={"tpr_at_0_1pct_fpr": shrunk})}
    forged = document.model_copy(update={"quantized": document.quantized.model_copy(update={"attacks": attacks})})
    again = {c.metric: c for c in compare_results(forged, rerun) if not c.result.endswith("(fp32 ref)")}
    assert again["lira-online TPR@0.1%"].tolerance == rows["lira-online TPR@0.1%"].tolerance


def test_a_result_s_pool_spread_comes_from_its_arrays_and_is_exact_where_no_shadow_enters(committed: Path) -> None:
    path = committed / "w1.58-last8--adaptive.json"
    result = load_result(path)
    spread = result_pool_spread(load_task("tiny-digits"), result, load_arrays(path, result))
    for evaluation, errors in ((result.quantized, spread.quantized), (result.reference, spread.reference)):
        numbers = headline_numbers(evaluation)
        assert errors.keys() == numbers.keys()
        assert all(math.isfinite(v) and v >= 0 for v in errors.values())
        for name in ("test accuracy", "global-threshold AUC", "global-threshold TPR@1%"):  # the targets' own numbers
            stat = numbers[name]
            assert errors[name] == pytest.approx(stat.std / math.sqrt(stat.n), rel=1e-9, abs=1e-15)
    # LiRA's numbers lean on the shadows the targets share (the other quantized targets, the other pool
    # models): leaving a group out moves some of them much further than the spread over targets says
    ratios = [errors[name] / (stat.std / math.sqrt(stat.n))
              for evaluation, errors in ((result.quantized, spread.quantized), (result.reference, spread.reference))
              for name, stat in headline_numbers(evaluation).items() if name.startswith("lira") and stat.std > 0]
    assert max(ratios) > 1.5
    # what the document says enters nothing: only its threat model and its arrays do
    forged = result.model_copy(update={"quantized": result.quantized.model_copy(
        update={"test_accuracy": result.quantized.test_accuracy.model_copy(update={"mean": 0.0, "std": 9.0})})})
    assert result_pool_spread(load_task("tiny-digits"), forged, load_arrays(path, result)) == spread


def test_the_retrained_rows_take_the_rerun_s_jackknife_for_each_evaluation(committed: Path) -> None:
    result = load_result(committed / "w1.58-last8--oblivious.json")
    rerun = result.model_copy(update={"environment": result.environment.model_copy(update={"processor": "another CPU"})})
    document = result.model_copy(update={"pool_digest": "0" * 64})
    wide = PoolSpread(quantized={"lira-online AUC": 0.25}, reference={"test accuracy": 0.125})
    plain = {(c.result, c.metric): c.tolerance for c in compare_results(document, rerun)}
    rows = {(c.result, c.metric): c.tolerance for c in compare_results(document, rerun, pool_se=wide)}
    label = "w1.58-last8--oblivious"
    assert rows.pop((label, "lira-online AUC")) == pytest.approx(6 * math.sqrt(2) * 0.25)
    assert rows.pop((f"{label} (fp32 ref)", "test accuracy")) == pytest.approx(6 * math.sqrt(2) * 0.125)
    assert plain[(label, "lira-online AUC")] < 6 * math.sqrt(2) * 0.25
    assert all(plain[key] == tolerance for key, tolerance in rows.items())  # nothing else widened
    assert regime(result, rerun) == SAME_POOL  # the document names the rerun's pool
    assert compare_results(result, rerun, pool_se=wide) == compare_results(result, rerun)  # only a retrained pool's


def test_reproduce_widens_by_the_pool_spread_only_where_the_spread_over_targets_fails(
        committed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A document of another CPU and another pool than the checker's: the retrained case. A number outside
    # the spread over targets gets the rerun's jackknife, measured only then. On this machine the rerun is
    # bit-identical to the committed run, so its jackknife is the committed arrays' (computed here).
    name = "w1.58-last8--adaptive"
    result = load_result(committed / f"{name}.json")
    spread = result_pool_spread(load_task("tiny-digits"), result, load_arrays(committed / f"{name}.json", result))
    stats = {metric: (stat, resolution, floor)
             for metric, _, stat, resolution, floor in headline_stats(result.quantized, result.quantized, result.n_test)}
    plain = {m: allowed_change(stat, res, RETRAINED_POOL, floor) for m, (stat, res, floor) in stats.items()}
    widened = {m: allowed_change(stat, res, RETRAINED_POOL, floor, spread.quantized[m])
               for m, (stat, res, floor) in stats.items()}
    metric = max(stats, key=lambda m: widened[m] / plain[m])
    assert widened[metric] > 1.2 * plain[metric]  # some number this task's shared shadows move further
    calls = []
    real = reproduce_module.result_pool_spread

    def spy(*args):
        calls.append(args[1].threat_model)
        return real(*args)

    monkeypatch.setattr(reproduce_module, "result_pool_spread", spy)
    options = RunOptions(cache_dir=committed.parents[2] / "cache")

    def reproduce_moved(by: float):
        document = json.loads((committed / f"{name}.json").read_text())
        document["environment"]["processor"] = "another CPU"
        document["pool_digest"] = "0" * 64
        attack, kind = metric.rsplit(" ", 1)
        where = (document["quantized"]["strongest"] if attack == "strongest" else
                 document["quantized"]["attacks"][attack])
        key = {"AUC": "auc", "TPR@0.1%": "tpr_at_0_1pct_fpr", "TPR@1%": "tpr_at_1pct_fpr"}[kind]
        for end in ("mean", "ci_low", "ci_high"):  # the interval moved along: the document stays well-formed
            where[key][end] += by
        folder = tmp_path / "results" / "tiny-digits" / "rtn"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(document))
        [done] = reproduce_module.reproduce([folder / f"{name}.json"], options)
        assert done.regime == RETRAINED_POOL
        return done.ok

    assert reproduce_moved(0.0) and calls == []  # within the spread over targets: no jackknife
    assert reproduce_moved((plain[metric] + widened[metric]) / 2) and calls == ["adaptive"]
    assert not reproduce_moved(1.1 * widened[metric])
    same = reproduce_module.reproduce([committed / f"{name}.json"], options)
    assert [r.regime for r in same] == [IDENTICAL] and len(calls) == 2


def test_a_document_cannot_widen_its_own_check(committed: Path) -> None:
    """What the committed document says can only make the check stricter: the case and the widths
    come from the checker's rerun."""
    result = load_result(committed / "w1.58-last8--oblivious.json")
    elsewhere = result.environment.model_copy(update={"processor": "another CPU"})
    rerun = result.model_copy(update={"environment": elsewhere})
    # a digest of some other pool does not buy the retrained tolerance when the checker pulled the canonical pool
    pulled = rerun.model_copy(update={"pool_source": PoolSourceRef(repo="org/pool", revision="abc")})
    forged_digest = result.model_copy(update={"pool_digest": "0" * 64})
    assert regime(forged_digest, pulled) == SAME_POOL and regime(forged_digest, rerun) == RETRAINED_POOL
    # an interval or a spread blown up in the document widens nothing: the widths are the rerun's
    accuracy = result.quantized.test_accuracy
    inflated = accuracy.model_copy(update={"mean": accuracy.mean + 0.05, "std": float("inf"), "ci_low": 0.0,
                                           "ci_high": float("inf")})
    forged = result.model_copy(update={"quantized": result.quantized.model_copy(update={"test_accuracy": inflated})})
    row = next(c for c in compare_results(forged, rerun) if c.metric == "test accuracy")
    assert row.tolerance < 0.05 and not row.ok  # a quarter of the rerun's own interval
    # the same with a forged digest (the retrained case): the width is still the rerun's spread, and the
    # resolution the rerun's test split, whatever n_test the document gives
    loose = forged.model_copy(update={"pool_digest": "0" * 64, "n_test": 1})
    assert regime(loose, rerun) == RETRAINED_POOL
    row = next(c for c in compare_results(loose, rerun) if c.metric == "test accuracy")
    assert row.tolerance == allowed_change(accuracy, 5 / (rerun.n_test * accuracy.n), RETRAINED_POOL)
    # an attack left out of the document, or one the rerun does not know, fails instead of being skipped
    attacks = dict(result.quantized.attacks)
    dropped = attacks.pop("lira-online")
    short = result.model_copy(update={"quantized": result.quantized.model_copy(update={"attacks": attacks})})
    extra = result.model_copy(update={"quantized": result.quantized.model_copy(
        update={"attacks": {**result.quantized.attacks, "made-up": dropped}})})
    for document, note in ((short, "not in the document"), (extra, "not rerun")):
        failed = [c for c in compare_results(document, rerun) if not c.ok]
        assert [c.metric for c in failed] == [f"{'lira-online' if note.startswith('not in') else 'made-up'} AUC ({note})"]


def test_a_document_with_an_infinite_number_is_refused(committed: Path, tmp_path: Path) -> None:
    document = json.loads((committed / "w1.58-last8--oblivious.json").read_text())
    document["quantized"]["test_accuracy"]["ci_high"] = float("inf")  # written as JSON's Infinity
    path = tmp_path / "w1.58-last8--oblivious.json"
    path.write_text(json.dumps(document))
    with pytest.raises(SpecError, match=r"quantized\.test_accuracy\.ci_high: Input should be a finite number"):
        load_result(path)


DRIFTING = '''
import os
from pathlib import Path

import torch
from mia_ptq_bench.plugin import Quantizer, fit_grid, layer_levels, register_quantizer


@register_quantizer("drifting")
class Drifting(Quantizer):
    """Stochastic rounding seeded by how many processes ran it before: another rounding every run."""

    @torch.no_grad()
    def quantize(self, model, calibration, plan):
        runs = Path(os.environ["DRIFT_COUNTER"])
        generator = torch.Generator().manual_seed(int(runs.read_text()) if runs.exists() else 0)
        for name, levels in layer_levels(model, plan).items():
            weight = model.get_submodule(name).weight
            grid = fit_grid(weight, levels)
            rows = weight.reshape(grid.scale.shape[0], -1)
            noise = torch.rand(rows.shape, generator=generator)
            integers = torch.clamp(torch.floor(rows / grid.scale + noise) + grid.zero_point, 0, levels - 1)
            weight.copy_(grid.dequantize(integers).view_as(weight))
        return model
'''


def test_reproduce_quantizes_afresh_whatever_the_cache_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A quantizer whose results change from run to run passes only if reproduce reads back the outputs its
    # own evaluate cached; it must quantize again and flag the change.
    plugin = tmp_path / "drifting.py"
    plugin.write_text(DRIFTING)
    counter = tmp_path / "runs"
    monkeypatch.setenv("DRIFT_COUNTER", str(counter))
    cache = str(tmp_path / "cache")
    first = cli.invoke(app, ["evaluate", "drifting", "--plugin", str(plugin), "--task", "tiny-digits", "--plans", "w2",
                             "--threat-models", "oblivious,adaptive-rtn", "--out", str(tmp_path / "r"),
                             "--cache-dir", cache])
    assert first.exit_code == 0, first.output + first.stderr
    counter.write_text("1")  # the next process rounds with another seed
    before = cached_outputs(tmp_path / "cache")
    assert before  # what an earlier reproduce would have read back instead of quantizing
    results = tmp_path / "r" / "tiny-digits" / "drifting"
    again = cli.invoke(app, ["reproduce", str(results / "w2--oblivious.json"), str(results / "w2--adaptive-rtn.json"),
                             "--plugin", str(plugin), "--cache-dir", cache, "--show", "failed"], env={"COLUMNS": "200"})
    assert again.exit_code == 1, again.output + again.stderr
    assert "quantized afresh" in again.output and "OUTSIDE" in again.output
    assert "0 of 2 results reproduced within tolerance" in again.output
    # The user's cache is read for the pool, not written: not the method's outputs nor the RTN shadows'
    # (adaptive-rtn), and the scratch folder inside it is gone.
    assert cached_outputs(tmp_path / "cache") == before
    assert not list((tmp_path / "cache").glob(".reproduce-*"))


def cached_outputs(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted((cache / "quantized").rglob("*.npz"))}


def test_a_killed_reproduce_leaves_scratch_that_the_next_one_and_cache_clear_remove(
        committed: Path, tmp_path: Path, live_and_gone_pids: tuple[int, int]) -> None:
    # The scratch folder is named after its machine and process: one whose process is gone from this machine
    # was a killed run's and goes (at the next reproduce, or with `cache clear`); a running one's stays, and
    # so does one from another machine sharing the cache, or anything else whose name merely starts alike.
    cache = tmp_path / "cache"
    host = socket.gethostname()
    live_pid, gone_pid = live_and_gone_pids
    live, dead = cache / f".reproduce-{host}-{live_pid}-ab12cd34", cache / f".reproduce-{host}-{gone_pid}-ef56gh78"
    elsewhere, other = cache / f".reproduce-{host}x-{gone_pid}-ij90kl12", cache / ".reproduce-notes"
    for folder in (live, dead, elsewhere, other):
        (folder / "outputs").mkdir(parents=True)
        (folder / "outputs" / "model-0000.npz").write_bytes(b"x" * 4096)
    listed = cli.invoke(app, ["cache", "list", "--cache-dir", str(cache)])
    assert listed.exit_code == 0 and "scratch" in listed.output, listed.output
    # (what the table says, read from the listing itself: a terminal's width may cut the table's cells)
    details = {entry.path.name: entry.detail for entry in list_cache(cache) if entry.kind == "scratch"}
    assert details == {live.name: f"scratch of a running reproduce (process {live_pid})",
                       dead.name: "left by an interrupted reproduce: safe to delete",
                       elsewhere.name: f"scratch of a reproduce on {host}x (process {gone_pid}), "
                                       "not checked from here"}
    refused = cli.invoke(app, ["cache", "clear", "scratch", "--task", "tiny-digits", "--cache-dir", str(cache)])
    assert refused.exit_code == 2 and "belong to no task" in refused.output + refused.stderr
    with in_use(cache, ["tiny-digits"]):  # a run using the cache: a killed run's scratch may go all the same
        cleared = cli.invoke(app, ["cache", "clear", "scratch", "--cache-dir", str(cache)])
    assert cleared.exit_code == 0, cleared.output
    assert "removed 1 entries" in cleared.output and not dead.exists()
    assert live.is_dir() and elsewhere.is_dir() and other.is_dir()
    dead.mkdir()
    result = cli.invoke(app, ["reproduce", str(committed / "w1.58-last8--adaptive.json"), "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output + result.stderr
    assert sorted(p.name for p in cache.glob(".reproduce-*")) == sorted(f.name for f in (live, elsewhere, other))
