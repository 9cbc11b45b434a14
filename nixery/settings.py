"""What every group of settings shares: the error that names a variable, and how a setting
is shown in a summary (the start-up log, `--check-config`, the web page).

A field of a settings dataclass says once, in its metadata, whether it is a secret, a URL
that may hold credentials, or shown some other way; `summarise` reads that, so no summary
mirrors the fields by hand, and a secret is left out of repr by the same mark.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from pathlib import Path
from typing import Any, Callable, Optional


class ConfigError(ValueError):
    """A variable has a value Nixery cannot use; the message names it. `lasting`: no restart gets
    past it (a bad value), unlike a file that is missing or unreadable, which may yet come (a
    mount, a secret written late at boot): a service manager should retry only the latter."""

    def __init__(self, message: str, lasting: bool = True):
        super().__init__(message)
        self.lasting = lasting


# A URL's user information: `user:password@`, or `token@` (GitHub and others take a token as the
# user name, `https://TOKEN@host/repo.git`), which only an ssh URL's plain user name is not.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*:)?//(?P<user>[^/@:\s'\"]+)(?P<password>:[^/@\s'\"]*)?@")
# Query parameters that carry credentials (`?access_token=`, `?private_token=`, signed URLs' signatures).
_SECRET_PARAMETER = re.compile(r"([?&][A-Za-z0-9_.-]*(?:token|secret|password|passwd|signature|credential|sig|key)"
                               r"[A-Za-z0-9_.-]*=)[^&#\s'\"]*", re.IGNORECASE)


def _userinfo(match: re.Match) -> str:
    scheme = match.group("scheme") or ""
    if match.group("password") is not None:
        return f"{scheme}//{match.group('user')}:***@"
    if scheme.lower().rstrip(":") in ("ssh", "git+ssh", "ssh+git"):
        return match.group(0)
    return f"{scheme}//***@"


def redact_url(value: str) -> str:
    """Hide a password or token embedded in a URL (https://user:token@host/..., https://token@host/...,
    ?access_token=...), in a URL or in text that quotes URLs (Nix's and git's messages)."""
    return _SECRET_PARAMETER.sub(r"\1***", _USERINFO.sub(_userinfo, value))


@dataclasses.dataclass(frozen=True)
class Shown:
    """How a setting appears in `summary()` (the start-up log, `--check-config`, the web page)."""

    secret: bool = False  # "<set>" or None, never the value; left out of repr too
    url: bool = False  # credentials a URL may hold are redacted
    hidden: bool = False  # left out
    key: Optional[str] = None  # the summary's name for it, when not the field's
    # A group (of this type) whose settings join as `<key or field>_<name>` (`key=""`: as `<name>`).
    flatten: Optional[type] = None
    show: Optional[Callable[[Any, Any], object]] = None  # (value, the settings it belongs to) -> what is shown


_SHOWN = "nixery.shown"
_PLAIN = Shown()


def setting(default: Any = dataclasses.MISSING, **shown: Any) -> Any:
    """A dataclass field and how it is shown; the one place a secret is marked."""
    rule = Shown(**shown)
    return dataclasses.field(default=default, repr=not rule.secret, metadata={_SHOWN: rule})


def _rule(field: dataclasses.Field) -> Shown:
    return field.metadata.get(_SHOWN, _PLAIN)


def _plain(value: Any, url: bool = False) -> object:
    if dataclasses.is_dataclass(value):
        return summarise(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_plain(item, url) for item in value]
    if isinstance(value, str):
        return redact_url(value) if url else value
    if isinstance(value, (Path, ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(value)
    return value


def _keys(group: type) -> list[str]:
    return [_rule(f).key or f.name for f in dataclasses.fields(group) if not _rule(f).hidden]


def summarise(settings: Any) -> dict[str, object]:
    """A dataclass of settings as JSON-ready values, as its fields' `Shown` rules say."""
    summary: dict[str, object] = {}
    for field in dataclasses.fields(settings):
        rule = _rule(field)
        value = getattr(settings, field.name)
        if rule.hidden:
            continue
        if rule.flatten:
            group = summarise(value) if value is not None else dict.fromkeys(_keys(rule.flatten))
            prefix = field.name if rule.key is None else rule.key
            summary.update({f"{prefix}_{name}" if prefix else name: shown for name, shown in group.items()})
        elif rule.show:
            summary[rule.key or field.name] = rule.show(value, settings)
        elif rule.secret:
            summary[rule.key or field.name] = "<set>" if value else None
        else:
            summary[rule.key or field.name] = _plain(value, rule.url)
    return summary
