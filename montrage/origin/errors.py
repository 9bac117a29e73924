"""The one error type of origin attribution, so that the CLI can report bad input without a traceback."""

from __future__ import annotations

from montrage.errors import MontrageError


class OriginError(MontrageError, ValueError):
    """Bad input to origin attribution: a model, image, features file or classifier that cannot be used as given.

    A ValueError, so `montrage` prints it as `montrage origin: error: ...` and exits with status 2.
    """
