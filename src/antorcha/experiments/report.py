"""The report of a sweep: ``summary.csv``, ``report.md`` and PNG plots, all computed from the output
folder (``results.jsonl``, the runs' ``done.json`` and ``plan.json``), so a report can be rebuilt at
any time (``antorcha experiment report OUT``) and never states a number that is not in the results.

Owns the comparisons: each DiLoCo run against the DDP baseline it was planned with, at equal tokens
(eval loss interpolated linearly in tokens at the largest token count every run of the group reached,
which is the planned budget when nothing crashed), and bytes per token (data-plane bytes sent by all
participants / tokens trained by all; the baseline's is the ring all-reduce estimate of what its ranks
send). Plots use matplotlib's Agg backend: no display is needed.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines have no display
import matplotlib.pyplot as plt

from antorcha.experiments.runner import DONE, RESULTS, read_rows

PLOTS = {
    "loss_tokens": "loss_vs_tokens.png",
    "loss_time": "loss_vs_time.png",
    "bytes": "bytes_per_token.png",
    "utilisation": "utilisation.png",
    "overview": "overview.png",
}
CSV_FIELDS = [
    "run_id",
    "kind",
    "label",
    "baseline_id",
    "H",
    "codec",
    "workers",
    "rounds",
    "tokens",
    "initial_eval_loss",
    "final_eval_loss",
    "eval_loss_at_equal_tokens",
    "equal_tokens",
    "loss_gap_vs_baseline",
    "bytes",
    "bytes_per_token",
    "traffic_reduction_vs_baseline",
    "reduction_over_h",
    "utilisation",
    "wall_s",
    "replicas_consistent",
]


@dataclass
class RunResult:
    """One finished run as the report sees it: its rows and its done record."""

    run_id: str
    kind: str
    label: str
    plan: dict[str, Any]
    record: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def inner_steps(self) -> int | None:
        return int(self.plan["run"]["inner_steps"]) if self.kind == "diloco" else None

    @property
    def final(self) -> dict[str, Any]:
        return self.rows[-1]

    def curve(self) -> tuple[list[float], list[float]]:
        """(tokens, eval loss) from the initial evaluation at 0 tokens on."""
        xs = [0.0] + [float(r["tokens"]) for r in self.rows if r["eval_loss"] is not None]
        ys = [float(self.record["initial_eval_loss"])]
        ys += [float(r["eval_loss"]) for r in self.rows if r["eval_loss"] is not None]
        return xs, ys

    def loss_at(self, tokens: float) -> float:
        xs, ys = self.curve()
        for (x0, y0), (x1, y1) in itertools.pairwise(zip(xs, ys, strict=True)):
            if x0 <= tokens <= x1:
                return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0) if x1 > x0 else y1
        return ys[-1] if tokens >= xs[-1] else ys[0]


def load_runs(out: Path) -> list[RunResult]:
    """The finished runs in OUT, in plan order (baselines first)."""
    plan = json.loads((out / "plan.json").read_text())["runs"]
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in read_rows(out):
        rows.setdefault(row["run_id"], []).append(row)
    results = []
    for p in plan:
        done = out / "runs" / p["run_id"] / DONE
        if not done.exists():
            continue
        record = json.loads(done.read_text())
        if record.get("config_hash") != p["config_hash"] or not rows.get(p["run_id"]):
            continue
        ordered = sorted(rows[p["run_id"]], key=lambda r: r["round"])
        results.append(RunResult(p["run_id"], p["kind"], p["label"], p, record, ordered))
    return results


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def summarize(runs: list[RunResult]) -> list[dict[str, Any]]:
    """One summary row per run; every number comes from its rows (or, for utilisation and wall time,
    its done record)."""
    by_id = {r.run_id: r for r in runs}
    groups: dict[str, list[RunResult]] = {}
    for r in runs:
        key = r.run_id if r.kind == "ddp" else (r.plan.get("baseline_id") or r.run_id)
        groups.setdefault(key, []).append(r)
    table = []
    for r in runs:
        key = r.run_id if r.kind == "ddp" else (r.plan.get("baseline_id") or r.run_id)
        group = groups[key]
        equal = min(float(g.final["tokens"]) for g in group)
        base = by_id.get(key) if key in by_id and by_id[key].kind == "ddp" else None
        loss_eq = r.loss_at(equal)
        tokens, sent = int(r.final["tokens"]), int(r.final["bytes"])
        bpt = sent / tokens if tokens else None
        row: dict[str, Any] = {
            "run_id": r.run_id,
            "kind": r.kind,
            "label": r.label,
            "baseline_id": base.run_id if base is not None and base is not r else "",
            "H": r.inner_steps,
            "codec": r.plan["run"].get("codec", "none") if r.kind == "diloco" else "fp32 grads",
            "workers": len(r.plan["workers"]),
            "rounds": len(r.rows),
            "tokens": tokens,
            "initial_eval_loss": float(r.record["initial_eval_loss"]),
            "final_eval_loss": float(r.final["eval_loss"]),
            "eval_loss_at_equal_tokens": loss_eq,
            "equal_tokens": int(equal),
            "loss_gap_vs_baseline": None,
            "bytes": sent,
            "bytes_per_token": bpt,
            "traffic_reduction_vs_baseline": None,
            "reduction_over_h": None,
            "utilisation": r.record.get("utilisation"),
            "wall_s": float(r.record["wall_s"]),
            "replicas_consistent": bool(r.record.get("replicas_consistent")),
        }
        if base is not None and base is not r:
            base_bpt = base.final["bytes"] / base.final["tokens"]
            row["loss_gap_vs_baseline"] = loss_eq / base.loss_at(equal) - 1
            if bpt:
                row["traffic_reduction_vs_baseline"] = base_bpt / bpt
                if r.inner_steps:
                    row["reduction_over_h"] = base_bpt / bpt / r.inner_steps
        table.append(row)
    return table


def write_csv(path: Path, table: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in table:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in CSV_FIELDS})


# ---- plots ------------------------------------------------------------------------------------------


def _colors(labels: list[tuple[str, str]]) -> dict[str, str]:
    """Baselines black, DiLoCo runs C0, C1, … in plan order: the same colour in every plot."""
    diloco = [run_id for run_id, kind in labels if kind != "ddp"]
    return {run_id: "black" if kind == "ddp" else f"C{diloco.index(run_id) % 10}" for run_id, kind in labels}


def _style(r: RunResult, colors: dict[str, str]) -> dict[str, Any]:
    if r.kind == "ddp":
        return {"color": colors[r.run_id], "linestyle": "--", "linewidth": 2, "marker": ".", "markersize": 4}
    return {"color": colors[r.run_id], "linewidth": 1.5, "marker": ".", "markersize": 4}


def _plot_loss_tokens(ax: Any, runs: list[RunResult], colors: dict[str, str]) -> None:
    for r in runs:
        xs, ys = r.curve()
        ax.plot(xs, ys, label=r.label, **_style(r, colors))
    ax.set_xlabel("tokens trained (all workers)")
    ax.set_ylabel("eval loss")
    ax.set_title("eval loss vs tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_loss_time(ax: Any, runs: list[RunResult], colors: dict[str, str]) -> None:
    # No point at t = 0: processes start, import torch and join first, so a line from the initial loss
    # would suggest learning during start-up. Time counts from starting the first worker (DDP: the ranks).
    for r in runs:
        ts = [float(row["elapsed_s"]) for row in r.rows]
        ax.plot(ts, [float(row["eval_loss"]) for row in r.rows], label=r.label, **_style(r, colors))
    ax.set_xlabel("wall time since the processes started (s)")
    ax.set_ylabel("eval loss")
    ax.set_title("eval loss vs wall time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _bars(
    ax: Any, table: list[dict[str, Any]], colors: dict[str, str], key: str, title: str, log: bool
) -> None:
    shown = [t for t in table if t[key] is not None]
    labels = [t["label"] for t in shown]
    values = [float(t[key]) for t in shown]
    bars = ax.bar(range(len(values)), values, color=[colors[t["run_id"]] for t in shown])
    ax.set_xticks(range(len(values)), labels, rotation=20, fontsize=8)
    if log:
        ax.set_yscale("log")
    for bar, v in zip(bars, values, strict=True):
        ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")


def write_plots(out: Path, runs: list[RunResult], table: list[dict[str, Any]]) -> dict[str, Path]:
    paths = {k: out / v for k, v in PLOTS.items()}
    colors = _colors([(r.run_id, r.kind) for r in runs])
    single = [
        ("loss_tokens", lambda ax: _plot_loss_tokens(ax, runs, colors)),
        ("loss_time", lambda ax: _plot_loss_time(ax, runs, colors)),
        (
            "bytes",
            lambda ax: _bars(ax, table, colors, "bytes_per_token", "data-plane bytes per token (log)", True),
        ),
        ("utilisation", lambda ax: _bars(ax, table, colors, "utilisation", "compute utilisation", False)),
    ]
    for key, draw in single:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        draw(ax)
        fig.tight_layout()
        fig.savefig(paths[key], dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.4))
    for (_, draw), ax in zip(single, axes.flat, strict=True):
        draw(ax)
    fig.tight_layout()
    fig.savefig(paths["overview"], dpi=100)
    plt.close(fig)
    return paths


# ---- findings and report.md ---------------------------------------------------------------------------


def findings(table: list[dict[str, Any]]) -> list[str]:
    """Sentences stating the sweep's trend in numbers, computed from the summary table."""
    lines: list[str] = []
    baselines = {t["run_id"]: t for t in table if t["kind"] == "ddp"}
    for base_id, base in baselines.items():
        arms = [t for t in table if t["baseline_id"] == base_id and t["traffic_reduction_vs_baseline"]]
        if not arms:
            continue
        lines.append(
            f"Baseline {base['label']} ({base['workers']} ranks): eval loss "
            f"{base['eval_loss_at_equal_tokens']:.4f} "
            f"at {base['equal_tokens']:,} tokens, {base['bytes_per_token']:.1f} bytes per token."
        )
        for t in arms:
            per_h = f" ({t['reduction_over_h']:.2f} × H)" if t["reduction_over_h"] is not None else ""
            lines.append(
                f"{t['label']}: {t['traffic_reduction_vs_baseline']:.1f}× less traffic than DDP{per_h}, "
                f"eval loss {t['eval_loss_at_equal_tokens']:.4f} at equal tokens "
                f"({100 * t['loss_gap_vs_baseline']:+.1f}% vs DDP)."
            )
        with_h = sorted((t for t in arms if t["H"]), key=lambda t: t["H"])
        hs = sorted({t["H"] for t in with_h})
        if len(hs) >= 2:
            lo = min((t for t in with_h if t["H"] == hs[0]), key=lambda t: t["run_id"])
            hi = min((t for t in with_h if t["H"] == hs[-1]), key=lambda t: t["run_id"])
            traffic = lo["bytes_per_token"] / hi["bytes_per_token"]
            falls = all(a["bytes_per_token"] > b["bytes_per_token"] for a, b in itertools.pairwise(with_h))
            worst = max(arms, key=lambda t: t["loss_gap_vs_baseline"])
            loss_lo, loss_hi = lo["eval_loss_at_equal_tokens"], hi["eval_loss_at_equal_tokens"]
            lines.append(
                f"Trend: from H = {hs[0]} to H = {hs[-1]} ({hs[-1] / hs[0]:.0f}× fewer syncs) bytes per "
                f"token fall {traffic:.1f}× ({'monotonically' if falls else 'not monotonically'}), while "
                f"eval loss at equal tokens moves from {loss_lo:.4f} to {loss_hi:.4f} "
                f"({100 * (loss_hi / loss_lo - 1):+.1f}%); the largest gap to DDP is "
                f"{100 * worst['loss_gap_vs_baseline']:+.1f}% ({worst['label']})."
            )
    return lines


def _table_md(table: list[dict[str, Any]]) -> list[str]:
    head = (
        "| run | H | codec | workers | rounds | tokens | eval loss (equal tokens) | gap vs DDP | "
        "bytes/token | traffic vs DDP | utilisation | wall s | consistent |"
    )
    lines = [head, "|" + "---|" * 13]
    for t in table:
        gap = t["loss_gap_vs_baseline"]
        red = t["traffic_reduction_vs_baseline"]
        lines.append(
            f"| {t['label']} | {t['H'] or '–'} | {t['codec']} | {t['workers']} | {t['rounds']} | "
            f"{t['tokens']:,} | {t['eval_loss_at_equal_tokens']:.4f} | "
            f"{'–' if gap is None else f'{100 * gap:+.1f}%'} | {_fmt(t['bytes_per_token'], '.2f')} | "
            f"{'1× (baseline)' if t['kind'] == 'ddp' else ('–' if red is None else f'{red:.1f}× less')} | "
            f"{_fmt(t['utilisation'], '.2f')} | {t['wall_s']:.0f} | "
            f"{'yes' if t['replicas_consistent'] else 'NO'} |"
        )
    return lines


def write_report(out: Path) -> Path:
    """(Re)build summary.csv, the plots and report.md from what OUT holds; returns report.md's path."""
    runs = load_runs(out)
    table = summarize(runs)
    write_csv(out / "summary.csv", table)
    plan = json.loads((out / "plan.json").read_text())["runs"]
    missing = [p["run_id"] for p in plan if p["run_id"] not in {r.run_id for r in runs}]
    spec_text = (out / "spec.toml").read_text() if (out / "spec.toml").exists() else ""
    spec = tomllib.loads(spec_text) if spec_text else {}
    lines = [f"# Experiment: {spec.get('name', out.name)}", ""]
    if spec.get("description"):
        lines += [spec["description"].strip(), ""]
    if runs:
        paths = write_plots(out, runs, table)
        first = runs[0].plan["run"]
        lines += [
            f"Model `{first['model_size']}`, sequences of {first['seq_len']} tokens, batch "
            f"{first['batch_size']} per worker; every run trains the same tokens (DDP: real "
            f"`torch.distributed` gloo data-parallel training with as many ranks as DiLoCo has "
            f"workers). Numbers below are computed from `{RESULTS}` by `antorcha.experiments.report`.",
            "",
            "## Findings",
            "",
            *[f"- {line}" for line in findings(table)],
            "",
            "## Runs",
            "",
            *_table_md(table),
            "",
            "*Bytes per token*: data-plane bytes sent by all participants (DiLoCo: pseudo-gradient chunks "
            "and reducers' answers, counted once by their sender; DDP: ring all-reduce share of each "
            "rank's fp32 gradients) divided by tokens trained by all workers. *Utilisation*: share of a "
            "worker's wall time spent in inner steps (mean over workers; DDP: training time / wall time). "
            "*Wall time* of DDP evals is placed along rank 0's training time.",
            "",
            *[
                f"Links of `{r.run_id}`: {r.record['link_method']}."
                for r in runs
                if r.record.get("link_method")
            ],
            "",
            "## Plots",
            "",
            f"![eval loss vs tokens]({paths['loss_tokens'].name})",
            f"![eval loss vs wall time]({paths['loss_time'].name})",
            f"![bytes per token]({paths['bytes'].name})",
            f"![utilisation]({paths['utilisation'].name})",
            "",
        ]
    else:
        lines += ["No run has finished yet.", ""]
    if missing:
        lines += [f"Not finished (or failed): {', '.join(missing)}. Run the same command again to finish."]
        lines += [""]
    lines += ["## Spec used", "", "```toml", spec_text.rstrip(), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
