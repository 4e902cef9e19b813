"""iii-embedded: an embedded, single-process task runtime for Python.

Functions, the iii engine's three trigger actions (synchronous, Void, Enqueue) and named
queues (standard and FIFO, retries with backoff, concurrency limits, dead-letter queues) run
inside your program, on an in-memory store or a SQLite (WAL) file that survives crashes.

The public surface is re-exported here; everything else lives in ``_``-prefixed modules:

* ``_app`` (the ``III`` facade and its lifecycles) → ``_runtime`` (a running engine: the
  three trigger actions) → ``_queues`` (a queue's dispatcher and workers) → ``_stores``
  (one protocol; in-memory and SQLite implementations).
* ``_triggers`` (trigger types and the ``Trigger`` handle) with ``_http``, ``_cron`` and
  ``_topics``; ``_config`` / ``_config_loader`` (``iii-config.yaml``), ``_actions``, ``_context``
  (``current_invocation``, ``Logger``), ``_errors``, ``_stats``, ``_builtins`` (iii's
  ``iii::queue::*`` functions).
* :mod:`iii_embedded.testing`: the virtual clock, ``drain()`` and the pytest plugin.
"""

from __future__ import annotations

from ._actions import EnqueueAction as EnqueueAction
from ._actions import TriggerAction as TriggerAction
from ._actions import TriggerActionEnqueue as TriggerActionEnqueue
from ._actions import TriggerActionVoid as TriggerActionVoid
from ._actions import VoidAction as VoidAction
from ._app import HOOK_EVENTS as HOOK_EVENTS
from ._app import III as III
from ._clock import Clock as Clock
from ._clock import SystemClock as SystemClock
from ._config import Config as Config
from ._config import HttpConfig as HttpConfig
from ._config import QueueConfig as QueueConfig
from ._config import StoreConfig as StoreConfig
from ._context import Invocation as Invocation
from ._context import Logger as Logger
from ._context import current_invocation as current_invocation
from ._errors import AwaitableResultError as AwaitableResultError
from ._errors import ConfigError as ConfigError
from ._errors import DeadlockError as DeadlockError
from ._errors import IIIError as IIIError
from ._errors import InvocationError as InvocationError
from ._errors import InvocationTimeoutError as InvocationTimeoutError
from ._errors import NonRetryableError as NonRetryableError
from ._errors import RetryAfter as RetryAfter
from ._errors import RunFailedError as RunFailedError
from ._errors import StoreError as StoreError
from ._errors import StoreVersionError as StoreVersionError
from ._logging import JsonFormatter as JsonFormatter
from ._registry import FunctionRef as FunctionRef
from ._runs import BatchResult as BatchResult
from ._runs import CancelResult as CancelResult
from ._runs import Run as Run
from ._runs import RunResult as RunResult
from ._runs import Runs as Runs
from ._sdk import InitOptions as InitOptions
from ._sdk import register_worker as register_worker
from ._stats import DeadJob as DeadJob
from ._stats import QueueStats as QueueStats
from ._stores import ErrorInfo as ErrorInfo
from ._triggers import Trigger as Trigger

__version__ = "0.1.0"

__all__ = [
    # the app
    "III",
    "register_worker",
    "InitOptions",
    "FunctionRef",
    "Trigger",
    "HOOK_EVENTS",
    # trigger actions
    "TriggerAction",
    "EnqueueAction",
    "VoidAction",
    "TriggerActionEnqueue",
    "TriggerActionVoid",
    # configuration
    "Config",
    "QueueConfig",
    "StoreConfig",
    "HttpConfig",
    # inside handlers
    "Invocation",
    "current_invocation",
    "Logger",
    # errors
    "IIIError",
    "InvocationError",
    "NonRetryableError",
    "RetryAfter",
    "ConfigError",
    "StoreError",
    "StoreVersionError",
    "RunFailedError",
    "DeadlockError",
    "InvocationTimeoutError",
    "AwaitableResultError",
    # runs
    "Run",
    "RunResult",
    "BatchResult",
    "CancelResult",
    "Runs",
    # inspection
    "JsonFormatter",
    "QueueStats",
    "DeadJob",
    "ErrorInfo",
    # clocks
    "Clock",
    "SystemClock",
    "__version__",
]
