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
    """What ``register_function`` returns: a handle with the function's ``id``, and
    :meth:`unregister` to remove the function again (as iii's ``FunctionRef``)."""

    id: str
    description: str | None = None
    metadata: Mapping[str, Any] | None = None
    _registry: Registry | None = attrs.field(default=None, eq=False, repr=False, alias="registry")
    _spec: FunctionSpec | None = attrs.field(default=None, eq=False, repr=False, alias="spec")

    def unregister(self) -> None:
        """Remove the function from its app: later calls fail with ``function_not_found``
        and enqueues with ``enqueue_error``; its queued jobs are held until a function of
        that id is registered again; an attempt already running finishes. Its triggers
        stay bound (a cron fire or an http request finds no function and says so).

        Harmless when the function is already unregistered, or when its id has been
        registered again since (by another ``register_function``): a ref removes only
        the registration it was returned by."""
        if self._registry is not None and self._spec is not None:
            self._registry.discard(self._spec)


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

    def ref(self, registry: Registry | None = None) -> FunctionRef:
        """The public handle (which can unregister this spec from ``registry``)."""
        return FunctionRef(
            id=self.id,
            description=self.description,
            metadata=self.metadata,
            registry=registry,
            spec=self if registry is not None else None,
        )


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


def _payload_refused(fn: object) -> str | None:
    """The handler's parameters, as ``(a, b)``, if it cannot be called with one positional
    argument (the payload); ``None`` if it can, or if its signature cannot be read (some
    builtins), where the call itself will tell."""
    try:
        signature = inspect.signature(fn)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(None)
    except TypeError:
        bare = signature.replace(
            parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
            return_annotation=signature.empty,
        )
        return str(bare)
    return None


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

    def add(self, spec: FunctionSpec) -> FunctionSpec:
        """Register ``spec`` and return it as stored; raises ``ValueError`` if its id is
        empty, blank or taken, or its handler a generator, and ``TypeError`` if its handler
        cannot take the payload as its one argument."""
        if not isinstance(spec.id, str) or not spec.id.strip():
            # iii's SDK: ValueError("id is required").
            raise ValueError(
                f"id is required: a function id must be a non-blank string, got {spec.id!r}"
            )
        if spec.id in self._specs:
            raise ValueError(
                f"function {spec.id!r} is already registered: give this handler another id, "
                "or unregister the first one (the FunctionRef register_function returned)"
            )
        kind = _generator_kind(spec.handler)
        if kind is not None:
            raise ValueError(
                f"the handler of {spec.id!r} is {kind} function: a handler returns its "
                "result (use return, not yield)"
            )
        refused = _payload_refused(spec.handler)
        if refused is not None:
            raise TypeError(
                f"the handler of {spec.id!r} must take one argument, the payload, but its "
                f"parameters are {refused}: write it as `def handler(data): ...` (other "
                "parameters need defaults)"
            )
        if not spec.is_async:
            spec = attrs.evolve(spec, handler=refusing_awaitables(spec.handler, spec.id))
        self._specs[spec.id] = spec
        for listener in list(self._listeners):
            listener(spec)
        return spec

    def remove(self, function_id: str) -> None:
        """Unregister a function (no error if absent)."""
        self._specs.pop(function_id, None)

    def discard(self, spec: FunctionSpec) -> bool:
        """Unregister ``spec`` if it is still the one registered under its id (not one
        registered again since); True if it was."""
        if self._specs.get(spec.id) is not spec:
            return False
        del self._specs[spec.id]
        return True

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
