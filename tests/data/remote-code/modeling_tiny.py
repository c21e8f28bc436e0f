"""A tiny model's "own code" for tests: Llama under another class name. Importing it appends
this process's pid to $QWRAP_TEST_REMOTE_CODE_MARKER, which proves the code ran."""

import os

from transformers import LlamaForCausalLM

_marker = os.environ.get("QWRAP_TEST_REMOTE_CODE_MARKER")
if _marker:
    with open(_marker, "a") as f:
        f.write(f"{os.getpid()}\n")


class TinyLlamaForCausalLM(LlamaForCausalLM):
    pass
