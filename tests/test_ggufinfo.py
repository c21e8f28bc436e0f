"""The stdlib GGUF header reader agrees with the pinned llama.cpp tree's own gguf-py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import Run
from qwrap.ggufinfo import GGUFFormatError, read_info, tensor_data
from qwrap.toolchain import Toolchain

pytestmark = pytest.mark.slow

DUMP = """
import json, sys
sys.path.insert(0, sys.argv[2])
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
print(json.dumps({
    "fields": {k: (f.contents() if not hasattr(f.contents(), "__len__") or isinstance(f.contents(), str) else len(f.contents()))
               for k, f in r.fields.items() if not k.startswith("GGUF.")},
    "tensors": [[t.name, [int(d) for d in t.shape], int(t.tensor_type), int(t.data_offset)] for t in r.tensors],
}, default=str))
"""


@pytest.fixture(scope="module")
def artifact(gguf_run: Run) -> Path:
    return gguf_run.out / "tiny-llama-Q4_K_M.gguf"


def test_matches_gguf_py(artifact: Path, convert_python: Path, toolchain: Toolchain) -> None:
    assert toolchain.source_dir is not None
    proc = subprocess.run([str(convert_python), "-c", DUMP, str(artifact), str(toolchain.source_dir / "gguf-py")],
                          capture_output=True, text=True, check=True)
    theirs = json.loads(proc.stdout)
    ours = read_info(artifact)
    assert ours.metadata["general.architecture"] == theirs["fields"]["general.architecture"]
    assert ours.file_type == theirs["fields"]["general.file_type"]
    assert ours.metadata["tokenizer.ggml.tokens"] == theirs["fields"]["tokenizer.ggml.tokens"]
    assert set(ours.metadata) == set(theirs["fields"])
    their_tensors = {name: (shape, ttype, offset) for name, shape, ttype, offset in theirs["tensors"]}
    assert len(ours.tensors) == len(their_tensors)
    for t in ours.tensors:
        shape, ttype, offset = their_tensors[t.name]
        assert list(t.shape) == shape and t.ggml_type == ttype
        assert ours.data_offset + t.offset == offset
    assert len(tensor_data(artifact, ours)) == len(ours.tensors)


def test_truncated_or_foreign_files_are_errors(artifact: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(artifact.read_bytes()[:5000])
    with pytest.raises(GGUFFormatError, match="truncated"):
        read_info(cut)
    other = tmp_path / "x.gguf"
    other.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(GGUFFormatError, match="not a GGUF"):
        read_info(other)
