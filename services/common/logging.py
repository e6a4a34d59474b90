"""One line per event, `key=value` style, request id first when there is one.

    log = get_logger("router")
    event(log, "plan published", version=3, missing=0)
    event(log, "generate failed", request_id=rid, level=logging.WARNING, code="UNAVAILABLE")

prints  `2025-01-01T12:00:00.123Z level=info svc=router event="plan published" version=3 missing=0`.
Values with spaces, quotes or `=` are quoted; newlines (tracebacks) are escaped so each event
stays one line for `grep` and log shippers.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_BARE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./:,@+[]")


def format_value(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}"
    else:
        text = str(value)
    if text and all(ch in _BARE for ch in text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def format_fields(fields: dict[str, Any]) -> str:
    return " ".join(f"{key}={format_value(val)}" for key, val in fields.items() if val is not None)


class KeyValueFormatter(logging.Formatter):
    """ts level svc [request_id] event k=v ... [exc="..."]"""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        head: dict[str, Any] = {"level": record.levelname.lower(), "svc": self.service}
        extra: dict[str, Any] = dict(getattr(record, "kv", None) or {})
        if "request_id" in extra:
            head["request_id"] = extra.pop("request_id")
        if record.name not in ("moe", self.service) and not record.name.startswith(("moe.", "services.")):
            head["logger"] = record.name
        head["event"] = record.getMessage()
        head.update(extra)
        if record.exc_info:
            head["exc"] = self.formatException(record.exc_info)
        return f"{ts}.{int(record.msecs):03d}Z {format_fields(head)}"


def configure_logging(service: str, level: str = "info") -> None:
    """Route the root logger to stderr through KeyValueFormatter (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter(service))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_moe_handler", False):
            root.removeHandler(old)
    handler._moe_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("grpc", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"moe.{name}")


def event(logger: logging.Logger, message: str, /, *, level: int = logging.INFO,
          request_id: str | None = None, exc_info: bool = False, **fields: Any) -> None:
    """Log one event with key=value fields (None values are left out)."""
    if not logger.isEnabledFor(level):
        return
    kv = {"request_id": request_id} if request_id else {}
    kv.update(fields)
    logger.log(level, message, extra={"kv": kv}, exc_info=exc_info)
