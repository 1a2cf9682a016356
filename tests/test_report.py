"""`modeltest report`: figures against an independent computation, the HTML page in a real
headless browser, the CI gate, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest


def evaluate(demo, data, out, task="textvqa"):
    from modeltest.config import load_config
    from modeltest.runner import Evaluator
    from modeltest.tasks import TASKS

    path = data / "textvqa" / "textvqa_val.jsonl" if task == "textvqa" else data / "videobench" / "Eval_QA"
    extra = ["task.subject_mapping=null"] if task == "videobench" else []
    return Evaluator(
        load_config(
            TASKS,
            task,
            "qwen2_vl",
            [
                f"model.model_path={demo.model}",
                f"task.local_dataset_path={path}",
                f"output_dir={out}",
                "max_output_length=4",
                *extra,
            ],
        ),
        show_progress=False,
    ).run()


def report(*argv):
    from modeltest.cli import main

    return main(["report", *argv])


@pytest.fixture(scope="module")
def two_runs(demo, tmp_path_factory):
    """Run A; then run B on a copy whose answer key gives 6 of 8 questions A's own answers."""
    root = tmp_path_factory.mktemp("report_runs")
    data = root / "data"
    shutil.copytree(demo.textvqa_jsonl.parent, data / "textvqa")
    ann_path = data / "textvqa" / "textvqa_val_annotations.json"
    ann = json.loads(ann_path.read_text())
    for entry in ann["annotations"]:  # no answer of A's matches (the demo's planted ones included)
        entry["answers"] = [{"answer": "no such answer"}] * 10
    ann_path.write_text(json.dumps(ann))
    a = evaluate(demo, data, root / "A")
    predicted = {r.id: r.extra["normalized"] for r in a.records}
    for entry in ann["annotations"][:6]:
        entry["answers"] = [{"answer": predicted[str(entry["question_id"])]}] * 10
    ann_path.write_text(json.dumps(ann))
    evaluate(demo, data, root / "B")
    return root


def independent(root: str, run: str) -> pd.DataFrame:
    debug = next((root / run / "debug").rglob("output_*.txt"))
    return pd.read_json(debug, lines=True, dtype={"id": str})


def test_report_csv_equals_an_independent_computation(two_runs, tmp_path):
    out = tmp_path / "rep"
    assert report(str(two_runs / "A"), str(two_runs / "B"), "--out", str(out)) == 0
    csv = pd.read_csv(out / "report.csv")
    assert list(csv.columns)[:8] == ["task", "subject", "run", "value", "total", "delta", "ci_low", "ci_high"]
    a, b = independent(two_runs, "A"), independent(two_runs, "B")
    row_a, row_b = csv[csv["run"] == "A"].iloc[0], csv[csv["run"] == "B"].iloc[0]
    assert row_a["value"] == pytest.approx(a["score"].mean()) and row_a["total"] == len(a)
    assert row_b["value"] == pytest.approx(b["score"].mean()) and row_b["value"] == pytest.approx(0.75)
    assert row_b["delta"] == pytest.approx(b["score"].mean() - a["score"].mean())
    # The interval, by a closed form rather than the code's own resampling: A scores 0 everywhere
    # and B 1 on 6 of the 8 pairs, so a resampled mean difference is Binomial(8, 3/4) / 8, whose
    # 2.5th and 97.5th percentiles are 3/8 and 1 (P(X <= 2) = 0.004, P(X <= 3) = 0.027,
    # P(X <= 7) = 0.90); 2000 resamples may put the lower one up to the next value, 1/2.
    assert (a["score"] == 0).all() and sorted(b["score"]) == [0, 0, 1, 1, 1, 1, 1, 1]
    assert 3 / 8 <= row_b["ci_low"] <= 1 / 2 and row_b["ci_high"] == 1.0
    assert bool(row_b["significant"]) and row_b["paired"] == 8
    md = (out / "report.md").read_text()
    assert "## Changed samples: A -> B" in md and md.count("| better") == 6
    assert "## Configuration differences" in md and "run.output_dir" in md


def test_gate_fails_on_a_planted_regression_and_passes_without(two_runs, tmp_path, capsys):
    # B as the baseline: A lost 6 of 8 answers, significantly.
    assert (
        report(
            str(two_runs / "A"),
            str(two_runs / "B"),
            "--baseline",
            "B",
            "--fail-below",
            "all=0.01",
            "--out",
            str(tmp_path / "r1"),
        )
        == 1
    )
    assert "GATE: A: textvqa dropped 0.7500" in capsys.readouterr().out
    assert (
        report(str(two_runs / "A"), str(two_runs / "B"), "--fail-below", "all=0.01", "--out", str(tmp_path / "r2")) == 0
    )
    assert (
        report(
            str(two_runs / "A"),
            str(two_runs / "B"),
            "--baseline",
            "1",
            "--fail-below",
            "textvqa=0.8",
            "--out",
            str(tmp_path / "r3"),
        )
        == 0
    )  # a drop smaller than allowed


@pytest.mark.subprocess  # a headless chromium (scripts/setup_browser.sh installs it)
def test_html_opens_in_a_headless_browser(two_runs, demo, tmp_path):
    if os.environ.get("MODELTEST_NO_BROWSER") == "1":
        pytest.skip("MODELTEST_NO_BROWSER=1: no browser on this machine (scripts/setup_browser.sh installs one)")
    chromium = shutil.which("chromium")
    assert chromium, "chromium is missing: run scripts/setup_browser.sh (or set MODELTEST_NO_BROWSER=1)"
    out = tmp_path / "rep"
    report(str(two_runs / "A"), str(two_runs / "B"), "--out", str(out))
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and 'src="//' not in page  # nothing external
    proc = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            (out / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert "Uncaught" not in proc.stderr and "CONSOLE" not in proc.stderr.upper().replace("CONSOLE_", ""), proc.stderr[
        -2000:
    ]
    for plot in ("plot-scores", "plot-latency", "plot-length"):
        assert f'id="{plot}"' in dom and "data:image/png;base64," in dom
    for section in (
        "Scores",
        "Configuration differences",
        "Changed samples: A -&gt; B",
        "Errors by message",
        "Accuracy by input length",
        "Speed",
    ):
        assert f"<h2>{section}</h2>" in dom, section
    assert dom.count("<table") >= 5 and dom.count('class="better"') == 6  # empty sections say (none)


def test_videobench_report_has_the_confusion_and_weighted_scores(demo, tmp_path):
    evaluate(demo, demo.root, tmp_path / "V", task="videobench")
    assert report(str(tmp_path / "V"), "--out", str(tmp_path / "rep")) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Predicted vs gold letters: V" in md and "weighted_score" in md


def test_bad_inputs_are_one_line_errors(two_runs, demo, tmp_path, capsys):
    def error(*argv) -> str:
        capsys.readouterr()
        assert report(*argv, "--out", str(tmp_path / "r")) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("modeltest: error: "), err
        return err

    (tmp_path / "empty").mkdir()
    assert "no results here" in error(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    shutil.copytree(two_runs / "A", broken)
    debug = next((broken / "debug").rglob("output_*.txt"))
    summary = next((broken / "results").rglob("*_summary.json"))
    s = json.loads(summary.read_text())
    s["debug_file"] = str(debug)
    summary.write_text(json.dumps(s))
    text = debug.read_text()
    debug.write_text(text[: len(text) - 40])  # the last record cut short
    assert ".txt:8: not a sample record" in error(str(broken))
    both = tmp_path / "both"
    shutil.copytree(two_runs / "A", both)
    evaluate(demo, demo.root, both, task="videobench")
    assert "runs of several tasks (textvqa, videobench); choose one with --task" in error(str(both))
    assert "different tasks" in error(str(two_runs / "A"), str(both / "results" / "videobench"))
    assert report(str(both), "--task", "videobench", "--out", str(tmp_path / "r")) == 0


def test_bench_jsons_side_by_side(tmp_path):
    rows = lambda sps: {
        "results": [
            {
                "backend": "engine",
                "workload": "textvqa",
                "batch_size": 8,  # noqa: E731
                "samples_per_s": sps,
                "ttft_p50_ms": 100.0,
            }
        ]
    }
    (tmp_path / "a.json").write_text(json.dumps(rows(2.0)))
    (tmp_path / "b.json").write_text(json.dumps(rows(1.5)))
    (tmp_path / "c.json").write_text(json.dumps(rows(2.05)))
    assert report("--bench", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "r")) == 1
    table = pd.read_csv(tmp_path / "r" / "bench_report.csv")
    sps = table[table["figure"] == "samples_per_s"].iloc[0]
    assert sps["ratio"] == pytest.approx(0.75) and bool(sps["regression"])
    assert report("--bench", str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--out", str(tmp_path / "r")) == 0


def test_runs_are_labelled_by_what_differs_and_a_textvqa_report_shows_only_its_sections(
    demo, data_copy, tmp_path, capsys
):
    """Two runs in the default layout's folder name (precision_result) on different backends: the
    tables call them by backend, not precision_result and precision_result#2; no VideoBench
    section in a TextVQA report; no <NA> cells; charts in the tables' unit."""
    from modeltest.config import load_config
    from modeltest.runner import Evaluator
    from modeltest.tasks import TASKS

    for backend in ("engine", "hf"):
        out = tmp_path / backend / "precision_result"
        Evaluator(
            load_config(
                TASKS,
                "textvqa",
                "qwen2_vl",
                [
                    f"model.model_path={demo.model}",
                    f"task.local_dataset_path={data_copy / 'textvqa' / 'textvqa_val.jsonl'}",
                    f"output_dir={out}",
                    "max_output_length=4",
                    f"model.backend={backend}",
                    "limit=3",
                ],
            ),
            show_progress=False,
        ).run()
    rep = tmp_path / "rep"
    assert (
        report(
            str(tmp_path / "engine" / "precision_result"), str(tmp_path / "hf" / "precision_result"), "--out", str(rep)
        )
        == 0
    )
    csv = pd.read_csv(rep / "report.csv")
    assert set(csv["run"]) == {"engine", "hf"}
    md = (rep / "report.md").read_text()
    assert "# textvqa: engine vs hf" in md and "precision_result" not in md.split("\n")[0]
    assert "VideoBench" not in md and "<NA>" not in md and "nan" not in md.split("## Configuration")[0]
    # one run alone in the default layout: named by its model, backend and data type
    assert report(str(tmp_path / "hf" / "precision_result"), "--out", str(tmp_path / "one")) == 0
    assert (tmp_path / "one" / "report.md").read_text().startswith("# textvqa: qwen2_vl hf fp32")


def test_paired_bootstrap_against_known_answers():
    """The interval's code against answers computed another way (no scipy here): degenerate and
    two-point cases exactly, a large sample against the normal approximation of the mean."""
    from modeltest.report.compare import paired_bootstrap

    assert paired_bootstrap(np.zeros(5), np.full(5, 0.25)) == (0.25, 0.25)  # no spread: a point
    # two pairs, differences 0 and 1: resampled means are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4
    assert paired_bootstrap(np.zeros(2), np.array([0.0, 1.0])) == (0.0, 1.0)
    # 400 pairs: 120 gains, 40 losses, the rest equal -> mean 0.2, sd of the mean ~ 0.0245
    diff = np.array([1.0] * 120 + [-1.0] * 40 + [0.0] * 240)
    lo, hi = paired_bootstrap(np.zeros(400), diff)
    half = 1.96 * diff.std() / np.sqrt(400)
    assert lo == pytest.approx(0.2 - half, abs=0.15 * half) and hi == pytest.approx(0.2 + half, abs=0.15 * half)
    assert np.isnan(paired_bootstrap(np.zeros(0), np.zeros(0))[0])


def test_delta_and_interval_are_over_the_same_pairs_when_sample_sets_differ(two_runs, demo, tmp_path):
    """C computes only the first 5 of B's 8 questions, with B's answers: over the pairs both
    scored nothing changed (delta 0 inside [0, 0]), though C's own mean (1.0) is not B's (0.75)."""
    from modeltest.config import load_config
    from modeltest.runner import Evaluator
    from modeltest.tasks import TASKS

    jsonl = two_runs / "data" / "textvqa" / "textvqa_val.jsonl"
    Evaluator(
        load_config(
            TASKS,
            "textvqa",
            "qwen2_vl",
            [
                f"model.model_path={demo.model}",
                f"task.local_dataset_path={jsonl}",
                f"output_dir={tmp_path / 'C'}",
                "max_output_length=4",
                "limit=5",
            ],
        ),
        show_progress=False,
    ).run()
    out = tmp_path / "rep"
    assert report(str(two_runs / "B"), str(tmp_path / "C"), "--out", str(out)) == 0
    csv = pd.read_csv(out / "report.csv")
    row_c = csv[csv["run"] == "C"].iloc[0]
    assert row_c["total"] == 5 and row_c["value"] == 1.0 and row_c["paired"] == 5
    assert row_c["delta"] == 0.0 and row_c["ci_low"] == 0.0 and row_c["ci_high"] == 0.0
    assert not bool(row_c["significant"])


def test_model_outputs_are_escaped_in_the_html(tmp_path):
    """A model can answer anything, markup included: the page shows it as text, never runs it."""
    from modeltest.report.render import write_html

    evil = "<script>alert('x')</script> & <img src=x onerror=alert(1)>"
    sections = {"Changed samples: <A> -> B": pd.DataFrame([{"id": "1", "output (A)": evil, "change": "worse"}])}
    write_html("textvqa: <A> vs B", sections, {}, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "<script>alert" not in page and "<img src=x" not in page and "<A>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;img src=x onerror=alert(1)&gt;" in page
    assert page.count("<script>") == 1  # the page's own sort/filter script only


@pytest.mark.subprocess  # a headless chromium (scripts/setup_browser.sh installs it)
def test_the_pages_tables_sort_by_number_and_filter_in_a_real_browser(tmp_path):
    """The report's own script, driven in chromium: a click on a header sorts the rows by number
    (not as text: 2.5 < 9 < 10 < 100), a second click reverses, typing in the filter hides the rows
    without the text."""
    import html as htmlmod
    import re

    from modeltest.report.render import write_html

    if os.environ.get("MODELTEST_NO_BROWSER") == "1":
        pytest.skip("MODELTEST_NO_BROWSER=1: no browser on this machine (scripts/setup_browser.sh installs one)")
    chromium = shutil.which("chromium")
    assert chromium, "chromium is missing: run scripts/setup_browser.sh (or set MODELTEST_NO_BROWSER=1)"
    rows = [{"name": n, "value": v} for n, v in (("alpha", "10"), ("beta", "9"), ("gamma", "100"), ("beta2", "2.5"))]
    page = tmp_path / "r.html"
    write_html("t", {"Table": pd.DataFrame(rows)}, {}, page)
    driver = """<script>
var t=document.getElementById('t0'), th=t.querySelectorAll('th')[1];
function col(i){return Array.from(t.tBodies[0].rows).map(function(r){return r.cells[i].textContent;}).join(',');}
th.click(); var asc=col(1); th.click(); var desc=col(1);
var f=document.querySelector('input.filter'); f.value='BETA'; f.dispatchEvent(new Event('input'));
var shown=Array.from(t.tBodies[0].rows).filter(function(r){return r.style.display!=='none';})
  .map(function(r){return r.cells[0].textContent;}).sort().join(',');
document.body.setAttribute('data-result', JSON.stringify({asc: asc, desc: desc, shown: shown}));
</script></body>"""
    page.write_text(page.read_text().replace("</body>", driver))
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'data-result="([^"]*)"', proc.stdout)
    assert found, proc.stdout[-2000:]
    result = json.loads(htmlmod.unescape(found.group(1)))
    assert result == {"asc": "2.5,9,10,100", "desc": "100,10,9,2.5", "shown": "beta,beta2"}
