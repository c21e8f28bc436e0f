"""A clean run without the Hub: whether WikiText-2 (the default calibration and evaluation
text) can be had is decided once, quickly, before the plan is built, the same way by `plan`,
`run` and a `--step` job; the run says what it does instead in one line and huggingface_hub
never retries.

conftest sets HF_HUB_OFFLINE=1 for every test; these tests unset it (``run_qwrap`` does when
given HF_ENDPOINT) and point HF_ENDPOINT at a closed local port, a name that never resolves, or
a local Hub server (tests/hubserver.py) serving a small WikiText-2 made from the test corpus.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import calibration_sample, run_qwrap
from hubserver import HubServer
from qwrap import reach
from qwrap.texts import Note, warning_lines
from qwrap.toolchain import Toolchain

RETRIES = ("thrown while requesting", "Retrying in")
UNRESOLVABLE = "http://qwrap-no-such-host.invalid"  # .invalid never resolves (RFC 2606)


@pytest.fixture
def closed_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def fresh_reach() -> Iterator[None]:
    reach.hub.cache_clear()
    yield
    reach.hub.cache_clear()


# -- the probe -------------------------------------------------------------------------------


def test_the_probe_answers_within_its_timeout(closed_endpoint: str) -> None:
    refused = reach.probe(closed_endpoint)
    assert not refused.ok and "refused" in refused.problem.lower() and refused.seconds < reach.PROBE_S
    assert refused.describe() == f"{closed_endpoint} is unreachable ({refused.problem})"
    with socket.socket() as silent:  # accepts connections (the backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        started = time.monotonic()
        mute = reach.probe(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        assert not mute.ok and time.monotonic() - started < 1.5, mute
    with HubServer() as hub:  # any answer under 500 is a Hub that answers
        assert reach.probe(hub.url).ok


def test_hf_hub_offline_answers_without_asking(monkeypatch: pytest.MonkeyPatch, closed_endpoint: str,
                                              fresh_reach: None) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", closed_endpoint)
    answer = reach.hub()
    assert answer == reach.Reach(closed_endpoint, reach.OFFLINE, 0.0)
    assert answer.describe() == "HF_HUB_OFFLINE is set"
    assert reach.hub() is answer  # asked once per process


# -- the notes -------------------------------------------------------------------------------


def test_notes_with_one_cause_print_as_one_line() -> None:
    calib = Note("the Hub is unreachable", "no importance matrix", "--calib FILE", "--no-imatrix")
    ev = Note("the Hub is unreachable", "not measured", "--eval-text FILE", "--no-eval")
    (line,) = warning_lines(calib, "", ev)
    assert line == ("the Hub is unreachable: no importance matrix, and not measured. Pass --calib FILE and "
                    "--eval-text FILE, or --no-imatrix and --no-eval to silence this.")
    other = Note("HF_HUB_OFFLINE is set", "not measured", "--eval-text FILE", "--no-eval")
    assert warning_lines(calib, other, "a plain note", "a plain note") == [calib, other, "a plain note"]
    # a str for the card and the journal, also once copied (a result is deep-copied) or dumped
    assert isinstance(calib, str) and copy.deepcopy(calib).fix == "--calib FILE"
    assert json.loads(json.dumps({"note": calib})) == {"note": str(calib)}


# -- the decision, timed ---------------------------------------------------------------------

_DECIDE = r"""
import json, sys, time
started = time.monotonic()
from pathlib import Path
from qwrap.formats import FORMATS
from qwrap.request import Request
from qwrap.texts import calibration, evaluation, warning_lines
gguf = FORMATS["gguf"]
values = {o.name: o.default for o in gguf.OPTIONS}
r = Request(model="m", output=Path(sys.argv[1]), formats=("gguf",),
            format_options=(("gguf", gguf.make_options({**values, "quant": ["Q4_K_M"]}, None)),))
imported = time.monotonic()
calib, calib_note = calibration(r, None, fetch=sys.argv[2] == "run")
ev, eval_note = evaluation(r, None, None, work=Path(sys.argv[1]) if sys.argv[2] == "run" else None)
print(json.dumps({"calibration": calib is not None, "evaluation": ev is not None,
                  "lines": warning_lines(calib_note, eval_note), "seconds": time.monotonic() - imported}))
"""


def _decide(tmp_path: Path, mode: str, env: dict[str, str]) -> tuple[dict, str]:
    child = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    proc = subprocess.run([sys.executable, "-c", _DECIDE, str(tmp_path / "work"), mode], capture_output=True,
                          text=True, env={**child, **env}, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


@pytest.mark.heavy
@pytest.mark.parametrize("where", ["closed port", "unresolvable name", "HF_HUB_OFFLINE"])
def test_without_the_hub_the_decision_is_quick_and_one_line(where: str, closed_endpoint: str,
                                                             tmp_path: Path) -> None:
    env = {"closed port": {"HF_ENDPOINT": closed_endpoint}, "unresolvable name": {"HF_ENDPOINT": UNRESOLVABLE},
           "HF_HUB_OFFLINE": {"HF_HUB_OFFLINE": "1"}}[where]
    for mode in ("plan", "run"):
        decided, stderr = _decide(tmp_path, mode, env)
        print(f"{where}, {mode}: the texts decided in {decided['seconds']:.2f} s")
        assert decided["seconds"] < 10, decided
        assert not decided["calibration"] and not decided["evaluation"]
        (line,) = decided["lines"]
        cause = "HF_HUB_OFFLINE is set" if where == "HF_HUB_OFFLINE" else f"{env['HF_ENDPOINT']} is unreachable"
        assert cause in line and "without an importance matrix" in line and "not measured" in line, line
        assert "--calib FILE" in line and "--eval-text FILE" in line
        assert not any(r in stderr for r in RETRIES), stderr


# -- plan, --step and run agree ---------------------------------------------------------------


def _ids(steps: list[dict]) -> list[tuple[str, str]]:
    return [(s["id"], s["fingerprint"]) for s in steps]


def _hub_lines(stderr: str, endpoint: str) -> list[str]:
    return [line for line in stderr.splitlines() if endpoint in line or "WikiText-2" in line]


@pytest.mark.slow
def test_plan_step_and_run_agree_without_the_hub(tiny_model: Path, tmp_path: Path, closed_endpoint: str,
                                                 toolchain: Toolchain) -> None:
    env = {"HF_ENDPOINT": closed_endpoint}
    out = tmp_path / "o"
    started = time.monotonic()
    planned = run_qwrap("plan", str(tiny_model), "-o", str(out), "-q", "Q4_K_M", "--json", env=env)
    print(f"qwrap plan without the Hub: {time.monotonic() - started:.1f} s")
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert [s["id"] for s in plan["steps"]] == ["gguf.convert", "gguf.quantize:Q4_K_M", "gguf.validate:Q4_K_M"]
    checks = {c["name"]: c["detail"] for c in plan["checks"]}
    assert f"{closed_endpoint} is unreachable" in checks["calibration"]
    assert "not measured" in checks["evaluation text"]
    step = run_qwrap("run", str(tiny_model), "-o", str(out), "-q", "Q4_K_M", "--step", "gguf.convert", env=env)
    assert step.returncode == 0, step.stderr
    ran = run_qwrap("run", str(tiny_model), "-o", str(out), "-q", "Q4_K_M", "--json", env=env)
    assert ran.returncode == 0, ran.stderr
    assert _ids(json.loads(ran.stdout)["steps"]) == _ids(plan["steps"])
    runs = [json.loads(line) for line in (out / ".checkpoint" / "journal.jsonl").read_text().splitlines()]
    assert [r["plan"] for r in runs if r.get("kind") == "run"] == [[s["id"] for s in plan["steps"]]] * 2
    for proc in (planned, step, ran):
        assert not any(r in proc.stderr for r in RETRIES), proc.stderr
    for proc in (step, ran):  # each run says it once: no importance matrix, nothing measured
        (line,) = _hub_lines(proc.stderr, closed_endpoint)
        assert "without an importance matrix" in line and "not measured" in line, line


def _wikitext(root: Path, corpus: Path, python: Path) -> Path:
    """A small Salesforce/wikitext: the corpus' first documents (~10k tokens: an importance
    matrix of 16 chunks, an evaluation of its 2) as the rows of real parquet files (train: the
    first 80%, test: the rest), written with the converter environment's pyarrow."""
    corpus = calibration_sample(corpus, root.with_name(f"{root.name}-documents.txt"), 40_000)
    script = r"""
import sys, pyarrow as pa, pyarrow.parquet as pq
from pathlib import Path
docs = [d.strip() for d in Path(sys.argv[1]).read_text().split("\n\n") if d.strip()]
cut = len(docs) * 8 // 10
for split, part in (("train", docs[:cut]), ("test", docs[cut:])):
    rows = [row for d in part for row in (d + "\n", "")]
    out = Path(sys.argv[2]) / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": rows}), out)
"""
    subprocess.run([str(python), "-c", script, str(corpus), str(root)], check=True, capture_output=True, text=True)
    return root


@pytest.mark.slow
def test_a_cached_wikitext_counts_with_or_without_the_hub(tiny_model: Path, corpus: Path, convert_python: Path,
                                                         tmp_path: Path, closed_endpoint: str,
                                                         toolchain: Toolchain) -> None:
    """Not cached and the Hub answers: `plan` lists the importance matrix and the evaluation,
    `run` downloads the texts and runs them. Cached: the same plan without the Hub, or with
    HF_HUB_OFFLINE, and a run that reuses every step and says nothing about the Hub."""
    args = ["-q", "Q4_K_M", "--json"]
    with HubServer() as hub:
        hub.add_repo("Salesforce/wikitext", _wikitext(tmp_path / "wikitext", corpus, convert_python),
                     repo_type="dataset")
        up = {"HF_ENDPOINT": hub.url}
        out = tmp_path / "o"
        planned = run_qwrap("plan", str(tiny_model), "-o", str(out), *args, env=up)
        assert planned.returncode == 0, planned.stderr
        plan = json.loads(planned.stdout)
        steps = {s["id"]: s for s in plan["steps"]}
        assert steps["gguf.quantize:Q4_K_M"]["inputs"].get("imatrix") == "gguf.imatrix"
        assert "gguf.eval:Q4_K_M" in steps and plan["calibration"] == "wikitext2"
        assert steps["gguf.imatrix"]["files"] == {}  # `run` fetches it: the same step, the same fingerprint
        ran = run_qwrap("run", str(tiny_model), "-o", str(out), *args, env=up)
        assert ran.returncode == 0, ran.stderr
        assert _ids(json.loads(ran.stdout)["steps"]) == _ids(plan["steps"])
        assert hub.downloads("Salesforce/wikitext") == {"wikitext-2-raw-v1/train-00000-of-00001.parquet",
                                                        "wikitext-2-raw-v1/test-00000-of-00001.parquet"}
        assert not _hub_lines(ran.stderr, hub.url), ran.stderr
    down = {"HF_ENDPOINT": closed_endpoint}
    for env in (down, {"HF_HUB_OFFLINE": "1"}):
        again = run_qwrap("plan", str(tiny_model), "-o", str(out), *args, env=env)
        assert again.returncode == 0, again.stderr
        cached = json.loads(again.stdout)
        assert _ids(cached["steps"]) == _ids(plan["steps"]), env
        assert Path({s["id"]: s for s in cached["steps"]}["gguf.imatrix"]["files"]["calib"]).is_file()
    reran = run_qwrap("run", str(tiny_model), "-o", str(out), *args, env=down)
    assert reran.returncode == 0, reran.stderr
    result = json.loads(reran.stdout)
    assert _ids(result["steps"]) == _ids(plan["steps"]) and {s["state"] for s in result["steps"]} == {"skipped"}
    assert not _hub_lines(reran.stderr, closed_endpoint) and not any(r in reran.stderr for r in RETRIES)
