"""A model's request parameter rules (``params:`` on a models.yaml entry).

``drop`` removes fields from each JSON request body, ``set`` overwrites them, ``defaults`` fills
the ones the client left out; the router applies them (:mod:`vlmhub.router.params`) before it
forwards the body. This module is only the schema and its checks: pure, nothing blocks.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from vlmhub.config.locate import FieldProblem
from vlmhub.spec import Strict

ROUTING_FIELDS = frozenset({"model"})
"""Fields a rule may not touch: the router routes by them before the rules apply."""


def _name(value: str) -> str:
    if not value.strip():
        raise FieldProblem("an empty parameter name", "write the field to drop, e.g. temperature")
    return value


class ParamRules(Strict):
    """``drop``, then ``set``, then ``defaults`` (see the module docs)."""

    model_config = ConfigDict(allow_inf_nan=False)

    drop: list[Annotated[str, AfterValidator(_name)]] = Field(default_factory=list)
    """Fields removed from the body (a client's ``temperature`` to an OCR model)."""
    set: dict[str, Any] = Field(default_factory=dict)
    """Fields overwritten whatever the client sent (``max_tokens: 4096``)."""
    defaults: dict[str, Any] = Field(default_factory=dict)
    """Fields added when the client left them out."""

    @model_validator(mode="after")
    def _consistent(self) -> ParamRules:
        named = [*self.drop, *self.set, *self.defaults]
        routing = sorted(ROUTING_FIELDS.intersection(named))
        if routing:
            raise FieldProblem(
                f"params may not change {', '.join(routing)}: the router routes by it",
                "remove it; use aliases or served_model_name to rename a model")
        clash = sorted({n for n in self.drop if n in self.set or n in self.defaults}
                       | {n for n in self.set if n in self.defaults})
        if clash:
            raise FieldProblem(
                f"{', '.join(clash)} named by more than one of drop, set and defaults",
                "keep each field in one of them (set already wins over what the client sends)")
        return self

    def __bool__(self) -> bool:
        return bool(self.drop or self.set or self.defaults)

    def summary(self) -> str:
        """One line: ``drop temperature; set max_tokens=512; defaults top_p=1``."""
        parts = []
        if self.drop:
            parts.append("drop " + ", ".join(self.drop))
        for label, values in (("set", self.set), ("defaults", self.defaults)):
            if values:
                parts.append(f"{label} " + ", ".join(f"{k}={v!r}" for k, v in values.items()))
        return "; ".join(parts) or "-"
