"""The report's forms: a coloured terminal summary, report.md, report.csv (machine-readable) and
a self-contained report.html (inline CSS and JS, plots embedded as PNG data URLs: no network)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd
from tabulate import tabulate
from termcolor import colored

CSV_COLUMNS = [
    "task",
    "subject",
    "run",
    "value",
    "total",
    "delta",
    "ci_low",
    "ci_high",
    "paired",
    "significant",
    "errors",
    "unparsed",
]


def fmt(x, digits: int = 4) -> str:
    if x is None or x is pd.NA or (isinstance(x, float) and x != x):
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def write_csv(scores: pd.DataFrame, path: Path) -> None:
    scores[CSV_COLUMNS].to_csv(path, index=False, float_format="%.6f")


def print_terminal(sections: Dict[str, pd.DataFrame], scores: pd.DataFrame, failures: List[str]) -> None:
    table = []
    for _, r in scores.iterrows():
        delta = ""
        if r["delta"] is not None and r["delta"] == r["delta"]:
            text = f"{r['delta'] * 100:+.2f} [{r['ci_low'] * 100:+.2f}, {r['ci_high'] * 100:+.2f}]"
            delta = colored(
                text, "red" if r["significant"] and r["delta"] < 0 else "green" if r["significant"] else None
            )
        table.append(
            [
                r["subject"],
                r["run"],
                f"{r['value'] * 100:.2f}" if r["value"] == r["value"] else "",
                r["total"],
                r["errors"],
                r["unparsed"],
                delta,
            ]
        )
    print(colored("\nScores (%; delta to the baseline with its 95% paired-bootstrap interval)", "cyan", attrs=["bold"]))
    print(
        tabulate(table, headers=["subject", "run", "score", "total", "errors", "unparsed", "delta"], tablefmt="github")
    )
    diff = sections.get("Configuration differences")
    if diff is not None and not diff.empty:
        print(colored("\nWhat differs between the runs' configurations", "cyan", attrs=["bold"]))
        print(tabulate(diff.values.tolist(), headers=list(diff.columns), tablefmt="github", maxcolwidths=40))
    for f in failures:
        print(colored(f"GATE: {f}", "red", attrs=["bold"]))


def write_markdown(title: str, sections: Dict[str, pd.DataFrame], path: Path) -> None:
    parts = [f"# {title}\n"]
    for name, df in sections.items():
        parts.append(f"\n## {name}\n")
        if df is None or df.empty:
            parts.append("\n(none)\n")
            continue
        parts.append("\n" + tabulate(df.map(_cell).values.tolist(), headers=list(df.columns), tablefmt="github") + "\n")
    path.write_text("".join(parts), encoding="utf-8")


def _cell(v):
    """A table cell as text: floats to 4 digits, missing values (None, NaN, pandas' NA) empty."""
    if v is None or v is pd.NA or isinstance(v, float):
        return fmt(v)
    return v


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plots(scores: pd.DataFrame, runs, lengths: pd.DataFrame) -> Dict[str, str]:
    """name -> PNG data URL: per-subject scores with interval whiskers, the latency histogram,
    accuracy against input length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = {}
    subjects = list(dict.fromkeys(scores["subject"]))
    labels = list(dict.fromkeys(scores["run"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(subjects) * max(1, len(labels)) / 2), 3.6))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        s = scores[scores["run"] == label].set_index("subject").reindex(subjects)
        x = np.arange(len(subjects)) + j * width
        err = None
        if s["delta"].notna().any():
            # whiskers: the baseline-relative interval, drawn around this run's score
            lo = (s["delta"] - s["ci_low"]).fillna(0).to_numpy(float)
            hi = (s["ci_high"] - s["delta"]).fillna(0).to_numpy(float)
            err = np.vstack([lo, hi])
        ax.bar(x, s["value"].to_numpy(float), width, yerr=err, capsize=3, label=label)
    ax.set_xticks(np.arange(len(subjects)) + width * (len(labels) - 1) / 2, subjects, rotation=30, ha="right")
    ax.set_ylabel("score (fraction correct, as in the tables)")
    ax.legend(fontsize=8)
    out["scores"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    for run in runs:
        t = run.records["e2e_time"].dropna()
        if len(t):
            ax.hist(t.to_numpy(float), bins=20, alpha=0.5, label=run.label)
    ax.set_xlabel("e2e_time per sample (s)")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    out["latency"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    for label in labels:
        runs = lengths[lengths["run"] == label]
        ax.plot(runs["tokens"], runs["accuracy"].astype(float), marker="o", label=label)
    ax.set_xlabel("input tokens")
    ax.set_ylabel("accuracy (fraction)")
    ax.legend(fontsize=8)
    out["length"] = _png(fig)
    return out


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;vertical-align:top;max-width:420px;overflow-wrap:anywhere}
th{background:#eee;cursor:pointer}tr.worse td{background:#fde8e8}tr.better td{background:#e8f8e8}
input.filter{margin:.2em 0;padding:2px 6px;width:20em}.sig-drop{color:#b00;font-weight:bold}.sig-gain{color:#070;font-weight:bold}"""

SCRIPT = """document.querySelectorAll('table.data').forEach(function(t){
 t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
  var rows=Array.from(t.tBodies[0].rows),asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
  rows.sort(function(a,b){var x=a.cells[i].textContent,y=b.cells[i].textContent,p=parseFloat(x),q=parseFloat(y);
   var c=(!isNaN(p)&&!isNaN(q))?p-q:x.localeCompare(y);return asc?c:-c;});
  rows.forEach(function(r){t.tBodies[0].appendChild(r);});});});});
document.querySelectorAll('input.filter').forEach(function(f){f.addEventListener('input',function(){
 var t=document.getElementById(f.dataset.table),q=f.value.toLowerCase();
 Array.from(t.tBodies[0].rows).forEach(function(r){r.style.display=r.textContent.toLowerCase().indexOf(q)<0?'none':'';});});});"""


def _table(df: pd.DataFrame, table_id: str) -> str:
    if df is None or df.empty:
        return "<p>(none)</p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for _, r in df.iterrows():
        cls = f' class="{r["change"]}"' if "change" in df.columns else ""
        cells = []
        for c in df.columns:
            v = r[c]
            text = html.escape(fmt(v))
            if c == "delta" and "significant" in df.columns and r.get("significant"):
                text = f'<span class="{"sig-drop" if v < 0 else "sig-gain"}">{text}</span>'
            cells.append(f"<td>{text}</td>")
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return (
        f'<input class="filter" data-table="{table_id}" placeholder="filter rows">'
        f'<table class="data" id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    )


def write_html(
    title: str,
    sections: Dict[str, pd.DataFrame],
    images: Dict[str, str],
    path: Path,
    failures: Optional[List[str]] = None,
) -> None:
    captions = {
        "scores": "Score per subject (whiskers: 95% interval of the difference to the baseline)",
        "latency": "Per-sample latency (e2e_time)",
        "length": "Accuracy by input length",
    }
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    for f in failures or []:
        parts.append(f'<p class="sig-drop">GATE: {html.escape(f)}</p>')
    for key, url in images.items():
        parts.append(
            f'<figure id="plot-{key}"><img alt="{html.escape(captions[key])}" src="{url}">'
            f"<figcaption>{html.escape(captions[key])}</figcaption></figure>"
        )
    for i, (name, df) in enumerate(sections.items()):
        parts.append(f"<h2>{html.escape(name)}</h2>{_table(df, f't{i}')}")
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    path.write_text("".join(parts), encoding="utf-8")
