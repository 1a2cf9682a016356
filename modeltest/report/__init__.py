"""`modeltest report`: read runs back, compare them, write the review.

load.py      a run's result files -> Run (summary, saved configuration, scored records)
compare.py   scores side by side with paired-bootstrap intervals, configuration diff, changed
             samples, errors, confusion, accuracy by input length, speed; the CI gate
render.py    terminal summary, report.md, report.csv, a self-contained report.html
bench.py     `--bench A.json B.json`: benchmark JSONs side by side
"""
