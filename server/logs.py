"""Structured logs of the ``apportion`` logger and its children (``apportion.server``, ...).

:func:`configure` installs one handler on the ``apportion`` logger, in one of two formats:

``json`` (default; one object per line, for log pipelines)::

    {"ts": "2025-01-02T03:04:05.678Z", "level": "INFO", "logger": "apportion.server",
     "msg": "rpc", "method": "SubmitWorkload", "code": "OK", "principal": "tenant:research#3f2a9c1b",
     "duration_ms": 1.7}

    ``ts`` is RFC 3339 in UTC with milliseconds; every field passed as
    ``logger.info(..., extra={...})`` is added as it is (``default=str`` for values
    JSON cannot hold; an extra named like a base field is kept as ``extra.NAME``); an
    exception adds ``exc``, a stack ``stack``.

``text`` (for people)::

    2025-01-02T03:04:05.678Z INFO  apportion.server: rpc method=SubmitWorkload code=OK duration_ms=1.7

    extras as ``key=value``, values with spaces or quotes JSON-quoted.

The handler is the ``apportion`` logger's only one and the logger does not propagate,
so records are not printed twice when the root logger has handlers of its own; the
root logger and its handlers are left untouched. Calling :func:`configure` again
replaces the handler (idempotent).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

LOGGER = "apportion"

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_BASE = ("ts", "level", "logger", "msg")


def get_logger(name: str = "") -> logging.Logger:
    """The ``apportion`` logger, or its child ``apportion.NAME``."""
    return logging.getLogger(f"{LOGGER}.{name}" if name else LOGGER)


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, then the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            out[f"extra.{key}" if key in _BASE else key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    if not text or any(c.isspace() or c in "\"'=" for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class TextFormatter(logging.Formatter):
    """``TS LEVEL logger: msg key=value ...`` for people."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname:<5} {record.name}: {record.getMessage()}"
        extras = " ".join(f"{k}={_text_value(v)}" for k, v in _extras(record).items())
        if extras:
            line = f"{line} {extras}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


class _Handler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure` installs (told apart from anyone else's by its class)."""


def configure(
    level: str | int = "INFO", fmt: Literal["json", "text"] = "json", stream: TextIO | None = None
) -> logging.Logger:
    """Send the ``apportion`` logs to ``stream`` (default: ``sys.stderr`` at call time) in
    ``fmt`` at ``level`` and above. Replaces the handler of an earlier call. Returns the logger."""
    if fmt not in ("json", "text"):
        raise ValueError(f"unknown log format {fmt!r}; expected 'json' or 'text'")
    if isinstance(level, str):
        number = logging.getLevelName(level.upper())
        if not isinstance(number, int):
            raise ValueError(f"unknown log level {level!r}; expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
        level = number
    logger = logging.getLogger(LOGGER)
    for old in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(old)
        old.close()
    handler = _Handler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger
