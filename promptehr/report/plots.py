"""Plots of the quality report, drawn from its JSON (so they show only what the report may show).

Input: the report dict of `quality_report`. Output: PNG files: prevalence.png (code prevalence),
counts.png (visits per patient, codes per visit), utility.png (TSTR AUROC), privacy.png (attacks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def _ci(m: dict, name: str) -> str:
    low, high = m.get(f"{name}_low", float("nan")), m.get(f"{name}_high", float("nan"))
    return f"{m.get(name, float('nan')):.3f} [{low:.3f}, {high:.3f}]"


def plot_prevalence(report: dict, path: Path) -> Path:
    plt, m, cut = _pyplot(), report["metrics"], report["suppression"]
    prev = report["visit_prevalence"]
    gen, real = np.asarray(prev["generated"]), np.asarray(prev["real"])
    floor = 0.5 / max(m["n_patients"], 1)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(np.maximum(real, floor), np.maximum(gen, floor), s=8, alpha=0.5)
    lim = [floor, 1.0]
    ax.plot(lim, lim, color="grey", lw=1)
    ax.set(
        xscale="log",
        yscale="log",
        xlim=lim,
        ylim=lim,
        xlabel="real (held-out): share of visits",
        ylabel="generated: share of visits (0 drawn at the edge)",
        title=f"code prevalence, R² {_ci(m, 'prevalence_r2_visit')}\n"
        f"(real vs real {m['prevalence_r2_visit_reference']:.3f}; "
        f"{cut['codes_dropped']} codes of < {cut['min_patients']} patients not drawn)",
    )
    ax.title.set_fontsize(9)
    return _save(fig, path)


def plot_counts(report: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ("visits_per_patient", "codes_per_visit"), ("visits per patient", "codes per visit")):
        for j, (name, hist) in enumerate(report[key].items()):
            x = np.array([int(k) for k in hist], dtype=float)
            y = np.array(list(hist.values()), dtype=float)
            ax.bar(x + (j - 0.5) * 0.4, y / max(y.sum(), 1), width=0.4, label=name)
        ax.set(title=title, ylabel="share")
        ax.legend()
    return _save(fig, path)


def plot_utility(report: dict, path: Path) -> Path:
    """Macro AUROC of the model trained on real vs on generated patients (with 95% intervals), and the
    per-group AUROCs of the groups that enough test patients hold."""
    plt, m, u = _pyplot(), report["metrics"], report["utility"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    names = ("real", "synthetic")
    values = [m.get(f"utility_auroc_{n}", float("nan")) for n in names]
    errors = [
        [max(v - m.get(f"utility_auroc_{n}_low", v), 0) for n, v in zip(names, values)],
        [max(m.get(f"utility_auroc_{n}_high", v) - v, 0) for n, v in zip(names, values)],
    ]
    left.bar(
        ["trained on real", "trained on generated"],
        np.nan_to_num(values),
        yerr=np.nan_to_num(errors),
        capsize=6,
        color=["tab:blue", "tab:orange"],
    )
    left.axhline(0.5, color="grey", lw=1, ls="--")
    left.set(
        ylim=(0, 1),
        ylabel="macro AUROC on held-out patients",
        title=f"next-visit code groups (TSTR), ratio {_ci(m, 'utility_ratio')}",
    )
    left.title.set_fontsize(9)
    right.scatter(u["auroc_real"], u["auroc_synthetic"], s=14, alpha=0.7)
    right.plot([0, 1], [0, 1], color="grey", lw=1)
    right.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="AUROC, trained on real",
        ylabel="AUROC, trained on generated",
        title=f"per group ({len(u['groups'])} with >= {report['suppression']['min_patients']} positive test patients)",
    )
    right.title.set_fontsize(9)
    return _save(fig, path)


def plot_privacy(report: dict, path: Path) -> Path:
    """Distance to the nearest released patient for training vs held-out patients (membership), the
    attribute-inference F1 by k beside the held-out reference, and the distance to the nearest training
    patient for generated vs held-out patients (copying)."""
    plt, m, pv = _pyplot(), report["metrics"], report["privacy"]
    edges = np.asarray(pv["distance_bins"])
    centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    accuracy = m.get("membership_distance_accuracy", float("nan"))
    for ax, hists, title in (
        (
            axes[0],
            pv["released_distance"],
            f"membership by distance: AUC {_ci(m, 'membership_distance_auc')},\n"
            f"median-threshold accuracy {accuracy:.3f} (0.5: no signal)",
        ),
        (
            axes[2],
            pv["training_distance"],
            f"copying: distance to the nearest training patient,\n"
            f"ratio {m['nn_distance_ratio']:.3f} (1: like held-out patients)",
        ),
    ):
        for j, (name, counts) in enumerate(hists.items()):
            counts = np.asarray(counts, dtype=float)
            ax.bar(centers + (j - 0.5) * width / 2, counts / max(counts.sum(), 1), width=width / 2, label=name)
        ax.set(xlabel="Jaccard distance", ylabel="share of patients", title=title)
        ax.title.set_fontsize(9)
        ax.legend()
    ai = pv["attribute_inference"]
    axes[1].plot(ai["k"], ai["synthetic"], marker="o", label="neighbours: generated")
    axes[1].plot(ai["k"], ai["heldout"], marker="s", label="neighbours: held-out real")
    axes[1].set(
        xlabel="k nearest neighbours",
        ylabel="F1 of the inferred codes",
        xticks=ai["k"],
        title="attribute inference on training patients\n(knowing their top-100 codes)",
    )
    axes[1].title.set_fontsize(9)
    axes[1].legend()
    return _save(fig, path)


def plot_report(report: dict, folder) -> list[Path]:
    """The plots into `folder` (utility and the released-cohort attacks only when the report has
    them); returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [plot_prevalence(report, folder / "prevalence.png"), plot_counts(report, folder / "counts.png")]
    if report["metrics"].get("released_patients", 0) > 0:
        paths += [plot_utility(report, folder / "utility.png"), plot_privacy(report, folder / "privacy.png")]
    return paths
