"""Error types that map onto the exit codes of `compress run` (see DESIGN.md, Interfaces)."""
from __future__ import annotations


class CompressError(Exception):
    """Base of every error compress raises on purpose."""

    exit_code = 1


class InputError(CompressError):
    """Bad input: config, paths, model or data. One clear line, exit code 2."""

    exit_code = 2


class ConfigError(InputError):
    """A config field is wrong. The message starts with the file and the field path."""


class GateFailed(CompressError):
    """One or more gates failed; artifacts and the report are still written. Exit code 3."""

    exit_code = 3


class PassFailed(CompressError):
    """A pass failed in a way that is not the user's input (parity over tolerance, NaN loss...). Exit code 1."""

    exit_code = 1

    def __init__(self, pass_name: str, message: str):
        super().__init__(f"pass '{pass_name}' failed: {message}")
        self.pass_name = pass_name


class NotCached(InputError):
    """`compress run --check-only` looked up a step the cache does not hold (the pipeline looks up, never builds).
    Exit code 2; compress.check words the fix."""

    def __init__(self, label: str, key: str, cache: object):
        super().__init__(f"pass '{label}' has no cached result for this config in {cache} (key {key[:12]})")
        self.label = label
        self.key = key
        self.cache = cache
