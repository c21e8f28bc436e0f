"""The GPU check's carry bundle: what scripts/gpu-device lists for the offline GPU machine is
what the environments' locks pin, never torch, and every environment has a list."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from conftest import REPO
from qwrap import envs

LISTS = REPO / "scripts" / "gpu-device"


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_every_environment_has_a_list_pinned_as_its_lock() -> None:
    for name, spec in envs.SPECS.items():
        listed = LISTS / f"{name}.txt"
        assert listed.is_file(), f"scripts/gpu-device/{name}.txt is missing: the GPU check cannot make {name} offline"
        lock = _pins(envs.LOCK_DIR / spec.lock)
        for pkg, version in _pins(listed).items():
            assert pkg != "torch", f"{listed.name} lists torch: the GPU machine's own is used"
            assert lock.get(pkg) == version, f"{listed.name}: {pkg}=={version}, but {spec.lock} pins {lock.get(pkg)}"


def test_gpu_scripts_teach_and_refuse_without_a_bundle(tmp_path: Path) -> None:
    helped = subprocess.run([str(REPO / "scripts" / "gpu-bundle"), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "carry" in helped.stdout
    missing = subprocess.run([str(REPO / "scripts" / "gpu-check")], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "QWRAP_GPU_BUNDLE": str(tmp_path / "none")})
    assert missing.returncode == 2 and "scripts/gpu-bundle" in missing.stderr
