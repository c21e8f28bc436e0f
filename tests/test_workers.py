"""The worker protocol, pure: jobs and events round-trip; malformed input is rejected."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwrap.workers import protocol as p
from qwrap.workers.backends import VALIDATE_MODULE, WORKER_MODULES

REPO = Path(__file__).resolve().parents[1]


def quantize_job(**changes: object) -> p.QuantizeJob:
    job = p.QuantizeJob(
        backend="gptqmodel", format="gptq", model="/m", output_dir="/o",
        calibration=p.TextSource(path="/c.txt", n_samples=4, seq_len=32, seed=3, cache_dir="/cache"),
        checkpoint_dir="/o/.checkpoint",
    )
    return dataclasses.replace(job, **changes)


def test_quantize_job_round_trips_through_json(tmp_path: Path) -> None:
    job = quantize_job(bits=3, act_order=True, damp=0.05)
    assert p.load_job(p.write_job(job, tmp_path / "job.json")) == job


def test_validate_job_round_trips() -> None:
    job = p.ValidateJob(model="/m", quantized="/q", text=p.TextSource(path="/t.txt", portion="held_out"))
    assert p.job_from_dict(json.loads(p.job_to_json(job))) == job


def test_defaults_fill_optional_fields() -> None:
    data = {"backend": "autoawq", "format": "awq", "model": "/m", "output_dir": "/o",
            "calibration": {"path": "/c.txt"}}
    job = p.job_from_dict(data)
    assert isinstance(job, p.QuantizeJob)
    assert (job.bits, job.group_size, job.zero_point, job.version) == (4, 128, True, "gemm")
    assert job.calibration.n_samples == 128 and job.calibration.portion == "calibration"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"backend": "autoawq"}, "does not write format"),
        ({"bits": 5}, "bits must be one of"),
        ({"group_size": 0}, "group_size"),
        ({"device": "tpu"}, "device must be"),
        ({"damp": 1.5}, "damp"),
        ({"version": "marlin"}, "version must be"),
    ],
)
def test_bad_values_are_rejected(change: dict[str, object], message: str) -> None:
    data = json.loads(p.job_to_json(quantize_job()))
    data.update(change)
    with pytest.raises(p.ProtocolError, match=message):
        p.job_from_dict(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"task": "quantize", "protocol": 99}, "protocol"),
        ({"task": "sing"}, "unknown task"),
        ({"task": "validate", "model": "/m", "quantized": "/q"}, "missing job fields: text"),
        ({"task": "validate", "model": "/m", "quantized": "/q", "text": {"path": "/t"}, "color": 1},
         "unknown job fields: color"),
    ],
)
def test_malformed_jobs_are_rejected(data: dict[str, object], message: str) -> None:
    with pytest.raises(p.ProtocolError, match=message):
        p.job_from_dict(data)


def test_every_declared_backend_format_pair_has_a_worker_module() -> None:
    for (backend, fmt), module in WORKER_MODULES.items():
        assert (REPO / "wrapper" / (module.replace(".", "/") + ".py")).is_file()
        assert p.worker_module(quantize_job(backend=backend, format=fmt)) == module
    validate = p.ValidateJob(model="/m", quantized="/q", text=p.TextSource(path="/t"))
    assert p.worker_module(validate) == VALIDATE_MODULE


EVENTS: list[p.Event] = [
    p.Started(task="quantize", backend="autoawq", pid=12, device="cpu", versions={"torch": "2.13.0"}),
    p.LayerStarted(index=0, total=3),
    p.LayerDone(index=0, total=3, seconds=1.5, peak_rss_bytes=10, peak_gpu_bytes=None, resumed=True),
    p.Progress(stage="calibration", done=4, total=4, unit="samples"),
    p.WarningEvent(message="careful"),
    p.CheckpointSaved(index=0, path="/o/.checkpoint/layer-00000.json"),
    p.Result(output_dir="/o", files=["config.json"], metadata={"kl_divergence": 0.01}),
    p.Error(kind="backend_unavailable", message="no CUDA", hint="use --backend gptqmodel"),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.name)
def test_events_round_trip(event: p.Event) -> None:
    line = p.encode_event(event)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    data = p.parse_event(line)
    assert data["event"] == event.name and data["v"] == p.PROTOCOL_VERSION
    assert {k: data[k] for k in dataclasses.asdict(event)} == dataclasses.asdict(event)


def test_parse_event_accepts_extra_fields_from_newer_workers() -> None:
    data = p.event_dict(p.LayerStarted(index=1, total=2))
    assert p.parse_event(json.dumps({**data, "eta": 3}))["eta"] == 3


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("Loading weights: 100%", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"event": "layer_started", "v": 2, "index": 0, "total": 1}', "protocol"),
        ('{"event": "dance", "v": 1}', "unknown event"),
        ('{"event": "layer_done", "v": 1, "index": 0}', "lacks total, seconds, peak_rss_bytes"),
        ('{"event": "error", "v": 1, "kind": "gremlins", "message": "x"}', "unknown error kind"),
    ],
)
def test_parse_event_rejects_malformed_lines(line: str, message: str) -> None:
    with pytest.raises(p.ProtocolError, match=message):
        p.parse_event(line)


def test_emit_writes_to_the_inherited_fd_only() -> None:
    """A child writes events to QWRAP_EVENT_FD; its stdout/stderr stay free for libraries."""
    read, write = os.pipe()
    code = ("from qwrap.workers import protocol as p; print('library noise');"
            "p.emit(p.Progress(stage='load', done=1, total=1, unit='model'))")
    env = {**os.environ, "PYTHONPATH": str(REPO / "wrapper"), p.EVENT_FD_ENV: str(write)}
    proc = subprocess.run([sys.executable, "-c", code], pass_fds=(write,), env=env,
                          capture_output=True, text=True, check=True)
    os.close(write)
    with os.fdopen(read) as events:
        lines = events.read().splitlines()
    assert proc.stdout == "library noise\n" and proc.stderr == ""
    assert [p.parse_event(line)["stage"] for line in lines] == ["load"]


def test_invalid_job_is_reported_before_any_heavy_import(tmp_path: Path) -> None:
    """Worker modules import only the stdlib at the top, so a bad job fails fast in any
    Python, with a bad_job event and exit code 2."""
    data = json.loads(p.job_to_json(quantize_job()))
    job = tmp_path / "job.json"
    job.write_text(json.dumps({**data, "bits": 5}))
    read, write = os.pipe()
    env = {**os.environ, "PYTHONPATH": str(REPO / "wrapper"), p.EVENT_FD_ENV: str(write)}
    proc = subprocess.run([sys.executable, "-m", "qwrap.workers.gptq_gptqmodel", str(job)],
                          pass_fds=(write,), env=env, capture_output=True, text=True)
    os.close(write)
    with os.fdopen(read) as events:
        (event,) = [p.parse_event(line) for line in events]
    assert proc.returncode == 2 and event["kind"] == "bad_job" and "bits must be one of" in event["message"]


class WordTokenizer:
    """Stands in for a HF tokenizer: one id per character, BOS = 1."""

    bos_token_id: int | None = 1

    def __call__(self, texts: list[str], add_special_tokens: bool) -> dict[str, list[list[int]]]:
        assert not add_special_tokens
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


def test_documents_split_into_calibration_and_held_out(tmp_path: Path) -> None:
    from qwrap.workers import calib

    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"doc {i}" for i in range(20)) + "\n")
    docs = calib.read_documents(text)
    held_out, rest = calib.portion(docs, "held_out"), calib.portion(docs, "calibration")
    assert held_out == ["doc 9", "doc 19"] and len(rest) == 18 and not set(held_out) & set(rest)
    lines = tmp_path / "t.jsonl"
    lines.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert calib.read_documents(lines) == ["a", "b"]


def test_samples_are_deterministic_windows_starting_with_bos() -> None:
    from qwrap.workers import calib

    spec = p.TextSource(path="-", n_samples=3, seq_len=5, seed=7)
    docs = [chr(ord("A") + i) * 6 for i in range(26)]
    first = calib.sample_ids(WordTokenizer(), docs, spec)
    assert first == calib.sample_ids(WordTokenizer(), docs, spec)
    assert first != calib.sample_ids(WordTokenizer(), docs, dataclasses.replace(spec, seed=8))
    assert [len(row) for row in first] == [5, 5, 5] and all(row[0] == 1 for row in first)


def test_too_little_text_repeats_with_a_warning_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwrap.workers import calib
    from qwrap.workers.runtime import WorkerError

    warnings: list[str] = []
    monkeypatch.setattr(calib, "warn", warnings.append)
    rows = calib.sample_ids(WordTokenizer(), ["abc"], p.TextSource(path="-", n_samples=4, seq_len=4))
    assert len(rows) == 4 and warnings and "repeat" in warnings[0]
    with pytest.raises(WorkerError, match="fewer than one"):
        calib.sample_ids(WordTokenizer(), ["a"], p.TextSource(path="-", n_samples=1, seq_len=64))
