"""The ``mptq-bench`` command: parse, call the library, render with rich."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.markup import escape as escape_markup
from rich.table import Table

from .errors import BenchError, printable
from .extensions import in_package

app = typer.Typer(add_completion=False, no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]},
                  help="Membership-inference benchmark for post-training-quantized networks.")
# User text (file names, display names, error messages quoting input) is printed through ``escape``: a name
# such as '[/]' must print as itself, not crash rich's markup parser; and emoji codes stay off, so that
# 'nosuch.py:x:' is not rendered as an emoji.
console = Console(emoji=False)
errors = Console(stderr=True, emoji=False)
T = TypeVar("T")


def escape(text: str) -> str:
    """Text rich prints literally: its markup escaped, control characters but line breaks written out."""
    return escape_markup(printable(text, newlines=True))


def one_line(text: str) -> str:
    """A problem line (it may quote a submission's file names): literal, and never more than one line."""
    return escape_markup(printable(text))


def _say_waiting(line: str) -> None:
    """What a command that uses the cache says, once, while a `cache clear` holds it (``cache.in_use``)."""
    errors.print(one_line(line), highlight=False, soft_wrap=True)


def guarded(action: Callable[[], T]) -> T:
    """Expected failures become one red line on stderr and exit code 2, never a traceback."""
    try:
        return action()
    except BenchError as exc:
        errors.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        _file_system_error(exc)
        raise typer.Exit(2) from None


def _raised_by_the_benchmark(exc: BaseException) -> bool:
    """Whether the deepest frame of ``exc``'s traceback outside the standard library is this package's own:
    the benchmark touching a path it was given. An error raised in a plugin's code or a library keeps its
    traceback, which its author needs."""
    import sysconfig

    paths = sysconfig.get_paths()
    libraries = (paths["purelib"], paths["platlib"])
    deepest, frame = None, exc.__traceback__
    while frame is not None:
        name = frame.tb_frame.f_code.co_filename
        if not (name.startswith("<") or name.startswith(paths["stdlib"]) and not name.startswith(libraries)):
            deepest = name
        frame = frame.tb_next
    return deepest is not None and in_package(deepest)


def _file_system_error(exc: OSError) -> None:
    """The file system refusing a path the user gave (too long, a loop, read-only, full...): one line. An
    OSError raised elsewhere (a plugin's or a library's code) is raised again, traceback and all."""
    if not _raised_by_the_benchmark(exc):
        raise exc
    where = f"{exc.filename}: " if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{exc.filename} -> {exc.filename2}: "
    errors.print(f"[bold red]error:[/] {escape(where + (exc.strerror or str(exc)))}", markup=True, highlight=False,
                 soft_wrap=True)


def run() -> None:
    """The ``mptq-bench`` command: ``app``, with an OSError the benchmark's own code met on a path (and no
    command handled) as one line, exit code 2, instead of a traceback."""
    try:
        app(prog_name="mptq-bench")
    except OSError as exc:
        _file_system_error(exc)
        sys.exit(2)


def _path(text: str | Path) -> Path:
    """A path option's text as a Path; an empty one is refused, where ``Path("")`` would quietly mean the
    current folder. (A default arrives as a Path already.)"""
    if isinstance(text, Path):
        return text
    if not text.strip():
        raise typer.BadParameter("an empty path; give a file or folder ('.' for the current folder)")
    return Path(text)


def _path_option(**settings):
    """``typer.Option`` for a path: parsed by ``_path``, shown as PATH."""
    return typer.Option(parser=_path, metavar="PATH", **settings)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"mia-ptq-bench {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="print the version and exit")] = False) -> None:
    """Membership-inference benchmark for post-training-quantized networks."""


def _split_list(text: Optional[str], option: str = "") -> Optional[list[str]]:
    """A comma-separated option's items (None when the option is not given); an option given with no
    item, an empty item or an item twice is refused rather than read as the default, skipped or run twice."""
    if text is None:
        return None
    items = [part.strip() for part in text.split(",")]
    if not any(items):
        raise BenchError(f"{option}: no item in {text!r} (leave the option out for the task's own)")
    if not all(items):  # 'w4,,w2' or 'w4,': a typo, not a list of two
        raise BenchError(f"{option}: an empty item in {text!r}")
    twice = sorted({item for item in items if items.count(item) > 1})
    if twice:
        raise BenchError(f"{option}: {', '.join(twice)} given twice")
    return items


def make_quantizer(cls, settings: list[str], base: dict | None = None, source: str = "--set"):
    """Instantiate a quantizer class with ``KEY=VALUE`` overrides of its config (values parsed as YAML);
    ``source`` names where ``base`` came from, for the error message."""
    import yaml
    from pydantic import ValidationError

    from .spec.loader import format_validation_error

    config = dict(base or {})
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BenchError(f"--set {item!r}: expected KEY=VALUE")
        try:
            config[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise BenchError(f"--set {item!r}: the value is not valid YAML ({' '.join(str(exc).split())[:160]})") from None
    try:
        return cls(config)
    except ValidationError as exc:
        where = "--set" if not base else source if not settings else f"{source} and --set"
        raise BenchError(format_validation_error(f"{cls.name} config ({where})", exc)) from None


@app.command()
def evaluate(
    quantizer: Annotated[str, typer.Argument(help="quantizer: a registered name, an entry point, a submission, file.py:Class or module:Class")],
    task: Annotated[str, typer.Option(help="task id or path to a task .yaml")] = "digits-mlp",
    plans: Annotated[Optional[str], typer.Option(help="comma-separated plans, e.g. w4,w1.58-last8 (default: the task's)")] = None,
    threat_models: Annotated[Optional[str], typer.Option("--threat-models", help="comma-separated, of oblivious, adaptive-rtn, adaptive (default: the task's)")] = None,
    device: Annotated[Optional[str], typer.Option(help="torch device (default: cuda when present, else cpu)")] = None,
    out: Annotated[Path, _path_option(help="results folder")] = Path("results"),
    cache_dir: Annotated[Optional[Path], _path_option(help="cache folder (default: $MPTQ_CACHE or ~/.cache/mia-ptq-bench)")] = None,
    data_root: Annotated[Optional[Path], _path_option(help="dataset folder (default: $MPTQ_DATA or ~/.cache/mia-ptq-bench/data)")] = None,
    download: Annotated[bool, typer.Option(help="allow downloading a missing dataset with torchvision")] = False,
    attack: Annotated[Optional[str], typer.Option(help="attack shown in the table (default: the task's first)")] = None,
    setting: Annotated[Optional[list[str]], typer.Option("--set", help="quantizer config KEY=VALUE (repeatable), e.g. --set iters=2000")] = None,
    submission: Annotated[Optional[Path], _path_option(help="write results into this submission folder (and its manifest)")] = None,
    submissions: Annotated[Path, _path_option(help="where submission folders are looked up by name")] = Path("submissions"),
    executor: Annotated[str, typer.Option(help="local, or ray: pool training and the quantization grid as Ray tasks")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(help="an existing Ray cluster (default: start a local Ray)")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="processes to train and quantize in, each with its share of the threads (default: 2 on a CPU for long work, else 1; executor local)")] = None,
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="train a missing pool under bfloat16 autocast: faster where the device has native bfloat16, not float32's bits (default: on a CUDA GPU with native bfloat16, never on a CPU; a resumed pool keeps the arithmetic it was started in)")] = None,
    plugin: Annotated[Optional[list[str]], typer.Option("--plugin", help="a module or .py file that registers datasets, models, quantizers or attacks (repeatable; also $MPTQ_PLUGINS)")] = None,
) -> None:
    """Quantize the task's targets at each plan, attack them with LiRA, write validated results."""
    from .submission.resolve import resolve, submission_quantizer
    from .report import RichProgress, attacks_table, results_table
    from .attack import THREAT_MODELS
    from .runner import RunOptions, check_task, evaluate as run_evaluate
    from .spec import PrecisionPlan, load_task
    from .executor import make_executor
    from .extensions import load_extensions
    from .submission import load_submission, write_manifest

    def action() -> None:
        extensions = load_extensions(plugin or [])
        spec = load_task(task)
        check_task(spec, task)
        found = submission_quantizer(submission) if submission else resolve(quantizer, submissions, "--submissions")
        if submission and setting:
            raise BenchError("--set cannot be combined with --submission: record the config in the submission's "
                             "submission.yaml (quantizer.config) so that its results say how they were made")
        if submission and found.name != quantizer:
            raise BenchError(f"--submission {submission} holds quantizer {found.name!r}, not {quantizer!r}")
        listed = load_submission(submission).tasks if submission else [spec.id]
        if spec.id not in listed:  # validate would refuse the folder with results for an unlisted task
            raise BenchError(f"--task {spec.id}: not among the tasks {submission / 'submission.yaml'} lists "
                             f"({', '.join(listed)}); add it there first")
        # A malformed plan or threat is refused before the run's header.
        plan_list, threat_list = _split_list(plans, "--plans"), _split_list(threat_models, "--threat-models")
        asked = [str(PrecisionPlan.parse(text)) for text in plan_list or []]
        for name in threat_list or []:
            THREAT_MODELS.get(name)
        held = found.cls.default_plans or list(spec.plans)  # what validate expects of this submission
        extra = [p for p in asked if p not in held]
        if submission and extra:  # validate would refuse their files
            raise BenchError(f"--plans {','.join(extra)}: not among the plans this submission holds for the task "
                             f"({', '.join(held)})")
        if workers is not None and executor != "local":
            raise BenchError(f"--workers {workers}: for the local executor; with --executor {executor} the executor "
                             "places the work")
        chosen = make_quantizer(found.cls, setting or [], found.config, f"{found.source}: quantizer.config")
        options = RunOptions(out_dir=submission / "results" if submission else out, data_root=data_root,
                             download=download, per_quantizer_folder=submission is None,
                             executor=make_executor(executor, ray_address), workers=workers, amp=amp,
                             extensions=extensions, task_source=task)
        _place(options, cache_dir, device)
        if attack is not None and not attack.strip():
            raise BenchError("--attack: empty (leave the option out for the task's first attack)")
        shown = attack or spec.attacks[0]
        if shown not in spec.attacks:
            raise BenchError(f"--attack {shown!r} is not among the task's attacks: {', '.join(spec.attacks)}")
        console.print(f"[bold]{escape(spec.id)}[/] v{spec.version} (task hash {spec.hash[:12]}) · quantizer "
                      f"[bold]{escape(str(chosen.name))}[/] · device {escape(str(options.device))}", highlight=False)
        started = time.time()
        with RichProgress(console) as progress:
            outcome = run_evaluate(chosen, spec, plan_list, threat_list, options, progress)
        console.print(results_table(outcome.results, shown))
        console.print(attacks_table(outcome.results))
        for path in outcome.paths:
            console.print(f"wrote {escape(str(path))}", highlight=False)
        if submission:
            console.print(f"wrote {escape(str(write_manifest(submission, started)))}", highlight=False)

    guarded(action)


@app.command()
def tasks(plugin: Annotated[Optional[list[str]], typer.Option("--plugin", help="extension module or .py file (repeatable)")] = None) -> None:
    """List the available task specs."""
    from .extensions import load_extensions
    from .spec import available_tasks, load_task

    def action() -> None:
        load_extensions(plugin or [])
        table = Table(title="tasks", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("id", "v", "model", "models/targets", "hash", "plans"):
            table.add_column(column, no_wrap=column != "plans")
        broken = []
        for path in available_tasks().values():
            try:
                spec = load_task(path)
            except BenchError as exc:  # one bad file hides no other task
                broken.append(str(exc))
                continue
            width = "" if spec.model.width == 1 else f" ×{spec.model.width:g}"
            table.add_row(*map(escape, (spec.id, str(spec.version), spec.model.arch + width,
                                        f"{spec.membership.n_models}/{spec.targets.count}", spec.hash[:8],
                                        " ".join(spec.plans))))
        # Piped, rich assumes 80 columns and would cut the plans to "w1…": a file or a pipe gets the whole table.
        needed = console.measure(table, options=console.options.update_width(1000)).maximum
        (console if console.is_terminal else Console(emoji=False, width=max(console.width, needed))).print(table)
        for problem in broken:
            errors.print(f"[bold red]invalid:[/] {one_line(problem)}", highlight=False, soft_wrap=True)
        if broken:
            raise typer.Exit(1)

    guarded(action)


@app.command()
def quantizers(
    submissions: Annotated[Path, _path_option(help="submissions folder to list")] = Path("submissions"),
) -> None:
    """List the quantizers that can be found: built-in, entry points, submissions."""
    from .quantize.plugins import ENTRY_POINT_GROUP
    from .submission.resolve import discover

    table = Table(title="quantizers", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption=f"Also: any package.module:Class; packages register under the entry-point group "
                          f"'{ENTRY_POINT_GROUP}'.", caption_justify="left")
    for column in ("name", "source", "description"):
        table.add_column(column, no_wrap=column == "name")
    for name, source, description in discover(submissions):
        table.add_row(escape(str(name)), escape(str(source)), escape(str(description)))
    console.print(table)


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(parser=_path, help="task .yaml, result .json, or submission folders")],
    plugin: Annotated[Optional[list[str]], typer.Option("--plugin", help="extension module or .py file whose names a task uses (repeatable)")] = None,
    recompute: Annotated[bool, typer.Option(help="also recompute every result from its committed quantized weights against the task's pool (trained or pulled if not cached); runs no submitted code")] = False,
    cache_dir: Annotated[Optional[Path], _path_option(help="cache folder for --recompute")] = None,
    data_root: Annotated[Optional[Path], _path_option(help="dataset folder for --recompute (default: $MPTQ_DATA or ~/.cache/mia-ptq-bench/data)")] = None,
    download: Annotated[bool, typer.Option(help="allow downloading a missing dataset for --recompute")] = False,
) -> None:
    """Check task specs, result files and submissions: schema, checksums, bit-width audit; numbers
    recomputed from a result's arrays (.npz), or from its quantized weights with --recompute.

    A submission folder as committed holds no arrays: its numbers are checked only with --recompute
    (what CI runs on a pull request, before `reproduce`). Submitted code is never imported or run.
    """
    from .budget import Machine, check_budget
    from .cache import default_cache_dir
    from .environment import default_device
    from .results.verify import verify_result
    from .runner import check_task
    from .spec import load_task
    from .extensions import load_extensions
    from .submission import submission_problems

    guarded(lambda: load_extensions(plugin or []))
    failures = 0
    for path in files:
        if path.is_dir():
            for folder, problems in submission_problems(path).items():
                for line in problems:
                    errors.print(f"[bold red]invalid:[/] {one_line(line)}", highlight=False, soft_wrap=True)
                if problems:
                    failures += 1
                elif recompute:  # the verdict on its numbers follows, result by result
                    console.print(f"[green]files ok[/] {one_line(str(folder))}: schema, checksums, audit", highlight=False,
                                  soft_wrap=True)
                else:
                    console.print(f"[green]ok[/] {one_line(str(folder))} [dim](numbers not recomputed: --recompute does that, as CI does)[/]",
                                  highlight=False, soft_wrap=True)
            continue
        try:
            note = None
            if path.suffix in (".yaml", ".yml"):
                spec = load_task(path)
                check_task(spec, str(path))
                # the task's cost on this machine, estimated without training; refused when absurd here
                device, cache = default_device(), default_cache_dir()
                budget = check_budget(spec, device, cache, source=str(path))
                note = (budget.summary(Machine.current(device, cache)) if budget is not None else
                        f"not estimated: dataset {spec.dataset.name!r} registers no shape in "
                        "mia_ptq_bench.data.DATASET_SHAPES (evaluate estimates it once the data is loaded)")
            elif path.suffix == ".json":
                verify_result(path, arrays_required=not recompute)
            elif not path.exists():
                raise BenchError(f"{path}: no such file or folder")
            else:
                raise BenchError(f"{path}: not a task (.yaml) or result (.json) file")
            console.print(f"[green]ok[/] {escape(str(path))}", highlight=False)
            if note:
                console.print(f"  budget: {escape(note)}", highlight=False, soft_wrap=True)
        except BenchError as exc:
            failures += 1
            for line in str(exc).splitlines():
                errors.print(f"[bold red]invalid:[/] {one_line(line)}", highlight=False, soft_wrap=True)
    if recompute and not failures:
        failures += _recompute_all(files, _cache_dir(cache_dir), data_root, download)
    elif recompute:
        errors.print("[bold red]not recomputed:[/] no number is recomputed until the problems above are fixed",
                     highlight=False)
    if failures:
        raise typer.Exit(1)


def _recompute_all(files: list[Path], cache_dir: Path, data_root: Optional[Path], download: bool) -> int:
    """Recompute every result among ``files`` (submission folders included); returns how many disagree."""
    from .recompute import RECOMPUTED, REFUSED, recompute_files
    from .submission import MANIFEST, find_submissions

    results = []
    for path in files:
        if path.is_dir():
            results += [p for f in find_submissions(path) for p in sorted((f / "results").glob("*/*.json"))
                        if p.name != MANIFEST]
        elif path.suffix == ".json":
            results.append(path)
    failures = 0
    for outcome in guarded(lambda: recompute_files(results, cache_dir, data_root, download, waiting=_say_waiting)):
        if outcome.status == RECOMPUTED:
            console.print(f"[green]recomputed[/] {one_line(str(outcome.path))}", highlight=False)
        elif outcome.status == REFUSED:
            failures += 1
            errors.print(f"[bold red]invalid:[/] {one_line(str(outcome.path))}: recomputed from its evidence: "
                         f"{one_line(outcome.reason)}", highlight=False, soft_wrap=True)
        else:
            console.print(f"[yellow]self-reported[/] {one_line(str(outcome.path))}: {one_line(outcome.reason)}",
                          highlight=False, soft_wrap=True)
    return failures


@app.command()
def reproduce(
    paths: Annotated[list[Path], typer.Argument(parser=_path, help="result .json files or submission folders")],
    device: Annotated[Optional[str], typer.Option(help="torch device (default: cuda when present, else cpu)")] = None,
    cache_dir: Annotated[Optional[Path], _path_option(help="cache folder (default: $MPTQ_CACHE or ~/.cache/mia-ptq-bench)")] = None,
    data_root: Annotated[Optional[Path], _path_option(help="dataset folder (default: $MPTQ_DATA or ~/.cache/mia-ptq-bench/data)")] = None,
    download: Annotated[bool, typer.Option(help="allow downloading a missing dataset with torchvision")] = False,
    plugin: Annotated[Optional[list[str]], typer.Option("--plugin", help="extension module or .py file (repeatable)")] = None,
    show: Annotated[str, typer.Option(help="rows to print: failed, headline or all")] = "headline",
    task: Annotated[Optional[list[str]], typer.Option("--task", help="only the results of this task (repeatable)")] = None,
) -> None:
    """Rerun committed results on this machine; compare every headline number with the committed one.

    Same environment: every number must be equal. Another machine: within the tolerance of
    docs/reproducibility.md. Exits 1 if any number is outside it. Runs a submission's code.
    """
    from .extensions import load_extensions
    from .report import RichProgress, reproduction_table
    from .reproduce import reproduce as run_reproduce
    from .runner import RunOptions

    def action() -> None:
        options = RunOptions(data_root=data_root, download=download, extensions=load_extensions(plugin or []))
        _place(options, cache_dir, device)
        with RichProgress(console) as progress:
            outcomes = run_reproduce(paths, options, progress, tasks=task)
        console.print(reproduction_table(outcomes, show))
        failed = [o for o in outcomes if not o.ok]
        console.print(f"{len(outcomes) - len(failed)} of {len(outcomes)} results reproduced within tolerance")
        if failed:
            raise typer.Exit(1)

    guarded(action)


pool_app = typer.Typer(no_args_is_help=True, help="Share pools on the Hugging Face Hub.")
app.add_typer(pool_app, name="pool")


@pool_app.command("push")
def pool_push(
    task: Annotated[str, typer.Argument(help="task id or .yaml path whose cached pool to upload")],
    repo: Annotated[str, typer.Option(help="Hub model repository, ORG/NAME")],
    private: Annotated[bool, typer.Option(help="create the repository private")] = False,
    cache_dir: Annotated[Optional[Path], _path_option(help="cache folder")] = None,
) -> None:
    """Upload a task's complete cached pool (weights, masks, scores, manifest with sha256 per file)."""
    from .pool import PoolStore
    from .pool.hub import push_pool
    from .spec import load_task

    def action() -> None:
        spec = load_task(task)
        commit = push_pool(PoolStore(_cache_dir(cache_dir), spec), repo, private, waiting=_say_waiting)
        console.print(escape(f"pushed the pool of {spec.id} to {repo} at commit {commit}"), highlight=False)

    guarded(action)


@pool_app.command("pull")
def pool_pull(
    task: Annotated[str, typer.Argument(help="task id or .yaml path the pool is for")],
    repo: Annotated[str, typer.Option(help="Hub model repository, ORG/NAME")],
    revision: Annotated[Optional[str], typer.Option(help="commit hash, branch or tag (default: main)")] = None,
    cache_dir: Annotated[Optional[Path], _path_option(help="cache folder")] = None,
    data_root: Annotated[Optional[Path], _path_option(help="compare the pool's data hash with the task's data in this folder before installing it (without it, a run compares it before it uses the pool)")] = None,
    download: Annotated[bool, typer.Option(help="with --data-root: allow downloading a missing dataset with torchvision")] = False,
    plugin: Annotated[Optional[list[str]], typer.Option("--plugin", help="with --data-root: extension module or .py file that registers the task's dataset (repeatable; also $MPTQ_PLUGINS)")] = None,
) -> None:
    """Download a pool, check its task hash and every file's sha256 (with --data-root, its data hash too), install it into the cache."""
    from .data import load_dataset
    from .extensions import load_extensions
    from .pool.hub import pull_pool
    from .spec import load_task

    def action() -> None:
        spec = load_task(task)
        data_sha256 = None
        if data_root is not None:
            load_extensions(plugin or [])
            data_sha256 = load_dataset(spec.dataset, data_root, download).digest()
        source = pull_pool(spec, _cache_dir(cache_dir), repo, revision, data_sha256, waiting=_say_waiting)
        if data_sha256 is None:
            console.print("the pool's data hash was not compared with local data (no --data-root); a run compares "
                          "it before it uses the pool", highlight=False)
        console.print(escape(f"pulled the pool of {spec.id} from {source.repo} at commit {source.revision}; "
                             f"pin it in the task with hub: {{repo: {source.repo}, revision: {source.revision}}}"),
                      highlight=False)

    guarded(action)


cache_app = typer.Typer(no_args_is_help=True, help="The cache of pools and quantized outputs.")
app.add_typer(cache_app, name="cache")


def _place(options, cache_dir: Optional[Path], device: Optional[str]) -> None:
    """Apply --cache-dir and --device to a run's options (the device checked before any work starts)."""
    if cache_dir is not None:
        options.cache_dir = cache_dir
    if device is not None:
        from .environment import usable_device

        options.device = usable_device(device)


def _cache_dir(cache_dir: Optional[Path]) -> Path:
    from .cache import default_cache_dir

    return cache_dir if cache_dir is not None else default_cache_dir()


@cache_app.command("list")
def cache_list(cache_dir: Annotated[Optional[Path], _path_option(help="cache folder")] = None) -> None:
    """Pools, quantized outputs and reproduce scratch in the cache, with their sizes."""
    from .cache_admin import list_cache

    folder = _cache_dir(cache_dir)
    table = Table(title=f"cache: {escape(str(folder))}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("kind", "task", "what", "size"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for entry in guarded(lambda: list_cache(folder)):
        table.add_row(escape(entry.kind), escape(entry.task), escape(entry.detail), f"{entry.bytes / 2**20:.1f} MiB")
    console.print(table)


@cache_app.command("clear")
def cache_clear(
    kind: Annotated[str, typer.Argument(help="pool, quantized, scratch or all")] = "all",
    task: Annotated[Optional[str], typer.Option(help="only this task's entries")] = None,
    cache_dir: Annotated[Optional[Path], _path_option(help="cache folder")] = None,
) -> None:
    """Remove cached pools and quantized outputs (recomputed when needed) and killed reproduce runs' scratch."""
    from .cache_admin import clear_cache

    if kind not in ("pool", "quantized", "scratch", "all"):
        errors.print(f"[bold red]error:[/] unknown kind {escape(repr(kind))}; choose pool, quantized, scratch or all")
        raise typer.Exit(2)
    removed = guarded(lambda: clear_cache(_cache_dir(cache_dir), kind, task))
    console.print(f"removed {len(removed)} entries ({sum(e.bytes for e in removed) / 2**20:.1f} MiB)")


leaderboard_app = typer.Typer(no_args_is_help=True, help="The static leaderboard site.")
app.add_typer(leaderboard_app, name="leaderboard")


@leaderboard_app.command("build")
def leaderboard_build(
    out: Annotated[Path, _path_option(help="folder for the built site: new, empty, or a site this command built (replaced whole)")] = Path("site"),
    submissions: Annotated[Path, _path_option(help="submissions folder")] = Path("submissions"),
    recompute: Annotated[bool, typer.Option(help="recompute every result from its committed quantized weights and label "
                                                 "it recomputed or self-reported; leave out what disagrees")] = False,
    cache_dir: Annotated[Optional[Path], _path_option(help="cache folder for --recompute")] = None,
    data_root: Annotated[Optional[Path], _path_option(help="dataset folder for --recompute (default: $MPTQ_DATA or ~/.cache/mia-ptq-bench/data)")] = None,
    download: Annotated[bool, typer.Option(help="allow downloading a missing dataset for --recompute")] = False,
    repository: Annotated[Optional[str], typer.Option(help="http(s) URL of the repository the site links to (default: the "
                                                            "one GitHub Actions builds, else no link)")] = None,
) -> None:
    """Render every validated result under submissions/ into a static site."""
    from .board.build import build_site, check_out, repository_url

    def action() -> None:
        if not submissions.is_dir():
            raise BenchError(f"{submissions}: no such folder (give --submissions the folder that holds the "
                             "submission folders)")
        if repository is not None and repository_url(repository) is None:
            raise BenchError(f"--repository: {repository!r} is not an http(s) URL")
        check_out(submissions, out)  # before any recomputation, which can take long
        checks = _site_checks(submissions, _cache_dir(cache_dir), data_root, download) if recompute else None
        summary = build_site(submissions, out, checks, repository)
        for line in summary["skipped"]:
            errors.print(f"[yellow]left out:[/] {one_line(line)}", highlight=False, soft_wrap=True)
        console.print(escape(f"built {summary['boards']} boards and {summary['entries']} entry pages into "
                             f"{summary['out']}/index.html"), highlight=False)

    guarded(action)


def _site_checks(submissions: Path, cache_dir: Path, data_root: Optional[Path], download: bool) -> dict:
    """For every result the site would publish: recomputed (with the checker's own numbers, which the site
    shows), self-reported or refused, and why. Only submissions that validate are recomputed (the build
    leaves the others out): nothing refused is trained for or read."""
    from .board.collect import Check, published_files, validated
    from .recompute import recompute_files
    from .submission import find_submissions, load_submission

    files = []
    for folder in find_submissions(submissions):
        try:
            problems, stale = validated(folder)
        except Exception:  # noqa: BLE001 - as the build itself (board.collect): one submission left out, not the site
            continue
        if not problems:
            files += [path for _, path in published_files(folder, load_submission(folder)) if path not in stale]
    return {outcome.path.resolve(): Check(outcome.status, outcome.reason, outcome.rerun)
            for outcome in recompute_files(files, cache_dir, data_root, download, waiting=_say_waiting)}


@app.command()
def findings(
    task: Annotated[str, typer.Option(help="task id")] = "digits-mlp",
    out: Annotated[Optional[Path], _path_option(help="markdown file to write (default: docs/findings-<task>.md); its figures go to figures/ beside it")] = None,
    submissions: Annotated[Path, _path_option(help="submissions folder")] = Path("submissions"),
) -> None:
    """Write the study's questions, answered from the committed results of one task, with figures."""
    from .findings import write_findings

    def action() -> None:
        path = out or Path("docs") / f"findings-{task}.md"
        command = f"mptq-bench findings --task {task}" + (f" --out {out}" if out else "")
        figures = write_findings(submissions, task, path, command)
        console.print(f"wrote {escape(str(path))} and its figures in {escape(str(figures))}", highlight=False)

    guarded(action)


@app.command()
def schema(kind: Annotated[str, typer.Argument(help="result or task")] = "result") -> None:
    """Print the JSON Schema of result documents (or of task specs)."""
    from .results.schema import Result
    from .spec.schema import TaskSpec

    models = {"result": Result, "task": TaskSpec}
    if kind not in models:
        errors.print(f"[bold red]error:[/] unknown schema {escape(repr(kind))}; choose result or task")
        raise typer.Exit(2)
    sys.stdout.write(json.dumps(models[kind].model_json_schema(), indent=2) + "\n")


if __name__ == "__main__":  # pragma: no cover
    run()
