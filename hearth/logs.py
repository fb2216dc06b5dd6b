"""Log set-up shared by every Hearth process: one JSON object per line.

Each record carries ``request_id`` and ``job_id`` when they are known, from
the context (the API sets the request's id) or from ``extra=`` (the worker
names the job a line is about).
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id: ContextVar[str | None] = ContextVar("job_id", default=None)

LogFormat = Literal["json", "text"]
FIELDS = "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s %(request_id)s %(job_id)s"


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = getattr(record, "request_id", None) or request_id.get()
        record.job_id = getattr(record, "job_id", None) or job_id.get()
        return True


def configure(level: str, fmt: LogFormat = "json") -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_Context())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                FIELDS,
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
