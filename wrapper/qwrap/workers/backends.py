"""The quantization backends, each declared once: what it quantizes and with which worker, and
its environment (named like the backend: ``qwrap setup --backends NAME``).

Everything else that lists backends is derived from ``DECLARED_BACKENDS``: each format's
``--backend`` choices (formats/awq.py, formats/gptq.py), the worker protocol's tables
(protocol.py), the environments (``envs.SPECS``, ``envs.KEY_PACKAGES``) and the CLI's help
texts; the Makefile's and the README's lists are checked against it
(tests/test_declared_backends.py). Stdlib only and small: `qwrap --help` reads it, and so do
the workers, through protocol.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    name: str
    workers: tuple[tuple[str, str], ...]  # (format, its worker module under qwrap.workers)
    lock: str  # the environment's lock file under qwrap/locks/
    imports: tuple[str, ...]  # the environment's health check (torch is shared between all of them)
    packages: tuple[str, ...]  # the lock's main pins, shown by `qwrap doctor`

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(fmt for fmt, _ in self.workers)


# A new backend is its worker, its lock and one line here. The order matters: a format's
# default backend is the first one declared for it.
DECLARED_BACKENDS: tuple[Backend, ...] = (
    Backend("gptqmodel", (("awq", "awq_gptqmodel"), ("gptq", "gptq_gptqmodel")), "gptqmodel.txt",
            ("torch", "transformers", "gptqmodel"), ("transformers", "gptqmodel", "optimum")),
    Backend("autoawq", (("awq", "awq_autoawq"),), "autoawq.txt", ("torch", "transformers", "awq"),
            ("transformers", "autoawq")),
    Backend("auto-gptq", (("gptq", "gptq_autogptq"),), "auto-gptq.txt", ("torch", "transformers", "auto_gptq"),
            ("transformers", "auto-gptq")),
)

# The environment that reloads and measures every artifact (hf_validate, GGUF's weights view).
VALIDATE_BACKEND = "gptqmodel"
VALIDATE_MODULE = "qwrap.workers.hf_validate"
# The bits each format's workers write.
BITS = {"awq": (4,), "gptq": (2, 3, 4, 8)}

BACKENDS = tuple(b.name for b in DECLARED_BACKENDS)
FORMATS = tuple(dict.fromkeys(fmt for b in DECLARED_BACKENDS for fmt in b.formats))
# Which module runs a (backend, format) job.
WORKER_MODULES: dict[tuple[str, str], str] = {
    (b.name, fmt): f"qwrap.workers.{module}" for b in DECLARED_BACKENDS for fmt, module in b.workers
}


def backends_for(fmt: str) -> tuple[str, ...]:
    """The backends that write ``fmt``, its default first (its ``--backend`` choices)."""
    return tuple(b.name for b in DECLARED_BACKENDS if fmt in b.formats)
