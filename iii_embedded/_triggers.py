"""Trigger registrations: the trigger types, and the :class:`Trigger` handle that
``register_trigger`` returns.

A trigger type (``http``, ``cron``, ``queue``...) plugs in a *registrar*: it checks a
trigger, binds it (a route, a schedule, a subscription) and returns a :class:`Binding`
that says what it bound and how to undo it. Registering the same thing twice (the same
cron schedule, the same function subscribed to a topic again) binds it once; the
registrar returns a binding with the same ``key``, and the thing stays bound until every
handle that registered it is unregistered (:class:`Bindings` counts them).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from ._app import III

__all__ = [
    "Binding",
    "Bindings",
    "Trigger",
    "TriggerRegistrar",
    "register_trigger_type",
    "trigger_registrar",
]


@attrs.define(frozen=True, kw_only=True)
class Binding:
    """What a registrar bound: ``key`` names it (equal for a registration that binds the
    same thing again), ``undo`` unbinds it."""

    key: Hashable
    undo: Callable[[], None]


TriggerRegistrar = Callable[["III", Mapping[str, Any]], Binding]
_TRIGGER_TYPES: dict[str, TriggerRegistrar] = {}


def register_trigger_type(name: str, registrar: TriggerRegistrar) -> None:
    """Plug in a trigger type (``http``, ``cron``, ``queue``...) for ``register_trigger``."""
    _TRIGGER_TYPES[name] = registrar


def trigger_registrar(kind: object) -> TriggerRegistrar:
    """The registrar of trigger type ``kind``; ``ValueError`` naming the known types."""
    registrar = _TRIGGER_TYPES.get(str(kind))
    if registrar is None:
        known = ", ".join(sorted(_TRIGGER_TYPES)) or "none"
        raise ValueError(f"unknown trigger type {kind!r} (supported: {known})")
    return registrar


class Trigger:
    """What ``register_trigger`` returns (iii's ``Trigger``): the registered trigger, and
    :meth:`unregister` to stop it.

    ``id`` is the trigger's id (the cron ``id`` it was given, else a new uuid), ``type``,
    ``function_id`` and ``config`` are what it was registered with.
    """

    __slots__ = ("_bindings", "_key", "_request", "config", "function_id", "id", "type")

    def __init__(
        self, bindings: Bindings, key: Hashable, request: dict[str, Any], trigger_id: str
    ) -> None:
        self._bindings = bindings
        self._key: Hashable | None = key
        self._request = request
        self.id = trigger_id
        self.type = str(request.get("type"))
        self.function_id: str | None = request.get("function_id")
        self.config: Any = request.get("config")

    def unregister(self) -> None:
        """Stop this trigger: a cron schedule fires no more (a fire already running
        finishes), an http route answers 404, a topic subscription gets no copy of later
        messages (those already stored for it are still delivered). Harmless twice.

        A schedule or subscription registered more than once stays until every
        registration of it is unregistered. The function stays registered."""
        self._bindings.release(self)

    @property
    def registration_error(self) -> dict[str, Any] | None:
        """Always ``None``: iii's engine reports a rejected binding later; here
        ``register_trigger`` raises at once instead."""
        return None

    def __repr__(self) -> str:
        state = "" if self._key is not None else ", unregistered"
        return (
            f"Trigger(id={self.id!r}, type={self.type!r}, function_id={self.function_id!r}{state})"
        )


Serialise = Callable[[Callable[[], Any]], Any]
"""Runs a registration or an unregistration where they cannot interleave (the app's
``_on_engine_thread``) and returns its result."""


class Bindings:
    """An app's bound triggers: how many handles hold each binding, and the registered
    trigger requests (``III.triggers``).

    A registration (the registrar's binding, then its count) and an unregistration (the
    count, then the undo) each run whole through ``serialise``: on the engine's loop
    while it runs. Otherwise a trigger registered again from one thread while another
    thread's unregistration of the same thing was undoing it found it still bound, was
    counted, and was then undone: a live handle with nothing bound."""

    def __init__(self, serialise: Serialise) -> None:
        self._serialise = serialise
        self._lock = threading.Lock()
        self._held: dict[Hashable, tuple[Binding, int]] = {}
        self.requests: list[dict[str, Any]] = []

    def bind(self, registrar: TriggerRegistrar, app: III, request: Mapping[str, Any]) -> Trigger:
        """Bind ``request`` with ``registrar`` and count the handle, as one step."""
        trigger: Trigger = self._serialise(lambda: self._add(registrar(app, request), request))
        return trigger

    def _add(self, binding: Binding, request: Mapping[str, Any]) -> Trigger:
        """Count one more handle of ``binding`` and return it."""
        saved = dict(request)
        config = saved.get("config")
        explicit = saved.get("id") or (
            config.get("job_id") if isinstance(config, Mapping) else None
        )
        with self._lock:
            held = self._held.get(binding.key)
            self._held[binding.key] = (held[0] if held else binding, (held[1] if held else 0) + 1)
            self.requests.append(saved)
        return Trigger(self, binding.key, saved, str(explicit) if explicit else str(uuid.uuid4()))

    def release(self, trigger: Trigger) -> None:
        """Drop ``trigger``'s hold; the last one undoes the binding."""
        self._serialise(lambda: self._release(trigger))

    def _release(self, trigger: Trigger) -> None:
        with self._lock:
            key, trigger._key = trigger._key, None
            if key is None:
                return  # unregistered already
            self.requests[:] = [r for r in self.requests if r is not trigger._request]
            binding, count = self._held[key]
            if count > 1:
                self._held[key] = (binding, count - 1)
                return
            del self._held[key]
        binding.undo()
