"""qwrap.hub and qwrap.calib_source against a real local Hub server and real huggingface_hub.

huggingface_hub reads HF_ENDPOINT, HF_HOME/HF_HUB_CACHE and HF_HUB_OFFLINE once, at import
time (``huggingface_hub.constants``), and the module is imported once per pytest process. So
every Hub case runs the real code path in a child ``python -c`` with its own environment
(endpoint = the local server, a temporary HF_HOME and HOME): no monkeypatched constants, no
mocks, and nothing written to the real ~/.cache. The child prints a JSON line per call;
qwrap errors come back as their class name, message and hint.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hubserver import HubServer, Repo, write_files, write_safetensors
from qwrap import calib_source
from qwrap.errors import ModelNotFoundError, UnsupportedModelError
from qwrap.hub import _weight_files, parameter_counts, resolve_model
from qwrap.modelfiles import ModelSource

GRANTED = "hf_granted_0123456789abcdef"  # may read the private and the gated repo
OTHER = "hf_other_user_fedcba9876543210"  # a valid account without access to either
UNKNOWN = "hf_not_a_token_5555555555555555"  # a token the Hub does not know
TOKENS = (GRANTED, OTHER, UNKNOWN)

META = {
    "config.json": '{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}',
    "generation_config.json": '{"do_sample": false}',
    "tokenizer.json": '{"model": {"type": "BPE"}}',
    "tokenizer_config.json": '{"bos_token": "<s>"}',
    "special_tokens_map.json": '{"eos_token": "</s>"}',
    "chat_template.jinja": "{{ messages }}",
}
INDEX = {
    "metadata": {"total_size": 88},
    "weight_map": {
        "model.embed.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors",
    },
}
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@dataclass
class Repos:
    public: Repo
    bin_only: Repo
    gated: Repo
    private: Repo


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubServer, Repos]]:
    root = tmp_path_factory.mktemp("repos")
    public = write_files(
        root / "public",
        {
            **META,
            "model.safetensors.index.json": json.dumps(INDEX),
            "README.md": "# tiny",
            ".gitattributes": "*.safetensors filter=lfs",
            "pytorch_model.bin": b"duplicate weights as a pickle",
            "training_args.bin": b"not weights",
            "original/params.json": "{}",
            "onnx/model.onnx": b"onnx",
        },
    )
    write_safetensors(public / SHARDS[0], {"model.embed.weight": ("F16", (4, 8))})
    write_safetensors(public / SHARDS[1], {"lm_head.weight": ("F32", (3, 4))})
    # Mistral-style duplicate of the shards: must not be downloaded.
    write_safetensors(public / "consolidated.safetensors", {"x": ("F16", (4, 8))})
    bin_only = write_files(
        root / "bin_only",
        {
            "config.json": '{"model_type": "gpt2"}',
            "tokenizer.json": '{"bin": 1}',
            "pytorch_model.bin": b"pickle",
            "training_args.bin": b"args",
        },
    )
    gated = write_files(root / "gated", {"config.json": '{"gated": 1}', "model.safetensors": b"g"})
    private = write_files(
        root / "private", {"config.json": '{"private": 1}', "model.safetensors": b"p"}
    )
    wikitext = write_files(
        root / "wikitext", {"wikitext-2-raw-v1/train-00000-of-00001.parquet": b"PAR1 fake PAR1"}
    )
    with HubServer(known_tokens={OTHER}) as hub:
        repos = Repos(
            public=hub.add_repo("acme/tiny-llama", public, tags=("v1.0",)),
            bin_only=hub.add_repo("acme/bin-only", bin_only),
            gated=hub.add_repo("acme/gated", gated, gated=True, allowed_tokens=(GRANTED,)),
            private=hub.add_repo("acme/private", private, private=True, allowed_tokens=(GRANTED,)),
        )
        hub.add_repo("Salesforce/wikitext", wikitext, repo_type="dataset")
        yield hub, repos


@pytest.fixture
def hub(server: tuple[HubServer, Repos]) -> HubServer:
    server[0].clear()
    return server[0]


@pytest.fixture
def repos(server: tuple[HubServer, Repos]) -> Repos:
    return server[1]


@pytest.fixture
def env(hub: HubServer, tmp_path: Path) -> dict[str, str]:
    """A child environment: local server, temporary HF_HOME/HOME, no inherited HF settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    clean.pop("TRANSFORMERS_OFFLINE", None)
    clean.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf"),
        HOME=str(tmp_path / "home"),
        XDG_CACHE_HOME=str(tmp_path / "xdg"),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        # Log everything huggingface_hub says, so the token-leak checks see it all.
        HF_HUB_VERBOSITY="debug",
        HF_DEBUG="1",
    )
    return clean


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_CHILD = r"""
import json, logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
from qwrap import calib_source, hub
from qwrap.errors import QwrapError

def run(call, kwargs):
    if call == "resolve":
        s = hub.resolve_model(**kwargs)
        return {"path": str(s.path), "name": s.name, "repo_id": s.repo_id, "revision": s.revision}
    if call == "counts":
        return {"counts": hub.parameter_counts(hub.resolve_model(**kwargs, weights=False))}
    if call == "wikitext2":
        return {"path": str(calib_source.wikitext2(**kwargs))}
    raise ValueError(call)

for call, kwargs in json.loads(sys.argv[1]):
    try:
        out = run(call, kwargs)
    except QwrapError as e:
        out = {"error": type(e).__name__, "message": str(e), "hint": e.hint}
    print("RESULT " + json.dumps(out), flush=True)
"""


@dataclass
class Run:
    results: list[dict[str, Any]]
    output: str  # stdout + stderr: every log line of the child


def run_child(env: dict[str, str], *calls: tuple[str, dict[str, Any]]) -> Run:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(calls)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    for token in TOKENS:
        assert token not in output, f"token leaked into the output:\n{output}"
    results = [
        json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")
    ]
    assert len(results) == len(calls), output
    return Run(results, output)


def resolve(env: dict[str, str], model: str, **kwargs: Any) -> dict[str, Any]:
    return run_child(env, ("resolve", {"model": model, **kwargs})).results[0]


def files_in(folder: str) -> set[str]:
    root = Path(folder)
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# -- local folders (in process: no Hub involved) ----------------------------------------------


def test_local_folder(tmp_path: Path) -> None:
    folder = write_files(tmp_path / "My-Model", {"config.json": "{}"})
    assert resolve_model(str(folder)) == ModelSource(folder.resolve(), "My-Model", None, None)


@pytest.mark.parametrize(
    "model", ["./missing", "/no/such/folder", "~/qwrap-missing-xyz", "gpt2", "a/b/c"]
)
def test_missing_local_folder(model: str) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(model)


def test_partially_existing_path_is_a_missing_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="folder 'models/llama' does not exist"):
        resolve_model("models/llama")


def test_local_parameter_counts_follow_the_index(tmp_path: Path) -> None:
    folder = write_files(
        tmp_path, {"config.json": "{}", "model.safetensors.index.json": json.dumps(INDEX)}
    )
    write_safetensors(folder / SHARDS[0], {"model.embed.weight": ("BF16", (4, 8))})
    write_safetensors(folder / SHARDS[1], {"lm_head.weight": ("F32", (3, 4)), "b": ("F32", (3,))})
    write_safetensors(folder / "consolidated.safetensors", {"x": ("BF16", (4, 8))})
    assert parameter_counts(resolve_model(str(folder))) == {"BF16": 32, "F32": 15}


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no config.json") as info:
        resolve_model(str(tmp_path))
    assert info.value.hint and "config.json" in info.value.hint


# -- weight selection (pure: a file list and the index files) -------------------------------


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # safetensors win over .bin duplicates; the index names the shards (not consolidated.*)
        (
            [
                "a.safetensors",
                "b.safetensors",
                "consolidated.safetensors",
                "model.safetensors.index.json",
                "pytorch_model.bin",
            ],
            ["a.safetensors", "b.safetensors"],
        ),
        (
            ["model.safetensors", "consolidated.safetensors", "pytorch_model.bin"],
            ["model.safetensors"],
        ),
        (["weights.safetensors", "sub/other.safetensors"], ["weights.safetensors"]),
        (["pytorch_model.bin", "training_args.bin"], ["pytorch_model.bin"]),
        (["x.bin", "y.bin", "training_args.bin"], ["x.bin", "y.bin"]),
        (["a.bin", "b.bin", "c.bin", "pytorch_model.bin.index.json"], ["a.bin", "b.bin"]),
    ],
)
def test_weight_files(tmp_path: Path, files: list[str], expected: list[str]) -> None:
    shards = {
        "model.safetensors.index.json": ["a.safetensors", "b.safetensors"],
        "pytorch_model.bin.index.json": ["a.bin", "b.bin", "a.bin"],
    }
    for index, names in shards.items():
        weight_map = {f"t{i}": name for i, name in enumerate(names)}
        (tmp_path / index).write_text(json.dumps({"weight_map": weight_map}))
    assert _weight_files(files, tmp_path, "acme/x") == expected


def test_no_weights_is_unsupported(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="no \\*.safetensors or \\*.bin"):
        _weight_files(["config.json", "model.gguf", "onnx/model.onnx"], tmp_path, "acme/x")


# -- Hub downloads ---------------------------------------------------------------------------


def test_public_download_fetches_only_needed_files(
    env: dict[str, str], hub: HubServer, repos: Repos
) -> None:
    got = resolve(env, "acme/tiny-llama")
    wanted = {*META, "model.safetensors.index.json", *SHARDS}
    assert hub.downloads("acme/tiny-llama") == wanted  # no .bin, consolidated, README, onnx/
    assert files_in(got["path"]) == wanted
    assert got["name"] == "tiny-llama"
    assert got["repo_id"] == "acme/tiny-llama"
    assert got["revision"] == repos.public.sha
    assert Path(got["path"]).name == repos.public.sha  # a snapshot folder in the temp HF_HOME
    assert Path(got["path"]).is_relative_to(env["HF_HOME"])


def test_weights_false_reads_safetensors_headers_only(env: dict[str, str], hub: HubServer) -> None:
    got = run_child(env, ("counts", {"model": "acme/tiny-llama"})).results[0]
    assert got == {"counts": {"F16": 32, "F32": 12}}
    assert hub.downloads("acme/tiny-llama") == {*META, "model.safetensors.index.json"}
    ranged = {r.filename for r in hub.requests if r.status == 206}
    assert ranged == set(SHARDS)  # headers fetched with Range requests, shards not downloaded


def test_bin_fallback_when_no_safetensors(env: dict[str, str], hub: HubServer) -> None:
    run = run_child(env, ("resolve", {"model": "acme/bin-only"}))
    assert "error" not in run.results[0]
    assert hub.downloads("acme/bin-only") == {"config.json", "tokenizer.json", "pytorch_model.bin"}
    assert "WARNING:qwrap.hub:acme/bin-only has no safetensors weights" in run.output


def test_revisions(env: dict[str, str], repos: Repos) -> None:
    sha = repos.public.sha
    tag, commit, unknown = run_child(
        env,
        ("resolve", {"model": "acme/tiny-llama", "revision": "v1.0", "weights": False}),
        ("resolve", {"model": "acme/tiny-llama", "revision": sha, "weights": False}),
        ("resolve", {"model": "acme/tiny-llama", "revision": "no-such-branch"}),
    ).results
    assert tag["revision"] == commit["revision"] == sha  # a tag resolves to its commit
    assert unknown["error"] == "ModelNotFoundError"
    assert "revision 'no-such-branch' does not exist" in unknown["message"]


def test_missing_repo(env: dict[str, str]) -> None:
    run = run_child(
        env,
        ("resolve", {"model": "acme/nope"}),
        ("resolve", {"model": "acme/nope", "token": OTHER}),
    )
    anonymous, authenticated = run.results
    # Anonymous: the Hub answers 401 for missing *and* private repos, so both are mentioned.
    assert anonymous["error"] == "AuthError"
    assert "not found, or it is private" in anonymous["message"]
    assert "hf auth login" in anonymous["hint"]
    # With a token the Hub answers 404.
    assert authenticated["error"] == "ModelNotFoundError"
    assert "spelling" in authenticated["hint"]


def test_gated_repo(env: dict[str, str], hub: HubServer) -> None:
    run = run_child(
        env,
        ("resolve", {"model": "acme/gated"}),
        ("resolve", {"model": "acme/gated", "token": OTHER}),
        ("resolve", {"model": "acme/gated", "token": GRANTED}),
    )
    anonymous, refused, granted = run.results
    for got in (anonymous, refused):
        assert got["error"] == "AuthError"
        assert "gated" in got["message"]
        assert "Request access" in got["hint"] and "HF_TOKEN" in got["hint"]
    assert "error" not in granted
    assert hub.downloads("acme/gated") == {"config.json", "model.safetensors"}


@pytest.mark.heavy
def test_private_repo_token_sources(env: dict[str, str], hub: HubServer) -> None:
    anonymous, explicit = run_child(
        env,
        ("resolve", {"model": "acme/private"}),
        ("resolve", {"model": "acme/private", "token": GRANTED}),
    ).results
    assert anonymous["error"] == "AuthError" and "hf auth login" in anonymous["hint"]
    assert "error" not in explicit
    # HF_TOKEN is used when no token is passed (here it is refused); an explicit token wins.
    from_env, wins = run_child(
        {**env, "HF_TOKEN": UNKNOWN},
        ("resolve", {"model": "acme/private"}),
        ("resolve", {"model": "acme/private", "token": GRANTED}),
    ).results
    assert from_env["error"] == "AuthError" and "refused the token" in from_env["message"]
    assert "error" not in wins


def test_token_never_in_errors_or_logs(env: dict[str, str], hub: HubServer) -> None:
    # run_child fails on any token in the output; here each token is surely sent and refused.
    wrong_user, invalid = run_child(
        env,
        ("resolve", {"model": "acme/private", "token": OTHER}),
        ("resolve", {"model": "acme/tiny-llama", "token": UNKNOWN}),
    ).results
    assert wrong_user["error"] == "ModelNotFoundError"
    assert invalid["error"] == "AuthError" and "refused the token" in invalid["message"]
    sent = {r.authorization for r in hub.requests}
    assert {f"Bearer {OTHER}", f"Bearer {UNKNOWN}"} <= sent


def test_unreachable_endpoint(env: dict[str, str], closed_port: int) -> None:
    got = resolve({**env, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port}"}, "acme/tiny-llama")
    assert got["error"] == "OfflineError"
    assert "unreachable" in got["message"]
    assert "HF_ENDPOINT" in got["hint"] and "local model folder" in got["hint"]


@pytest.mark.heavy
def test_offline_mode_uses_the_cached_snapshot(
    env: dict[str, str], hub: HubServer, closed_port: int
) -> None:
    online = resolve(env, "acme/tiny-llama")
    hub.clear()
    offline = resolve({**env, "HF_HUB_OFFLINE": "1"}, "acme/tiny-llama")
    assert offline == online
    assert hub.requests == []
    # An unreachable Hub falls back on the same cache.
    unreachable = resolve(
        {**env, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port}"}, "acme/tiny-llama"
    )
    assert unreachable == online
    # A snapshot cached by an older huggingface_hub has no file listing: offline still works.
    shutil.rmtree(Path(online["path"]).parents[1] / "trees")
    assert resolve({**env, "HF_HUB_OFFLINE": "1"}, "acme/tiny-llama") == online


def test_offline_mode_without_cache(env: dict[str, str], hub: HubServer) -> None:
    got = resolve({**env, "HF_HUB_OFFLINE": "1"}, "acme/tiny-llama")
    assert got["error"] == "OfflineError"
    assert "HF_HUB_OFFLINE" in got["message"] and "unset HF_HUB_OFFLINE" in got["hint"]
    assert hub.requests == []


@pytest.mark.heavy
def test_offline_mode_with_config_only_cached_needs_weights(env: dict[str, str]) -> None:
    first = resolve(env, "acme/tiny-llama", weights=False)
    assert "error" not in first
    meta_only, weights = run_child(
        {**env, "HF_HUB_OFFLINE": "1"},
        ("resolve", {"model": "acme/tiny-llama", "weights": False}),
        ("resolve", {"model": "acme/tiny-llama"}),
    ).results
    assert meta_only == first
    assert weights["error"] == "OfflineError"


# -- calibration data ------------------------------------------------------------------------


@pytest.mark.heavy
def test_wikitext2_download_and_offline(env: dict[str, str], hub: HubServer) -> None:
    (offline,) = run_child({**env, "HF_HUB_OFFLINE": "1"}, ("wikitext2", {})).results
    assert offline["error"] == "OfflineError"
    assert "--calib FILE" in offline["hint"]
    (online,) = run_child(env, ("wikitext2", {})).results
    parquet = Path(online["path"])
    assert parquet.name == "train-00000-of-00001.parquet"
    assert parquet.read_bytes() == b"PAR1 fake PAR1"
    assert hub.downloads("Salesforce/wikitext") == {
        "wikitext-2-raw-v1/train-00000-of-00001.parquet"
    }
    (cached,) = run_child({**env, "HF_HUB_OFFLINE": "1"}, ("wikitext2", {})).results
    assert cached == online


def test_wikitext2_text_conversion_command() -> None:
    parquet = Path("/cache/wikitext-2-raw-v1/train-00000-of-00001.parquet")
    assert calib_source.text_path(parquet) == parquet.with_name("train-00000-of-00001.txt")
    assert calib_source.conversion_argv(parquet, python="/env/bin/python") == [
        "/env/bin/python",
        "-m",
        "qwrap.workers.parquet_text",
        str(parquet),
        str(parquet.with_name("train-00000-of-00001.txt")),
    ]
