"""The function registry: ids to handlers."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from ._errors import AwaitableResultError

__all__ = ["FunctionRef", "FunctionSpec", "Handler", "Registry"]

Handler = Callable[[Any], Any]
"""A handler takes the payload and returns a JSON-serialisable value. An ``async def``
handler (or a ``functools.partial`` of one, or an object whose ``__call__`` is one) is
awaited on the event loop; any other callable runs in a worker thread and must not return
an awaitable, which nothing would await (see :func:`refusing_awaitables`)."""

# Results a plain handler returns most, told apart from awaitables without an ABC check.
_PLAIN_RESULTS = frozenset({type(None), bool, int, float, str, dict, list, tuple})


@attrs.define(frozen=True, kw_only=True)
class FunctionRef:
    """What ``register_function`` returns: a handle with the function's ``id``."""

    id: str
    description: str | None = None
    metadata: Mapping[str, Any] | None = None


@attrs.define(frozen=True, kw_only=True)
class FunctionSpec:
    """A registered function."""

    id: str
    handler: Handler
    is_async: bool
    description: str | None = None
    metadata: Mapping[str, Any] | None = None
    internal: bool = False
    """True for the runtime's own functions (``iii::queue::*``, ``engine::queue::*``)."""

    def ref(self) -> FunctionRef:
        """The public handle."""
        return FunctionRef(id=self.id, description=self.description, metadata=self.metadata)


def refusing_awaitables(fn: Handler, function_id: str) -> Handler:
    """``fn`` (a plain, not ``async def``, handler), failing with an
    :class:`AwaitableResultError` (a ``TypeError`` that no retry can fix) that says what to
    do if it returns an awaitable: ``lambda data: process(data)`` with an async
    ``process`` would otherwise complete at once with a coroutine as its result, and the
    work would never run."""

    @functools.wraps(fn)
    def plain(payload: Any) -> Any:
        result = fn(payload)
        if type(result) in _PLAIN_RESULTS or not inspect.isawaitable(result):
            return result
        if inspect.iscoroutine(result):
            result.close()  # never awaited, and never will be: no warning about it later
        raise AwaitableResultError(
            f"the handler of {function_id!r} is a plain function that returned "
            f"{type(result).__name__}, which nothing awaits: make the handler `async def`, "
            "or register the async function itself (a functools.partial of it works too)"
        )

    return plain


def is_async_callable(fn: object) -> bool:
    """True for ``async def`` functions (also behind ``functools.partial`` or ``__call__``)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - callable objects
    return call is not None and inspect.iscoroutinefunction(call)


def _generator_kind(fn: object) -> str | None:
    while isinstance(fn, functools.partial):
        fn = fn.func
    for candidate in (fn, getattr(fn, "__call__", None)):  # noqa: B004 - callable objects
        if inspect.isasyncgenfunction(candidate):
            return "an async generator"
        if inspect.isgeneratorfunction(candidate):
            return "a generator"
    return None


class Registry:
    """Holds function specs by id; duplicate ids are refused."""

    def __init__(self) -> None:
        self._specs: dict[str, FunctionSpec] = {}
        self._listeners: list[Callable[[FunctionSpec], None]] = []

    def add(self, spec: FunctionSpec) -> None:
        """Register ``spec``; raises ``ValueError`` if its id is taken."""
        if not spec.id or not isinstance(spec.id, str):
            raise ValueError(f"a function id must be a non-empty string, got {spec.id!r}")
        if spec.id in self._specs:
            raise ValueError(f"function {spec.id!r} is already registered")
        kind = _generator_kind(spec.handler)
        if kind is not None:
            raise ValueError(
                f"the handler of {spec.id!r} is {kind} function: a handler returns its "
                "result (use return, not yield)"
            )
        if not spec.is_async:
            spec = attrs.evolve(spec, handler=refusing_awaitables(spec.handler, spec.id))
        self._specs[spec.id] = spec
        for listener in list(self._listeners):
            listener(spec)

    def remove(self, function_id: str) -> None:
        """Unregister a function (no error if absent)."""
        self._specs.pop(function_id, None)

    def get(self, function_id: str) -> FunctionSpec | None:
        """The spec for ``function_id``, or ``None``."""
        return self._specs.get(function_id)

    def ids(self) -> list[str]:
        """Every registered id."""
        return list(self._specs)

    def user_ids(self) -> list[str]:
        """Ids of user (non-internal) functions."""
        return [s.id for s in self._specs.values() if not s.internal]

    def on_register(self, listener: Callable[[FunctionSpec], None]) -> None:
        """Call ``listener`` whenever a function is registered."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[FunctionSpec], None]) -> None:
        """Undo :meth:`on_register`."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def __contains__(self, function_id: object) -> bool:
        return function_id in self._specs
