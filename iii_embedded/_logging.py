"""JSON logs: a stdlib ``logging.Formatter`` that writes one JSON object per record.

The runtime logs under ``iii_embedded`` with the job's fields as record attributes
(``function_id``, ``receipt_id``, ``queue``, ``attempt``, ``duration_ms``), and ``Logger``
adds the same to your messages (plus ``data``). This formatter keeps them as JSON keys::

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

__all__ = ["JsonFormatter"]

_FIELDS = ("function_id", "receipt_id", "queue", "attempt", "duration_ms", "data")


class JsonFormatter(logging.Formatter):
    """Format records as one-line JSON: time, level, logger, message, the invocation's
    fields when present, and the exception's traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON object."""
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in _FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                out[field] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        try:
            return json.dumps(out, default=repr, allow_nan=False)
        except (TypeError, ValueError):
            # A value JSON cannot hold as such (a key that is not text, a cycle, NaN):
            # the fields that fail are written as their repr, and the line is still JSON.
            for key, value in out.items():
                try:
                    json.dumps(value, default=repr, allow_nan=False)
                except (TypeError, ValueError):
                    out[key] = repr(value)
            return json.dumps(out, default=repr, allow_nan=False)
