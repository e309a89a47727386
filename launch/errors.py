"""``twotower-launch``'s refusal: one exception, one exit status, a message that says what to change.

Every check runs before anything is written or submitted; the CLI prints the message and exits
with the code (``2`` bad input, like ``twotower-train``'s configuration errors; ``3`` the layout
does not fit, like ``twotower-train --plan``; ``1`` the scheduler refused a submission)::

    >>> err = LaunchError("cluster.account is not set", code=LaunchError.BAD_INPUT)
    >>> err.code, str(err)
    (2, 'cluster.account is not set')
"""

from __future__ import annotations


class LaunchError(Exception):
    """A launch refused before (or, for ``SUBMIT``, while) anything reached the scheduler."""

    SUBMIT = 1
    BAD_INPUT = 2
    PLAN = 3

    def __init__(self, message: str, code: int = BAD_INPUT):
        super().__init__(message)
        self.code = code
