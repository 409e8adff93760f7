"""The project's own exceptions.

The CLI turns every ``GcError`` into one line on stderr and exit code 1 (``GC_DEBUG=1`` shows the
traceback). Messages say what was given, what was expected and what to do next, and name the file.
"""

from __future__ import annotations


class GcError(Exception):
    """Base class of every error ``gc`` reports to a user."""


class InputError(GcError):
    """An input file is missing, unreadable, malformed, or holds data we refuse (e.g. negative counts)."""


class ReferenceMismatchError(GcError):
    """An artefact was built against another gene reference (vocabulary hash) than the one in use."""


class OutputExistsError(GcError):
    """The output path already exists and ``--overwrite`` was not given."""


class FormatError(GcError):
    """A stored artefact (corpus, medians, knowledge table, checkpoint) is truncated, inconsistent, or of an
    unknown format version."""
