"""The static site: built from validated results, checked in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from conftest import TASKS, needed, strict
from mia_ptq_bench.board.rank import pareto_front
from mia_ptq_bench.board.build import build_site, safe_url
from mia_ptq_bench.cli import app
from mia_ptq_bench.results.io import load_result

REPO = Path(__file__).resolve().parent.parent
cli = CliRunner()
CHROMIUM = Path("/usr/lib/chromium/chromium")
EVIL = "<script>alert(1)</script>"


def _submission(root: Path, name: str, quantizer: dict, display: str | None = None, contact: str = "a@example.org") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    spec = {"name": name, "display_name": display or name, "version": "1", "authors": [{"name": "Tester"}],
            "description": f"{name} for the site test", "license": "MIT", "contact": contact,
            "quantizer": quantizer, "tasks": ["tiny-digits"]}
    (folder / "submission.yaml").write_text(yaml.safe_dump(spec))
    return folder


def _evaluate(folder: Path, name: str) -> None:
    result = cli.invoke(app, ["evaluate", name, "--task", "tiny-digits", "--submission", str(folder)])
    assert result.exit_code == 0, result.stderr


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32, rtn, the worked example and a hostile entry on tiny-digits v2; one entry left at v1 (stale)."""
    root = tmp_path_factory.mktemp("board")
    v1, v2 = root / "tasks-v1", root / "tasks-v2"
    v1.mkdir(), v2.mkdir()
    shutil.copy(TASKS / "tiny-digits.yaml", v1)
    (v2 / "tiny-digits.yaml").write_text((TASKS / "tiny-digits.yaml").read_text().replace("version: 1", "version: 2"))
    submissions = root / "submissions"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPTQ_CACHE", str(root / "cache"))
        mp.setenv("MPTQ_TASKS", str(v1))
        _evaluate(_submission(submissions, "old-entry", {"builtin": "rtn", "config": {"search": "minmax"}}), "old-entry")
        mp.setenv("MPTQ_TASKS", str(v2))
        _evaluate(_submission(submissions, "fp32", {"builtin": "fp32"}, "Full precision"), "fp32")
        _evaluate(_submission(submissions, "rtn", {"builtin": "rtn"}, "Round to nearest"), "rtn")
        example = submissions / "example-stochastic-rounding"
        shutil.copytree(REPO / "submissions" / "example-stochastic-rounding", example,
                        ignore=shutil.ignore_patterns("results"))
        spec = yaml.safe_load((example / "submission.yaml").read_text())
        (example / "submission.yaml").write_text(yaml.safe_dump(dict(spec, tasks=["tiny-digits"])))
        _evaluate(example, "example-stochastic-rounding")
        hostile = _submission(submissions, "hostile", {"builtin": "rtn", "config": {"steps": 40}},
                              display=f"Hostile {EVIL}", contact="javascript:alert(1)")
        spec = yaml.safe_load((hostile / "submission.yaml").read_text())
        spec["description"] = f'{EVIL} <img src=x onerror="alert(2)">'
        (hostile / "submission.yaml").write_text(yaml.safe_dump(spec))
        _evaluate(hostile, "hostile")
        result = cli.invoke(app, ["leaderboard", "build", "--submissions", str(submissions), "--out", str(root / "site")])
        assert result.exit_code == 0, result.stderr
    return root / "site"


def test_site_layout(site: Path) -> None:
    boards = sorted(p.name for p in (site / "boards").glob("*.html"))
    assert boards == sorted(f"tiny-digits--{t}--{p}{view}.html" for t in ("adaptive", "oblivious")
                            for p in ("w1.58-last8", "w4") for view in ("", "--strongest"))
    assert {p.stem for p in (site / "entries").glob("*.html")} == {"fp32", "rtn", "example-stochastic-rounding",
                                                                  "hostile"}  # old-entry publishes nothing current
    assert (site / "style.css").is_file() and (site / "results.csv").is_file()


def test_boards_rank_with_references_and_leave_stale_results_out(site: Path) -> None:
    table = pd.read_csv(site / "boards" / "tiny-digits--oblivious--w4.csv")
    assert {"fp32", "rtn"} <= set(table.entry) and "old-entry" not in set(table.entry)
    assert list(table.tpr_at_0_1pct_fpr) == sorted(table.tpr_at_0_1pct_fpr)
    # references are yardsticks, not ranked; an entry ranks 1 + the entries whose whole interval lies below its own
    assert table[table.reference]["rank"].isna().all() and table[~table.reference]["rank"].notna().all()
    ranked = table[~table.reference]
    assert ranked["rank"].iloc[0] == 1
    for _, row in ranked.iterrows():
        assert row["rank"] == 1 + int((ranked.tpr_at_0_1pct_fpr_high < row.tpr_at_0_1pct_fpr_low).sum())
    assert table.pareto.any()
    # old-entry's results are of task version 1: validate refuses them (nothing checks them against the
    # current task), so the site leaves them out and says why
    html = (site / "boards" / "tiny-digits--oblivious--w4.html").read_text()
    assert "old-entry" not in html
    index = (site / "index.html").read_text()
    assert "old-entry: " in index and "result(s) of an older version of tiny-digits (" in index
    assert "; rerun the evaluation" in index


def test_strongest_board_ranks_by_the_strategy_chosen_per_target(site: Path) -> None:
    table = pd.read_csv(site / "boards" / "tiny-digits--adaptive--w4--strongest.csv")
    plain = pd.read_csv(site / "boards" / "tiny-digits--adaptive--w4.csv").set_index("entry")
    assert list(table.tpr_at_0_1pct_fpr) == sorted(table.tpr_at_0_1pct_fpr)
    assert set(table.entry) == set(plain.index)
    for row in table.itertuples():  # the figures are each result's strongest summary, not the headline attack's
        name = "fp32--adaptive.json" if row.entry == "fp32" else "w4--adaptive.json"
        result = load_result(site.parent / "submissions" / row.entry / "results" / "tiny-digits" / name)
        assert row.tpr_at_0_1pct_fpr == pytest.approx(result.quantized.strongest.tpr_at_0_1pct_fpr.mean, abs=1e-12)
        assert row.true_positives_0_1pct == result.quantized.strongest.tpr_at_0_1pct_fpr.true_positives


def test_hostile_metadata_is_escaped_in_the_html(site: Path) -> None:
    for page in [site / "index.html", site / "entries" / "hostile.html", *(site / "boards").glob("*.html")]:
        html = page.read_text()
        # the one script is the site's own sort.js; no submission text became markup
        own = f'<script src="{"" if page.name == "index.html" else "../"}sort.js" defer></script>'
        assert html.count(own) == 1 and "<script" not in html.replace(own, "")
        assert "onerror=" not in html.replace("onerror=&#34;", "")
        assert 'href="javascript:' not in html
    entry = (site / "entries" / "hostile.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in entry and "javascript:alert(1)" in entry


def test_pareto_front() -> None:
    accuracy = pd.Series([0.9, 0.8, 0.85, 0.95, 0.8])
    leakage = pd.Series([0.01, 0.005, 0.02, 0.03, 0.005])
    assert pareto_front(accuracy, leakage).tolist() == [True, True, False, True, True]


def test_only_http_links() -> None:
    assert safe_url("https://arxiv.org/abs/1") == "https://arxiv.org/abs/1"
    assert safe_url("javascript:alert(1)") is None and safe_url("data:text/html,x") is None and safe_url(None) is None


def test_build_refuses_boards_without_references(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    submissions = tmp_path / "subs"
    shutil.copytree(site.parent / "submissions" / "example-stochastic-rounding", submissions / "example-stochastic-rounding")
    monkeypatch.setenv("MPTQ_TASKS", str(site.parent / "tasks-v2"))
    from mia_ptq_bench.errors import BenchError

    with pytest.raises(BenchError, match="every board shows fp32 and rtn"):
        build_site(submissions, tmp_path / "out")


def test_workflows_are_valid_and_safe() -> None:
    workflows = REPO / ".github" / "workflows"
    names = sorted(p.name for p in workflows.glob("*.yml"))
    assert names == ["pages.yml", "tests.yml", "validate-submission.yml"]
    if shutil.which("check-jsonschema"):
        check = subprocess.run(["check-jsonschema", "--builtin-schema", "vendor.github-workflows",
                                *map(str, workflows.glob("*.yml"))], capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr
    loaded = {p.name: yaml.safe_load(p.read_text()) for p in workflows.glob("*.yml")}
    validate = loaded["validate-submission.yml"]
    triggers = validate[True]  # YAML reads the key `on` as True
    assert "pull_request" in triggers and "pull_request_target" not in triggers
    steps = " ".join(str(s.get("run", "")) for s in validate["jobs"]["validate"]["steps"])
    assert "mptq-bench validate submissions/" in steps and "evaluate" not in steps
    # submitted code runs only in the reproduce job, only after validation, on the tasks the site labels
    reproduce = validate["jobs"]["reproduce"]
    assert reproduce["needs"] == "validate"
    rerun = " ".join(str(s.get("run", "")) for s in reproduce["steps"])
    # the tasks from the parsed metadata (submission.load.rerun_tasks), never by matching its text
    assert "rerun_tasks" in rerun and "grep" not in rerun
    # a package-published quantizer is installed from the parsed, pinned requirement before its rerun
    assert 'pip install --constraint "$RUNNER_TEMP/constraints.txt" "$requirement"' in rerun
    assert "submission.load import requirement" in rerun and "pip freeze --exclude-editable" in rerun
    # both jobs read the pull request at the commit the run started for, never its moving head ref
    for job in ("validate", "reproduce"):
        steps = validate["jobs"][job]["steps"]
        assert any(s.get("env", {}).get("HEAD_SHA") == "${{ github.event.pull_request.head.sha }}"
                   and 'git checkout "$HEAD_SHA" -- submissions' in s.get("run", "") for s in steps), job
    assert "refs/pull" not in (workflows / "validate-submission.yml").read_text()
    assert "bash .ci/run" in (workflows / "tests.yml").read_text()
    assert "leaderboard build" in (workflows / "pages.yml").read_text()
    for name, workflow in loaded.items():
        # least privilege: nothing for the workflow, each job states its own
        assert workflow["permissions"] == {}, name
        for job_name, job in workflow["jobs"].items():
            granted = job.get("permissions")
            assert isinstance(granted, dict), f"{name}: job {job_name} states no permissions"
            writes = {k for k, v in granted.items() if v == "write"}
            if job_name == "deploy":
                assert granted == {"pages": "write", "id-token": "write"}, name
                assert "run" not in " ".join(map(str, job["steps"])), "the deploying job runs no repository code"
            else:
                assert writes == set() and granted.get("id-token") is None, f"{name}: {job_name} may write {writes}"
            for step in job["steps"]:
                uses = step.get("uses")
                if uses is None:
                    continue
                action, _, ref = uses.partition("@")
                # pinned by full commit SHA, the tag it stands for in a comment beside it
                assert re.fullmatch(r"[0-9a-f]{40}", ref), f"{name}: {uses} is not pinned to a commit SHA"
                line = next(line for line in (workflows / name).read_text().splitlines() if uses in line)
                assert re.search(r"# v\d+\.\d+\.\d+$", line), f"{name}: {uses} has no tag comment"
                if action == "actions/checkout":
                    assert step.get("with", {}).get("persist-credentials") is False, f"{name}: checkout keeps the token"
    pages = loaded["pages.yml"]
    # deploy only from main: a workflow_dispatch on another branch must not publish its site
    for job_name in ("build", "deploy"):
        assert pages["jobs"][job_name]["if"] == "github.ref == 'refs/heads/main'"
    assert pages["jobs"]["deploy"]["needs"] == "build"


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True, text=True,
                          env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
                               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_pull_request_jobs_run_the_base_code_on_the_pull_request_s_submissions(tmp_path: Path) -> None:
    # A pull request that changes the validator as well as its submission: both jobs must still run the
    # base branch's validator. The step that takes submissions/ from the pull request, run as the
    # workflow runs it, against a repository whose pull request ref GitHub would serve.
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "validate-submission.yml").read_text())
    origin, work = tmp_path / "origin", tmp_path / "work"
    origin.mkdir()
    _git(origin, "init", "-q", "-b", "main")
    (origin / "mia_ptq_bench").mkdir()
    (origin / "mia_ptq_bench" / "validate.py").write_text("honest\n")
    (origin / "submissions" / "old").mkdir(parents=True)
    (origin / "submissions" / "old" / "submission.yaml").write_text("old\n")
    _git(origin, "add", "-A")
    _git(origin, "commit", "-q", "-m", "base")
    base = _git(origin, "rev-parse", "HEAD")
    (origin / "mia_ptq_bench" / "validate.py").write_text("always passes\n")
    (origin / "submissions" / "mine").mkdir()
    (origin / "submissions" / "mine" / "submission.yaml").write_text("mine\n")
    _git(origin, "rm", "-q", "submissions/old/submission.yaml")
    _git(origin, "add", "-A")
    _git(origin, "commit", "-q", "-m", "pull request")
    head = _git(origin, "rev-parse", "HEAD")  # the commit the run was started for
    _git(origin, "update-ref", "refs/pull/7/head", "HEAD")
    _git(origin, "tag", "pushed-over", "HEAD")  # GitHub keeps serving a pushed-over commit by its hash
    _git(origin, "reset", "-q", "--hard", base)
    for job in ("validate", "reproduce"):
        steps = workflow["jobs"][job]["steps"]
        checkout = next(s for s in steps if str(s.get("uses", "")).startswith("actions/checkout@"))
        assert checkout["with"]["ref"] == "${{ github.event.pull_request.base.sha }}"
        take = next(s for s in steps if s.get("name", "").startswith("Take only submissions/ from the pull request"))
        assert take["env"] == {"HEAD_SHA": "${{ github.event.pull_request.head.sha }}"}
        assert steps.index(take) < steps.index(next(s for s in steps if "pip install -e ." in str(s.get("run", ""))))
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(["git", "clone", "-q", "--no-local", str(origin), str(work)], check=True)  # what checkout gives
        subprocess.run(["bash", "-e", "-c", take["run"]], cwd=work, check=True, capture_output=True,
                       env={**os.environ, "HEAD_SHA": head})
        assert (work / "mia_ptq_bench" / "validate.py").read_text() == "honest\n", job
        assert sorted(str(p.relative_to(work)) for p in (work / "submissions").rglob("*") if p.is_file()) == \
            ["submissions/mine/submission.yaml"], job
        # While the validate job ran, the author pushed code it never saw: the reproduce job must not run it.
        _git(origin, "checkout", "-q", "--detach", head)
        (origin / "submissions" / "mine" / "unvalidated.py").write_text("import os\n")
        _git(origin, "add", "-A")
        _git(origin, "commit", "-q", "-m", "pushed while validation ran")
        _git(origin, "update-ref", "refs/pull/7/head", "HEAD")
        _git(origin, "checkout", "-q", "main")


def test_under_the_test_command_a_missing_dependency_fails_instead_of_skipping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("MPTQ_NO_SKIPS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not here"):
        needed("no_such_module_for_the_test", "not here")
    monkeypatch.setenv("MPTQ_NO_SKIPS", "1")  # what scripts/run-tests exports
    with pytest.raises(pytest.fail.Exception, match=r"not here \(a skip proves nothing here\)"):
        needed("no_such_module_for_the_test", "not here")
    assert "export MPTQ_NO_SKIPS=1" in (REPO / "scripts" / "run-tests").read_text()
    assert needed("json", "always there").dumps([1]) == "[1]"


@pytest.fixture(scope="module")
def browser():
    playwright = needed("playwright.sync_api", "playwright not installed: pip install -e '.[test]'")
    if not CHROMIUM.is_file():
        reason = f"no Chromium at {CHROMIUM}: apt-get install chromium (Debian's package), or run scripts/run-tests"
        if strict():  # under the test command a skipped browser test would prove nothing: fail instead
            pytest.fail(reason)
        pytest.skip(reason)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                          "--disable-component-update", "--no-first-run"])
        yield browser
        browser.close()


def _scripts(page) -> list[str]:
    """The scripts a page loads, by file name: the site's own sort.js and nothing inline."""
    sources = page.eval_on_selector_all("script", "els => els.map(e => e.getAttribute('src') || 'INLINE')")
    return [source.rsplit("/", 1)[-1] for source in sources]


def test_every_page_in_chromium(site: Path, browser) -> None:
    pages = [site / "index.html", *sorted((site / "boards").glob("*.html")), *sorted((site / "entries").glob("*.html"))]
    seen_links = set()
    for path in pages:
        page = browser.new_page()
        problems: list[str] = []
        page.on("console", lambda msg, seen=problems: seen.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc, seen=problems: seen.append(str(exc)))
        page.on("dialog", lambda dialog, seen=problems: seen.append(f"dialog: {dialog.message}"))
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        assert problems == [], (path.name, problems)
        assert _scripts(page) == ["sort.js"]
        for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"):
            if href.startswith("file://"):
                seen_links.add(href.split("#")[0])
            else:
                assert href.startswith(("http://", "https://")), (path.name, href)
        if path.parent.name == "boards":
            rows = page.locator("table.board").first.locator("tbody tr").count()
            assert page.locator("svg.plot circle.point").count() == rows  # one point per entry
            # a ROC per entry for one attack; the strongest-attack view mixes attacks per target: no single ROC
            strongest = path.name.endswith("--strongest.html")
            assert page.locator("svg.plot polyline.roc").count() == (0 if strongest else rows)
            stem = path.name.removesuffix(".html")
            csv_table = pd.read_csv(path.parent / f"{stem}.csv")
            json_table = pd.DataFrame(json.loads((path.parent / f"{stem}.json").read_text()))
            assert len(csv_table) == len(json_table) == rows
            shown = page.locator("table.board").first.locator("tbody tr th[scope=row] a").all_inner_texts()
            assert shown == list(csv_table.display_name) == list(json_table.display_name)
            first_tpr = page.locator("table.board").first.locator("tbody tr").first.locator("td.num").nth(2).inner_text()
            assert first_tpr.split()[0] == f"{100 * csv_table.tpr_at_0_1pct_fpr[0]:.3f}"
        page.close()
    for link in seen_links:
        target = Path(link.removeprefix("file://"))
        assert target.is_file(), f"broken internal link {link}"
        if target.suffix == ".csv":
            pd.read_csv(StringIO(target.read_text()))
        elif target.suffix == ".json":
            json.loads(target.read_text())


def test_hostile_entry_renders_inert_in_chromium(site: Path, browser) -> None:
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto((site / "entries" / "hostile.html").as_uri())
    page.wait_for_load_state("load")
    assert dialogs == [] and _scripts(page) == ["sort.js"] and page.locator("img").count() == 0
    assert EVIL in page.locator("h1").inner_text()
    assert page.locator("a[href^='javascript']").count() == 0
    page.close()


@pytest.mark.parametrize("cell, written", [
    ('=HYPERLINK("http://evil","x")', "'=HYPERLINK(\"http://evil\",\"x\")"), ("+1+1", "'+1+1"), ("-2+3", "'-2+3"),
    ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"), ("\rx", "'\rx"), ("plain", "plain"), ("a=b", "a=b"),
])
def test_csv_cells_never_start_a_formula(tmp_path: Path, cell: str, written: str) -> None:
    from mia_ptq_bench.board.build import _downloads

    table = pd.DataFrame({"display_name": [cell], "tpr": [-0.5], "rank": [1], "reference": [True],
                          "quantizer_config": [{"=k": "-v"}]})
    _downloads(table, tmp_path, "board")
    back = pd.read_csv(tmp_path / "board.csv", keep_default_na=False)
    assert len(back) == 1 and back.display_name[0] == written  # a CR inside a cell does not split the row
    # numbers stay numbers (a negative one is not text to neutralise), booleans stay booleans
    assert back.tpr[0] == -0.5 and back["rank"][0] == 1 and bool(back.reference[0]) is True
    assert back.quantizer_config[0] == '{"=k": "-v"}'
    assert json.loads((tmp_path / "board.json").read_text())[0]["display_name"] == cell  # JSON keeps the text


def test_entry_page_shows_the_command_that_reproduces_it(site: Path) -> None:
    html = (site / "entries" / "rtn.html").read_text()
    assert "mptq-bench reproduce submissions/rtn --task tiny-digits" in html
    # the command names the entry's own folder, never another's
    assert "submissions/fp32" not in html


def test_the_index_leads_with_the_real_image_task() -> None:
    from mia_ptq_bench.board.build import task_order

    assert task_order(["tiny-digits", "digits-mlp", "fashion-mnist-resnet", "a-task"]) == [
        "fashion-mnist-resnet", "digits-mlp", "a-task", "tiny-digits"]
    assert task_order(["tiny-digits", "a-task"]) == ["a-task", "tiny-digits"]


# -- the site as its readers expect (issue 18) ----------------------------------------------------------

SAMPLE_PAGES = ["index.html", "boards/tiny-digits--oblivious--w4.html", "entries/example-stochastic-rounding.html"]


def test_tied_ranks_follow_the_intervals_and_skip_references() -> None:
    from mia_ptq_bench.board.rank import tied_ranks

    # sorted by mean: a ref, A [0,2], B [1,3] overlaps A, C [5,6] is clear of both, D [5.5,7] overlaps C
    low = pd.Series([0.0, 0.0, 1.0, 5.0, 5.5])
    high = pd.Series([9.0, 2.0, 3.0, 6.0, 7.0])
    ranks, tied = tied_ranks(low, high, pd.Series([True, False, False, False, False]))
    assert ranks.isna().tolist() == [True, False, False, False, False]
    assert ranks[1:].tolist() == [1, 1, 3, 3] and tied.tolist() == [False, True, True, True, True]
    ranks, tied = tied_ranks(pd.Series([0.0, 4.0]), pd.Series([1.0, 5.0]), pd.Series([False, False]))
    assert ranks.tolist() == [1, 2] and not tied.any()
    # A [1.2,3.6], B [4.0,13.2] clear of A, C [3.5,15.0] overlapping A: no one is significantly better than
    # C, so C ranks 1 (with A) whatever order the rows come in, also below B in a table sorted by mean.
    low, high = pd.Series([1.2, 4.0, 3.5]), pd.Series([3.6, 13.2, 15.0])
    for order in ([0, 1, 2], [0, 2, 1], [2, 1, 0]):
        ranks, tied = tied_ranks(low[order], high[order], pd.Series([False] * 3, index=order))
        assert ranks.sort_index().tolist() == [1, 2, 1] and tied.sort_index().tolist() == [True, False, True]


def test_the_frontier_ignores_float_noise_in_the_last_bit() -> None:
    # 7637/8000 computed in two orders: the same accuracy, so the entry that leaks more is dominated
    accuracy = pd.Series([0.954625, 0.9546250000000001])
    assert accuracy[1] > accuracy[0]
    assert pareto_front(accuracy, pd.Series([0.00334, 0.00897])).tolist() == [True, False]


def test_the_json_download_holds_every_number_as_the_csv_does(tmp_path: Path) -> None:
    # pandas' to_json keeps 10 decimals: 0.0018277159 in the JSON against 0.00182771591234 in the CSV.
    from mia_ptq_bench.board.build import _downloads

    value = 0.0018277159123456789
    table = pd.DataFrame({"entry": ["a", "b"], "tpr": [value, float("nan")], "n": [3, 4],
                          "config": [{"bits": 2}, {}]})
    _downloads(table, tmp_path, "board")
    records = json.loads((tmp_path / "board.json").read_text())
    assert records[0]["tpr"] == value == float(pd.read_csv(tmp_path / "board.csv").tpr[0])
    assert records[1]["tpr"] is None and records[1]["n"] == 4 and records[0]["config"] == {"bits": 2}


def test_the_index_marks_references_and_self_reported_numbers(site: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from mia_ptq_bench.board.build import build_site
    from mia_ptq_bench.board.collect import Check

    monkeypatch.setenv("MPTQ_TASKS", str(site.parent / "tasks-v2"))  # the version the fixture's results are of
    submissions = site.parent / "submissions"
    claims = {path.resolve(): Check("self-reported", "the shadows were too large to commit")
              for path in (submissions / "hostile" / "results").rglob("*.json")}
    build_site(submissions, tmp_path / "site", checks=claims)
    rows = [row.split("</tr>")[0] for row in (tmp_path / "site" / "index.html").read_text().split("<tr>")]
    rows = [row for row in rows if '<td class="num" data-value="0' in row]  # the headline tables' rows
    hostile = [row for row in rows if 'href="entries/hostile.html"' in row]
    honest = [row for row in rows if 'href="entries/example-stochastic-rounding.html"' in row]
    references = [row for row in rows if 'href="entries/rtn.html"' in row]
    assert hostile and all(">self-reported</span>" in row for row in hostile)
    assert honest and not any("self-reported" in row for row in honest)
    assert references and all(">reference</span>" in row for row in references)


def test_self_reported_rows_are_shown_but_neither_ranked_nor_on_the_frontier() -> None:
    from mia_ptq_bench.board.rank import BOARD_COLUMNS, board

    def row(entry: str, tpr: float, accuracy: float, check: str, plan: str = "w4") -> dict:
        numbers = {c: 0.0 for c in BOARD_COLUMNS}
        return {**numbers, "entry": entry, "reference": entry in ("fp32", "rtn"), "check": check, "task": "t",
                "threat_model": "oblivious", "attack": "lira-online", "plan": plan, "tpr_at_0_1pct_fpr": tpr,
                "tpr_at_0_1pct_fpr_low": tpr - 0.001, "tpr_at_0_1pct_fpr_high": tpr + 0.001,
                "test_accuracy": accuracy, "roc_fpr": [], "roc_tpr": []}

    rows = pd.DataFrame([row("fp32", 0.05, 0.9, "recomputed", "fp32"), row("rtn", 0.03, 0.88, "recomputed"),
                         row("claims", 0.0, 0.99, "self-reported"), row("honest", 0.02, 0.87, "recomputed"),
                         row("other", 0.04, 0.89, "recomputed")])
    table = board(rows, "t", "oblivious", "w4", "lira-online").set_index("entry")
    assert pd.isna(table.loc["claims", "rank"]) and not table.loc["claims", "pareto"]
    assert table.loc["honest", "rank"] == 1 and table.loc["other", "rank"] == 2
    # without the self-reported row's claim of 0% leakage at 99% accuracy, honest entries stay on the frontier
    assert table.loc["honest", "pareto"] and table.loc["other", "pareto"]


def test_a_self_reported_point_is_drawn_hollow_and_cannot_stretch_the_axes() -> None:
    # A self-reported document's numbers are taken on trust: accuracy 100% with an interval [0, 100]
    # once set the x axis to 0-100 and squeezed every checked point into a few pixels.
    from mia_ptq_bench.board.svg import Point, privacy_utility

    def point(label: str, x: float, self_reported: bool = False, low: float | None = None,
              high: float | None = None) -> Point:
        return Point(label, "#123456", x, x - 0.5 if low is None else low, x + 0.5 if high is None else high,
                     0.01, 0.005, 0.02, False, False, self_reported)

    honest = [point("a", 80.0), point("b", 82.0)]
    alone = str(privacy_utility(honest, "t", 1e-4, "k"))
    claims = point("claims", 100.0, True, 0.0, 100.0)
    both = str(privacy_utility([*honest, claims], "t", 1e-4, "k"))
    centres = re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)" r="5" ([^>]*)>', both)
    assert re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)" r="5"', alone) == [c[:2] for c in centres[:2]]
    assert 'style="stroke:#123456"' in centres[2][2] and 'class="point self-reported"' in centres[2][2]
    assert float(centres[2][0]) == max(float(c[0]) for c in centres)  # clamped to the right edge of the range
    assert "claims (self-reported)" in both and "self-reported (not recomputed" in both


def test_boards_mark_ties_and_leave_references_unranked(site: Path) -> None:
    table = pd.read_csv(site / "boards" / "tiny-digits--oblivious--w4.csv")
    html = (site / "boards" / "tiny-digits--oblivious--w4.html").read_text()
    ranks = re.findall(r'<td class="num rank" data-value="([^"]*)">(.*?)</td>', html)
    assert len(ranks) == len(table)
    for (value, shown), row in zip(ranks, table.itertuples()):
        if row.reference:
            assert value == "" and shown == "–"
        else:
            assert value == str(int(row.rank)) and (shown.startswith("<abbr") == bool(row.tied))


def test_entry_page_shows_the_effective_config_plans_in_task_order_and_fp32(site: Path) -> None:
    html = (site / "entries" / "rtn.html").read_text()
    recorded = load_result(site.parent / "submissions" / "rtn" / "results" / "tiny-digits" / "w4--oblivious.json")
    assert recorded.quantizer.config  # the result records the resolved defaults; submission.yaml had none
    shown = re.findall(r'<pre class="config">(.*?)</pre>', html, re.S)[0]
    assert json.loads(shown.replace("&#34;", '"')) == recorded.quantizer.config
    # the task lists w4 before w1.58-last8; text order would put w1.58-last8 first
    plans = re.findall(r'<td class="plan">([^<]*)</td>', html)
    assert plans[:2] == ["w4", "w1.58-last8"]
    assert 'data-entry="fp32 (reference)"' in html


def test_boards_whose_shadows_are_quantized_targets_say_how_firm_their_intervals_are(site: Path) -> None:
    # Measured between two pools (docs/reproducibility.md): under the adaptive attacker, whose shadows are each
    # entry's own quantized targets, the intervals and the rank separations are too narrow; the oblivious
    # attacker's need no note.
    def note(threat: str) -> str:
        html = (site / "boards" / f"tiny-digits--{threat}--w4.html").read_text()
        return " ".join(" ".join(re.findall(r'<p class="note">(.*?)</p>', html, flags=re.S)).split())

    assert "Read a rank here as less firm than it looks" in note("adaptive")
    assert note("oblivious") == ""  # (tiny-digits has no adaptive-rtn board)
    index = " ".join((site / "index.html").read_text().split())
    assert "the intervals are too narrow" in index


def test_board_links_to_every_other_board_of_its_task(site: Path) -> None:
    html = (site / "boards" / "tiny-digits--adaptive--w4.html").read_text()
    others = {p.name for p in (site / "boards").glob("tiny-digits--*.html")} - {"tiny-digits--adaptive--w4.html"}
    assert others <= set(re.findall(r'href="([^"/]+\.html)"', html))
    assert 'aria-current="page"' in html


def test_repository_and_guide_links_come_from_github_actions(monkeypatch: pytest.MonkeyPatch) -> None:
    from mia_ptq_bench.board.build import repository_url

    monkeypatch.setenv("GITHUB_SERVER_URL", "https://github.com")
    monkeypatch.setenv("GITHUB_REPOSITORY", "someone/mia-ptq-bench")
    assert repository_url() == "https://github.com/someone/mia-ptq-bench"
    assert repository_url("javascript:alert(1)") is None
    monkeypatch.delenv("GITHUB_REPOSITORY")
    assert repository_url() is None


def test_tables_have_captions_and_header_scopes(site: Path) -> None:
    for name in SAMPLE_PAGES:
        html = (site / name).read_text()
        assert html.count("<table") == html.count("<caption>"), name
        assert "<th>" not in html, name  # every header cell says what it heads
        assert 'aria-describedby="plot-' in html or name == "index.html"


def test_same_method_same_colour_everywhere(site: Path) -> None:
    from mia_ptq_bench.board.palette import colour_for

    assert colour_for("fp32") != colour_for("rtn")
    seen: dict[str, set[str]] = {}
    for page in sorted((site / "boards").glob("*--w*.html")):
        html = page.read_text()
        for colour, entry in re.findall(r'(?:fill|stroke)="(#[0-9a-f]{6})" class="(?:point[^"]*|roc)" data-entry="([^"]*)"',
                                        html):
            seen.setdefault(entry, set()).add(colour)
    assert {"Full precision", "Round to nearest"} <= set(seen)
    assert all(len(colours) == 1 for colours in seen.values()), seen
    assert seen["Full precision"] != seen["Round to nearest"]


def test_results_of_tasks_the_pull_request_job_reruns_are_labelled_reproduced(
        site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mia_ptq_bench.board.collect as collect_module

    board = "boards/tiny-digits--oblivious--w4.html"
    assert "check-reproduced" not in (site / board).read_text()  # tiny-digits is not rerun in pull requests
    monkeypatch.setattr(collect_module, "REPRODUCED_IN_PULL_REQUESTS", ("tiny-digits",))
    monkeypatch.setenv("MPTQ_TASKS", str(site.parent / "tasks-v2"))
    build_site(site.parent / "submissions", tmp_path / "s")
    html = (tmp_path / "s" / board).read_text()
    assert html.count('class="tag check-reproduced"') == html.count('class="tag check-unchecked"') > 0


def test_entries_never_share_a_colour_even_when_their_names_hash_alike() -> None:
    import hashlib

    from mia_ptq_bench.board.palette import FIXED, OTHERS, assign_colours, colour_for

    def slot(name: str) -> int:
        return int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(OTHERS)

    names = [f"entry-{i}" for i in range(200)]
    first = names[0]
    twin = next(n for n in names[1:] if slot(n) == slot(first))  # a name that wants the same colour
    pair = assign_colours([twin, first, "rtn"])
    assert pair["rtn"] == FIXED["rtn"] and pair[first] == colour_for(first) == OTHERS[slot(first)]
    assert pair[twin] == OTHERS[(slot(first) + 1) % len(OTHERS)]  # the next free slot, not a shared colour
    many = assign_colours(names[:20] + list(FIXED))
    assert len(set(many.values())) == len(many)  # 26 entries, 26 colours (past the palette: generated ones)
    assert assign_colours(reversed(names[:20])) == {n: many[n] for n in names[:20]}  # order of arrival is irrelevant


def test_leaderboard_build_links_the_repository_it_is_given(site: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPTQ_TASKS", str(site.parent / "tasks-v2"))
    monkeypatch.setenv("MPTQ_CACHE", str(site.parent / "cache"))
    source = site.parent / "submissions"
    built = cli.invoke(app, ["leaderboard", "build", "--submissions", str(source), "--out", str(tmp_path / "s"),
                             "--repository", "https://example.org/me/fork"])
    assert built.exit_code == 0, built.stderr
    index = (tmp_path / "s" / "index.html").read_text()
    assert 'href="https://example.org/me/fork"' in index
    assert 'href="https://example.org/me/fork/blob/main/docs/submit.md"' in index
    refused = cli.invoke(app, ["leaderboard", "build", "--submissions", str(source), "--out", str(tmp_path / "t"),
                               "--repository", "javascript:alert(1)"])
    assert refused.exit_code == 2 and "--repository: 'javascript:alert(1)' is not an http(s) URL" in refused.stderr
    assert not (tmp_path / "t").exists()


def test_plot_axes_in_percent_and_roc_from_the_resolved_fpr(site: Path) -> None:
    from mia_ptq_bench.board.svg import roc_floor

    assert roc_floor(600) == 1e-3 and roc_floor(75) == 1e-2 and roc_floor(20_000) == 1e-5
    html = (site / "boards" / "tiny-digits--oblivious--w4.html").read_text()
    table = pd.read_csv(site / "boards" / "tiny-digits--oblivious--w4.csv")
    ticks = re.findall(r'class="tick"[^>]*>([^<]*)</text>', html)
    assert any(t.endswith("%") for t in ticks)
    floor = roc_floor(float((table.negatives / table.targets).max()))
    assert f">{100 * floor:g}%</text>" in html and ">0.001%</text>" not in html


@pytest.fixture
def phone(browser):
    context = browser.new_context(viewport={"width": 390, "height": 844})
    yield context
    context.close()


def test_pages_do_not_scroll_sideways_on_a_phone(site: Path, phone) -> None:
    for name in SAMPLE_PAGES:
        page = phone.new_page()
        page.goto((site / name).as_uri())
        page.wait_for_load_state("load")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, name
        # an interval is one line: each .ci box is one text line high
        heights = page.eval_on_selector_all(".ci", "els => els.map(e => e.getClientRects().length)")
        assert heights and set(heights) == {1}, name
        page.close()


def _boxes(svg) -> list[dict]:
    """The rendered box of every text element in one plot."""
    return svg.evaluate("s => [...s.querySelectorAll('text')].map(e => { const r = e.getBoundingClientRect();"
                        " return {x: r.left, y: r.top, r: r.right, b: r.bottom, t: e.textContent}; })")


def test_plot_labels_neither_collide_nor_leave_the_plot(site: Path, browser) -> None:
    pages = [*sorted((site / "boards").glob("*.html")), *sorted((site / "entries").glob("*.html"))]
    for width in (390, 1200):
        context = browser.new_context(viewport={"width": width, "height": 900})
        for path in pages:
            page = context.new_page()
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            for index in range(page.locator("svg.plot").count()):
                svg = page.locator("svg.plot").nth(index)
                frame = svg.bounding_box()
                texts = _boxes(svg)
                for box in texts:
                    assert frame["x"] - 0.5 <= box["x"] and box["r"] <= frame["x"] + frame["width"] + 0.5, (path.name, box)
                    assert frame["y"] - 0.5 <= box["y"] and box["b"] <= frame["y"] + frame["height"] + 0.5, (path.name, box)
                for i, a in enumerate(texts):
                    for b in texts[i + 1:]:
                        apart = a["r"] <= b["x"] or b["r"] <= a["x"] or a["b"] <= b["y"] or b["b"] <= a["y"]
                        assert apart, (path.name, width, a["t"], b["t"])
                # one legend entry per plotted method, in the plot's own figure
                plotted = svg.evaluate("s => [...new Set([...s.querySelectorAll('[data-entry]')].map(e => e.dataset.entry))]")
                legend = svg.evaluate("s => [...s.parentElement.querySelectorAll('ul.legend li')].map(e => e.dataset.entry)")
                assert plotted and sorted(plotted) == sorted(legend), (path.name, plotted, legend)
            page.close()
        context.close()


def test_headers_sort_the_rows_and_without_javascript_every_row_is_there(site: Path, browser) -> None:
    path = site / "boards" / "tiny-digits--oblivious--w4.html"
    table = pd.read_csv(path.with_suffix(".csv"))
    names = "tbody tr th[scope=row] a"
    page = browser.new_page()
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    board = page.locator("table.board").first
    assert board.locator(names).all_inner_texts() == list(table.display_name)
    accuracy = board.locator("thead th").nth(2)
    accuracy.locator("button.sort").click()
    ascending = sorted(table.itertuples(), key=lambda r: r.test_accuracy)
    shown = board.locator(names).all_inner_texts()
    assert accuracy.get_attribute("aria-sort") == "ascending"
    assert [table.set_index("display_name").test_accuracy[n] for n in shown] == [r.test_accuracy for r in ascending]
    accuracy.locator("button.sort").press("Enter")  # the keyboard sorts too: the other way
    assert accuracy.get_attribute("aria-sort") == "descending"
    again = board.locator(names).all_inner_texts()
    assert [table.set_index("display_name").test_accuracy[n] for n in again] == sorted(
        table.test_accuracy, reverse=True)
    # the filter keeps the rows holding every word typed, and clearing it brings every row back
    search = page.locator("label.filter input").first
    search.fill("round nearest")
    visible = [n for n in board.locator(names).all() if n.is_visible()]
    assert [n.inner_text() for n in visible] == ["Round to nearest"]
    assert page.locator("label.filter span").first.inner_text() == f"1 of {len(table)} rows"
    search.fill("")
    assert all(n.is_visible() for n in board.locator(names).all())
    page.close()

    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    board = page.locator("table.board").first
    assert board.locator(names).all_inner_texts() == list(table.display_name)
    assert board.locator("button.sort").count() == 0 and page.locator("label.filter").count() == 0
    first_tpr = board.locator("tbody tr").first.locator("td.num").nth(2).inner_text()
    assert first_tpr.split()[0] == f"{100 * table.tpr_at_0_1pct_fpr[0]:.3f}"
    context.close()


def test_dark_mode_follows_the_reader(site: Path, browser) -> None:
    backgrounds = {}
    for scheme in ("light", "dark"):
        context = browser.new_context(color_scheme=scheme)
        page = context.new_page()
        page.goto((site / "index.html").as_uri())
        page.wait_for_load_state("load")
        backgrounds[scheme] = page.evaluate("getComputedStyle(document.body).backgroundColor")
        context.close()
    assert backgrounds["light"] == "rgb(255, 255, 255)" and backgrounds["dark"] != backgrounds["light"]


def _luminance(rgb: str) -> float:
    channels = [int(v) / 255 for v in re.findall(r"\d+", rgb)[:3]]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def test_small_grey_text_keeps_its_contrast(site: Path, browser) -> None:
    for scheme in ("light", "dark"):
        context = browser.new_context(color_scheme=scheme)
        page = context.new_page()
        page.goto((site / "boards" / "tiny-digits--oblivious--w4.html").as_uri())
        page.wait_for_load_state("load")
        for selector in (".ci", ".muted", "ul.legend li", "tr.reference .ci"):
            fg, bg = page.eval_on_selector(selector, """e => { let b = e, c;
                while (b && ((c = getComputedStyle(b).backgroundColor) === 'rgba(0, 0, 0, 0)')) b = b.parentElement;
                return [getComputedStyle(e).color, c || 'rgb(255, 255, 255)']; }""")
            light, dark = sorted([_luminance(fg), _luminance(bg)], reverse=True)
            assert (light + 0.05) / (dark + 0.05) >= 4.5, (scheme, selector, fg, bg)
        context.close()
