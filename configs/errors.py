"""Errors for bad input, shared by every package: each carries one line that names the value and the fix."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot work. The message is one line naming the value and the fix."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: missing, uncommitted, or written by an incompatible engine."""
