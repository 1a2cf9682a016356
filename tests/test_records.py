"""The typed per-sample record: its JSON form, older records read for resuming, newer ones skipped."""

import json

from modeltest.core import SCHEMA_VERSION, SampleRecord
from modeltest.records import RecordStore


def test_round_trip_keeps_key_order_and_task_extras():
    rec = SampleRecord(
        id="7",
        subject="MSVD",
        input={"prompt": "p", "images": [], "videos": ["v.mp4"]},
        output="B",
        prediction="B",
        gold="B",
        score=1.0,
        e2e_time=0.5,
        queue_time=0.1,
        choices={"A": "x", "B": "y"},
        extra={"reference_rule_choice": "B"},
        key="k1",
    )
    d = rec.to_json()
    assert list(d) == [
        "id",
        "subject",
        "input",
        "output",
        "prediction",
        "gold",
        "score",
        "error",
        "e2e_time",
        "queue_time",
        "preprocess_time",
        "input_tokens",
        "output_tokens",
        "prefill_time",
        "choices",
        "reference_rule_choice",
        "key",
        "schema",
    ]
    assert d["schema"] == SCHEMA_VERSION and SampleRecord.from_json(json.loads(json.dumps(d))) == rec
    assert "choices" not in SampleRecord(id="1", subject="t", input={}, key="k").to_json()


def test_store_reads_schema_1_records_and_skips_torn_and_newer_ones(tmp_path):
    v1 = {
        "id": "1",
        "subject": "textvqa",
        "input": {"prompt": "q", "images": ["a.jpg"], "videos": []},
        "output": "yes",
        "prediction": "yes",
        "gold": ["yes"] * 10,
        "score": 1.0,
        "error": None,
        "e2e_time": 0.2,
        "preprocess_time": 0.01,
        "input_tokens": 30,
        "output_tokens": 1,
        "prefill_time": 0.1,
        "normalized": "yes",
        "key": "old",
    }
    newer = dict(v1, key="future", schema=SCHEMA_VERSION + 1)
    (tmp_path / "records_dp0.jsonl").write_text(json.dumps(v1) + "\n" + json.dumps(newer) + "\n" + '{"key": "to')
    loaded = RecordStore(tmp_path, shard="dp0").load()
    assert set(loaded) == {"old"}
    old = loaded["old"]
    assert old.schema == 1 and old.queue_time is None and old.extra == {"normalized": "yes"} and old.output == "yes"
