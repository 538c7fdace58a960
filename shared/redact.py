"""Keeps secrets out of logs, exception messages and events.

`redact(text)` masks the values of connection-string keys (AccountKey, SharedAccessKey, ...),
SAS signatures, function keys (`code=`), bearer tokens and passwords. `install_log_redaction()`
puts a filter on the root logger's handlers and on the Azure SDK loggers, so even an SDK that
logs a connection string at DEBUG level writes it masked.
"""

from __future__ import annotations

import logging
import re
from typing import Any

# Names whose value is secret, also as the end of a longer name (AZUREML_CLIENT_SECRET,
# x-functions-key, "AccountKey" as a JSON or dict key).
_SECRET_NAMES = (
    r"[A-Za-z0-9_.-]*(?:AccountKey|SharedAccessKey|SharedAccessSignature|password|passwd|pwd|secret|token|"
    r"api[_-]?key|functions[_-]key|client[_-]?key|credential)|sig|code"
)
_PATTERNS = [
    # key=value, key: value, "key": "value", 'key': 'value', key%3Dvalue (URL-encoded)
    re.compile(rf"(?i)(?<![A-Za-z0-9_.-])((?:{_SECRET_NAMES}))([\"']?\s*(?:[=:]|%3D|%3A)\s*)([\"']?)((?:\\[\"']|[^;&\s\"',}}])+)"),
    # Authorization: Bearer <token>, Basic <credentials>
    re.compile(r"(?i)\b(Bearer|Basic)(\s+)()([A-Za-z0-9._~+/=%-]{8,})"),
    # user info in a URL: scheme://user:password@host
    re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/\s:@]*)(:)()([^\s@]+)(?=@)"),
]
MASK = "***"
# C0/C1 controls and the Unicode bidirectional and invisible formatting characters (a U+202E in
# a file name can make a log line read backwards).
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]")


def redact(text: object) -> str:
    value = str(text)
    for pattern in _PATTERNS:
        value = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}{MASK}", value)
    return value


def printable(text: object, keep_newlines: bool = False, limit: int | None = None) -> str:
    """Text from outside made safe to print: control and bidi characters become escapes such as \\u202e;
    with `limit`, cut to that many characters (and "..." to say so)."""
    value = str(text)
    if not keep_newlines:
        value = value.replace("\n", "\\n").replace("\t", "\\t")
    shown = _UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", value)
    return shown if limit is None or len(shown) <= limit else shown[:limit] + "..."


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (with its arguments applied) in redacted form."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args is None and record.__dict__.get("_redacted") is record.msg:
            return True  # cleaned by an earlier filter (the record factory, a handler's): unchanged since
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is the logger's problem, not ours
            return True
        # The message on one line (a newline from outside cannot forge a log line); a traceback
        # keeps its lines.
        cleaned = printable(redact(message))
        if record.exc_info and record.exc_info[1] is not None:
            cleaned += "\n" + printable(redact(logging.Formatter().formatException(record.exc_info)), keep_newlines=True)
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = cleaned, None
        record.__dict__["_redacted"] = cleaned
        return True


AZURE_LOGGERS = (
    "azure",
    "azure.servicebus",
    "azure.core",
    "azure.identity",
    "azure.data.tables",
    "azure.storage",
    "uamqp",
    "azure.servicebus._pyamqp",
)


_FACTORY_INSTALLED = False


def _install_record_factory() -> None:
    """Redact every record as it is created, whichever logger or handler it then goes to."""
    global _FACTORY_INSTALLED
    if _FACTORY_INSTALLED:
        return
    previous = logging.getLogRecordFactory()
    flt = RedactingFilter()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        flt.filter(record)
        return record

    logging.setLogRecordFactory(factory)
    _FACTORY_INSTALLED = True


def install_log_redaction() -> RedactingFilter:
    """Idempotent: redact at record creation, plus a filter on the root handlers and Azure SDK loggers."""
    _install_record_factory()
    existing = next((f for f in logging.getLogger().filters if isinstance(f, RedactingFilter)), None)
    flt = existing or RedactingFilter()
    for logger in [logging.getLogger(), *(logging.getLogger(name) for name in AZURE_LOGGERS)]:
        if flt not in logger.filters:
            logger.addFilter(flt)
        for handler in logger.handlers:
            if flt not in handler.filters:
                handler.addFilter(flt)
    return flt
