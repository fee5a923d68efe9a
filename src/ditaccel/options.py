"""Options travel in config dataclasses (``f(pipe, ..., config=XConfig(...))``, as diffusers'
``apply_x(module, XConfig)``); the older keyword form of the same options keeps working, with a
DeprecationWarning."""

from __future__ import annotations

import dataclasses
import warnings


def resolve(cls, config, options: dict, where: str):
    """``config`` (a ``cls``; None: ``cls()``), or ``cls(**options)`` from the keyword form, with a
    DeprecationWarning naming the config to pass instead.  Both at once, or an option ``cls`` does
    not have, is a TypeError.

    Example::

        cfg = resolve(ProfileConfig, None, {"steps": 50}, "profile")  # warns; ProfileConfig(steps=50)
    """
    if not options:
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"{where}: config must be a {cls.__name__}, got {type(config).__name__}")
        return cls() if config is None else config
    if config is not None:
        raise TypeError(f"{where}: pass the options in the {cls.__name__} or as keywords, not both")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"{where} has no option {', '.join(unknown)}; its options: {', '.join(sorted(known))}")
    warnings.warn(f"{where}(..., {', '.join(options)}=...) is deprecated: pass "
                  f"{where}(..., config={cls.__name__}({', '.join(f'{k}=...' for k in options)}))",
                  DeprecationWarning, stacklevel=3)
    return cls(**options)
