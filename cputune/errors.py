"""The exception types every layer raises; a leaf module so anything may import it (pip's rule)."""

from __future__ import annotations

from typing import Sequence


class CputuneError(Exception):
    """Base error: a one-line message for the user and an optional hint on what to do."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class TopologyError(CputuneError):
    pass


class ModelError(CputuneError):
    """A model cannot be had: no such file or name, several where one was meant, a wrong quant."""


class GGUFError(ModelError):
    """A GGUF file's bytes are wrong: not GGUF, truncated, corrupt or implausible header values."""


class InsufficientMemory(CputuneError):
    pass


class ProbeError(CputuneError):
    pass


class ConfigError(CputuneError):
    """Bad user input: an unknown name, a malformed spec, a missing file."""


class ProcessFailed(CputuneError):
    """A subprocess failed: carries argv, exit code and the tail of its output, like pip's error."""

    TAIL_LINES = 40

    def __init__(self, message: str, argv: Sequence[str], returncode: int | None,
                 output: str = "", hint: str | None = None, log_path: str | None = None):
        super().__init__(message, hint)
        self.argv = list(argv)
        self.returncode = returncode
        self.output_tail = output.splitlines()[-self.TAIL_LINES:]
        self.log_path = log_path

    def details(self) -> str:
        lines = [f"command: {' '.join(self.argv)}", f"exit code: {self.returncode}"]
        if self.log_path:
            lines.append(f"full log: {self.log_path}")
        if self.output_tail:
            lines.append("last output lines:")
            lines.extend("  " + line for line in self.output_tail)
        return "\n".join(lines)


class BuildError(ProcessFailed):
    pass
