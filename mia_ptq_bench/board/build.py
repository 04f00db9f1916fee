"""``mptq-bench leaderboard build``: validated results -> pandas -> Jinja2 -> a static site.

Layout of the built site::

    index.html                       tasks x threat models, the headline boards, metrics, how to submit
    results.csv, results.json        every current result (headline attack)
    boards/<task>--<threat>--<plan>.html|.csv|.json
    entries/<entry>.html             metadata, links, config, every result, ROC curves
    style.css
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from ..attack import THREAT_MODELS
from ..atomic import another_live_process, temporary_folder, write_text_atomic
from ..errors import BenchError, WriteError
from ..spec import load_registered_task
from .collect import STRONGEST, Check, Collected, collect
from .palette import assign_colours, colour_for
from .rank import board, missing_references
from .svg import DASHES, Curve, Point, privacy_utility, roc_curves, roc_floor

PLOT_FLOOR = 1e-4  # TPR@0.1%FPR of 0 is drawn here on the log axis


def safe_url(value: object) -> str | None:
    """Only http(s) URLs become links."""
    text = str(value) if value is not None else ""
    return text if urlparse(text).scheme in ("http", "https") else None


# The index opens on these tasks, in this order (the real-image grid first; digits-mlp is the quick
# default), then every other task with results, alphabetically.
LEAD_TASKS = ("fashion-mnist-resnet", "digits-mlp")


def task_order(task_ids) -> list[str]:
    lead = [t for t in LEAD_TASKS if t in set(task_ids)]
    return lead + sorted(set(task_ids) - set(lead))


def board_name(task: str, threat: str, plan: str) -> str:
    return f"{task}--{threat}--{plan}"


def _environment() -> Environment:
    templates = Path(str(resources.files("mia_ptq_bench.leaderboard"))) / "templates"
    env = Environment(loader=FileSystemLoader(str(templates)), autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda v, digits=2: f"{100 * float(v):.{digits}f}"
    env.filters["safe_url"] = safe_url
    return env


def _points(table: pd.DataFrame, colours: dict[str, str]) -> list[Point]:
    return [Point(label=r.display_name, colour=colours[r.entry], x=100 * r.test_accuracy,
                  x_low=100 * r.test_accuracy_low, x_high=100 * r.test_accuracy_high, y=r.tpr_at_0_1pct_fpr,
                  y_low=r.tpr_at_0_1pct_fpr_low, y_high=r.tpr_at_0_1pct_fpr_high, reference=bool(r.reference),
                  pareto=bool(r.pareto), self_reported=r.check == "self-reported")
            for r in table.itertuples()]


def _negatives_per_target(table: pd.DataFrame) -> float:
    """Non-members per target (``negatives`` is summed over targets): 1/this is the smallest FPR resolved."""
    per_target = (table.negatives / table.targets.clip(lower=1)).dropna()
    return float(per_target.max()) if len(per_target) else float("nan")


def repository_url(explicit: str | None = None) -> str | None:
    """The repository the site links to: given, or the one GitHub Actions is building (pages.yml), else none."""
    if explicit:
        return safe_url(explicit)
    server, repo = os.environ.get("GITHUB_SERVER_URL"), os.environ.get("GITHUB_REPOSITORY")
    return safe_url(f"{server.rstrip('/')}/{repo}") if server and repo else None


def plan_key(plans: list[str]):
    """Sort key putting fp32 first, then the task's own plan order (not text order: w1.58-last8 after w1.58)."""
    order = {plan: i for i, plan in enumerate(["fp32", *plans])}
    return lambda plan: (order.get(plan, len(order)), plan)


def effective_configs(mine: pd.DataFrame, plans: dict[str, list[str]]) -> list[dict]:
    """The quantizer configs the entry's results record (the resolved config, defaults filled in), one per
    distinct config with the task/plan results it covers: an empty ``config:`` in submission.yaml means the
    quantizer's defaults, and the results say what those were."""
    groups: dict[str, dict] = {}
    for r in mine.itertuples():
        group = groups.setdefault(r.config_hash, {"config": json.dumps(r.quantizer_config, indent=2, sort_keys=True),
                                                  "hash": r.config_hash, "results": set()})
        group["results"].add((r.task, r.plan))
    for group in groups.values():
        group["results"] = [f"{task} {plan}" for task, plan in
                            sorted(group["results"], key=lambda tp: (tp[0], plan_key(plans.get(tp[0], []))(tp[1])))]
    return list(groups.values())


# A text cell starting with one of these is a formula to a spreadsheet: '=HYPERLINK("http://evil", "x")' as a
# display name would be a live link (or worse) in whoever opens the CSV (OWASP: CSV injection).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: object) -> object:
    """A CSV cell that no spreadsheet evaluates: text (and lists/mappings, written as JSON) starting with a
    formula character gets a leading apostrophe; numbers, booleans and missing values stay as they are."""
    if isinstance(value, (dict, list, tuple)):
        value = json.dumps(value, sort_keys=True)
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def _downloads(table: pd.DataFrame, folder: Path, name: str) -> None:
    """``name``.csv and ``name``.json (names hold dots, as in w1.58: no Path.with_suffix here)."""
    flat = table.drop(columns=[c for c in ("roc_fpr", "roc_tpr") if c in table.columns])
    # Numbers and booleans are never touched; text may be object or pandas' string dtype, so test for numbers.
    text_columns = [c for c in flat.columns if not pd.api.types.is_numeric_dtype(flat[c])]
    # CRLF line ends (RFC 4180) also make the writer quote a text cell holding a bare CR, which would split the row
    write_text_atomic(folder / f"{name}.csv", flat.assign(**{c: flat[c].map(csv_safe) for c in text_columns})
                      .to_csv(index=False, lineterminator="\r\n"))
    # Every number as the CSV and the page hold it (pandas' to_json keeps 10 decimals); missing ones as null.
    records = [{key: _json_value(value) for key, value in record.items()} for record in flat.to_dict("records")]
    write_text_atomic(folder / f"{name}.json", json.dumps(records, indent=1, allow_nan=False) + "\n")


def _json_value(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


SITE_MARKER = ".mptq-site"  # in every site this builds: a folder holding it may be replaced by the next build


def build_site(submissions: Path, out: Path, checks: Mapping[Path, Check] | None = None,
               repository: str | None = None) -> dict:
    """Render the whole site into ``out`` (replaced); returns a summary for the CLI.

    ``out`` must be new, empty, or a site this built before (it holds SITE_MARKER), and never a folder
    the build reads or the current folder: an existing folder is replaced whole. The new site is built
    beside it and swapped in by two renames, the old one kept until the new one is in place, so a
    failure at any point leaves the previous site as it was. A folder that cannot be written
    (read-only, full disk) is one WriteError naming it.
    """
    out = Path(out)
    staging = None
    try:
        check_out(Path(submissions), out)
        out.parent.mkdir(parents=True, exist_ok=True)
        _recover(out)
        staging = temporary_folder(f".{out.name}.building-{os.getpid()}-", out.parent)  # readable by a web server's user
        summary = _build_site(Path(submissions), staging, checks, repository)
        _swap_in(staging, out)
        return {**summary, "out": out}
    except (WriteError, BenchError):
        raise
    except OSError as exc:
        raise WriteError(f"{exc.filename or out}: cannot write the site: {exc.strerror or exc}") from None
    finally:  # a build that failed half-way leaves nothing behind (a finished one renamed its staging folder)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _recover(out: Path) -> None:
    """What a build killed mid-way left beside ``out``: its staging folders go; a site it had set aside
    while swapping is put back if ``out`` is missing. Folders of a build still running (their names carry
    its process id) are left alone: a concurrent build into the same ``out`` is not a killed one."""
    for left in sorted(out.parent.glob(f".{out.name}.building-*")):
        if not _running(left, left.name.removeprefix(f".{out.name}.building-")):
            shutil.rmtree(left, ignore_errors=True)
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if _running(old, old.name.removeprefix(f".{out.name}.old-")):
            continue
        if not out.exists() and (old / SITE_MARKER).is_file():
            old.rename(out)
        else:
            shutil.rmtree(old, ignore_errors=True)


# No build runs this long: a folder older than this is a killed build's, whatever process now has its id
# (in a container the build may have been process 1, which is always alive).
BUILD_HOURS = 24


def _running(folder: Path, suffix: str) -> bool:
    """Whether ``folder`` belongs to a build still running: the process whose id starts ``suffix`` ('<pid>-...')
    is alive on this machine (and is not this one), and the folder is younger than BUILD_HOURS."""
    pid = suffix.split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        if time.time() - folder.stat().st_mtime > BUILD_HOURS * 3600:
            return False
    except OSError:
        return False
    return another_live_process(int(pid))


# The files every site holds: a folder with all of them was built by this command, before the marker existed.
SITE_LAYOUT = ("index.html", "boards", "entries", "style.css")


def check_out(submissions: Path, out: Path) -> None:
    """Refuse, as one BenchError, an ``--out`` the build must not replace (see ``build_site``)."""
    try:
        _check_out(submissions, out)
    except OSError as exc:
        raise BenchError(f"{out}: cannot be checked as the site's folder: {exc.strerror or exc}") from None


def _check_out(submissions: Path, out: Path) -> None:
    where, here = out.resolve(), Path.cwd().resolve()
    read = submissions.resolve()
    if where == here or where in here.parents:
        raise BenchError(f"{out}: the site would replace the current folder or one above it; give a folder of its own "
                         "(e.g. --out site)")
    if where == read or where in read.parents or read in where.parents:
        raise BenchError(f"{out}: the site would replace or sit inside the submissions folder {submissions}, "
                         "which it is built from; give a folder of its own (e.g. --out site)")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BenchError(f"{out}: not a folder; refused (give a new folder, or a site this command built)")
    if out.is_dir() and any(out.iterdir()) and not (out / SITE_MARKER).is_file() and \
            not all((out / name).exists() for name in SITE_LAYOUT):
        raise BenchError(f"{out}: a folder that holds files but no {SITE_MARKER} (not a site this command built); "
                         "it would be replaced whole: move it away or give another --out")


def _swap_in(staging: Path, out: Path) -> None:
    """``staging`` becomes ``out``; the old ``out``, if any, is deleted only once the new one is in place."""
    if not out.exists():
        staging.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        staging.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _build_site(submissions: Path, staging: Path, checks: Mapping[Path, Check] | None,
                repository: str | None) -> dict:
    collected: Collected = collect(submissions, checks)
    if collected.rows.empty:
        raise BenchError(f"{submissions}: no valid results to build a leaderboard from"
                         + (f" (skipped: {'; '.join(collected.skipped)})" if collected.skipped else ""))
    rows = collected.rows
    env = _environment()
    (staging / "boards").mkdir()
    (staging / "entries").mkdir()
    (staging / SITE_MARKER).write_text("built by mptq-bench leaderboard build; the next build replaces this folder\n")
    static = Path(str(resources.files("mia_ptq_bench.leaderboard"))) / "static"
    for asset in static.iterdir():
        shutil.copy(asset, staging / asset.name)

    repository = repository_url(repository)
    links = {"repository": repository, "guide": f"{repository}/blob/main/docs/submit.md" if repository else None}
    colours = assign_colours(rows.entry.unique())
    tasks = []
    for task_id in task_order(rows.task.unique()):
        spec = load_registered_task(task_id)
        attack = spec.attacks[0]
        boards = _task_boards(rows, spec, attack, collected.skipped)
        for b in boards:
            _render_board(env, staging, rows, spec, attack, b, boards, links, colours)
        threats = [{"threat": threat,
                    "boards": [b for b in boards if b["threat"] == threat and b["view"] != STRONGEST],
                    "strongest": [b for b in boards if b["threat"] == threat and b["view"] == STRONGEST]}
                   for threat in spec.threat_models]
        tasks.append({"spec": spec, "attack": attack, "threats": threats})

    if not any(th["boards"] for t in tasks for th in t["threats"]):
        raise BenchError(f"{submissions}: no board can be built: "
                         + "; ".join(line for line in collected.skipped if line.startswith("board "))[:2000])
    headline_attack = {t["spec"].id: t["attack"] for t in tasks}
    plans = {t["spec"].id: list(t["spec"].plans) for t in tasks}
    for name, spec in collected.submissions.items():
        _render_entry(env, staging, rows, name, spec, headline_attack, plans, links, colours)

    headline_rows = rows[rows.task.map(headline_attack) == rows.attack]
    _downloads(headline_rows.sort_values(["task", "threat_model", "plan", "tpr_at_0_1pct_fpr"]), staging, "results")
    index = env.get_template("index.html.j2").render(root="", title="mia-ptq-bench leaderboard", tasks=tasks,
                                                     entries=collected.submissions, skipped=collected.skipped,
                                                     links=links)
    write_text_atomic(staging / "index.html", index)
    return {"boards": sum(len(th["boards"]) + len(th["strongest"]) for t in tasks for th in t["threats"]),
            "entries": len(collected.submissions), "skipped": collected.skipped}


def _task_boards(rows: pd.DataFrame, spec, attack: str, skipped: list[str]) -> list[dict]:
    """Every board of one task that can be published, in the task's order: threat model, view, plan."""
    boards = []
    for threat in spec.threat_models:
        for view in (attack, STRONGEST):
            for plan in spec.plans:
                table = board(rows, spec.id, threat, plan, view)
                if table.empty:
                    continue
                missing = missing_references(table)
                if missing:  # a board is only published beside its references: leave this one out, say why
                    line = (f"board {spec.id}/{threat}/{plan}: no result from the reference "
                            f"submission(s) {', '.join(missing)}; every board shows fp32 and rtn")
                    if line not in skipped:  # the headline and the strongest view of a board miss the same
                        skipped.append(line)
                    continue
                name = board_name(spec.id, threat, plan) + ("--strongest" if view == STRONGEST else "")
                boards.append({"plan": plan, "threat": threat, "name": name, "view": view, "frame": table,
                               "table": table.to_dict("records")})
    return boards


def _render_board(env: Environment, staging: Path, rows: pd.DataFrame, spec, attack: str, b: dict,
                  siblings: list[dict], links: dict, colours: dict[str, str]) -> None:
    """One board page, its CSV and JSON; ``siblings`` are every board of the task, for the navigation."""
    table, threat, plan, view, name = b["frame"], b["threat"], b["plan"], b["view"], b["name"]
    _downloads(table, staging / "boards", name)
    shown = "the strongest attack per target" if view == STRONGEST else view
    title = f"{spec.id} · {threat} · {plan}" + (" · strongest attack" if view == STRONGEST else "")
    scatter = privacy_utility(_points(table, colours), f"Privacy against utility: {title}", PLOT_FLOOR, name + "--scatter")
    rocs = None
    if view != STRONGEST:  # the strongest view mixes attacks per target: no single ROC to draw
        curves = [Curve(r.display_name, colours[r.entry], r.roc_fpr, r.roc_tpr, bool(r.reference))
                  for r in table.itertuples()]
        rocs = roc_curves(curves, f"ROC ({attack}): {title}", roc_floor(_negatives_per_target(table)), name + "--roc")
    page = env.get_template("board.html.j2").render(
        root="../", title=title, task=spec, threat=threat, shadows=THREAT_MODELS.get(threat).shadows, plan=plan,
        attack=shown, name=name,
        strongest=view == STRONGEST, table=b["table"], scatter=scatter, rocs=rocs,
        floor=PLOT_FLOOR, siblings=siblings, current=b, links=links)
    write_text_atomic(staging / "boards" / f"{name}.html", page)


def _render_entry(env: Environment, staging: Path, rows: pd.DataFrame, name: str, spec,
                  headline_attack: dict[str, str], plans: dict[str, list[str]], links: dict,
                  colours: dict[str, str]) -> None:
    """One entry page: metadata, the effective config, its results per task and threat model with ROC curves
    beside the full-precision reference's."""
    mine = rows[(rows.entry == name) & rows.task.isin(list(headline_attack))]
    headline = mine[mine.task.map(headline_attack) == mine.attack]
    groups = []
    for (task_id, threat), part in headline.groupby(["task", "threat_model"], sort=True):
        order = plan_key(plans[task_id])
        part = part.sort_values("plan", key=lambda column: column.map(order))
        colour = colours.get(name, colour_for(name))
        curves = [Curve(r.plan, colour, r.roc_fpr, r.roc_tpr, r.plan == "fp32", DASHES[i % len(DASHES)])
                  for i, r in enumerate(part.itertuples())]
        if name != "fp32":  # the yardstick every curve is read against
            fp32 = rows[(rows.entry == "fp32") & (rows.task == task_id) & (rows.threat_model == threat)
                        & (rows.attack == headline_attack[task_id])]
            curves += [Curve("fp32 (reference)", colour_for("fp32"), r.roc_fpr, r.roc_tpr, True) for r in fp32.itertuples()]
        key = f"{task_id}--{threat}"
        groups.append({"task": task_id, "threat": threat, "key": key, "rows": part.to_dict("records"),
                       "rocs": roc_curves(curves, f"ROC of {spec.display_name}: {task_id} · {threat}",
                                          roc_floor(_negatives_per_target(part)), key)})
    submitted = json.dumps(spec.quantizer.config, indent=2, sort_keys=True)
    # What a reader runs, in a clone of the repository, to check this entry's numbers on their machine.
    reproduce = [f"mptq-bench reproduce submissions/{name} --task {task_id}" for task_id in sorted(set(mine.task))]
    page = env.get_template("entry.html.j2").render(
        root="../", title=spec.display_name, entry=spec, groups=groups, submitted=submitted,
        configs=effective_configs(mine, plans), reproduce=reproduce, links=links)
    write_text_atomic(staging / "entries" / f"{name}.html", page)


__all__ = ["build_site", "repository_url", "safe_url"]
