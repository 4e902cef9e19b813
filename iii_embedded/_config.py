"""Configuration values: what ``iii-config.yaml`` turns into.

Every value here is a frozen attrs object, validated once at the boundary (YAML → attrs in
:mod:`iii_embedded._config_loader`, or keyword arguments in Python) and trusted inside.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import attrs

__all__ = [
    "QueueConfig",
    "StoreConfig",
    "HttpConfig",
    "Config",
    "DEFAULT_QUEUE",
]

DEFAULT_QUEUE = "default"


COUNT_MAX = 2**32 - 1
"""The largest count (attempts, concurrency, prefetch): iii's ``u32``."""
MS_MAX = 2**63 - 1
"""The largest number of milliseconds (a signed 64-bit integer, as SQLite stores it)."""
_COUNTS = {"max_retries", "concurrency", "prefetch"}


def int_problem(name: str, value: object, low: int) -> str | None:
    """Why ``value`` cannot be the integer setting ``name`` (at least ``low``), or
    ``None``. Counts are iii's ``u32``, milliseconds a signed 64-bit integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        return f"{name} must be an integer >= {low}, got {value!r}"
    high = COUNT_MAX if name in _COUNTS else MS_MAX
    if value > high:
        return f"{name} must be at most {high}, got {value}"
    return None


def _positive(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    problem = int_problem(attribute.name, value, 1)
    if problem:
        raise ValueError(problem)


def _non_negative(_inst: object, attribute: attrs.Attribute[int], value: int | None) -> None:
    problem = None if value is None else int_problem(attribute.name, value, 0)
    if problem:
        raise ValueError(problem)


@attrs.define(frozen=True, kw_only=True)
class QueueConfig:
    """One named queue: iii's keys and defaults, plus our documented extensions.

    ``max_retries`` counts *total delivery attempts* (iii's tested meaning: 3 means three
    calls; 0 and 1 both mean one call).
    """

    name: str = DEFAULT_QUEUE
    max_retries: int = attrs.field(default=3, validator=_non_negative)
    concurrency: int = attrs.field(default=10, validator=_positive)
    type: Literal["standard", "fifo"] = "standard"
    message_group_field: str | None = None
    backoff_ms: int = attrs.field(default=1000, validator=_non_negative)
    poll_interval_ms: int = attrs.field(default=100, validator=_positive)
    # Extensions (not in iii):
    timeout_ms: int | None = attrs.field(default=None, validator=_non_negative)
    max_backoff_ms: int | None = attrs.field(default=None, validator=_non_negative)
    jitter: bool = False
    prefetch: int | None = attrs.field(default=None, validator=_non_negative)
    """Jobs a process claims beyond its free slots, so its workers have the next jobs at
    hand while the store writes outcomes and claims more. ``None``: ``4 × concurrency``.
    On a file store prefetched jobs are leased (the store shows them ``running``); set 0
    for long jobs shared by several processes, so an idle process can take them. In
    memory they read ``queued`` until their handlers start."""

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a queue name must be a non-empty string, got {self.name!r}")
        if self.type not in ("standard", "fifo"):
            raise ValueError(f"type must be 'standard' or 'fifo', got {self.type!r}")
        if not isinstance(self.jitter, bool):
            raise ValueError(f"jitter must be true or false, got {self.jitter!r}")
        field = self.message_group_field
        if field is not None and (not isinstance(field, str) or not field):
            raise ValueError(f"message_group_field must be a field name, got {field!r}")
        if self.type == "fifo" and not self.message_group_field:
            raise ValueError(f"FIFO queue '{self.name}' requires message_group_field")

    @property
    def is_fifo(self) -> bool:
        """True for FIFO queues."""
        return self.type == "fifo"

    @property
    def max_attempts(self) -> int:
        """Total delivery attempts (``max_retries``, at least one)."""
        return max(1, self.max_retries)

    def backoff_delay_ms(self, retry: int) -> int:
        """Delay before retry number ``retry`` (1-based), before jitter.

        ``backoff_ms × 2^(retry-1)``, capped by ``max_backoff_ms`` when set.
        """
        # Capped, so that a large retry number cannot build a huge integer.
        delay = min(self.backoff_ms << min(max(1, retry) - 1, 64), MS_MAX)
        if self.max_backoff_ms is not None:
            delay = min(delay, self.max_backoff_ms)
        return delay


@attrs.define(frozen=True, kw_only=True)
class StoreConfig:
    """The queue store: iii's builtin adapter (``in_memory`` or ``file_based``)."""

    store_method: Literal["in_memory", "file_based"] = "in_memory"
    file_path: str | None = None
    synchronous: Literal["normal", "full"] = "normal"
    lease_ms: int = attrs.field(default=30_000, validator=_positive)
    result_retention_ms: int = attrs.field(default=86_400_000, validator=_positive)
    pin_cpu: int | Literal["auto"] | None = None
    """*Extension* (Linux): run the engine's event loop and the file store's writer on
    one CPU, a number or ``"auto"`` (the one the engine starts on). Off by default; see
    docs/configuration.md."""
    commit_on_loop: bool = True
    """*Extension*: let the event loop commit a small transaction of the file store
    itself when it has nothing else to run and recent commits were fast, instead of
    waking the writer thread. On by default; see docs/configuration.md."""

    def __attrs_post_init__(self) -> None:
        pin = self.pin_cpu
        if (
            pin is not None
            and pin != "auto"
            and (isinstance(pin, bool) or not isinstance(pin, int) or pin < 0)
        ):
            raise ValueError(f"pin_cpu must be a CPU number >= 0 or 'auto', got {pin!r}")
        if self.store_method not in ("in_memory", "file_based"):
            raise ValueError(
                f"store_method must be 'in_memory' or 'file_based', got {self.store_method!r}"
            )
        if self.store_method == "file_based" and not self.file_path:
            raise ValueError("store_method 'file_based' requires file_path")
        if self.synchronous not in ("normal", "full"):
            raise ValueError(f"synchronous must be 'normal' or 'full', got {self.synchronous!r}")
        if not isinstance(self.commit_on_loop, bool):
            raise ValueError(f"commit_on_loop must be true or false, got {self.commit_on_loop!r}")


def _host(_inst: object, _attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"host must be a non-empty string, got {value!r}")


def _port(_inst: object, _attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"port must be an integer 0-65535, got {value!r}")


@attrs.define(frozen=True, kw_only=True)
class HttpConfig:
    """iii's http worker: where the engine serves HTTP triggers itself."""

    host: str = attrs.field(default="127.0.0.1", validator=_host)
    port: int = attrs.field(default=3111, validator=_port)
    """``0``: a free port, picked when the server starts."""
    max_body_bytes: int = attrs.field(default=10 * 1024 * 1024, validator=_positive)
    """*Extension*: the largest request body served; a larger one is a 413 (10 MiB)."""
    header_timeout_ms: int = attrs.field(default=10_000, validator=_positive)
    """*Extension*: how long a connection has to send a whole request head, from its
    opening or its last response, before the engine's server closes it."""
    body_timeout_ms: int = attrs.field(default=60_000, validator=_positive)
    """*Extension*: how long a request's whole body may take to arrive after its head; one
    still coming is answered with a 408 and the function is not called (60 s)."""


def _default_queues() -> dict[str, QueueConfig]:
    return {DEFAULT_QUEUE: QueueConfig(name=DEFAULT_QUEUE)}


def _ensure_default(
    queues: Mapping[str, QueueConfig] | Iterable[QueueConfig],
) -> dict[str, QueueConfig]:
    """The queues by name, with a ``default`` one; a list of ``QueueConfig`` is taken by
    their names (``Config(queues=[QueueConfig(name="a")])``)."""
    if not isinstance(queues, Mapping):
        by_name: dict[str, QueueConfig] = {}
        for queue in queues:
            if not isinstance(queue, QueueConfig):
                raise TypeError(f"queues must hold QueueConfig items, got {queue!r}")
            if queue.name in by_name:
                raise ValueError(f"queue {queue.name!r} is given twice")
            by_name[queue.name] = queue
        queues = by_name
    queues = dict(queues)
    if DEFAULT_QUEUE not in queues:
        queues = {**queues, DEFAULT_QUEUE: QueueConfig(name=DEFAULT_QUEUE)}
    for name, queue in queues.items():
        if queue.name != name:
            raise ValueError(f"queue key {name!r} does not match its config name {queue.name!r}")
    return queues


@attrs.define(frozen=True, kw_only=True)
class Config:
    """A whole runtime configuration. A ``default`` queue always exists."""

    queues: dict[str, QueueConfig] = attrs.field(factory=_default_queues, converter=_ensure_default)
    store: StoreConfig = attrs.field(factory=StoreConfig)
    http: HttpConfig | None = None
    source: str | None = None
    """The file this config was read from, if any."""
