"""The one exception type of the data layer.

Every data problem a user can fix (a missing file, a corrupt archive, a wrong key in an .npz, a
split that does not exist) is raised as `DataError` with a message that says what was found, what
was expected and which command or setting fixes it. It subclasses RuntimeError so generic handlers
still catch it, and the CLI prints its message without a traceback.
"""

from __future__ import annotations

from twostage.common.errors import UserError


class DataError(UserError, RuntimeError):
    """A data problem, phrased so that the message says what to do about it."""


__all__ = ["DataError"]
