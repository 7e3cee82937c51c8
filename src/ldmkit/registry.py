"""The classes that files name, one registry per kind, and the loaders behind DiffusionPipeline's entry points.

Registries. A pipeline folder names its classes: ``model_index.json`` has the pipeline's ``_class_name`` and a
``[library, class name]`` per component; an original CompVis YAML describes one of five families, each run
by one pipeline. Each kind has one :class:`Registry` here, and classes join it when they are defined, through
their base class, so that no list of names is kept by hand:

- ``PIPELINES``, keyed by ``_class_name``: every ``DiffusionPipeline`` subclass, under its class name (what
  ``save_pretrained`` writes).
- ``COMPONENTS``, keyed by ``(library, class name)``: every ``ModelMixin`` subclass, under the class keyword
  ``library`` (default ``"diffusers"``: ``class ClassEmbedder(ModelMixin, library="ldmkit")``); every
  concrete ``SchedulerMixin`` subclass (one that defines ``__init__``; the shared mixins do not), under
  ``"diffusers"``; ``LDMTokenizer``, which has no such base, by the decorator
  :meth:`Registry.register`, as transformers' ``BertTokenizer`` (and ``BertTokenizerFast`` on load).
- ``COMPVIS_FAMILIES``, keyed by family (``"text-to-image"``, ...): the pipeline that says so with the class
  keyword ``compvis_family`` (``class LDMPipeline(DiffusionPipeline, compvis_family="unconditional")``).

Loaders. Building a pipeline from files (``ldmkit.assembly``) needs the pipeline classes, so it sits above
them, and the pipelines must not import it. ``DiffusionPipeline.from_pretrained``, ``from_single_file`` and
``save_pretrained`` therefore call the function the assembly registered under the method's name
(:func:`register_loader`); ``ldmkit/__init__.py`` imports the assembly, so every ``import ldmkit...`` has
registered them before user code runs. A missing loader is a broken invariant (an assertion).

This module imports nothing of ldmkit but ``errors``: every layer may use it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

from .errors import LDMKitError

LOADER_NAMES = ("from_pretrained", "from_single_file", "save_pretrained")
_LOADERS: dict[str, Callable] = {}


def _same_definition(a: type, b: type) -> bool:
    """The same class statement run again (a re-import, a class made in a function): the new one replaces."""
    return a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__


class Registry:
    """Classes of one kind by the key their files give them (a key may have aliases, accepted on load).

    Two different classes may claim one key (a user's class named like one of ldmkit's); defining them is
    not an error, but looking the key up is, since the file cannot say which one it means.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[Hashable, list[type]] = {}
        self._keys: dict[type, Hashable] = {}

    def add(self, key: Hashable, cls: type, aliases: Iterable[Hashable] = ()) -> None:
        """Let ``cls`` be found under ``key`` (and ``aliases``); ``key`` is the one :meth:`key_of` gives."""
        self._keys[cls] = key
        for name in (key, *aliases):
            others = [c for c in self._classes.get(name, []) if not _same_definition(c, cls)]
            self._classes[name] = [*others, cls]

    def register(self, key: Hashable, aliases: Iterable[Hashable] = ()) -> Callable[[type], type]:
        """:meth:`add` as a class decorator, for classes without a base class that joins for them."""
        def join(cls: type) -> type:
            self.add(key, cls, aliases)
            return cls
        return join

    def get(self, key: Hashable) -> type | None:
        """The class registered under ``key``, or None."""
        classes = self._classes.get(key, [])
        if len(classes) > 1:
            where = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in classes)
            raise LDMKitError(f"Several {self.kind} classes are registered as {key!r} ({where}), so the file "
                              "cannot say which one it means. Rename the class you defined.")
        return classes[0] if classes else None

    def key_of(self, cls: type) -> Hashable | None:
        """The key of ``cls``, or of its nearest registered base class (None if none is registered)."""
        for base in cls.__mro__:
            if base in self._keys:
                return self._keys[base]
        return None

    def keys(self) -> list:
        """Every key and alias, sorted (for messages)."""
        return sorted(self._classes, key=str)


PIPELINES = Registry("pipeline")
COMPONENTS = Registry("component")
COMPVIS_FAMILIES = Registry("CompVis pipeline")


def register_loader(name: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``DiffusionPipeline.<name>`` (the method passes its arguments on)."""
    assert name in LOADER_NAMES, f"{name!r} is not one of DiffusionPipeline's loaders {LOADER_NAMES}"

    def join(fn: Callable) -> Callable:
        _LOADERS[name] = fn
        return fn
    return join


def loader(name: str) -> Callable:
    """The function registered for ``DiffusionPipeline.<name>``."""
    assert name in _LOADERS, (f"no {name!r} loader is registered: ldmkit.assembly registers it and "
                              "ldmkit/__init__.py imports that package, so it cannot be missing after `import ldmkit`")
    return _LOADERS[name]


__all__ = ["COMPONENTS", "COMPVIS_FAMILIES", "LOADER_NAMES", "PIPELINES", "Registry", "loader", "register_loader"]
