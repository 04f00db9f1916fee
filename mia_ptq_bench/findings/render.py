"""The study's questions answered from the committed results of one task: a markdown document and its figures.

Every number comes from a result file; the study's own CIFAR-100 figures (``study.yaml``) are
quoted beside them and marked *study*. Each answer is a sentence that states the conclusion
and its uncertainty: differences are paired over the targets (every method is evaluated on
the same targets) with a 95% Student-t interval, which the benchmark measured to be
conservative for its pools (docs/reproducibility.md).

Three attackers are compared throughout: the **study's** (oblivious, online LiRA, its
full-precision shadows), the **adaptive** one (online LiRA with shadows quantized like the
target), and the **strongest** (per target, the best strategy an attacker who knows the
quantizer finds on its own shadow models: any attack, full-precision or quantized shadows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..board.collect import published_files, validated
from ..board.palette import assign_colours, colour_for
from ..board.rank import pareto_front
from ..errors import BenchError
from ..metrics import summarize
from ..results.io import load_result
from ..results.schema import Evaluation, Result
from ..spec import load_task
from ..spec.plans import PrecisionPlan
from ..submission import REFERENCE_ENTRIES, find_submissions, load_submission

STUDY_ATTACK = "lira-online"


def study_numbers() -> dict[str, dict[str, tuple[float, float]]]:
    """The study's (test accuracy %, TPR@0.1%FPR) per method and plan, from ``study.yaml``."""
    data = yaml.safe_load(resources.files(__package__).joinpath("study.yaml").read_text(encoding="utf-8"))
    return {method: {plan: (cell["accuracy"], cell["tpr_at_0_1pct_fpr"]) for plan, cell in plans.items()}
            for method, plans in data["results"].items()}


@dataclass
class Loaded:
    results: dict[tuple[str, str, str], Result]  # (entry, plan, threat) -> result
    names: dict[str, str]  # entry -> display name (markdown-escaped)
    colours: dict[str, str]  # entry -> colour, as the leaderboard assigns them (no two alike)

    def get(self, entry: str, plan: str, threat: str) -> Result | None:
        return self.results.get((entry, plan, threat))


def load(submissions: Path, task: str) -> Loaded:
    """The current results of ``task`` from every submission that validates, as the leaderboard takes them
    (a submission ``validate`` refuses is left out, a stale result file on its own)."""
    results, names, entries = {}, {}, []
    current = load_task(task)
    for folder in find_submissions(submissions):
        try:
            problems, stale = validated(folder)
        except Exception:  # noqa: BLE001 - as the leaderboard: a validator failure costs the submission, not the page
            continue
        if problems:
            continue
        spec = load_submission(folder)
        entries.append(folder.name)
        for task_id, path in published_files(folder, spec):
            if task_id != task or path in stale:
                continue
            result = load_result(path)
            if result.task.hash == current.hash:
                results[(folder.name, result.plan, result.threat_model)] = result
                names[folder.name] = markdown_text(spec.display_name)
    if not results:
        raise BenchError(f"no current results for task {task!r} under {submissions}")
    return Loaded(results, names, assign_colours(entries))


def markdown_text(text: str) -> str:
    """``text`` with markdown's markup characters escaped: a display name is the submitter's free text."""
    return re.sub(r"([\\`*_\[\]<>|])", r"\\\1", text)  # links, emphasis, code, HTML and table cells


# -- per-target numbers and paired comparisons ------------------------------------------------------------

def tpr(evaluation: Evaluation, attack: str) -> np.ndarray:
    """Per-target TPR@0.1%FPR of one attack, or of each target's strongest strategy (``attack="strongest"``)."""
    if attack == "strongest":
        return np.array([t.strongest.tpr_at_0_1pct_fpr.tpr for t in evaluation.targets])
    return np.array([t.attacks[attack].tpr_at_0_1pct_fpr.tpr for t in evaluation.targets])


def accuracy(evaluation: Evaluation) -> np.ndarray:
    return np.array([t.test_accuracy for t in evaluation.targets])


def pp(values: np.ndarray) -> str:
    """Mean in percentage points with its 95% interval over targets: ``+1.23 pp [0.45, 2.01]``."""
    s = summarize(100 * values, bounds=None)
    return f"{s.mean:+.2f} pp [{s.ci_low:+.2f}, {s.ci_high:+.2f}]"


def significant(values: np.ndarray) -> bool:
    """Whether the 95% interval of ``values``' mean excludes zero; one value has no interval, so no verdict."""
    s = summarize(values, bounds=None)
    return s.n > 1 and (s.ci_low > 0 or s.ci_high < 0)


# Between two trainings of the same pool (two CPUs), the paired differences a verdict rests on moved by
# a median of 0.6-1.1 of their standard errors over targets (docs/reproducibility.md): a verdict that a
# move of one standard error would turn is as likely as not to read otherwise on another pool.
EDGE_STANDARD_ERRORS = 1.0
NEAR_EDGE = "near the edge"


def near_edge(values: np.ndarray, rise: bool = False) -> bool:
    """Whether moving the mean of ``values`` by EDGE_STANDARD_ERRORS standard errors would turn the verdict
    ``significant`` gives (its 95% interval excludes zero), or with ``rise`` the one-sided verdict
    ``significant and mean > 0`` (a rise): its lower end crosses zero."""
    s = summarize(values, bounds=None)
    if s.n < 2 or s.std == 0:
        return False
    standard_error = s.std / np.sqrt(s.n)
    half_width = (s.ci_high - s.ci_low) / 2
    distance = s.mean - half_width if rise else abs(s.mean) - half_width  # how far the verdict's edge is from 0
    return bool(abs(distance) < EDGE_STANDARD_ERRORS * standard_error)


def edge(values: np.ndarray, rise: bool = False) -> str:
    """`` (near the edge)`` after a verdict on ``values`` that another pool may well turn, else nothing."""
    return f" ({NEAR_EDGE})" if near_edge(values, rise) else ""


def pct(value: float, digits: int = 2) -> str:
    return f"{100 * value:.{digits}f}%"


def cut(before: float, after: float) -> str:
    """How much lower ``after`` is than ``before``, in words a reader can take away."""
    if before <= 0:
        return "no leakage to cut"
    share = 1 - after / before
    return f"{100 * share:.0f}% lower" if share >= 0 else f"{100 * -share:.0f}% higher"


# -- the figures -----------------------------------------------------------------------------------------

def plan_order(plans: list[str]) -> list[str]:
    """Most bits first: w4, w2, w1.58, then the -last variants (text order would put w1.58 first)."""
    return sorted(plans, key=lambda p: (PrecisionPlan.parse(p).last_bits is not None, -PrecisionPlan.parse(p).bits))


def _figures(data: Loaded, methods: list[str], plans: list[str], attackers: list[tuple[str, str, str]],
             fp: Evaluation, folder: Path, stem: str) -> list[tuple[str, str]]:
    """Render the figures as PNG files into ``folder``; returns (file name, alt text) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    floor = 1e-4

    def point(evaluation: Evaluation, attack: str) -> tuple[float, float, float]:
        s = summarize(tpr(evaluation, attack))
        return max(s.mean, floor), max(s.mean - s.ci_low, 0), max(s.ci_high - s.mean, 0)

    # 1. leakage against bits, one panel per attacker
    fig, axes = plt.subplots(1, len(attackers), figsize=(4.2 * len(attackers), 3.8), sharey=True, squeeze=False)
    x = np.arange(len(plans))
    for ax, (title, threat, attack) in zip(axes[0], attackers):
        ax.axhline(max(summarize(tpr(fp, attack if attack != "strongest" else "strongest")).mean, floor),
                   color=colour_for("fp32"), linestyle="--", linewidth=1, label="full precision")
        for method in methods:
            cells = [data.get(method, plan, threat) for plan in plans]
            shown = [(i, point(r.quantized, attack)) for i, r in enumerate(cells) if r is not None]
            if not shown:
                continue
            xs = [i for i, _ in shown]
            ys = [p[0] for _, p in shown]
            errors = np.array([[p[1] for _, p in shown], [p[2] for _, p in shown]])
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, color=data.colours.get(method, colour_for(method)),
                        label=data.names.get(method, method))
        ax.set_yscale("log")
        ax.set_xticks(x, plans)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("precision plan")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("TPR at 0.1% FPR (log; lower leaks less)")
    axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    name = f"{stem}-leakage-vs-bits.png"
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    written.append((name, "TPR at 0.1% FPR against the precision plan, per method, for each attacker"))

    # 2. accuracy against leakage, one panel per plan, the strongest attacker
    strongest_title, strongest_threat, _ = attackers[-1]
    fig, axes = plt.subplots(1, len(plans), figsize=(3.6 * len(plans), 3.6), sharey=True, squeeze=False)
    for ax, plan in zip(axes[0], plans):
        acc = summarize(accuracy(fp))
        leak = point(fp, "strongest")
        ax.errorbar([100 * acc.mean], [leak[0]], xerr=[[100 * (acc.mean - acc.ci_low)], [100 * (acc.ci_high - acc.mean)]],
                    yerr=[[leak[1]], [leak[2]]], marker="s", color=colour_for("fp32"), label="full precision")
        for method in methods:
            result = data.get(method, plan, strongest_threat)
            if result is None:
                continue
            acc = summarize(accuracy(result.quantized))
            leak = point(result.quantized, "strongest")
            ax.errorbar([100 * acc.mean], [leak[0]], xerr=[[100 * (acc.mean - acc.ci_low)], [100 * (acc.ci_high - acc.mean)]],
                        yerr=[[leak[1]], [leak[2]]], marker="o", color=data.colours.get(method, colour_for(method)),
                        label=data.names.get(method, method))
        ax.set_yscale("log")
        ax.set_title(plan, fontsize=10)
        ax.set_xlabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"TPR at 0.1% FPR, {strongest_title}")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    name = f"{stem}-accuracy-vs-leakage.png"
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    written.append((name, "Test accuracy against TPR at 0.1% FPR of the strongest attacker, per plan"))

    # 3. what each attacker gets, per method and plan: grouped bars
    fig, axes = plt.subplots(1, len(plans), figsize=(3.6 * len(plans), 3.6), sharey=True, squeeze=False)
    width = 0.8 / len(attackers)
    for ax, plan in zip(axes[0], plans):
        for k, (title, threat, attack) in enumerate(attackers):
            heights = []
            for method in methods:
                result = data.get(method, plan, threat)
                heights.append(summarize(tpr(result.quantized, attack)).mean if result else np.nan)
            ax.bar(np.arange(len(methods)) + (k - (len(attackers) - 1) / 2) * width, 100 * np.array(heights), width,
                   label=title, color=["#bbbbbb", "#56b4e9", "#0072b2", "#000000"][k % 4])
        ax.set_xticks(np.arange(len(methods)), [data.names.get(m, m) for m in methods], rotation=30, ha="right",
                      fontsize=8)
        ax.set_title(plan, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("TPR at 0.1% FPR (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    name = f"{stem}-attackers.png"
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    written.append((name, "TPR at 0.1% FPR per method and plan for the study's, the adaptive and the strongest attacker"))
    return written


# -- the document ----------------------------------------------------------------------------------------

def render(submissions: Path, task: str, figures: Path | None = None, figures_link: str = "figures",
           command: str | None = None) -> str:
    """The markdown; with ``figures``, the PNGs are written there and linked as ``figures_link/<name>``.
    ``command``: the command line that writes it, as the page says (default: ``findings --task <task>``)."""
    data = load(submissions, task)
    spec = load_task(task)
    plans = plan_order([p for p in spec.plans if any(k[1] == p for k in data.results)])
    submitted = sorted({entry for entry, _, _ in data.results} - set(REFERENCE_ENTRIES))
    methods = [m for m in ("rtn", *submitted) if any(k[0] == m for k in data.results)]
    threats = list(spec.threat_models)
    adaptive = "adaptive" if "adaptive" in threats else threats[-1]
    any_result = next(iter(data.results.values()))
    fp = any_result.reference
    fp_study = summarize(tpr(fp, STUDY_ATTACK))
    fp_strongest = summarize(tpr(fp, "strongest"))
    attackers = [("study's attacker (oblivious, online LiRA)", "oblivious", STUDY_ATTACK)]
    if adaptive != "oblivious":
        attackers.append((f"{adaptive} attacker, online LiRA", adaptive, STUDY_ATTACK))
    attackers.append((f"strongest attacker ({adaptive})", adaptive, "strongest"))
    name = lambda m: data.names.get(m, m)  # noqa: E731
    targets = fp_study.n
    lines = [
        f"# Findings on `{task}`",
        "",
        f"Generated by `{command or f'mptq-bench findings --task {task}'}` on {datetime.now(timezone.utc):%Y-%m-%d} from the results "
        f"under `{submissions}/`: no number is typed by hand except the study's, marked *study*. Task version "
        f"{spec.version} (hash `{spec.hash[:12]}`): {spec.description.strip()}",
        "",
        f"Every figure is a mean over the task's {targets} targets, each a pool model attacked with the other pool "
        f"models as shadows; intervals are 95% Student-t intervals over targets, and differences are paired over the "
        f"same targets. At 0.1% FPR each target's figure rests on its non-members: about "
        f"{fp.attacks[STUDY_ATTACK].tpr_at_0_1pct_fpr.negatives // targets} per target, so no false positive is "
        f"allowed below 1 in {fp.attacks[STUDY_ATTACK].tpr_at_0_1pct_fpr.negatives // targets}. The intervals cover "
        f"the targets of this one pool, not another training of it: every target shares its shadows, so a pool "
        f"trained again (on another CPU, say) moves all of them together, and a verdict whose interval nearly "
        f"touches zero can change with it: a verdict that a move of {EDGE_STANDARD_ERRORS:g} standard error would "
        f"turn is marked *{NEAR_EDGE}* (pools trained on two CPUs moved these differences by a median of "
        f"0.6-1.1 standard errors; docs/reproducibility.md).",
        "",
        f"Full precision: test accuracy {pct(summarize(accuracy(fp)).mean)}; TPR@0.1%FPR {pct(fp_study.mean)} "
        f"[{pct(fp_study.ci_low)}, {pct(fp_study.ci_high)}] for the study's attacker and {pct(fp_strongest.mean)} "
        f"for the strongest one.",
        "",
    ]
    if figures is not None:
        for file, alt in _figures(data, methods, plans, attackers, fp, figures, task):
            lines += [f"![{alt}]({figures_link}/{file})", ""]

    # 1. the headline claim
    low, high = plans[-1] if "w1.58" not in plans else "w1.58", "w4" if "w4" in plans else plans[0]
    lines += ["## 1. Does TPR@0.1%FPR fall by an order of magnitude at 1.58 bits while 4 bits change nothing?", ""]
    for method in methods:
        ob_low, ad_low = data.get(method, low, "oblivious"), data.get(method, low, adaptive)
        ob_high = data.get(method, high, "oblivious")
        if ob_low is None:
            continue
        study_after = summarize(tpr(ob_low.quantized, STUDY_ATTACK)).mean
        sentence = (f"- **{name(method)}** at {low}: the study's attacker falls from {pct(fp_study.mean)} to "
                    f"{pct(study_after)} ({cut(fp_study.mean, study_after)}; "
                    f"{pp(tpr(ob_low.quantized, STUDY_ATTACK) - tpr(ob_low.reference, STUDY_ATTACK))})")
        if ad_low is not None:
            strongest_after = summarize(tpr(ad_low.quantized, "strongest")).mean
            sentence += (f", but the strongest attacker still reaches {pct(strongest_after)} "
                         f"({cut(fp_strongest.mean, strongest_after)} than against full precision)")
        if ob_high is not None:
            change = tpr(ob_high.quantized, STUDY_ATTACK) - tpr(ob_high.reference, STUDY_ATTACK)
            sentence += (f". At {high} the change is {pp(change)}, "
                         f"{'a real change' if significant(change) else 'within noise'}{edge(change)}")
        lines.append(sentence + ".")
    study = study_numbers()
    lines += ["", "*Study* (CIFAR-100, ResNet18, online LiRA; test accuracy / TPR@0.1%FPR): full precision "
              f"{study['fp32']['fp32'][0]:.2f}% / {study['fp32']['fp32'][1]:.3f}; "
              + "; ".join(f"{m} " + ", ".join(f"{p} {a:.2f}% / {t:.4f}" for p, (a, t) in sorted(v.items()))
                          for m, v in study.items() if m != "fp32")
              + ". It reports a 99.2-99.4% cut at 1.58 bits and none at 4 bits. Its w1.58 runs most likely kept the "
              "classifier at 8 bits (its workflow's `--auto_last_8bit` does so below 2 bits), which is this "
              "benchmark's `w1.58-last8`.", ""]

    # 2. the last layer at 8 bits
    if f"{low}-last8" in plans and low in plans:
        lines += [f"## 2. What does keeping the classifier at 8 bits buy back? (`{low}-last8` against `{low}`)", ""]
        for method in methods:
            a, b = data.get(method, f"{low}-last8", adaptive), data.get(method, low, adaptive)
            if a is None or b is None:
                continue
            acc = accuracy(a.quantized) - accuracy(b.quantized)
            leak = tpr(a.quantized, "strongest") - tpr(b.quantized, "strongest")
            lines.append(f"- **{name(method)}**: test accuracy {pp(acc)}, strongest attacker's TPR@0.1%FPR {pp(leak)}: "
                         + ("accuracy bought back" if significant(acc) and acc.mean() > 0 else "no accuracy measurably bought back")
                         + edge(acc, rise=True)
                         + (", at a measurable cost in privacy" if significant(leak) and leak.mean() > 0
                            else ", with no measurable cost in privacy")
                         + edge(leak, rise=True) + ".")
        lines.append("")

    # 3. online against offline
    if "lira-offline" in spec.attacks:
        lines += ["## 3. Is online LiRA harder to mitigate than offline?", "",
                  "Cut in TPR@0.1%FPR against full precision, study's (oblivious) shadows:", ""]
        for method in methods:
            parts = []
            for plan in plans:
                result = data.get(method, plan, "oblivious")
                if result is None:
                    continue
                cells = []
                for attack in ("lira-online", "lira-offline"):
                    before, after = summarize(tpr(result.reference, attack)).mean, summarize(tpr(result.quantized, attack)).mean
                    cells.append(cut(before, after))
                parts.append(f"{plan}: online {cells[0]}, offline {cells[1]}")
            lines.append(f"- **{name(method)}**: " + "; ".join(parts) + ".")
        lines += ["", "The study found online LiRA harder to mitigate. Where the online attack loses much more than the "
                  "offline one here, quantization is not hiding membership so much as breaking the online attack's "
                  "per-example Gaussians, fitted on full-precision shadows, for a quantized target (section 6).", ""]

    # 4. trade-off
    lines += ["## 4. Which method gives the best trade-off?", "",
              "Per plan, the entries on the Pareto frontier of test accuracy (higher) against the strongest attacker's "
              "TPR@0.1%FPR (lower), full precision included:", ""]
    for plan in plans:
        points = [(m, data.get(m, plan, adaptive).quantized) for m in methods if data.get(m, plan, adaptive)]
        points.append(("fp32", fp))
        front = pareto_front(pd.Series([summarize(accuracy(e)).mean for _, e in points]),
                             pd.Series([summarize(tpr(e, "strongest")).mean for _, e in points]))
        lines.append(f"- `{plan}`: " + ", ".join(name(m) if m != "fp32" else "full precision"
                                                  for (m, _), keep in zip(points, front) if keep))
    lines.append("")

    # 5. the adaptive attacker
    if adaptive != "oblivious":
        n_quantized = len(spec.quantized_shadow_models) - 1
        lines += ["## 5. How much of the gain survives an attacker who knows the quantizer?", "",
                  f"The oblivious attacker has {spec.membership.n_models - 1} full-precision shadows per target; the "
                  f"{adaptive} attacker quantizes {n_quantized} of them (the task's budget), so online LiRA's "
                  "per-example Gaussians rest on fewer models"
                  + (" — with this few, a drop from oblivious to adaptive can be the smaller shadow set, "
                     "not the quantizer's doing: online LiRA's per-example variances need many shadows per side, "
                     "while its fixed-variance form and RMIA do not, which is why the strongest attacker "
                     "(section 6) is the better measure here."
                     if n_quantized < 31 else "."), ""]
        for method in methods:
            parts = []
            for plan in plans:
                ob, ad = data.get(method, plan, "oblivious"), data.get(method, plan, adaptive)
                if ob is None or ad is None:
                    continue
                o, a = tpr(ob.quantized, STUDY_ATTACK), tpr(ad.quantized, STUDY_ATTACK)
                gain = tpr(ob.reference, STUDY_ATTACK) - o
                if significant(gain) and gain.mean() > 0:
                    recovered = (a.mean() - o.mean()) / gain.mean()
                    verdict = (f"the adaptive attacker recovers {100 * recovered:.0f}% of the loss"
                               if recovered >= 0 else "the adaptive attacker does worse still")
                else:
                    verdict = "no measurable loss to recover"
                if near_edge(gain, rise=True):  # the verdict on whether there is a loss at all
                    verdict += f", {NEAR_EDGE}" if verdict.startswith("no ") else f"; that loss is {NEAR_EDGE}"
                parts.append(f"{plan}: {pct(o.mean())} -> {pct(a.mean())} ({verdict})")
            lines.append(f"- **{name(method)}**, online LiRA oblivious -> {adaptive}: " + "; ".join(parts) + ".")
        lines.append("")

    # 5b. the cheap proxy: RTN-quantized shadows for any method
    if "adaptive-rtn" in threats and adaptive == "adaptive":
        lines += ["## 5b. Is a cheap proxy as good: shadows quantized with RTN instead of the method itself?", "",
                  "Online LiRA's TPR@0.1%FPR with RTN-quantized shadows (`adaptive-rtn`, no run of the method per "
                  "shadow) against shadows quantized by the method (`adaptive`), paired over targets:", ""]
        for method in (m for m in methods if m != "rtn"):
            parts = []
            for plan in plans:
                proxy, own = data.get(method, plan, "adaptive-rtn"), data.get(method, plan, "adaptive")
                if proxy is None or own is None:
                    continue
                difference = tpr(proxy.quantized, STUDY_ATTACK) - tpr(own.quantized, STUDY_ATTACK)
                parts.append(f"{plan}: {pct(tpr(proxy.quantized, STUDY_ATTACK).mean())} vs "
                             f"{pct(tpr(own.quantized, STUDY_ATTACK).mean())} ({pp(difference)}"
                             + ("" if significant(difference) else ", within noise")
                             + (f", {NEAR_EDGE})" if near_edge(difference) else ")"))
            if parts:
                lines.append(f"- **{name(method)}**: " + "; ".join(parts) + ".")
        lines.append("")

    # 6. which attacker breaks which method
    lines += ["## 6. Which attacker breaks which method, and does the ranking change?", "",
              "The strongest attacker picks, for each block of targets, the attack and shadows that do best on its "
              "own shadow models (it never sees the targets' membership), so it can miss the attack that would "
              "have been best on the targets"
              + (f": at full precision it reaches {pct(fp_strongest.mean)} where the study's online LiRA reaches "
                 f"{pct(fp_study.mean)}." if fp_strongest.mean < fp_study.mean else ".")
              + " Most frequent choice per method and plan:", ""]
    for method in methods:
        parts = []
        for plan in plans:
            result = data.get(method, plan, adaptive)
            if result is None:
                continue
            chosen = max(result.quantized.strongest.chosen.items(), key=lambda kv: kv[1])
            parts.append(f"{plan}: {chosen[0]} for {chosen[1]} of {targets} targets")
        lines.append(f"- **{name(method)}**: " + "; ".join(parts) + ".")
    lines.append("")
    for plan in plans:
        rows = [(m, data.get(m, plan, "oblivious"), data.get(m, plan, adaptive)) for m in methods]
        rows = [(m, ob, ad) for m, ob, ad in rows if ob is not None and ad is not None]
        if len(rows) < 2:
            continue
        by_study = [m for m, ob, _ in sorted(rows, key=lambda r: summarize(tpr(r[1].quantized, STUDY_ATTACK)).mean)]
        by_strongest = [m for m, _, ad in sorted(rows, key=lambda r: summarize(tpr(r[2].quantized, "strongest")).mean)]
        moved = sum(a != b for a, b in zip(by_study, by_strongest))
        shift = "; ".join(f"{name(m)} {pct(summarize(tpr(ob.quantized, STUDY_ATTACK)).mean)} -> "
                          f"{pct(summarize(tpr(ad.quantized, 'strongest')).mean)}" for m, ob, ad in rows)
        lines.append(f"- `{plan}`, least leaky first: study's attacker {' < '.join(map(name, by_study))}; "
                     f"strongest attacker {' < '.join(map(name, by_strongest))}"
                     + (f" ({moved} of {len(rows)} places change)" if moved else " (the same order)")
                     + f". TPR@0.1%FPR, study's -> strongest: {shift}.")
    lines.append("")

    # 7. wall time
    lines += ["## Wall time", "", "Seconds from the start of each `evaluate` run to its last result, as recorded:", ""]
    total = 0.0
    for method in [*methods, "fp32"]:
        times = [(r.seconds, r.environment.device) for (m, _, _), r in data.results.items() if m == method]
        if times:
            seconds = max(t for t, _ in times)
            total += seconds
            lines.append(f"- {name(method)}: {seconds:.0f} s on {times[0][1]}")
    # the grid's cost at a glance; the first run on a cold cache also carries the pool's training
    lines += [f"- All together: {total:.0f} s ({total / 3600:.2f} h)", "",
              "A run that finds its pool and quantized models in the cache only attacks and measures, so these "
              "times are a cold run's only when the results were made from an empty cache (the cold grid's cost "
              "is measured in docs/tasks.md).", ""]
    return "\n".join(lines)
