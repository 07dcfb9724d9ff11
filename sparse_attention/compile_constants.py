"""Values that torch.compile bakes into its graphs as constants, computed eagerly from an
object (a layout, a pattern, a module's dispatcher).

`torch.compiler.assume_constant_result` runs a function outside the graph and keeps its
result as a constant, but only takes arguments Dynamo can hand over as Python constants,
and some torch releases (2.11 among them) refuse user-defined objects there. So the object
travels by identity: Dynamo turns `id(obj)` into a constant guarded on that very object (a
different object recompiles; the graph is dropped when the object dies), and a registry of
live objects turns the id back into the object.
"""

from __future__ import annotations

import functools
import weakref

import torch

_live_objects: weakref.WeakValueDictionary[int, KnownById] = weakref.WeakValueDictionary()


class KnownById:
    """Base class of the objects `eager_constant` functions take: every instance is
    registered when it is created (copies and unpickled objects too)."""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        _live_objects[id(obj)] = obj
        return obj


def live_object(obj_id: int) -> KnownById:
    """The live KnownById object of this id (as Dynamo hands ids over)."""
    return _live_objects[obj_id]


def eager_constant(fn):
    """Decorator: `fn(obj, *args)`, with obj a KnownById and args Python constants, runs
    eagerly even under torch.compile and its result becomes a constant of the graph."""

    def by_id(obj_id: int, *args):
        return fn(live_object(obj_id), *args)

    # Dynamo names a constant result after its function: one name per wrapped function, so
    # that two of them can return tensors in one graph.
    name = f"{fn.__name__}_by_id"
    by_id.__name__ = by_id.__qualname__ = name
    by_id.__code__ = by_id.__code__.replace(co_name=name, co_qualname=name)
    by_id = torch.compiler.assume_constant_result(by_id)

    @functools.wraps(fn)
    def call(obj: KnownById, *args):
        if not isinstance(obj, KnownById):
            raise TypeError(f"{fn.__name__}: expected a KnownById object, got {type(obj).__name__}")
        return by_id(id(obj), *args)

    return call
