"""The request as a value, in-process: its JSON round trip (what `qwrap resume` reads back from
the journal) with every format's options, and --backend routing (``request.backends_from``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from qwrap.errors import UsageError
from qwrap.formats import FORMATS
from qwrap.request import Request, backends_from


def options(fmt: str, backend: str | None = None, **values: Any) -> Any:
    f = FORMATS[fmt]
    return f.make_options({**{o.name: o.default for o in f.OPTIONS}, **values}, backend)


def through_json(request: Request) -> Request:
    return Request.from_json(json.loads(json.dumps(request.to_json())))


def full_request(tmp_path: Path) -> Request:
    """Every run-level field and every format's options away from their defaults."""
    calib = tmp_path / "calib.txt"
    calib.write_text("text")
    return Request(
        model="org/model", output=tmp_path / "out", formats=("gguf", "awq", "gptq"),
        format_options=(
            ("gguf", options("gguf", quant=["Q4_K_M", "Q8_0"], outtype="bf16", imatrix="auto",
                             eval_weights="on", split_max_size="2g")),
            ("awq", options("awq", "gptqmodel", bits=4, group_size=64, calib_samples=16, calib_seq_len=64,
                            device="cpu", trust_remote_code=True, awq_version="gemv", zero_point=False)),
            ("gptq", options("gptq", "auto-gptq", bits=8, group_size=32, act_order=True, sym=False, damp=0.05)),
        ),
        revision="0123abc", calib=str(calib), force=True, keep_intermediate=True, threads=3, jobs=5,
        stall_timeout=None, preflight=False, evaluate=False, eval_text=str(calib), eval_tokens=4096, eval_ctx=256,
        max_kld=("0.5", "Q4_K_M=0.1"), base_model="org/base",
    )


def test_a_request_survives_its_json_round_trip(tmp_path: Path) -> None:
    req = full_request(tmp_path)
    back = through_json(req)
    assert back == req
    for fmt in req.formats:
        assert back.options(fmt) == req.options(fmt)
        assert type(back.options(fmt)) is type(req.options(fmt))
    assert isinstance(back.output, Path) and isinstance(back.max_kld, tuple)
    assert back.options("gguf").quants == ("Q4_K_M", "Q8_0")  # a tuple again, not the JSON list
    assert back.options("gptq").backend == "auto-gptq" and back.options("awq").backend == "gptqmodel"


def test_the_defaults_survive_too(tmp_path: Path) -> None:
    req = Request(model=str(tmp_path), output=tmp_path / "o", formats=("gguf",),
                  format_options=(("gguf", options("gguf")),))
    assert through_json(req) == req


def test_the_json_is_plain_and_carries_each_formats_options(tmp_path: Path) -> None:
    data = full_request(tmp_path).to_json()
    assert data["output"] == str(tmp_path / "out") and data["formats"] == ["gguf", "awq", "gptq"]
    assert set(data["format_options"]) == {"gguf", "awq", "gptq"}
    assert data["format_options"]["gptq"]["damp"] == 0.05
    assert data["format_options"]["awq"]["awq_version"] == "gemv"
    assert data["format_options"]["gguf"]["split_max_size"] == "2G"
    assert "token" not in data  # never part of a request: it is written to the journal


def test_options_missing_from_an_older_journal_take_their_defaults(tmp_path: Path) -> None:
    data = full_request(tmp_path).to_json()
    data["format_options"] = {"awq": {"bits": 4}}
    data["unknown_future_field"] = 1
    back = Request.from_json(data)
    assert back.options("awq") == options("awq")  # the default backend and the rest
    assert back.options("gguf") == FORMATS["gguf"].options_from_json({})
    assert back.options("gptq").backend == FORMATS["gptq"].BACKENDS[0]


def test_a_journal_without_format_options_or_with_an_unknown_format_is_refused(tmp_path: Path) -> None:
    data = full_request(tmp_path).to_json()
    old = {k: v for k, v in data.items() if k != "format_options"}
    with pytest.raises(UsageError, match="older qwrap"):
        Request.from_json(old)
    with pytest.raises(UsageError, match="formats this qwrap does not have: onnx"):
        Request.from_json({**data, "formats": ["gguf", "onnx"]})


def test_options_is_by_format(tmp_path: Path) -> None:
    req = full_request(tmp_path)
    assert req.options("awq").awq_version == "gemv"
    with pytest.raises(KeyError):
        dataclasses.replace(req, format_options=()).options("awq")


# -- --backend routing ---------------------------------------------------------------------


def with_backend(fmt: str) -> list[str]:
    return [f for f in FORMATS if FORMATS[f].BACKENDS and fmt in FORMATS[f].BACKENDS]


def test_a_bare_backend_goes_to_every_requested_format_that_knows_it() -> None:
    shared = "gptqmodel"
    assert set(with_backend(shared)) == {"awq", "gptq"}  # the premise: both formats know it
    assert backends_from([shared], ("gguf", "awq", "gptq")) == {"awq": shared, "gptq": shared}
    assert backends_from([shared], ("gptq",)) == {"gptq": shared}
    assert backends_from(["autoawq"], ("gguf", "awq", "gptq")) == {"awq": "autoawq"}
    assert backends_from([], ("awq", "gptq")) == {}


def test_format_equals_name_is_explicit() -> None:
    assert backends_from(["gptq=gptqmodel"], ("awq", "gptq")) == {"gptq": "gptqmodel"}
    assert backends_from(["autoawq", "gptq=auto-gptq"], ("awq", "gptq")) == {"awq": "autoawq", "gptq": "auto-gptq"}
    assert backends_from(["gptqmodel", "awq=autoawq"], ("awq", "gptq")) == {"awq": "autoawq", "gptq": "gptqmodel"}


@pytest.mark.parametrize(("values", "formats"), [
    (["nonesuch"], ("awq", "gptq")),
    (["autoawq"], ("gguf", "gptq")),  # known, but to no requested format
    (["awq=auto-gptq"], ("awq", "gptq")),  # a backend of the other format
    (["gguf=autoawq"], ("gguf", "awq")),  # a format without backends
    (["onnx=autoawq"], ("awq",)),  # no such format
    (["autoawq", "nonesuch"], ("awq",)),
])
def test_an_unknown_backend_is_a_usage_error_listing_the_choices(values: list[str], formats: tuple[str, ...]) -> None:
    with pytest.raises(UsageError) as exc:
        backends_from(values, formats)
    assert repr(values[-1]) in str(exc.value)
    assert exc.value.exit_code == 2
    for name, f in FORMATS.items():
        for backend in f.BACKENDS:
            assert backend in (exc.value.hint or ""), (name, backend)
