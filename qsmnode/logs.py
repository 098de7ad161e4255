"""The node's log: one line per event on stderr, with no patient data, libraries included.

qsmnode's own lines name instances by UID only. The libraries it uses (pydicom, pynetdicom,
highdicom) speak for themselves, through Python's ``warnings`` and their loggers, and their
messages quote what they found: pydicom's "Invalid value for VR UI: '...'" once carried 480
header bytes of a malformed instance, patient name, ID and birth date included, to stderr.
:func:`setup_logging` routes every such message through the node's handler, where
:class:`LibraryDetailsWithheld` keeps the words that say what happened and withholds the values
(:func:`withhold_details`). It applies at every log level: patient data never belongs in a log.

Every process of the node calls :func:`setup_logging` (the node, its classifier child), so
none of them writes a library's message to the shared stderr unfiltered.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

#: Loggers whose messages may quote data from DICOM files or peers.
LIBRARY_LOGGERS = ("pydicom", "pynetdicom", "highdicom")
#: Where Python ``warnings`` are logged (after :func:`withhold_details`).
WARNINGS_LOGGER = "qsmnode.library-warnings"

# where a value starts: a quote, a colon, '=', a backslash escape or a bytes literal
_VALUE_START = re.compile(r"""['"`:=\\<\[{]|\bb'""")
_MAX_WORDS = 120
_WITHHELD = " [details withheld: library messages may quote patient data]"


def withhold_details(text: str) -> str:
    """The words of a library's message before the first value it quotes (first line, at most
    120 characters), and a note that the rest was withheld; the text itself when it has no value."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    match = _VALUE_START.search(first)
    words = first[:match.start()] if match else first
    if len(words) > _MAX_WORDS:
        words = words[:_MAX_WORDS]
    words = words.rstrip(" .,;-")
    if match or len(first) > len(words) + 1 or "\n" in text.strip():
        return (words or "message") + _WITHHELD
    return words


def is_library(name: str) -> bool:
    """True for a record of one of :data:`LIBRARY_LOGGERS` (or a child logger of one)."""
    return any(name == lib or name.startswith(lib + ".") for lib in LIBRARY_LOGGERS)


class LibraryDetailsWithheld(logging.Filter):
    """On the node's handler: a library's record keeps its level, logger and leading words; its
    arguments, the values after those words, tracebacks and stack are withheld."""

    def filter(self, record: logging.LogRecord) -> bool:
        if is_library(record.name):
            template = record.msg if isinstance(record.msg, str) else str(record.msg)
            record.msg, record.args = withhold_details(template), None
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


class PynetdicomOnlyInDebug(logging.Filter):
    """Drops pynetdicom's records unless the node logs at debug level.

    pynetdicom logs ERROR lines (and, for TLS and broken connections, tracebacks) for every failed
    connection, e.g. on every retry while a destination PACS is down. The node says the same in
    one line of its own per event (the dispatcher: which destination, the cause, the next try;
    the receiver: each refused association), so pynetdicom's lines are noise at info level.
    With ``log_level = "debug"`` they are shown, for troubleshooting.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "pynetdicom" and not record.name.startswith("pynetdicom."):
            return True
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def setup_logging(level: str = "info") -> None:
    """One line per event on stderr; library messages (loggers and ``warnings``) through the same
    handler with their details withheld; pynetdicom's own lines only at debug level."""
    from pynetdicom import _config as pynetdicom_config

    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    root = logging.getLogger()
    if not any(getattr(h, "_qsmnode", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(PynetdicomOnlyInDebug())
        handler.addFilter(LibraryDetailsWithheld())
        handler._qsmnode = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    route_library_output()


def route_library_output() -> None:
    """Send every library logger's records and every Python warning to the root logger's handlers
    (the node's, filtered), not to handlers of their own or straight to stderr."""
    import pydicom  # noqa: F401 - imported for its logger set-up, which this then undoes

    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for own in list(logger.handlers):
            if not isinstance(own, logging.NullHandler):
                logger.removeHandler(own)
        logger.propagate = True
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.WARNING)
    warnings.showwarning = _log_warning


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the node: one log line, the message's details withheld."""
    where = os.path.basename(os.path.dirname(filename)) or os.path.basename(filename)
    logging.getLogger(WARNINGS_LOGGER).warning("%s from %s: %s", category.__name__, where,
                                               withhold_details(str(message)))
