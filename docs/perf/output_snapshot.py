"""Every output a user sees, in one JSON file, to compare two versions of modeltest after a refactor:
both tasks on the demo (engine and hf backends), run_pa on an image and a video, and the server's
greedy answers to a text, an image and a video request.

    python docs/perf/output_snapshot.py /tmp/before      # on the old checkout
    python docs/perf/output_snapshot.py /tmp/after       # on the new one
    python -c "import json; a, b = (json.load(open(f'/tmp/{x}/snapshot.json')) for x in ('before', 'after')); print([k for k in a if a[k] != b[k]])"

REPO (default: this checkout) picks the modeltest to run; DEMO (default /tmp/modeltest-snapshot-demo)
is built once and shared, so both versions answer the same questions."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

repo = Path(os.environ.get("REPO", Path(__file__).resolve().parents[2]))
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
py = sys.executable
demo = Path(os.environ.get("DEMO", "/tmp/modeltest-snapshot-demo"))
if not demo.exists():
    subprocess.run([py, "-m", "modeltest", "demo", "--dir", str(demo), "--build-only"], check=True, cwd=repo)
model = demo / "Qwen2-VL-tiny-random"
env = dict(os.environ, MODELTEST_PYTHON=sys.executable, MODELTEST_MEDIA_CACHE=str(demo) + "-media-cache")
res = {}
for backend in ("engine", "hf"):
    for task, ds in (("textvqa", demo / "textvqa/textvqa_val.jsonl"), ("videobench", demo / "videobench/Eval_QA")):
        od = out / f"run_{task}_{backend}"
        subprocess.run(
            [
                "bash",
                "scripts/mm_run.sh",
                task,
                "qwen2_vl",
                f"model.model_path={model}",
                f"task.local_dataset_path={ds}",
                *(["task.subject_mapping=null"] if task == "videobench" else []),
                f"output_dir={od}",
                f"model.backend={backend}",
                "prep_workers=0",
                "resume=false",
                "batch_size=4",
            ],
            check=True,
            cwd=repo,
            env=env,
            capture_output=True,
        )
        f = sorted(glob.glob(str(od / "debug/**/output_*.txt"), recursive=True))[0]
        recs = [json.loads(line) for line in open(f)]
        res[f"{task}_{backend}"] = [
            {k: r.get(k) for k in ("id", "output", "input_tokens", "output_tokens", "prediction", "score", "error")}
            for r in recs
        ]
        res[f"{task}_{backend}_csv"] = open(
            sorted(glob.glob(str(od / "results/**/*_result.csv"), recursive=True))[0]
        ).read()
img = sorted((demo / "textvqa").rglob("*.jpg"))[0]
vid = sorted((demo / "videobench").rglob("*.mp4"))[0]
for name, f in (("img", img), ("vid", vid)):
    rp = out / f"run_pa_{name}.json"
    subprocess.run(
        [
            "bash",
            "scripts/run_pa.sh",
            "--model_path",
            str(model),
            "--input_image",
            str(f),
            "--max_batch_size",
            "2",
            "--max_output_length",
            "12",
            "--results_save_path",
            str(rp),
        ],
        check=True,
        cwd=repo,
        capture_output=True,
        env=env,
    )
    res[f"run_pa_{name}"] = [{k: r[k] for k in ("output", "output_token_ids", "error")} for r in json.load(open(rp))]
s = socket.socket()
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
s.close()
proc = subprocess.Popen(
    [
        py,
        "-m",
        "modeltest",
        "serve",
        "--model_path",
        str(model),
        "--port",
        str(port),
        "--allowed-local-media-path",
        "/tmp",
    ],
    cwd=repo,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
try:
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    for name, content in (
        ("text", "Hello there"),
        ("img", [{"type": "image_url", "image_url": {"url": img.as_uri()}}, {"type": "text", "text": "What?"}]),
        ("vid", [{"type": "video_url", "video_url": {"url": vid.as_uri()}}, {"type": "text", "text": "What?"}]),
    ):
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 12,
                "temperature": 0,
                "mm_processor_kwargs": {"fps": 0.5} if name == "vid" else {},
            },
            timeout=300,
        ).json()
        res[f"serve_{name}"] = [r.get("choices", [{}])[0].get("message"), r.get("usage"), r.get("error")]
finally:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
json.dump(res, open(out / "snapshot.json", "w"), indent=1, sort_keys=True)
print("ok", len(res))
