"""Trigger actions: how a ``trigger`` call is carried out (iii's ``TriggerAction``)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ._errors import InvocationError

__all__ = [
    "TriggerAction",
    "EnqueueAction",
    "VoidAction",
    "TriggerActionEnqueue",
    "TriggerActionVoid",
    "Action",
    "parse_action",
]


@attrs.define(frozen=True, kw_only=True)
class EnqueueAction:
    """Route the call through a named queue; the caller gets ``{"messageReceiptId": ...}``.

    ``delay_ms``, ``idempotency_key`` and ``max_attempts`` are our extensions (Trigger.dev
    style): start no earlier than ``delay_ms`` from now; return the live run with the same
    key instead of storing a new one; override the queue's ``max_retries`` for this run.
    """

    queue: str = "default"
    delay_ms: int = 0
    idempotency_key: str | None = None
    max_attempts: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """iii's wire form, ``{"type": "enqueue", "queue": ...}`` (plus set extensions)."""
        out: dict[str, Any] = {"type": "enqueue", "queue": self.queue}
        if self.delay_ms:
            out["delay_ms"] = self.delay_ms
        if self.idempotency_key is not None:
            out["idempotency_key"] = self.idempotency_key
        if self.max_attempts is not None:
            out["max_attempts"] = self.max_attempts
        return out


@attrs.define(frozen=True)
class VoidAction:
    """Fire and forget: the caller continues at once and never sees the outcome."""

    def to_dict(self) -> dict[str, Any]:
        """iii's wire form, ``{"type": "void"}``."""
        return {"type": "void"}


Action = EnqueueAction | VoidAction

TriggerActionEnqueue = EnqueueAction
"""iii's name for the Enqueue action's class: ``TriggerActionEnqueue(queue="q")`` is
``TriggerAction.Enqueue(queue="q")``."""
TriggerActionVoid = VoidAction
"""iii's name for the Void action's class: ``TriggerActionVoid()`` is
``TriggerAction.Void()``."""


class TriggerAction:
    """Constructors for the trigger actions, spelled as in the iii SDK."""

    @staticmethod
    def Enqueue(
        *,
        queue: str = "default",
        delay_ms: int = 0,
        idempotency_key: str | None = None,
        max_attempts: int | None = None,
    ) -> EnqueueAction:
        """Enqueue on the named queue, ``default`` when none is named (see
        :class:`EnqueueAction`)."""
        return EnqueueAction(
            queue=queue,
            delay_ms=delay_ms,
            idempotency_key=idempotency_key,
            max_attempts=max_attempts,
        )

    @staticmethod
    def Void() -> VoidAction:
        """Fire and forget (see :class:`VoidAction`)."""
        return _VOID


_VOID = VoidAction()
_ACTION_TYPES = (EnqueueAction, VoidAction)
_ENQUEUE_KEYS = ("type", "queue", "delay_ms", "idempotency_key", "max_attempts")
"""The keys of the Enqueue action's dict form: iii's, then our extensions."""
_ENQUEUE_KEY_SET = frozenset(_ENQUEUE_KEYS)


_SAME_AS = {"data": "payload"}
"""Other projects' names for a key of ours (iii's wire messages call the payload data)."""


def refuse_unknown_keys(
    given: Mapping[Any, Any], subject: str, known: Sequence[str], code: str
) -> None:
    """Refuse a dict (an action's, a trigger request's) with keys it does not know:
    ignored, a misspelt option (a Trigger.dev user's ``idempotencyKey``) left the call
    without what it asked for. A camelCase spelling of a known key is named."""
    unknown = [key for key in given if key not in known]
    if len(unknown) == 1:
        what = f"an unknown key {unknown[0]!r}"
        snake = re.sub(r"(?<!^)([A-Z])", r"_\1", str(unknown[0])).lower()
        snake = _SAME_AS.get(snake, snake)
        if snake in known:
            what += f" (did you mean {snake!r}?)"
    else:
        what = "unknown keys " + ", ".join(repr(key) for key in unknown)
    keys = (
        f"its only key is {known[0]}"
        if len(known) == 1
        else f"its keys are {', '.join(known[:-1])} and {known[-1]}"
    )
    raise InvocationError(code, f"{subject} has {what}; {keys}")


def parse_action(action: object) -> Action | None:
    """Accept an action object, iii's dict form, or ``None`` (a synchronous call)."""
    if action is None or isinstance(action, _ACTION_TYPES):
        return action
    if isinstance(action, Mapping):
        kind = str(action.get("type", "")).lower()
        if kind == "void":
            if len(action) > 1:
                refuse_unknown_keys(action, "Void action", ("type",), "invalid_action")
            return _VOID
        if kind == "enqueue":
            if not _ENQUEUE_KEY_SET.issuperset(action):
                refuse_unknown_keys(action, "Enqueue action", _ENQUEUE_KEYS, "enqueue_error")
            # iii: "the default queue is used when no queue name is specified".
            queue = action.get("queue", "default")
            if queue is None:
                queue = "default"
            if not isinstance(queue, str) or not queue:
                raise InvocationError(
                    "enqueue_error",
                    f"Enqueue action's 'queue' must be a queue name, not {queue!r}",
                )
            # Passed on as given: the enqueue checks them, naming a bad one.
            delay = action.get("delay_ms")
            return EnqueueAction(
                queue=queue,
                delay_ms=0 if delay is None else delay,
                idempotency_key=action.get("idempotency_key"),
                max_attempts=action.get("max_attempts"),
            )
    raise InvocationError(
        "invalid_action",
        f"unknown trigger action {action!r}: use TriggerAction.Enqueue(queue=...), "
        "TriggerAction.Void(), or omit it for a synchronous call",
    )
