"""The one base class of problems a user can fix.

Every error that means "your input, config, data or run folder is wrong" derives from `UserError`;
the CLI (twostage/cli.py) prints those as one line naming the problem and the fix, and lets every
other exception (a bug) keep its traceback. Library callers catch `UserError` the same way.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message says what to change."""


__all__ = ["UserError"]
