"""`qwrap push` and `run --push-to` against the local Hub server (tests/hubserver.py) with the
real huggingface_hub client in a real qwrap process: what arrives byte for byte, the commit's
file list, idempotency, resume after a dropped connection, the auth errors, the refusals."""

from __future__ import annotations

import json
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from background import Lane, prefetch, prefetched
from conftest import calibration_sample, run_qwrap
from hubserver import HubServer
from qwrap.ggufinfo import read_info
from qwrap.journal import Journal

pytestmark = [pytest.mark.slow, pytest.mark.backend]

WRITER = "hf_writer_0123456789abcdef0123"  # may write to the namespace "me"
READER = "hf_reader_fedcba98765432100000"  # a valid account without write access there
UNKNOWN = "hf_nobody_55555555555555555555"


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _chat_model_and_its_run(tiny_model: Path, corpus: Path, on: Lane, tmp: Path) -> tuple[Path, Path, Path]:
    """The tiny model with a chat template in its tokenizer_config.json, and a real run of it:
    the default GGUF type (with an importance matrix from --calib: the corpus' first documents,
    ~3k tokens, as corpus.txt) and GPTQ."""
    model = tmp / "chat" / tiny_model.name
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}, indent=2))
    calib = calibration_sample(corpus, tmp / "texts" / "corpus.txt", 12_000)
    out = tmp / "run" / "out"
    proc = on.qwrap("run", str(model), "-o", str(out), "-f", "gguf", "-f", "gptq", "--calib", str(calib),
                    "--calib-samples", "4", "--calib-seq-len", "64", "--no-eval", "--keep-intermediate",
                    "--threads", "1")  # one thread a tool beside the other lanes' work
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model, out, calib


prefetch(__name__, "push.finished", _chat_model_and_its_run, ("tiny_model", "corpus"))


@pytest.fixture(scope="module")
def chat_model(request: pytest.FixtureRequest) -> Path:
    """The tiny model with a chat template in its tokenizer_config.json."""
    return prefetched(request, "push.finished")[0]


@pytest.fixture(scope="module")
def finished(request: pytest.FixtureRequest) -> Path:
    """A real run of chat_model (on the session's lane, background.py)."""
    return prefetched(request, "push.finished")[1]


@pytest.fixture(scope="module")
def calib(request: pytest.FixtureRequest) -> Path:
    """The calibration text of that run."""
    return prefetched(request, "push.finished")[2]


@pytest.fixture()
def hub(tmp_path: Path) -> Iterator[HubServer]:
    with HubServer(known_tokens={WRITER, READER}, storage=tmp_path / "hub", write_tokens={"me": {WRITER}}) as server:
        yield server


def push(hub_url: str, *args: str, token: str | None = WRITER, **env: str) -> tuple[int, str, str]:
    proc = run_qwrap("push", *args, *(["--token", token] if token else []),
                     env={"HF_ENDPOINT": hub_url, "HF_HUB_DISABLE_XET": "1", **env})
    return proc.returncode, proc.stdout, proc.stderr


def published(out: Path) -> dict[str, bytes]:
    """What a push of ``out`` must deliver: the artifacts, the card, the imatrix (kept)."""
    files = {p.name: p.read_bytes() for p in out.glob("*.gguf")}
    for folder in (p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files |= {f.relative_to(out).as_posix(): f.read_bytes() for f in folder.rglob("*") if f.is_file()}
    files["README.md"] = (out / "README.md").read_bytes()
    files |= {name: (out / name).read_bytes() for name in ("quality.html", "quality.png") if (out / name).exists()}
    files["imatrix.gguf"] = (out / ".checkpoint" / "work" / "imatrix.gguf").read_bytes()
    return files


def test_card_shows_the_command_that_ran_and_no_local_path(finished: Path) -> None:
    """As the run wrote it (before any push rewrites it with --base-model)."""
    card = (finished / "README.md").read_text()
    command = re.search(r"## How it was made\n\n```sh\n(.*)\n```", card)
    assert command is not None
    assert command[1].startswith("qwrap run tiny-llama ") and "--calib corpus.txt" in command[1]
    assert "--quant" not in command[1] and "-q " not in command[1]
    assert str(finished.parent) not in card and "/tmp" not in card
    meta = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in meta, "a local folder name is not a Hub id"


def test_chat_template_and_tokenizer_carried_through(finished: Path, chat_model: Path) -> None:
    (gguf,) = [p for p in finished.glob("*.gguf")]
    assert read_info(gguf).metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    (folder,) = [p for p in finished.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (folder / name).read_bytes() == (chat_model / name).read_bytes(), name
    card = (finished / "README.md").read_text()
    assert "apply_chat_template" in card and "--jinja" in card


def test_push_is_byte_identical_one_commit_and_idempotent(finished: Path, hub: HubServer, tmp_path: Path) -> None:
    rc, stdout, stderr = push(hub.url, str(finished), "me/tiny-quants", "--base-model", "org/tiny-base", "--json")
    assert rc == 0, stderr
    expected = published(finished)
    assert any(k.endswith(".gguf") and k != "imatrix.gguf" for k in expected)
    assert any(k.endswith("/config.json") for k in expected)
    (commit,) = hub.commits
    assert commit.revision == "main" and sorted(commit.files) == sorted(expected)
    stored = hub.repos[("model", "me/tiny-quants")].folder
    for name, data in expected.items():
        assert (stored / name).read_bytes() == data, name
    gptq = next(k for k in expected if k.endswith("/config.json"))
    assert json.loads((stored / gptq).read_text())["quantization_config"]
    card = (stored / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "org/tiny-base" and meta["quantized_by"] == "qwrap"
    assert meta["pipeline_tag"] == "text-generation" and {"gguf", "gptq"} <= set(meta["tags"])
    report = json.loads(stdout)
    assert report["bytes_uploaded"] == sum(len(d) for d in expected.values())
    assert hub.uploaded_bytes() == sum(len(d) for n, d in expected.items() if n.endswith((".gguf", ".safetensors",
                                                                                            ".model")))
    puts = hub.uploaded_bytes()

    rc, stdout, stderr = push(hub.url, str(finished), "me/tiny-quants", "--base-model", "org/tiny-base", "--json")
    assert rc == 0, stderr
    assert len(hub.commits) == 1 and hub.uploaded_bytes() == puts, "a second push must upload nothing"
    assert json.loads(stdout)["uploaded"] == [] and "up to date" in stderr
    records = [r for r in Journal(finished).records() if r.get("kind") == "push"]
    assert [r["state"] for r in records][-2:] == ["started", "done"] and records[-1]["unchanged"]


def test_cut_uploads_resume_without_duplicating(finished: Path, hub: HubServer) -> None:
    hub.cut_puts = 1  # the first LFS PUT loses its connection half-way: the client resends it
    rc, _, stderr = push(hub.url, str(finished), "me/cut")
    assert rc == 0, stderr
    whole = hub.uploaded_bytes()
    assert [r.status for r in hub.requests if r.method == "PUT"].count(0) == 1

    hub.cut_commits = 1  # everything uploaded, then the commit is cut: the push fails
    rc, _, stderr = push(hub.url, str(finished), "me/cut2")
    assert rc == 5 and "run the same push again" in stderr, stderr
    assert hub.uploaded_bytes() == whole  # this server shares LFS objects between repos: nothing new was sent
    rc, _, stderr = push(hub.url, str(finished), "me/cut2")
    assert rc == 0, stderr
    assert hub.uploaded_bytes() == whole and hub.commits[-1].repo_id == "me/cut2"


def test_revision_and_pull_request(finished: Path, hub: HubServer) -> None:
    rc, _, stderr = push(hub.url, str(finished), "me/branchy", "--revision", "v1", "--private")
    assert rc == 0, stderr
    assert hub.commits[-1].revision == "v1" and hub.repos[("model", "me/branchy")].private
    rc, _, stderr = push(hub.url, str(finished), "me/pr", "--create-pr")
    assert rc == 0, stderr
    assert hub.commits[-1].revision == "refs/pr/1" and "/discussions/1" in stderr


def test_auth_errors_are_clear_and_never_show_the_token(finished: Path, hub: HubServer) -> None:
    cases = [(None, 4, "hf auth login"), (UNKNOWN, 4, "settings/tokens"), (READER, 18, "write access")]
    for token, code, fix in cases:
        rc, stdout, stderr = push(hub.url, str(finished), "me/denied", token=token)
        assert rc == code and fix in stderr, (token, rc, stderr)
        assert not token or token not in stdout + stderr
    rc, _, stderr = push(hub.url, str(finished), "someone/else", token=READER)
    assert rc == 18, stderr
    assert not hub.commits
    rc, _, stderr = push(hub.url, str(finished), "me/offline", HF_HUB_OFFLINE="1")
    assert rc == 5 and "HF_HUB_OFFLINE" in stderr, stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    rc, _, stderr = push(closed, str(finished), "me/unreachable")
    assert rc == 5 and "unreachable" in stderr, stderr
    for path in finished.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            assert WRITER.encode() not in path.read_bytes(), path


def test_refuses_a_folder_without_quantization_config(finished: Path, hub: HubServer, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    (config,) = [p for p in copy.glob("*/config.json") if not p.parent.name.startswith(".")]
    data = json.loads(config.read_text())
    del data["quantization_config"]
    config.write_text(json.dumps(data))
    rc, _, stderr = push(hub.url, str(copy), "me/broken")
    assert rc == 19 and "quantization_config" in stderr, stderr
    assert not hub.requests, "nothing may reach the Hub"


def test_run_push_to_is_the_journaled_last_step(finished: Path, hub: HubServer, chat_model: Path, calib: Path) -> None:
    proc = run_qwrap("run", str(chat_model), "-o", str(finished), "-f", "gguf", "-f", "gptq", "--calib", str(calib),
                     "--calib-samples", "4", "--calib-seq-len", "64", "--no-eval", "--keep-intermediate",
                     "--push-to", "me/from-run", "--token", WRITER, "--json",
                     env={"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert all(a["reused"] for a in result["artifacts"]) and result["push"]["repo_id"] == "me/from-run"
    assert len(hub.commits) == 1 and hub.commits[0].repo_id == "me/from-run"
    last = Journal(finished).records()[-1]
    assert last["kind"] == "push" and last["state"] == "done" and WRITER not in json.dumps(last)
