"""Errors caused by input (a config value, a file, a directory, a model), as opposed to bugs.

The command line prints an :class:`RspoError` as one line and exits with code 2; anything else
is a bug and shows its traceback. Every subclass is also a ``ValueError`` so library callers can
catch input errors the usual way.
"""

from __future__ import annotations

import reprlib

_brief_repr = reprlib.Repr()
_brief_repr.maxstring = 60
_brief_repr.maxother = 60
_brief_repr.maxlist = _brief_repr.maxtuple = _brief_repr.maxdict = _brief_repr.maxset = 6
_brief_repr.maxlevel = 2


def brief(value: object, limit: int = 160) -> str:
    """A bounded repr for error messages: a value echoed back is at most ``limit`` characters (a YAML alias
    bomb must not become a 39 MB message), and walking it is cheap (reprlib stops at a few levels)."""
    text = _brief_repr.repr(value)
    return text if len(text) <= limit else text[: limit - 4] + " ..."


class RspoError(ValueError):
    """An expected error caused by input; the message names the field, file, directory or tensor."""


class ConfigError(RspoError):
    """A configuration value that cannot be accepted; the message names the field."""


class FieldError(ConfigError):
    """A value that a config dataclass's own checks reject, for one field. :func:`rspo.config.build` names the
    field as the user spelled it (``router_shift.gamma_min``, ``router_shift_gamma_min`` in TRL,
    ``actor_rollout_ref.rspo.gamma_min`` in verl)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class RunDirError(RspoError):
    """A directory a command may not write into, or a run directory it cannot continue."""


class CheckpointError(RspoError):
    """A checkpoint that is corrupt, incomplete or not ours; the message names the file."""


class ModelError(RspoError):
    """A model directory that cannot serve as a policy (missing files, unknown or dense model)."""


class NonFiniteError(ValueError):
    """NaN or inf where a finite value is required (e.g. router log-probs of a diverged model).

    Not an input error: the trainer treats it like a non-finite loss (the update is skipped and counted).
    """
