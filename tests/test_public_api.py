"""The public surface: every public name is exported in ``__all__`` and documented, and
nothing private leaks."""

from __future__ import annotations

import inspect

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
