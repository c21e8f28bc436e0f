"""What qwrap reads of an environment from its files alone (plan-time checks start no
interpreter): a package in its own site-packages or in the shared ones its .pth files add."""

from __future__ import annotations

from pathlib import Path

from qwrap.envs import Env


def test_a_package_is_found_in_the_environment_or_through_its_pth_files(tmp_path: Path) -> None:
    env = Env("gptqmodel", tmp_path / "env")
    site = env.path / "lib" / "python3.11" / "site-packages"
    (site / "gptqmodel").mkdir(parents=True)
    shared = tmp_path / "torch-env" / "site-packages"
    (shared / "torch").mkdir(parents=True)
    assert env.holds("gptqmodel") and not env.holds("torch") and not env.holds("torchvision")
    (site / "_qwrap_torch.pth").write_text(f"# the shared torch\nimport os\n{shared}\n\n")
    assert env.holds("torch") and not env.holds("torchvision")
    (shared / "torchvision").mkdir()
    assert env.holds("torchvision")
    assert not Env("autoawq", tmp_path / "missing").holds("torch")
