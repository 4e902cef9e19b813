"""The public surface: every public name is exported in ``__all__`` and documented, and
nothing private leaks."""

from __future__ import annotations

import inspect

import attrs

import iii_embedded
import iii_embedded.testing


def test_all_lists_exactly_the_public_names_of_the_package() -> None:
    public = {
        name
        for name in vars(iii_embedded)
        if not name.startswith("_") and not inspect.ismodule(getattr(iii_embedded, name))
    }
    public.discard("annotations")
    assert set(iii_embedded.__all__) - {"__version__"} == public


def test_nothing_private_is_exported() -> None:
    for module in (iii_embedded, iii_embedded.testing):
        assert [n for n in module.__all__ if n.startswith("_") and n != "__version__"] == []


def test_every_public_callable_and_class_has_a_docstring() -> None:
    for module in (iii_embedded, iii_embedded.testing):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"
                if inspect.isclass(obj):
                    for attr, member in vars(obj).items():
                        if attr.startswith("_") or not inspect.isfunction(member):
                            continue
                        assert inspect.getdoc(member), f"{name}.{attr} has no docstring"


def test_public_classes_live_in_private_modules_behind_the_facade() -> None:
    for name in iii_embedded.__all__:
        obj = getattr(iii_embedded, name)
        module = getattr(obj, "__module__", "iii_embedded")
        assert module == "iii_embedded" or module.split(".")[1].startswith("_"), (name, module)


def test_the_iii_sdk_names_that_examples_import_are_exported() -> None:
    """iii's Python examples run with only their import line changed: the names they
    import from ``iii`` exist here, with iii's fields where iii's are plain data."""
    for name in (
        "register_worker",
        "InitOptions",
        "FunctionRef",
        "Trigger",
        "TriggerAction",
        "TriggerActionEnqueue",
        "TriggerActionVoid",
        "InvocationError",
        "Logger",
    ):
        assert name in iii_embedded.__all__, name
    assert iii_embedded.TriggerActionEnqueue is iii_embedded.EnqueueAction
    assert iii_embedded.TriggerActionVoid is iii_embedded.VoidAction
    assert [f.name for f in attrs.fields(iii_embedded.InitOptions)] == [
        "worker_name",
        "worker_description",
        "enable_metrics_reporting",
        "invocation_timeout_ms",
        "reconnection_config",
        "otel",
        "headers",
        "telemetry",
    ]
    assert callable(iii_embedded.FunctionRef.unregister)
    assert callable(iii_embedded.Trigger.unregister)
