"""The one exception family the CLI turns into a one-line message and a non-zero exit."""

from .fileformat.errors import SnapshotError
from .stream.errors import StreamError


class VmsnapError(Exception):
    """A failure with a message fit for one line on stderr."""


#: Everything a user can cause with bad input; never shown as a traceback.
USER_ERRORS = (VmsnapError, SnapshotError, StreamError, OSError)
