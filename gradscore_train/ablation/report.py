"""Step 5 of an ablation, the report: ``report.md`` and its PNGs in the ablation's output folder.

``write_report(ablation, results) -> (path, console table)``; ``results`` is what
``assessment.assess_all`` returns. Every number in the report comes from those results.
"""
from __future__ import annotations

import math
import os
import re

import numpy as np
import torch

from .assessment import IMAGE_PREDICTORS, PREDICTORS
from .config import Ablation, is_reference, read_step_costs
from .study import correlation_table

__all__ = ["write_report", "summary_rows", "fmt_mean_std"]

QUALITY_LABEL = {"energy_distance": "energy distance to fresh target samples",
                 "sliced_wasserstein": "sliced 2-Wasserstein distance to fresh target samples",
                 "nll": "sample NLL under the target, E_q[-log p_0]",
                 "classifier_fd": "Frechet distance in the digit classifier's features to held-out data"}
PREDICTOR_LABEL = {"dsm_l2": "DSM / L2 error ∫σ²‖e‖²", "gradient": "gradient error ∫σ²‖Π_G e‖²",
                   "solenoidal": "solenoidal error ∫σ²‖Π_S e‖²", "kl_girsanov": "Girsanov KL bound",
                   "kl_gradient": "gradient-only KL bound", "siem": "SIEM (QV; toys: exact score subtracted)",
                   "bits_per_dim": "bits/dim (probability-flow ODE)"}


def _f(v) -> float:
    return float(v) if v is not None else float("nan")


def fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if math.isinf(v):
        return "inf"
    a = abs(v)
    return f"{v:.3g}" if a == 0 or 1e-3 <= a < 1e4 else f"{v:.2e}"


def fmt_mean_std(vals) -> str:
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    m = float(np.mean(vals))
    return fmt(m) if len(vals) == 1 else f"{fmt(m)} ± {fmt(float(np.std(vals, ddof=1)))}"


def _groups(runs: list[dict]) -> dict:
    out = {}
    for r in runs:
        out.setdefault(r["label"], []).append(r)
    return out


def summary_rows(runs: list[dict], quality_key: str) -> list[dict]:
    """One row per objective (and grid point): mean ± std over seeds of quality, diagnostics, cost."""
    rows = []
    for label, group in _groups(runs).items():
        done = [r for r in group if "final_metrics" in r]
        assessed = [r["assessment"] for r in done if "assessment" in r]
        fm = [r["final_metrics"] for r in done]
        row = {"label": label, "seeds": f"{len(done)}/{len(group)}",
               "failed": [r["run_id"] for r in group if r.get("failed")]}
        if assessed and "classifier_fd" in assessed[0]["quality"]:      # the image study's own assessment
            for k in ("classifier_fd", "classifier_fd_floor", "class_coverage"):
                row[k] = fmt_mean_std([_f(a["quality"].get(k)) for a in assessed])
            for k in IMAGE_PREDICTORS:
                row[k] = fmt_mean_std([_f(a["predictors"][k]) for a in assessed])
            for k in ("quality", "diagnostics", "likelihood", "siem"):
                row[f"cost_{k}"] = fmt_mean_std([_f(a["cost_s"].get(k)) for a in assessed])
        elif assessed:
            def q(k, assessed=assessed):
                return [_f(a["quality"][k]) for a in assessed]

            row["quality"] = fmt_mean_std(q(quality_key))
            row["energy_distance"] = fmt_mean_std(q("energy_distance"))
            row["floor"] = fmt(float(np.mean(q("energy_distance_floor"))))
            row["nll"] = fmt_mean_std(q("nll"))
            for k in PREDICTORS:
                row[k] = fmt_mean_std([_f(a["predictors"][k]) for a in assessed])
            if any("quality/model_nll" in m for m in fm):      # eval.likelihood: the model's NLL of data (nats)
                row["model_nll"] = fmt_mean_std([_f(m.get("quality/model_nll")) for m in fm])
        else:   # images: what the training loop measured (quality, diagnostics at eval.diag_times)
            for k in sorted({k for m in fm for k in m if k.startswith(("quality/", "diag/")) and "stderr" not in k}):
                row[k] = fmt_mean_std([_f(m.get(k)) for m in fm])
        row["arm"], row["steps"] = group[0].get("arm", "steps"), str(group[0].get("steps", "-"))
        row["objective"] = group[0].get("objective")
        row["train_s"] = fmt_mean_std([_f(m.get("train/seconds_per_step")) * _f(m.get("step")) for m in fm])
        row["sec_per_step"] = fmt_mean_std([_f(m.get("train/seconds_per_step")) for m in fm])
        row["wall_s"] = fmt_mean_std([_f(r.get("wall_s")) for r in done])
        rows.append(row)
    return rows


def _per_class_table(rows: list[dict]) -> list[str]:
    """Markdown lines: per objective, the classifier's accuracy on the samples drawn for each label
    (class-conditional runs) or each class's share of the samples (unconditional runs); [] when neither was measured."""
    for prefix, what in (("quality/class_accuracy/", "Per-class accuracy: the fraction of the samples drawn for "
                          "label k that the classifier of `gradscore.quality` labels k (mean ± std over seeds)"),
                         ("quality/class_share/", "Per-class share: the fraction of the samples the classifier of "
                          "`gradscore.quality` labels k (uniform: 0.1 for the digits; mean ± std over seeds)")):
        classes = sorted({int(k[len(prefix):]) for r in rows for k in r if k.startswith(prefix)})
        if classes:
            body = [[r["label"], *[r.get(f"{prefix}{k}", "-") for k in classes]] for r in rows]
            return [f"{what}.", "", _markdown_table(["objective", *map(str, classes)], body), ""]
    return []


def _correlation_markdown(corr: list[dict], confidence: float) -> str:
    """The rows of ``study.correlation_table`` as a markdown table (predictor, Spearman rho, interval, n)."""
    return _markdown_table(["predictor", "Spearman rho", f"{int(confidence * 100)}% CI", "n"],
                           [[PREDICTOR_LABEL[r["predictor"]], fmt(r["spearman"]),
                             f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]", str(r["n"])] for r in corr])


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_samples(runs, mixture, path: str):
    """One scatter panel per objective (its first finished seed) over target samples."""
    import torch
    plt = _plt()
    firsts = {}
    for r in runs:
        if r.get("samples_path") and os.path.isfile(r["samples_path"]) and r["label"] not in firsts:
            firsts[r["label"]] = r
    if not firsts:
        return False
    data = mixture.sample(2000, generator=torch.Generator().manual_seed(0))
    n = len(firsts)
    cols = min(n, 5)                                   # rows of five: long grid labels stay readable
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.7 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    lim = float(data.abs().max()) * 1.35
    for ax, (label, r) in zip(axes.flat, firsts.items()):
        x = torch.load(r["samples_path"], weights_only=True)
        ok = torch.isfinite(x).all(1)
        ax.scatter(data[:, 0], data[:, 1], s=1, c="lightgray")
        ax.scatter(x[ok, 0], x[ok, 1], s=1, c="tab:blue", alpha=0.6)
        ed = r["assessment"]["quality"]["energy_distance"]
        outside = float((~ok | (x.abs() > lim).any(1)).float().mean())
        note = f", {outside:.0%} outside the frame" if outside > 0.005 else ""
        title = label.replace("/", "\n", label.count("/") - 1) if len(label) > 36 else label   # wrap long labels
        ax.set_title(f"{title} (seed {r['seed']})\nED {fmt(_f(ed))}" + note, fontsize=7)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_decomposition(runs, path: str):
    """Per objective: ``||e_t||^2``, ``||Pi_G e_t||^2``, ``||Pi_S e_t||^2`` vs ``t`` (mean over seeds)."""
    plt = _plt()
    groups = {k: [r["assessment"] for r in g if "assessment" in r] for k, g in _groups(runs).items()}
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        return False
    n = len(groups)
    cols = min(n, 5)                                    # many objectives (and budgets): rows of five panels
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (label, assessed) in zip(axes.flat, groups.items()):
        t = [p["t"] for p in assessed[0]["per_time"]]
        for key, colour in (("l2", "k"), ("gradient", "tab:blue"), ("solenoidal", "tab:orange")):
            v = np.mean([[p[key] for p in a["per_time"]] for a in assessed], axis=0)
            ax.plot(t, np.maximum(v, 1e-6), marker="o", ms=3, c=colour,
                    label={"l2": "L2", "gradient": "gradient", "solenoidal": "solenoidal"}[key])
            low = v <= 1e-6        # an unbiased estimate at or below zero (within its noise): drawn at the floor, open
            if low.any():
                ax.plot(np.asarray(t)[low], np.full(int(low.sum()), 1e-6), ls="none", marker="v", ms=6,
                        mfc="white", c=colour)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("t")
        ax.set_title(label, fontsize=9)
    for row in axes:
        row[0].set_ylabel("squared error under p_t\n(open triangles: estimate <= 0, at the floor 1e-6)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_comparison(runs, quality_key: str, path: str, reference: str | None = None):
    """Quality per objective, one dot per seed and the mean as a bar, the equal-steps and equal-wall-time arms side
    by side (the ``reference`` objective's runs serve both arms); a log axis when the values span more than a
    factor 30. False when nothing was assessed."""
    plt = _plt()
    pts = [r for r in runs if "assessment" in r]
    if not pts:
        return False
    objectives = list(dict.fromkeys(r["base_label"] for r in pts))
    arms = [a for a in ("steps", "wall_time") if any(r.get("arm", "steps") == a for r in pts)]
    fig, ax = plt.subplots(figsize=(1.1 * len(objectives) + 2.5, 3.6))
    width = 0.8 / len(arms)
    for j, arm in enumerate(arms):
        for i, obj in enumerate(objectives):
            vals = [_f(r["assessment"]["quality"][quality_key]) for r in pts
                    if r["base_label"] == obj and (r.get("arm", "steps") == arm or is_reference(r["label"], reference))]
            if not vals:
                continue
            x = i + (j - (len(arms) - 1) / 2) * width
            ax.bar(x, float(np.mean(vals)), width * 0.9, color=f"C{j}", alpha=0.35,
                   label={"steps": "equal steps", "wall_time": "equal wall time"}[arm] if i == 0 else None)
            ax.scatter([x] * len(vals), vals, color=f"C{j}", s=14, zorder=3)
    floor = [_f(r["assessment"]["quality"].get(f"{quality_key}_floor")) for r in pts]
    if floor and not math.isnan(floor[0]):
        ax.axhline(float(np.nanmean(floor)), color="k", ls=":", lw=1, label="two-sample floor")
    finite = [_f(r["assessment"]["quality"][quality_key]) for r in pts]
    finite = [v for v in finite + floor if math.isfinite(v) and v > 0]
    if finite and max(finite) > 30 * min(finite):
        ax.set_yscale("log")
    ax.set_xticks(range(len(objectives)))
    ax.set_xticklabels([o.replace("l2+dual_sobolev/", "l2+ds ") for o in objectives], rotation=25, ha="right",
                       fontsize=8)
    ax.set_ylabel(f"{quality_key.replace('_', ' ')} (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _colours(keys):
    cmap = _plt().get_cmap("tab10")
    return {k: cmap(i % 10) for i, k in enumerate(keys)}


def plot_kl_vs_quality(runs, quality_key: str, path: str):
    """Both KL bounds (x) against measured quality (y), one point per run."""
    plt = _plt()
    pts = [r for r in runs if "assessment" in r]
    if not pts:
        return False
    col = _colours(list(dict.fromkeys(r["label"] for r in pts)))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, key, title in ((axes[0], "kl_girsanov", "Girsanov bound (all of e)"),
                           (axes[1], "kl_gradient", "gradient-only bound (Pi_G e)")):
        for label in col:
            sel = [r["assessment"] for r in pts if r["label"] == label]
            ax.scatter([a["predictors"][key] for a in sel], [_f(a["quality"][quality_key]) for a in sel],
                       c=[col[label]], label=label, s=18)
        ax.set_xscale("symlog", linthresh=1e-1)
        ax.set_yscale("log")
        ax.set_xlabel(f"{title}  (nats)")
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel(quality_key.replace("_", " "))
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_correlation(population, quality_key: str, table, path: str):
    """One panel per predictor: predictor (x, symlog) against quality (y, log), coloured by family."""
    plt = _plt()
    fams = list(dict.fromkeys(p["family"] for p in population))
    col = _colours(fams)
    keys = [row["predictor"] for row in table]
    n = len(keys)
    cols = 3
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    rho = {row["predictor"]: row for row in table}
    for ax, key in zip(axes.flat, keys):
        for fam in fams:
            sel = [p for p in population if p["family"] == fam]
            y = np.array([_f(p["quality"][quality_key]) for p in sel])
            ax.scatter([p["predictors"][key] for p in sel], np.where(np.isfinite(y), y, np.nan), c=[col[fam]], s=14,
                       label=fam)
        lin = max(1e-4, float(np.nanmedian([abs(p["predictors"][key]) for p in population]) / 10 or 1e-4))
        ax.set_xscale("symlog", linthresh=lin)
        ax.set_yscale("log")
        r = rho[key]
        ax.set_title(f"{PREDICTOR_LABEL[key]}\nSpearman {fmt(r['spearman'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]",
                     fontsize=8)
        ax.set_ylabel(quality_key.replace("_", " "), fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- report
def write_report(ab: Ablation, results: dict) -> tuple[str, str]:
    """Write ``<output_dir>/report.md`` (+ PNGs); returns ``(path, console table)``."""
    out = ab.output_dir
    os.makedirs(out, exist_ok=True)
    st, ac = ab.schema.study, ab.schema.assessment
    qk = st.quality
    runs, population = results["runs"], results["population"]
    rows = summary_rows(runs, qk)
    spec0 = ab.runs()[0]
    cfg = spec0.config
    toy = cfg.data.kind == "toy"
    image_study = not toy and any("classifier_fd" in r for r in rows)
    predictors = IMAGE_PREDICTORS if image_study else PREDICTORS

    wall = sum(_f(r.get("wall_s")) for r in runs if r.get("wall_s"))
    backbone = (f"(hidden {cfg.model.hidden}, depth {cfg.model.depth})" if cfg.model.kind == "mlp"
                else f"(channels {cfg.model.block_out_channels})")
    lines = [f"# Ablation `{ab.schema.name}`", "",
             f"Config: `{ab.path}` (base `{ab.schema.base}`). Output: `{out}`. Training wall time summed over runs: "
             f"{wall:.0f} s (runs launched in parallel overlap; `{ab.schema.launcher.kind}` launcher).", "",
             "## Matched budget", "",
             f"Every run: {cfg.train.max_steps} steps, global batch {cfg.train.batch_size}, lr {cfg.train.lr:g}, "
             f"warm-up {cfg.train.warmup_steps}, EMA {cfg.train.ema_decay:g}, model `{cfg.model.kind}` "
             f"{backbone}, data `{cfg.data.kind}`{'/' + cfg.data.preset if toy else ''}; the data order and noise "
             f"of step k depend only on the seed (seeds {ab.schema.seeds}); only `objective.*` differs. "
             f"Launcher: `{ab.schema.launcher.kind}`."
             + (f" Second budget, equal wall time: every objective also trains for the time "
                f"`{ab.schema.budget.wall_time}` takes for its {cfg.train.max_steps} steps (its steps below; the other "
                "keys as above)."
                if ab.schema.budget.wall_time else ""), ""]
    if ab.schema.grid:
        lines += [f"Grid: {ab.schema.grid} (crossed with objectives having the hyperparameter and seeds).", ""]

    lines += ["## Sample quality and diagnostics per objective (mean ± std over seeds)", ""]
    if toy:
        lines += [f"Quality: {QUALITY_LABEL['energy_distance']} ({ac.num_samples} samples, reverse SDE, "
                  f"{ac.sample_steps} steps; `floor` = the same distance between two target samples of that size), "
                  "and the sample NLL "
                  "(the target entropy is the value exact samples give). Diagnostics on a grid of "
                  f"{ac.num_times} times, {ac.num_points} points of p_t per time, {ac.num_features} Fourier features "
                  "+ quadratics; errors are `∫ σ_t² ‖·‖² dt` (L2 exact from the mixture's score, gradient part "
                  "estimated without it, solenoidal = L2 - gradient); KL bounds in nats (reverse SDE, prior term "
                  "included); SIEM with the exact score subtracted. `s/step`: training wall time per optimizer step; "
                  "`wall`: "
                  "wall time of the whole run (setup, final samples and checkpoints included).", ""]
        header = ["objective", "seeds", "energy dist.", "floor", "NLL", "DSM/L2", "gradient", "solenoidal",
                  "KL Girsanov", "KL gradient", "SIEM", "s/step", "wall s"]
        body = [[r["label"], r["seeds"], r.get("energy_distance", "-"), r.get("floor", "-"), r.get("nll", "-"),
                 r.get("dsm_l2", "-"), r.get("gradient", "-"), r.get("solenoidal", "-"), r.get("kl_girsanov", "-"),
                 r.get("kl_gradient", "-"), r.get("siem", "-"), r["sec_per_step"], r["wall_s"]] for r in rows]
        if any("model_nll" in r for r in rows):          # eval.likelihood was on: E_data[-log q] by the PF-ODE
            header.insert(5, "model NLL")
            for r, b in zip(rows, body):
                b.insert(5, r.get("model_nll", "-"))
    elif image_study:                                     # the image study: every model assessed alike
        lines += [f"Quality: {QUALITY_LABEL['classifier_fd']} ({ac.num_samples} samples, reverse "
                  f"{ac.method.upper()}, {ac.sample_steps} steps; `floor`: the same distance between two data "
                  "samples of that size), and `coverage`, the fraction of the classes holding at least half a "
                  "uniform share of the samples (by the same classifier). Diagnostics without the true score "
                  f"(neural decomposition, {ac.fit_steps} steps per network) on {ac.num_times} times, "
                  f"{ac.num_data} data points, {ac.num_points} points of p_t per time; errors are `∫ σ_t² ‖·‖² dt` "
                  "with L2 = gradient + solenoidal; KL bounds in nats (prior term included); bits/dim of "
                  f"{ac.likelihood_samples} data points (`-` when not measured). `cost s`: wall seconds per model of "
                  "the sample-based quality / the diagnostics / the likelihood / SIEM (without a reference: there "
                  "is no exact score).", ""]
        header = ["objective", "seeds", "classifier FD", "floor", "coverage", "DSM/L2", "gradient", "solenoidal",
                  "KL Girsanov", "KL gradient", "SIEM", "bits/dim", "s/step", "wall s",
                  "cost s (quality / diag. / lik. / SIEM)"]
        body = [[r["label"], r["seeds"], *[r.get(k, "-") for k in ("classifier_fd", "classifier_fd_floor",
                 "class_coverage", *IMAGE_PREDICTORS)], r["sec_per_step"], r["wall_s"],
                 " / ".join(r.get(f"cost_{k}", "-") for k in ("quality", "diagnostics", "likelihood", "siem"))]
                for r in rows]
    else:
        lines += ["Quality and diagnostics as measured by the training loop at the end of each run "
                  "(`final_metrics.json`); no correlation study (it needs a target with an exact score).", ""]
        per_class = ("quality/class_accuracy/", "quality/class_share/")     # one table of their own, below
        qkeys = sorted({k for r in rows for k in r
                        if k.startswith(("quality/", "diag/")) and not k.startswith(per_class)})
        header = ["objective", "seeds", *qkeys, "s/step", "wall s"]
        body = [[r["label"], r["seeds"], *[r.get(k, "-") for k in qkeys], r["sec_per_step"], r["wall_s"]] for r in rows]
    at = header.index("s/step")               # the budget's columns: steps (and train s) before s/step
    header.insert(at, "steps")
    for r, b in zip(rows, body):
        b.insert(at, r["steps"])
    ref = ab.schema.budget.wall_time
    if any(r["arm"] == "wall_time" for r in rows):       # two matched budgets: one table each
        costs = read_step_costs(ab.step_costs_path, ref, ab.runs("steps")[0].config.train.max_steps)
        header.insert(at + 1, "train s")
        for r, b in zip(rows, body):
            b.insert(at + 1, r["train_s"])
        n_ref = costs["reference_steps"]
        steps_rows = [b for r, b in zip(rows, body) if r["arm"] == "steps"]
        time_rows = [b for r, b in zip(rows, body) if r["arm"] == "wall_time" or is_reference(r["label"], ref)]
        table = _markdown_table(header, steps_rows)
        time_table = _markdown_table(header, time_rows)
        pilot = ", ".join(f"`{k}` {1e3 * v:.0f} ms" for k, v in costs["seconds_per_step"].items())
        lines += [f"### Equal steps ({n_ref} optimizer steps each)", "", table, "",
                  f"### Equal wall time (the time `{ref}` takes for {n_ref} steps)", "",
                  f"Steps from a pilot that timed every objective's optimizer step side by side in one process "
                  f"({costs['pilot_rounds']} rounds of {costs['pilot_steps']} steps, {costs['threads']} thread(s), "
                  "median; "
                  f"`{ab.step_costs_path}`): {pilot} per step. `train s`: the training loop's own seconds per step "
                  "times its steps (runs launched in parallel share the machine, so they drift from the pilot).", "",
                  time_table, ""]
        table = table + "\n\nEqual wall time:\n" + time_table
    else:
        table = _markdown_table(header, body)
        lines += [table, ""]
    if not toy and not image_study:
        lines += _per_class_table(rows)
    if image_study:
        from ..evaluation import save_grid
        for r in runs:
            path = r.get("samples_path")
            if r.get("seed") == ab.schema.seeds[0] and path and os.path.isfile(path):
                name = "samples-" + re.sub(r"[^A-Za-z0-9_.+-]+", "_", r["label"].replace("=", "")).strip("_") + ".png"
                save_grid(torch.load(path, weights_only=True)[:64], os.path.join(out, name))
                lines += [f"Samples of `{r['label']}` (seed {r['seed']}):", "", f"![{r['label']}]({name})", ""]
    if toy and any("model_nll" in r for r in rows):
        lines += ["`model NLL`: the trained model's NLL of target samples, E_p[-log q] in nats, by the "
                  "probability-flow ODE (`eval.likelihood`; the target's entropy is what the exact score gives).", ""]
    if toy and population:
        ent = [_f(p["quality"]["entropy"]) for p in population]
        lines += [f"Target entropy (NLL of exact samples): {fmt(float(np.mean(ent)))}.", ""]
    failed = [rid for r in rows for rid in r["failed"]]
    if failed:
        lines += ["Failed runs (non-finite loss; retried on the next invocation): " + ", ".join(failed), ""]

    if toy or image_study:
        figs = [("comparison.png", "Sample quality per objective (dots: seeds; bars: means)",
                 lambda p: plot_comparison(runs, qk, p, ab.schema.budget.wall_time)),
                ("decomposition.png", "Per-time decomposition L2 = gradient + solenoidal (mean over seeds)",
                 lambda p: plot_decomposition(runs, p)),
                ("kl_vs_quality.png", "The two KL bounds against measured quality (one point per run)",
                 lambda p: plot_kl_vs_quality(runs, qk, p))]
        if toy:
            from ..data import toy_mixture
            mixture = toy_mixture(cfg.data)
            figs.insert(0, ("samples.png", "Samples per objective (first seed) over target samples",
                            lambda p: plot_samples(runs, mixture, p)))
        for name, title, fn in figs:
            if fn(os.path.join(out, name)):
                lines += [f"### {title}", "", f"![{title}]({name})", ""]

    console = ["", f"Ablation {ab.schema.name}: quality and diagnostics per objective (mean ± std over seeds)", table]
    if st.enabled and population:
        corr = correlation_table(population, qk, predictors, st.bootstrap, st.confidence)
        fam_counts = {}
        for p in population:
            fam_counts[p["family"]] = fam_counts.get(p["family"], 0) + 1
        if not image_study:
            what = ("`trained`: every kept checkpoint of every run; `rotation`: the exact score plus a zero-effect "
                    f"field c J grad log p_t (c in {st.rotations}); `gradient`: the exact score plus a grad phi with "
                    f"phi = x^T diag(1,-1) x / 2 (a in {st.gradient_errors}); `combination`: both "
                    f"([a, c] in {st.combinations}).")
        else:
            what = ("`trained`: every kept checkpoint of every run; `rotation`: the first run's final model s plus "
                    f"c J s for a skew J in pixel space (c in {st.rotations}; zero-effect only for the exact score, "
                    "so approximately); `gradient`: s plus a A x with A = diag(1, -1, ...) over the pixel columns "
                    f"(a in {st.gradient_errors}); `combination`: both ([a, c] in {st.combinations}).")
        lines += ["## Correlation study", "",
                  f"Population: {len(population)} models ({', '.join(f'{v} {k}' for k, v in fam_counts.items())}). "
                  + what, "",
                  f"Quality: {QUALITY_LABEL[qk]} (lower is better; not one of the predictors). Spearman rank "
                  f"correlation between quality and each predictor, {int(st.confidence * 100)}% percentile bootstrap "
                  "interval over "
                  f"{st.bootstrap} resamples of the models. A good predictor has a large positive correlation.", ""]
        ctab = _correlation_markdown(corr, st.confidence)
        lines += [ctab, ""]
        ranked = sorted((r for r in corr if not math.isnan(r["spearman"])), key=lambda r: -r["spearman"])
        if ranked:
            by = {r["predictor"]: r for r in corr}
            lines += [f"Reading (generated from the table): the highest rank correlation with quality is "
                      f"{PREDICTOR_LABEL[ranked[0]['predictor']]} (rho {fmt(ranked[0]['spearman'])}); "
                      f"gradient error rho {fmt(by['gradient']['spearman'])} vs DSM/L2 error rho "
                      f"{fmt(by['dsm_l2']['spearman'])}; "
                      f"gradient-only KL bound rho {fmt(by['kl_gradient']['spearman'])} vs Girsanov bound rho "
                      f"{fmt(by['kl_girsanov']['spearman'])}. Overlapping intervals mean the population cannot tell "
                      "the two apart.", ""]
        if plot_correlation(population, qk, corr, os.path.join(out, "correlation.png")):
            lines += ["![correlation](correlation.png)", ""]
        if image_study:
            costs = {k: [_f(p["cost_s"].get(k)) for p in population if "cost_s" in p]
                     for k in ("quality", "diagnostics", "likelihood", "siem")}
            if costs["quality"]:
                lines += [f"Cost per model (mean over {len(costs['quality'])}, wall seconds on this machine): the "
                          f"sample-based quality {fmt(float(np.mean(costs['quality'])))} s; the diagnostics "
                          f"{fmt(float(np.mean(costs['diagnostics'])))} s (one decomposition per time gives DSM/L2, "
                          "the gradient and solenoidal parts and both KL bounds); bits/dim "
                          f"{fmt(float(np.mean(costs['likelihood'])))} s; SIEM "
                          f"{fmt(float(np.nanmean(costs['siem'])))} s.", ""]
            trained = [p for p in population if p["family"] == "trained"]
            if len(trained) >= 3 and len(trained) < len(population):
                corr_t = correlation_table(trained, qk, predictors, st.bootstrap, st.confidence)
                lines += [f"Trained models alone ({len(trained)}, no perturbations):", "",
                          _correlation_markdown(corr_t, st.confidence), ""]
        lines += ["### Every model of the population", "",
                  _markdown_table(["model", "family", qk, *predictors],
                                  [[p["name"], p["family"], fmt(_f(p["quality"][qk])),
                                    *[fmt(p["predictors"][k]) for k in predictors]] for p in population]), ""]
        console += ["", f"Correlation study ({len(population)} models; quality = {qk}): Spearman rho [CI]", ctab]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path, "\n".join(console)
