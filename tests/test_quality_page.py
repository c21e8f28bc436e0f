"""The quality page: the plot drawn by the real worker in the report environment, a
self-contained HTML page, and that page opened in a real headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Any

import pytest

from conftest import _missing
from qwrap import envs, qualitypage
from qwrap.errors import ToolchainMissingError
from qwrap.results import RunResult
from qwrap.workers import quality_plot

MODEL = "Llama-3.2-1B"
F16_BYTES = 2_479_595_520
# (type, bytes, bits/weight, KLD mean, KLD p99, PPL, same top-1, gate): figures of the kind
# llama-perplexity reports for a 1B Llama on WikiText-2 test (gates from --max-kld 0.5).
GGUF_ROWS = (
    ("Q2_K", 580_874_240, 3.76, 0.6121, 4.913, 19.84, 0.7412, "failed"),
    ("Q3_K_M", 691_011_584, 4.47, 0.2104, 1.962, 15.41, 0.8537, "passed"),
    ("Q4_K_M", 807_694_336, 5.23, 0.0452, 0.4127, 13.77, 0.9302, "passed"),
    ("Q5_K_M", 911_503_360, 5.90, 0.0163, 0.1461, 13.44, 0.9581, "passed"),
    ("Q6_K", 1_021_800_448, 6.61, 0.00611, 0.0532, 13.33, 0.9746, "passed"),
    ("Q8_0", 1_321_083_904, 8.55, 0.00153, 0.0139, 13.30, 0.9871, "passed"),
)
PPL_BASE = 13.2871


def _row(fmt: str, quant: str, path: Path, size: int, bpw: float, quality: dict[str, Any] | None,
         gate: str | None) -> dict[str, Any]:
    return {"format": fmt, "quant": quant, "path": str(path), "bytes": size, "sha256": "ab" * 32,
            "bits_per_weight": bpw, "validated": True, "quality": quality, "gate": gate, "seconds": 41.2,
            "peak_rss_bytes": 1_900_000_000, "peak_gpu_bytes": 0, "reused": False, "calibration": None,
            "trust_remote_code": False, "library": "gguf" if fmt == "gguf" else "transformers",
            "usage": f"use {path.name}", "shards": []}


def run_result(out: Path, *, name: str = MODEL) -> RunResult:
    """A qwrap.result/2 document as `qwrap run --format gguf --format awq --format gptq` writes it,
    read back as the typed result (its schema checked)."""
    return RunResult.from_json(run_document(out, name=name))


def run_document(out: Path, *, name: str = MODEL) -> dict[str, Any]:
    rows = [
        _row("gguf", quant, out / f"{name}-{quant}.gguf", size, bpw,
             {"kld_mean": kld, "kld_p99": p99, "ppl": ppl, "ppl_base": PPL_BASE, "delta_ppl": round(ppl - PPL_BASE, 4),
              "top1_agreement": top1, "tokens": 36_864, "ctx": 512, "runtime": "llama.cpp", "weights": None},
             gate)
        for quant, size, bpw, kld, p99, ppl, top1, gate in GGUF_ROWS
    ]
    rows.append(_row("awq", "4bit-g128", out / f"{name}-AWQ-4bit-g128", 1_018_003_456, 6.58,
                     {"kld_mean": 0.0611, "tokens": 4096, "runtime": "transformers", "weights": None}, None))
    rows.append(_row("gptq", "4bit-g128", out / f"{name}-GPTQ-4bit-g128", 1_015_234_560, 6.56, None, None))
    return {
        "schema": "qwrap.result/2", "qwrap_version": "0.1.0",
        "model": {"input": f"meta-llama/{name}", "name": name, "path": "/data/hf/llama", "repo_id": f"meta-llama/{name}",
                  "revision": None, "chat_template": False},
        "toolchain": {"llama_cpp_commit": "0c1e5703c5b1a2f4e6d8c0b2a4f6e8d0c2b4a6f8"},
        "request": {"output": str(out)}, "command": ["qwrap", "run", f"meta-llama/{name}"], "artifacts": rows,
        "quality_reference": {"text": "wikitext2 (test)",
                              "text_identity": "hf-dataset:Salesforce/wikitext/wikitext-2-raw-v1/test.parquet",
                              "ctx": 512, "chunks": 144, "tokens_scored": 36_864, "ppl_base": PPL_BASE, "note": None,
                              "bridge": None},
        "calibration": {"state": "used", "label": "wikitext2", "note": None},
        "steps": [], "warnings": [], "complete": True, "push": None,
    }


# -- a PNG reader (stdlib) ------------------------------------------------------------------


def png_info(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, the decompressed image data) of a PNG, checking its chunks' CRCs."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, width, height, idat = 8, 0, 0, b""
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        pos += 12 + length
    return width, height, zlib.decompress(idat)


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def report_env() -> envs.Env:
    try:
        return envs.find_env("report")
    except ToolchainMissingError:
        _missing("the report environment", "run `qwrap setup` or `make envs`")
        raise


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        _missing("Chromium", "run `make browser` (apt-get install chromium)")
    assert path is not None
    return path


def headless(chromium: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Chromium with a fresh profile, a private $HOME and nothing reaching the network."""
    home = tmp / "chromium-home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache")}
    argv = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tempfile.mkdtemp(prefix='profile-', dir=tmp)}", "--window-size=1200,1600", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=180, stdin=subprocess.DEVNULL)


# -- tests ----------------------------------------------------------------------------------


def test_pareto_front_is_the_lowest_kld_for_its_size() -> None:
    pts = [{"label": "a", "bytes": 10, "kld_mean": 0.5}, {"label": "b", "bytes": 20, "kld_mean": 0.6},
           {"label": "c", "bytes": 30, "kld_mean": 0.1}, {"label": "d", "bytes": 30, "kld_mean": 0.2},
           {"label": "e", "bytes": 40, "kld_mean": 0.1}, {"label": "f", "bytes": 50, "kld_mean": 0.01}]
    assert [p["label"] for p in quality_plot.pareto(pts)] == ["a", "c", "f"]


def test_plot_input_takes_the_measured_artifacts(tmp_path: Path) -> None:
    doc = qualitypage.plot_input(run_result(tmp_path), F16_BYTES)
    labels = [p["label"] for p in doc["points"]]
    # the GPTQ row has no quality; AWQ and GPTQ share a type, so the format names the point
    assert labels == [q[0] for q in GGUF_ROWS] + ["AWQ 4bit-g128"]
    assert doc["reference_bytes"] == F16_BYTES and MODEL in doc["title"]


def test_nothing_is_written_without_a_measured_artifact(tmp_path: Path) -> None:
    doc = run_document(tmp_path)
    for a in doc["artifacts"]:
        a["quality"] = None
    result = RunResult.from_json(doc)
    assert qualitypage.write(tmp_path, result, reference_bytes=F16_BYTES) == []
    assert list(tmp_path.iterdir()) == []


def test_without_the_report_environment_the_page_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWRAP_CACHE_DIR", str(tmp_path / "empty-cache"))
    out = tmp_path / "out"
    out.mkdir()
    written = qualitypage.write(out, run_result(out), reference_bytes=F16_BYTES)
    assert written == [out / "quality.html"] and not (out / "quality.png").exists()
    note = getattr(written, "note", None)
    assert note is not None and "\n" not in note and "qwrap setup" in note
    page = (out / "quality.html").read_text()
    assert "qwrap setup" in page and "<img" not in page and page.count("<tr>") == 1 + 8


def test_every_text_is_escaped(tmp_path: Path) -> None:
    doc = run_document(tmp_path, name='evil<script>alert("x")</script>&')
    doc["quality_reference"]["note"] = "<b>bold</b>"
    result = RunResult.from_json(doc)
    page = qualitypage.render(result, tmp_path, None, reference_bytes=None)
    assert "<script" not in page and "<b>bold" not in page
    assert "evil&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in page and "&lt;b&gt;bold" in page


@pytest.mark.slow
def test_quality_page_renders_in_a_real_browser(tmp_path: Path, report_env: envs.Env, chromium: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = run_result(out)
    written = qualitypage.write(out, result, reference_bytes=F16_BYTES)
    png, page = out / "quality.png", out / "quality.html"
    assert written == [png, page] and getattr(written, "note", "x") is None
    assert (out / ".checkpoint" / "logs" / "quality-plot.log").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".checkpoint"]  # no temp left

    # the plot: a valid PNG of the fixed size (9 x 5.5 in at 120 dpi), not blank, the same every time
    data = png.read_bytes()
    width, height, raw = png_info(data)
    assert (width, height) == (1080, 660) and len(set(raw)) > 40
    again = qualitypage.write(out, result, reference_bytes=F16_BYTES)
    assert again == written and png.read_bytes() == data

    # the page: self-contained, the plot embedded, every artifact in the table
    html = page.read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == 1 and base64.b64decode(uris[0]) == data
    rest = html.replace(uris[0], "")
    assert not re.search(r'https?:|ftp:|file:|//|\bhref=|url\(|@import|<script|<link|<iframe|<object', rest, re.I)
    assert re.findall(r'\bsrc="([^"]*)"', rest) == ["data:image/png;base64,"]
    assert "wikitext2 (test)" in html and "36,864 tokens scored" in html and "ctx 512" in html

    # a real browser: the rendered DOM has the table, and a screenshot is not blank
    dom = headless(chromium, tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<tbody>(.*)</tbody>", dom.stdout, re.S)
    assert body is not None, dom.stdout[:2000]
    rows = re.findall(r"<tr>(.*?)</tr>", body.group(1), re.S)
    assert len(rows) == len(result.artifacts)
    for row, artifact in zip(rows, result.artifacts, strict=True):
        assert Path(artifact.path).name in row
    assert "failed" in rows[0] and "not measured" in rows[-1] and "0.0452" in rows[2] and "+0.4829" in rows[2]
    assert re.search(r'<img[^>]+src="data:image/png;base64,', dom.stdout)

    shot = tmp_path / "shot.png"
    proc = headless(chromium, tmp_path, f"--screenshot={shot}", page.as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    shot_data = shot.read_bytes()
    width, height, raw = png_info(shot_data)
    assert (width, height) == (1200, 1600)
    assert len(shot_data) > 60_000 and len(set(raw)) > 100, "the screenshot looks blank"
    keep = os.environ.get("QWRAP_KEEP_SCREENSHOT")  # to look at it: QWRAP_KEEP_SCREENSHOT=/tmp/shot.png
    if keep:
        shutil.copyfile(shot, keep)


# -- standard errors and noise ----------------------------------------------------------------

# (type, KLD mean's standard error, PPL's, ΔPPL's, same top-1's): of the size llama-perplexity
# prints for 36,864 tokens; Q5_K_M and Q6_K are made to sit within noise of each other.
GGUF_ERRORS = {"Q2_K": (0.0061, 0.21, 0.12, 0.0023), "Q3_K_M": (0.0019, 0.16, 0.07, 0.0018),
               "Q4_K_M": (0.00041, 0.14, 0.031, 0.0013), "Q5_K_M": (0.0049, 0.14, 0.014, 0.0010),
               "Q6_K": (0.0020, 0.14, 0.008, 0.00082), "Q8_0": (0.000016, 0.14, 0.003, 0.00059)}


def document_with_errors(out: Path) -> dict[str, Any]:
    doc = run_document(out)
    for row in doc["artifacts"]:
        if row["format"] == "gguf":
            kld, ppl, delta, top1 = GGUF_ERRORS[row["quant"]]
            row["quality"].update(kld_mean_se=kld, ppl_se=ppl, ppl_base_se=0.139, delta_ppl_se=delta,
                                  top1_agreement_se=top1)
    return doc


def test_the_page_shows_each_error_and_marks_what_is_within_noise(tmp_path: Path) -> None:
    result = RunResult.from_json(document_with_errors(tmp_path))
    page = qualitypage.render(result, tmp_path, None, reference_bytes=None)
    body = re.search(r"<tbody>(.*)</tbody>", page, re.S)
    assert body is not None
    rows = dict(zip((q[0] for q in GGUF_ROWS), re.findall(r"<tr>(.*?)</tr>", body.group(1), re.S), strict=False))
    assert "0.0452 ± 0.00041" in rows["Q4_K_M"] and "13.77 ± 0.14" in rows["Q4_K_M"]
    assert "+0.4829 ± 0.031" in rows["Q4_K_M"] and "93.0% ± 0.13%" in rows["Q4_K_M"]
    assert ">0.4127<" in rows["Q4_K_M"]  # the p99 has no error
    # Q5_K_M (0.0163 ± 0.0049) and Q6_K (0.00611 ± 0.0020) differ by 0.0102 < 2 x 0.0053: each is marked
    assert "≈ Q6_K</span>" in rows["Q5_K_M"] and "≈ Q5_K_M</span>" in rows["Q6_K"]
    assert "≈" not in rows["Q4_K_M"] and "≈" not in rows["Q8_0"]
    assert "PPL of the 16-bit model 13.29 ± 0.14" in page
    assert "± its standard error" in page and "≈ marks a mean KLD within noise" in page
    assert re.findall(r"≈ ([^<]+)</span>", page) == ["Q6_K", "Q5_K_M"]  # nothing else is marked
    doc = qualitypage.plot_input(result, F16_BYTES)
    assert [p.get("kld_mean_se") for p in doc["points"]] == [e[0] for e in GGUF_ERRORS.values()] + [None]


def test_a_page_without_errors_says_nothing_of_them(tmp_path: Path) -> None:
    page = qualitypage.render(run_result(tmp_path), tmp_path, b"\x89PNG", reference_bytes=None)
    assert "±" not in page and "≈" not in page and "standard error" not in page


def test_the_plot_worker_checks_the_errors_it_is_given(tmp_path: Path) -> None:
    job = tmp_path / "in.json"
    point = {"label": "Q4_K_M", "format": "gguf", "bytes": 10, "kld_mean": 0.04}
    for se, ok in ((0.001, True), (None, True), (-0.001, False), ("x", False), (float("inf"), False)):
        job.write_text(json.dumps({"points": [{**point, **({"kld_mean_se": se} if se is not None else {})}]}))
        if ok:
            assert quality_plot.load(job)[0][0]["kld_mean"] == 0.04
        else:
            with pytest.raises(quality_plot.BadInput, match="kld_mean_se"):
                quality_plot.load(job)
