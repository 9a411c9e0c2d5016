"""What ``@serve.batch`` and ``@serve.multiplexed`` share: telling a decorated method from a
function by its signature, and the instance attributes that keep a method's state."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict


def takes_self(func: Callable, name: str, decorator: str, argument: str) -> bool:
    """Whether ``func`` takes ``self`` and one ``argument`` (a method) rather than the
    argument alone (a function); a TypeError naming ``decorator`` if it takes neither."""
    positional = [p for p in inspect.signature(func).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                  and p.default is p.empty]
    if len(positional) not in (1, 2):
        raise TypeError(f"{decorator} needs a function of one argument, {argument} (a "
                        f"method: self and that argument); {name} takes "
                        f"{[p.name for p in positional]}.")
    return len(positional) == 2


def attributes_of(instance: Any, name: str, decorator: str, kept: str) -> Dict[str, Any]:
    """``vars(instance)``, where a decorated method keeps ``kept`` (its queue, its cache);
    a TypeError saying how to make room if the instance has no ``__dict__``."""
    try:
        return vars(instance)
    except TypeError:
        raise TypeError(f"{name} uses {decorator}, which keeps {kept} on the instance, but a "
                        f"{type(instance).__name__} has no __dict__ (__slots__): add "
                        "'__dict__' to its __slots__.") from None
