"""--split-max-size on a tiny model with a tiny size: llama-gguf-split after validation, shards
named as llama.cpp expects, the set loaded from its first shard, listed with sizes and hashes,
reused on rerun, and pushed as a set."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import run_qwrap
from hubserver import HubServer
from qwrap.journal import sha256_file
from qwrap.toolchain import Toolchain

pytestmark = pytest.mark.slow
WRITER = "hf_writer_0123456789abcdef0123"


def test_split_set_validated_listed_reused_and_pushed(tiny_model: Path, tmp_path: Path, toolchain: Toolchain) -> None:
    out = tmp_path / "out"
    args = ("run", str(tiny_model), "-o", str(out), "-q", "Q8_0", "--split-max-size", "2M", "--no-eval", "--json")
    plan = run_qwrap("plan", *args[1:])
    assert plan.returncode == 0, plan.stderr
    assert "gguf.split:Q8_0" in [s["id"] for s in json.loads(plan.stdout)["steps"]]
    proc = run_qwrap(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (artifact,) = json.loads(proc.stdout)["artifacts"]
    shards = artifact["shards"]
    count = len(shards)
    assert count > 1 and artifact["validated"]
    assert [s["path"] for s in shards] == [f"{tiny_model.name}-Q8_0-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    for s in shards:
        assert (out / s["path"]).stat().st_size == s["bytes"] <= 2_000_000
        assert sha256_file(out / s["path"]) == s["sha256"]
    assert artifact["bytes"] == sum(s["bytes"] for s in shards) and artifact["path"] == str(out / shards[0]["path"])
    assert sorted(p.name for p in out.glob("*.gguf")) == [s["path"] for s in shards], "the single file is gone"
    assert not (out / ".checkpoint" / "work").exists() or not any((out / ".checkpoint" / "work").iterdir())
    load = subprocess.run([str(toolchain.tool("llama-simple")), "-m", str(out / shards[0]["path"]), "-n", "4",
                           "Once upon a time"], capture_output=True, text=True, timeout=120)
    assert load.returncode == 0 and f"additional {count - 1} GGUFs metadata loaded" in load.stderr

    again = run_qwrap(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["artifacts"][0]["reused"]

    with HubServer(known_tokens={WRITER}, storage=tmp_path / "hub", write_tokens={"me": {WRITER}}) as hub:
        pushed = run_qwrap("push", str(out), "me/split", "--token", WRITER,
                           env={"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"})
        assert pushed.returncode == 0, pushed.stderr
        (commit,) = hub.commits
        assert {s["path"] for s in shards} <= set(commit.files)
        stored = hub.repos[("model", "me/split")].folder
        assert all((stored / s["path"]).read_bytes() == (out / s["path"]).read_bytes() for s in shards)
