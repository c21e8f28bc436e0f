"""Every expected error, its exit code and its hint: the one place that defines them.

Each class carries a unique ``exit_code`` (documented in README.md, pinned by a test)
and an optional ``hint``: the next thing the user can do. The CLI prints message and
hint; tracebacks only with QWRAP_DEBUG=1. Unexpected exceptions exit with 1.
"""

from __future__ import annotations

from typing import ClassVar


class QwrapError(Exception):
    """Base of every expected error. ``str(err)`` is the message; ``hint`` says what to do."""

    exit_code: ClassVar[int] = 1
    title: ClassVar[str] = "error"

    def __init__(self, message: str, *, hint: str | None = None, log_path: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.log_path = log_path


class UsageError(QwrapError):
    """Bad option values or combinations (unknown quant type, bad group size, ...)."""

    exit_code = 2
    title = "invalid usage"


class ModelNotFoundError(QwrapError):
    """The local folder or Hub repo (or revision) does not exist."""

    exit_code = 3
    title = "model not found"


class AuthError(QwrapError):
    """The Hub refused access: missing/invalid token, gated or private repo."""

    exit_code = 4
    title = "access denied"


class OfflineError(QwrapError):
    """A download was needed but the network is unreachable or HF_HUB_OFFLINE is set."""

    exit_code = 5
    title = "offline"


class UnsupportedModelError(QwrapError):
    """Architecture or tokenizer that the pinned converter/backends cannot handle."""

    exit_code = 6
    title = "unsupported model"


class ToolchainMissingError(QwrapError):
    """The pinned llama.cpp build or a backend environment is missing or broken."""

    exit_code = 7
    title = "toolchain missing"


class OutputExistsError(QwrapError):
    """An artifact already exists and --force was not given."""

    exit_code = 8
    title = "output exists"


class InsufficientDiskError(QwrapError):
    """Not enough free disk for the planned outputs, or the disk filled up while writing."""

    exit_code = 9
    title = "not enough disk space"


class StepFailedError(QwrapError):
    """A supervised tool exited with an error."""

    exit_code = 10
    title = "step failed"


class ToolKilledError(StepFailedError):
    """A tool was killed by a signal from outside qwrap (a step failure, not a bad artifact)."""


class ValidationFailedError(QwrapError):
    """An artifact was produced but did not pass validation; it is not reported as success."""

    exit_code = 11
    title = "validation failed"


class OutOfMemoryError(QwrapError):
    """A child process was killed by the kernel for memory (or raised an OOM)."""

    exit_code = 12
    title = "out of memory"


class StalledError(QwrapError):
    """A child produced no output for longer than --stall-timeout and was killed."""

    exit_code = 13
    title = "stalled"


class LockedError(QwrapError):
    """Another live qwrap process holds the output folder, or the step (``--step``) being asked for."""

    exit_code = 14
    title = "output folder in use"


class JournalError(QwrapError):
    """The step journal cannot be read (not a crash-truncated last line: real corruption)."""

    exit_code = 15
    title = "journal unreadable"


class BackendUnavailableError(QwrapError):
    """A quantization backend cannot run on this host (e.g. auto-gptq without CUDA)."""

    exit_code = 16
    title = "backend unavailable"


class QualityGateError(QwrapError):
    """An artifact's measured quality is over its --max-kld limit (it stays on disk, marked failed)."""

    exit_code = 17
    title = "quality gate failed"


class WriteAccessError(QwrapError):
    """The Hub refused a push: the token may read but not write there (403), or the repo is gated/owned by others."""

    exit_code = 18
    title = "no write access"


class NotPublishableError(QwrapError):
    """An output folder that must not be pushed as it is: an unvalidated artifact, a failed quality gate,
    an AWQ/GPTQ folder without its quantization_config, a model card the Hub would reject."""

    exit_code = 19
    title = "not publishable"


class InputsNotReadyError(QwrapError):
    """``--step``: a step it reads is not done and verified yet (a scheduler ran it too early)."""

    exit_code = 22
    title = "inputs not ready"


class ModelFilesError(QwrapError):
    """A model file is broken: a safetensors header, an index, config.json (named, with the fix)."""

    exit_code = 20
    title = "broken model files"


class OutputPathError(QwrapError):
    """A path qwrap would write in the output folder is a symbolic link or leaves the folder."""

    exit_code = 21
    title = "unsafe output path"


class Interrupted(QwrapError):
    """Ctrl-C (130) or SIGTERM (143): children were stopped, the journal says interrupted."""

    exit_code = 130
    title = "interrupted"

    def __init__(self, message: str = "interrupted", *, signum: int = 2, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.signum = signum

    @property
    def code(self) -> int:
        return 128 + self.signum


ALL_ERRORS: tuple[type[QwrapError], ...] = (
    UsageError,
    ModelNotFoundError,
    AuthError,
    OfflineError,
    UnsupportedModelError,
    ToolchainMissingError,
    OutputExistsError,
    InsufficientDiskError,
    StepFailedError,
    ValidationFailedError,
    OutOfMemoryError,
    StalledError,
    LockedError,
    JournalError,
    BackendUnavailableError,
    QualityGateError,
    WriteAccessError,
    NotPublishableError,
    InputsNotReadyError,
    ModelFilesError,
    OutputPathError,
    Interrupted,
)


def exit_code_for(err: BaseException) -> int:
    """The process exit code for ``err`` (1 for anything unexpected)."""
    if isinstance(err, Interrupted):
        return err.code
    if isinstance(err, QwrapError):
        return err.exit_code
    return 1
