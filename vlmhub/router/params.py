"""Applying a model's parameter rules (``params:`` in models.yaml) to a JSON request body.

The handler calls :func:`rules_for` once it knows the model: one dict lookup and None for a
model without rules, so a request to such a model costs nothing more. With rules,
:func:`apply_rules` returns the new payload and its bytes, or None when no rule changed anything
(the client's original bytes are then forwarded untouched). Pure; nothing blocks. Runs in the
request's task on the event loop.
"""

from __future__ import annotations

import json
from typing import Any

from vlmhub.config.params import ParamRules
from vlmhub.config.schema import Config
from vlmhub.router.body import too_deep


def rules_for(config: Config, model: str) -> ParamRules | None:
    """``model``'s rules in ``config`` (the router's current one), or None when it has none."""
    entry = config.models.get(model)
    rules = entry.params if entry is not None else None
    return rules if rules else None


def apply_rules(
    rules: ParamRules, payload: dict[str, Any]
) -> tuple[dict[str, Any], bytes] | None:
    """``payload`` with ``drop`` removed, ``set`` overwritten and ``defaults`` filled, and its
    JSON; None when the payload is already so. May raise RecursionError (a deeply nested
    body): the caller answers 400."""
    changed = any(name in payload for name in rules.drop) or any(
        payload.get(k, _MISSING) != v for k, v in rules.set.items()) or any(
        k not in payload for k in rules.defaults)
    if not changed:
        return None
    out = {k: v for k, v in payload.items() if k not in rules.drop}
    out.update(rules.set)
    for key, value in rules.defaults.items():
        out.setdefault(key, value)
    return out, json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode()


def ruled(
    config: Config, model: str, body: bytes, payload: dict[str, Any]
) -> tuple[bytes, dict[str, Any]]:
    """The body and payload to forward for ``model``: the rules applied, or the originals
    (same objects) when it has none or none changes anything. 400 for a too-deep body."""
    rules = rules_for(config, model)
    if rules is None:
        return body, payload
    try:
        out = apply_rules(rules, payload)
    except RecursionError:
        raise too_deep() from None
    return (body, payload) if out is None else (out[1], out[0])


_MISSING = object()
