"""model.py on real folders: the chat template found where the pinned converter looks for it."""

from __future__ import annotations

import json
from pathlib import Path

from qwrap.model import chat_template


def test_chat_template_in_the_converters_order(tmp_path: Path) -> None:
    assert chat_template(tmp_path) is None
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    assert chat_template(tmp_path) == "from json"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert chat_template(tmp_path) == "from jinja"
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "from config"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert chat_template(tmp_path) == "from config"
    (tmp_path / "tokenizer_config.json").write_text("not json")
    assert chat_template(tmp_path) == "from jinja"
