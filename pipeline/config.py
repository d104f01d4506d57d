"""Config checks that name the key: unknown keys and wrong types against each `_target_`'s signature.

Hydra already rejects overrides of keys that don't exist in the composed config. What it cannot know
is whether `model.generator.ch=abc` fits the constructor, or whether a key in an experiment file is
one the target accepts. The keyword-only, type-annotated signature of every `_target_` is our schema,
so we check the composed config against it before anything is built.
"""
from __future__ import annotations

import inspect
import types
import typing
from typing import Any

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A bad config value; the message names the key and, where possible, the fix."""


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether a plain config value fits a type annotation (lenient for types we can't judge)."""
    if annotation is inspect.Parameter.empty or annotation is Any or value is None and annotation is None:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return len(args) != 1 or all(_accepts(args[0], v) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True  # modules, callables, tensors: built elsewhere or not checkable here


def _signature(target: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    sig = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolvable forward references (third-party code): check names only
        hints = {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return dict(sig.parameters), hints, var_kw


def check_targets(cfg: DictConfig, prefix: str = "") -> None:
    """Walk the config; for every node with `_target_`, check its keys and value types."""
    for key in cfg:
        if str(key).startswith("_") or OmegaConf.is_missing(cfg, key):
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none():
            check_targets(node, f"{prefix}{key}.")
    if "_target_" not in cfg:
        return
    where = prefix.rstrip(".") or "<root>"
    try:
        target = get_object(cfg._target_)
    except Exception as e:
        raise ConfigError(f"{where}._target_={cfg._target_!r} cannot be imported: {e}") from None
    params, hints, var_kw = _signature(target)
    for key in cfg:
        key = str(key)
        if key.startswith("_"):
            continue
        if key not in params:
            if var_kw:
                continue
            valid = ", ".join(k for k in params if k != "self")
            raise ConfigError(f"{prefix}{key}: unknown key for {cfg._target_}. Valid keys: {valid}")
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{prefix}{key} is required (???): set it with {prefix}{key}=<value>")
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and "_target_" in node:
            continue
        value = cfg[key]  # an interpolation (`${schedule.resolutions}`) resolves to a config node too
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        annotation = hints.get(key, params[key].annotation)
        if isinstance(annotation, str):  # unresolved string annotation
            continue
        if not _accepts(annotation, value):
            name = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
            raise ConfigError(f"{prefix}{key}={value!r} has the wrong type: expected {name}")


def build(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` of the node at `key`, with errors that name the key."""
    node = OmegaConf.select(cfg, key)
    if node is None:
        raise ConfigError(f"{key} is missing from the config")
    try:
        return instantiate(node, **kwargs)
    except Exception as e:
        cause = e.__cause__ or e
        raise ConfigError(f"{key}: {type(cause).__name__}: {cause}") from e
