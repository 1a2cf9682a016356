"""The coloured end-of-run table."""

from __future__ import annotations

from typing import List, Optional

from tabulate import tabulate
from termcolor import colored

from .core import ResultRow, SampleRecord, count_errors, errors_by_message


def print_summary(
    cfg,
    rows: List[ResultRow],
    records: List[SampleRecord],
    paths,
    elapsed: float,
    computed: int,
    load_s: Optional[float] = None,
) -> None:
    """elapsed: seconds of evaluation (model loading, load_s, is shown apart)."""
    table = []
    for r in rows:
        value = "" if r.value is None else f"{100 * r.value:.2f}"
        is_acc = r.metric == "acc"
        table.append(
            [
                r.tasks,
                r.total if is_acc else "",
                f"{r.passed:g}" if is_acc else "",
                r.metric,
                value,
                r.errors if is_acc else "",
                r.unparsed if is_acc else "",
            ]
        )
    head = ["Tasks", "Total", "Pass", "Metric", "Value (%)", "Errors", "Unparsed"]
    print()
    print(
        colored(
            f"{cfg.task.task_name} | {cfg.model.model_name} | {cfg.model.backend} | {cfg.model.data_type or 'served'} | "
            f"batch {cfg.run.batch_size} | {len(records)} samples, {computed} computed in {elapsed:.1f}s"
            + (f" (+ {load_s:.1f}s loading the model)" if load_s is not None else ""),
            "cyan",
            attrs=["bold"],
        )
    )
    text = tabulate(table, headers=head, tablefmt="github")
    lines = text.splitlines()
    if len(lines) > 2:
        lines[2] = colored(lines[2], "green", attrs=["bold"])  # the overall row
    print("\n".join(lines))
    notes = sorted({r.preprocessing for r in records if r.preprocessing})
    for note in notes:
        n = sum(1 for r in records if r.preprocessing == note)
        print(colored(f"{n} of {len(records)} sample(s): {note} (the score is not the task's setting)", "yellow"))
    errors = count_errors(records)
    if errors:
        print(
            colored(
                f"{errors} of {len(records)} sample(s) recorded with errors (see 'error' in the debug file):", "yellow"
            )
        )
        grouped = errors_by_message(records)
        for message, n in grouped[:5]:
            print(colored(f"  {n} x {message}", "yellow"))
        if len(grouped) > 5:
            print(colored(f"  ... and {len(grouped) - 5} other message(s) (summary.json: errors_by_message)", "yellow"))
    print(f"result csv : {paths.result_csv}")
    print(f"debug file : {paths.debug_file}")
