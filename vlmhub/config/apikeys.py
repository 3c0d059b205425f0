"""``router.api_keys``: plain key strings, or named keys with their own models, limits and
expiry (docs/configuration.md, "api_keys").

A named key's secret is written inline (``key``), read from an environment variable
(``key_env``) or from a file (``key_file``, its first line). It is read when models.yaml is
validated (start-up and every reload: a rotated file applies at the next reload) and is never
echoed: not in an error, not in a repr. Reading a key file blocks on the disk (a few bytes).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    model_validator,
)

from vlmhub.config.locate import FieldProblem
from vlmhub.spec import Strict

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def _key(value: str) -> str:
    if not value.strip():
        raise FieldProblem("an empty key", "remove the entry, or write the key")
    return value


class NamedKey(Strict):
    """One named client key: ``{name, key | key_env | key_file, models, rpm, tpm, expires}``."""

    model_config = ConfigDict(allow_inf_nan=False)

    name: str
    """What usage and the logs call this key (never the key itself)."""
    key: str | None = Field(default=None, repr=False)
    key_env: str | None = None
    """The environment variable holding the key (of the router's process)."""
    key_file: Path | None = None
    """A file whose first line is the key (keep it mode 0600)."""
    models: list[str] | None = None
    """The models (names or aliases) this key may use; absent: all of them."""
    rpm: int | None = Field(default=None, ge=1)
    """Requests per minute this key may send (absent: no limit)."""
    tpm: int | None = Field(default=None, ge=1)
    """Tokens (prompt + completion) per minute; counted after each answer."""
    expires: dt.datetime | dt.date | None = None
    """From this instant (a date: its midnight, UTC) the key is refused (401)."""
    _secret: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _resolve(self) -> NamedKey:
        if not NAME.match(self.name):
            raise FieldProblem(f"name {self.name[:70]!r} is not a usable key name",
                               "use letters, digits and . _ - @ (at most 64), e.g. alice")
        given = [f for f in ("key", "key_env", "key_file") if getattr(self, f) is not None]
        if len(given) != 1:
            raise FieldProblem(f"key {self.name!r} needs exactly one of key, key_env, key_file"
                               f" ({len(given)} given)",
                               "write the key inline, or name an env var or a file holding it")
        if self.key is not None:
            secret = self.key
        elif self.key_env is not None:
            secret = os.environ.get(self.key_env, "")
            if not secret.strip():
                raise FieldProblem(f"key {self.name!r}: the environment variable "
                                   f"{self.key_env[:64]!r} is not set or empty",
                                   "export it in the router's environment, or use key_file")
        else:
            assert self.key_file is not None
            path = self.key_file.expanduser()
            try:
                with path.open(encoding="utf-8") as fh:
                    secret = fh.readline(4096)
            except (OSError, UnicodeDecodeError) as exc:
                raise FieldProblem(f"key {self.name!r}: cannot read key_file {str(path)!r} "
                                   f"({type(exc).__name__})",
                                   "write the key on the file's first line") from None
        self._secret = _key(secret.strip() if self.key is None else secret)
        return self

    @property
    def secret(self) -> str:
        """The key itself (for the router's table; never print it)."""
        return self._secret

    def expires_at(self) -> float | None:
        """``expires`` as a Unix time (a date or a naive time: UTC)."""
        when = self.expires
        if when is None:
            return None
        if not isinstance(when, dt.datetime):
            when = dt.datetime(when.year, when.month, when.day)
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        return when.timestamp()


# The tags start with "function-" so that a located error names the entry itself
# (router.api_keys.1.rpm, not router.api_keys.1.named.rpm): locate.explain leaves such parts
# of an error's path out, as it does pydantic's own validator steps.
PLAIN, NAMED = "function-plain", "function-named"


def _kind(value: Any) -> str:
    return PLAIN if isinstance(value, str) else NAMED


ApiKey = Annotated[
    Annotated[str, AfterValidator(_key), Tag(PLAIN)] | Annotated[NamedKey, Tag(NAMED)],
    Discriminator(_kind),
]
"""One ``router.api_keys`` entry: a plain key string or a :class:`NamedKey`."""


def check_names(keys: list[str | NamedKey]) -> list[str | NamedKey]:
    """Named keys have distinct names, and no two entries share a secret."""
    names: set[str] = set()
    secrets: set[str] = set()
    for entry in keys:
        secret = entry if isinstance(entry, str) else entry.secret
        if not isinstance(entry, str):
            if entry.name in names:
                raise FieldProblem(f"two keys are named {entry.name!r}",
                                   "give every named key its own name")
            names.add(entry.name)
        if secret in secrets:
            raise FieldProblem("two entries have the same key",
                               "give every person or script a key of its own")
        secrets.add(secret)
    return keys


def secrets_of(keys: list[str | NamedKey]) -> list[str]:
    """Every entry's key (to mask in the logs and to build the router's table)."""
    return [k if isinstance(k, str) else k.secret for k in keys]
