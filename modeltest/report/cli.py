"""`modeltest report RUN [RUN ...]`: compare runs of one task and see where a model fails."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def add_parser(sub) -> None:
    r = sub.add_parser("report", help="compare runs side by side (scores with intervals, what changed, failures)")
    r.add_argument("runs", nargs="*", help="output_dir of each run (or a *_result.csv / *_summary.json in one)")
    r.add_argument("--task", default=None, help="which task, when an output_dir holds several")
    r.add_argument(
        "--baseline",
        default=None,
        help="the run the others are compared with (a RUN, or its index; default: the first)",
    )
    r.add_argument("--labels", default=None, help="comma-separated names for the runs in the tables")
    r.add_argument("--out", default="report", help="where to write report.md/.csv/.html (default: ./report)")
    r.add_argument(
        "--fail-below",
        nargs="*",
        default=[],
        metavar="SUBJECT=DELTA",
        help="exit 1 when a score drops significantly by more than DELTA against the baseline "
        "(SUBJECT: a subject, the task name for the overall score, or all)",
    )
    r.add_argument(
        "--bench",
        nargs="*",
        default=None,
        metavar="JSON",
        help="compare `modeltest bench` / `bench-serve` JSONs instead (the first is the baseline)",
    )
    r.add_argument(
        "--regression-threshold",
        type=float,
        default=0.05,
        help="--bench: a figure worse by more than this fraction is a regression (default 0.05)",
    )
    r.set_defaults(func=main)


def main(args) -> int:
    out = Path(args.out)
    if args.bench is not None:
        return bench_main(args, out)
    from .compare import (
        changed_samples,
        config_diff,
        confusion,
        error_groups,
        gate_failures,
        length_bins,
        parse_gate,
        score_table,
        speed,
        weighted_rows,
    )
    from .load import load_run, name_runs
    from .render import plots, print_terminal, write_csv, write_html, write_markdown

    if not args.runs:
        raise UserError("report: give at least one run (an output_dir), or --bench A.json B.json")
    labels = args.labels.split(",") if args.labels else [None] * len(args.runs)
    if len(labels) != len(args.runs):
        raise UserError(f"--labels: {len(labels)} names for {len(args.runs)} runs")
    runs = [load_run(p, args.task, label) for p, label in zip(args.runs, labels)]
    name_runs(runs, args.runs)
    tasks = {r.task for r in runs}
    if len(tasks) > 1:
        raise UserError(f"report: the runs are of different tasks ({', '.join(sorted(tasks))}); choose one with --task")
    baseline = _baseline_index(args.baseline, args.runs, runs)
    runs = [runs[baseline]] + [r for i, r in enumerate(runs) if i != baseline]
    scores = score_table(runs)
    lengths = length_bins(runs)
    sections = {"Scores": scores}
    if runs[0].task == "videobench":
        sections["Weighted scores (VideoBench)"] = weighted_rows(runs)
    sections["Configuration differences"] = config_diff(runs)
    for other in runs[1:]:
        sections[f"Changed samples: {runs[0].label} -> {other.label}"] = changed_samples(runs[0], other)
    sections["Errors by message"] = error_groups(runs)
    if runs[0].task == "videobench":
        for run in runs:
            sections[f"Predicted vs gold letters: {run.label}"] = confusion(run).reset_index()
    sections["Accuracy by input length"] = lengths
    sections["Speed"] = speed(runs)
    failures = gate_failures(scores, parse_gate(args.fail_below))
    out.mkdir(parents=True, exist_ok=True)
    title = f"{runs[0].task}: " + " vs ".join(r.label for r in runs)
    write_csv(scores, out / "report.csv")
    write_markdown(title, sections, out / "report.md")
    write_html(title, sections, plots(scores, runs, lengths), out / "report.html", failures)
    print_terminal(sections, scores, failures)
    print(f"report: {out / 'report.html'} (also report.md, report.csv)")
    return 1 if failures else 0


def _baseline_index(choice, paths, runs) -> int:
    if choice is None:
        return 0
    if choice.isdigit() and int(choice) < len(runs):
        return int(choice)
    for i, (p, r) in enumerate(zip(paths, runs)):
        if choice in (p, r.label):
            return i
    raise UserError(f"--baseline {choice}: not one of the runs ({', '.join(r.label for r in runs)})")


def bench_main(args, out: Path) -> int:
    from tabulate import tabulate
    from termcolor import colored

    from .bench import compare_bench

    if len(args.bench) < 2:
        raise UserError("--bench: give at least two JSONs (the first is the baseline)")
    table = compare_bench(args.bench, args.regression_threshold)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "bench_report.csv", index=False, float_format="%.6f")
    rows = [
        [
            r.row,
            r.figure,
            f"{r.baseline:.4g}",
            r.run,
            f"{r.value:.4g}",
            colored(f"{r.ratio:.3f}", "red" if r.regression else None),
        ]
        for r in table.itertuples()
    ]
    print(tabulate(rows, headers=["row", "figure", "baseline", "run", "value", "ratio"], tablefmt="github"))
    bad = table[table["regression"]]
    for r in bad.itertuples():
        print(colored(f"regression: {r.row} {r.figure} {r.baseline:.4g} -> {r.value:.4g} ({r.run})", "red"))
    print(f"report: {out / 'bench_report.csv'}")
    return 1 if len(bad) else 0
