"""The iii-sdk face: ``register_worker`` as in ``from iii import register_worker``.

Code written for the iii engine connects a worker to an engine over a websocket; here the
engine is in-process, so ``register_worker`` builds an :class:`~iii_embedded.III` from the
project's config and starts it on a background thread, where the iii SDK keeps its
connection. The address is accepted for compatibility and ignored; of iii's
:class:`InitOptions`, only ``invocation_timeout_ms`` has an effect.

Like the real SDK, a program that registers functions and reaches the end of its script
keeps serving: a non-daemon keeper thread holds the process until the engine is shut down
— by ``iii.shutdown()``, SIGTERM, or SIGINT (Ctrl-C), both of which shut down gracefully.
A script that dies of an uncaught exception shuts the worker down too, after the
traceback is printed, instead of leaving a process that serves with its script gone.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Mapping
from types import FrameType
from typing import Any

import attrs

from ._app import III, _on_sigterm
from ._config_loader import find_config
from ._runtime import DEFAULT_TIMEOUT_MS

__all__ = ["InitOptions", "register_worker"]

log = logging.getLogger("iii_embedded")


_lock = threading.Lock()
_shared: III | None = None


@attrs.define
class InitOptions:
    """The options of ``register_worker``, with the fields of iii's ``InitOptions``.

    ``invocation_timeout_ms`` is the timeout of a synchronous ``trigger`` that gives no
    ``timeout_ms`` (30 000 by default, as in iii). The others concern the connection to a
    remote engine, its dashboard and its telemetry, which an embedded engine does not
    have: they are accepted and ignored.
    """

    worker_name: str | None = None
    worker_description: str | None = None
    enable_metrics_reporting: bool = True
    invocation_timeout_ms: int = DEFAULT_TIMEOUT_MS
    reconnection_config: Any = None
    otel: Any = None
    headers: dict[str, str] | None = None
    telemetry: Any = None


def register_worker(
    address: str | None = None, options: InitOptions | Mapping[str, Any] | None = None
) -> III:
    """Start the process's embedded engine (or return it if already started) — iii SDK
    compatible.

    Every iii worker talks to one engine; here every ``register_worker`` call in a process
    returns the same running engine, so code split over several modules (one registers
    functions, another triggers them) works as it does against iii. The config comes from
    ``$III_CONFIG``, else ``./iii-config.yaml`` if present, else the defaults (an in-memory
    store and a ``default`` queue). ``address`` is accepted and ignored: there is no
    remote engine to connect to. Of ``options`` (an :class:`InitOptions`, or a mapping of
    its fields), ``invocation_timeout_ms`` sets the default timeout of synchronous
    triggers; the rest is ignored. Options apply when the call starts the engine: later
    calls return the running engine as it is.
    """
    del address
    if isinstance(options, Mapping):
        timeout = options.get("invocation_timeout_ms", DEFAULT_TIMEOUT_MS)
    else:  # ours, or any object with the field (iii's own InitOptions, say)
        timeout = getattr(options, "invocation_timeout_ms", DEFAULT_TIMEOUT_MS)
    global _shared
    with _lock:
        if _shared is not None and _shared.is_running:
            return _shared
        app = III(find_config(), invocation_timeout_ms=timeout)
        app.start()
        app._kept_serving = True  # the keeper below holds the process, not the exit hook
        _keep_serving(app)
        _shared = app
        return app


def _keep_serving(app: III) -> None:
    stopped = threading.Event()
    app.on_shutdown(stopped.set)
    keeper = threading.Thread(target=stopped.wait, name="iii-register-worker", daemon=False)
    keeper.start()
    # A script that dies of an uncaught error must not leave the worker serving silently.
    previous_hook = sys.excepthook

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        previous_hook(kind, value, tb)
        app.shutdown()

    sys.excepthook = excepthook
    if threading.current_thread() is not threading.main_thread():
        return
    previous: dict[int, Any] = {}

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not app._stop():
            return  # a shutdown was under way (this signal interrupted it): it goes on
        own = previous.get(signum)
        if callable(own) and own is not signal.default_int_handler:
            own(signum, frame)  # the program's own handler decides what happens next
            return
        # Ctrl-C while the script still runs interrupts it as usual, and SIGTERM ends it
        # (with the status a process killed by it reports, as iii's SDK does); once the
        # script is done (the process only waits for the engine), stopping the engine is
        # enough.
        if threading.main_thread().is_alive():
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is signal.SIG_IGN:
            continue  # the program ignores it: so do we
        previous[sig] = signal.signal(sig, stop)
        if previous[sig] is _on_sigterm:  # start()'s, which this handler does the work of
            previous[sig] = signal.SIG_DFL

    def restore() -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in previous.items():
                if signal.getsignal(sig) is stop:
                    signal.signal(sig, handler)

    app.on_shutdown(restore)
