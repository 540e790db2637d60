"""The exception types every layer raises; a leaf module so anything may import it (pip's rule)."""

from __future__ import annotations

import re
import signal
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
    """Bad user input: an unknown name, a malformed spec, a missing or damaged file of settings
    (a TOML, a saved profile)."""


class EngineError(CputuneError):
    """The engine cannot do what was asked: unknown, not built yet, or its build lacks a program
    or a feature (llama-server, the RPC backend), or cannot load this model; or a program needed
    to fetch, build or run it (git, cmake, numactl) is missing. BuildError is the same kind for a
    build that ran and failed."""


class NetworkError(CputuneError):
    """The network refused: a port in use or not bindable, an RPC worker that cannot be reached
    or speaks another protocol, an HTTP request that failed."""


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
        code = f"{self.returncode}"
        if self.returncode is not None and self.returncode < 0:
            code += f" ({signal_name(-self.returncode).split(' (')[0]})"
        lines = [f"command: {' '.join(self.argv)}", f"exit code: {code}"]
        if self.log_path:
            lines.append(f"full log: {self.log_path}")
        if self.output_tail:
            lines.append("last output lines:")
            lines.extend("  " + line for line in self.output_tail)
        return "\n".join(lines)


class BuildError(ProcessFailed, EngineError):
    """A build step (CMake, the compiler, the built library) failed: a ProcessFailed, so the CLI
    shows its command and output, and an EngineError, so `except EngineError` means "no usable
    engine" whether it was never built or its build failed."""


class WriteError(ConfigError):
    """A file cannot be written where it was asked for: the folder is missing, something other
    than a regular file (a device, a FIFO, a folder, a symbolic link) is there, or the write
    itself failed (no space, no permission). The message names the path."""


class Terminated(KeyboardInterrupt):
    """SIGTERM unwinding cputune the way Ctrl-C does, so that `finally` blocks stop children and
    remove temporary files; the command then exits 128 + the signal's number, as a shell reports."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


def signal_name(signum: int) -> str:
    """'SIGABRT (signal 6)'; 'signal 77' for a number the platform has no name for."""
    try:
        return f"{signal.Signals(signum).name} (signal {signum})"
    except ValueError:
        return f"signal {signum}"


def describe_exit(returncode: int) -> str:
    """How a process ended, from Popen's returncode (negative: the signal that killed it):
    'exited with code 1' or 'was killed by SIGABRT (signal 6)'. Follows the program's name."""
    if returncode < 0:
        return f"was killed by {signal_name(-returncode)}"
    return f"exited with code {returncode}"


# What a llama.cpp program says when it dies, most specific first: GGML_ASSERT and GGML_ABORT
# print `file:line: message` before the backtrace (ggml/src/ggml.c ggml_abort); an uncaught C++
# exception prints `what():` before std::terminate's backtrace; then any `error` line.
_CRASH_LINES = (re.compile(r"GGML_ASSERT\(.*\) failed"), re.compile(r"^\S+\.(?:c|cc|cpp|h|hpp):\d+: \S"),
                re.compile(r"^\s*what\(\):\s*\S"))
_ERROR_LINE = re.compile(r"\berror\b", re.IGNORECASE)
_SOURCE_PATH = re.compile(r"^\S*/([^/\s]+\.(?:c|cc|cpp|h|hpp):\d+: )")


def failure_line(output: str) -> str | None:
    """The line of a failed program's output that says why: the GGML_ASSERT, the GGML_ABORT
    message, the C++ exception, else the first line with 'error' in it; None when none does."""
    lines = [ln.strip() for ln in output.splitlines()]
    for pattern in (*_CRASH_LINES, _ERROR_LINE):
        for ln in lines:
            if pattern.search(ln):
                # `../../vendor/llama.cpp/ggml/src/ggml-cpu/ggml-cpu.c:3395: GGML_ASSERT(...)`:
                # the file's name is enough in one line (the whole path stays in the output tail).
                return _SOURCE_PATH.sub(lambda m: m.group(1), ln, count=1)
    return None


def without_backtrace(output: str) -> str:
    """The output up to the assert/abort/exception line: what ggml prints after it is a gdb or
    backtrace_symbols dump of the dying process (ggml_print_backtrace), not a reason."""
    lines = output.splitlines()
    for pattern in _CRASH_LINES:
        for i, ln in enumerate(lines):
            if pattern.search(ln.strip()):
                return "\n".join(lines[:i + 1])
    return output


def exit_message(program: str, returncode: int, output: str = "", context: str = "") -> str:
    """One line for a failed run: 'llama-bench was killed by SIGABRT (signal 6): <the
    GGML_ASSERT line>'. `context` goes after the exit (' before it was ready')."""
    why = failure_line(output)
    return f"{program} {describe_exit(returncode)}{context}" + (f": {why}" if why else "")


def process_failed(program: str, argv: Sequence[str], returncode: int, output: str = "",
                   context: str = "", hint: str | None = None, log_path: str | None = None,
                   cls: type[ProcessFailed] = ProcessFailed) -> ProcessFailed:
    """The ProcessFailed for a run that ended with `returncode` (the one helper every caller of
    a subprocess uses): the signal named, the line that says why, the backtrace left out."""
    if returncode < 0:
        output = without_backtrace(output)
    return cls(exit_message(program, returncode, output, context), argv, returncode, output,
               hint=hint, log_path=log_path)
