"""Who is calling an HTTP function, and whether they may do what they ask.

Two modes, chosen by the app setting `RETRAIN_AUTH`:

- `function_key` (the default, the fallback): the host checked the function key; the caller is
  recorded as "function key" (anyone holding the key), never as the name the body claims.
- `entra`: App Service Authentication ("Easy Auth") with Microsoft Entra ID signs the caller in and
  passes the principal in `X-MS-CLIENT-PRINCIPAL` (base64 JSON: claims with the object id, name and
  app roles). The app reads that header only when the platform says authentication is on
  (`WEBSITE_AUTH_ENABLED`): the platform then replaces any header a client sent. The app roles
  `Retrain.Reader` (status, dashboard), `Retrain.Requester` (+ retrain requests) and
  `Retrain.Operator` (+ promote, rollback, pause, resume) decide what the caller may do.

In both modes a principal header that arrives while the platform's authentication is off is
refused: nothing but a client could have set it. The body's `requested_by` is kept as a note
("on behalf of"), never as the actor.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from typing import Any

AUTH_SETTING = "RETRAIN_AUTH"
PLATFORM_AUTH_SETTING = "WEBSITE_AUTH_ENABLED"  # App Service sets it to "True" when Authentication is on
PRINCIPAL_HEADER = "X-MS-CLIENT-PRINCIPAL"
FUNCTION_KEY_ACTOR = "function key"

READER, REQUESTER, OPERATOR = "Retrain.Reader", "Retrain.Requester", "Retrain.Operator"
ALLOWED = {
    "read": frozenset({READER, REQUESTER, OPERATOR}),
    "request": frozenset({REQUESTER, OPERATOR}),
    "control": frozenset({OPERATOR}),
}
_OBJECT_ID = ("http://schemas.microsoft.com/identity/claims/objectidentifier", "oid")
_NAME = ("name", "preferred_username", "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name")
_ROLE = ("roles", "http://schemas.microsoft.com/ws/2008/06/identity/claims/role")


class Refused(Exception):  # noqa: N818 - an answer to the caller, not a program error
    """The caller is not let in: an HTTP status, a reason code and a description."""

    def __init__(self, status: int, reason: str, description: str):
        super().__init__(description)
        self.status, self.reason, self.description = status, reason, description


@dataclass(frozen=True)
class Caller:
    actor: str  # what the ledger, the events and the decisions record as requested_by
    verified: bool  # signed in (entra) rather than holding a shared key


def caller(headers: Any, operation: str) -> Caller:
    """The caller of a request with these headers, if they may perform `operation` (read, request,
    control); raises Refused (401, 403, or 500 for a misconfigured app) otherwise."""
    from shared.redact import printable

    platform_on = os.environ.get(PLATFORM_AUTH_SETTING, "").strip().lower() == "true"
    mode = os.environ.get(AUTH_SETTING, "function_key").strip().lower() or "function_key"
    header = headers.get(PRINCIPAL_HEADER)
    if header and not platform_on:
        raise Refused(
            401, "forged_principal", f"{PRINCIPAL_HEADER} arrived while App Service Authentication is off: only the platform may set it"
        )
    if mode == "function_key":
        return Caller(FUNCTION_KEY_ACTOR, verified=False)
    if mode != "entra":
        raise Refused(500, "misconfigured", f"{AUTH_SETTING} must be 'function_key' or 'entra'")
    if not platform_on:
        raise Refused(500, "misconfigured", f"{AUTH_SETTING}=entra needs App Service Authentication (Entra ID) turned on for the app")
    if not header:
        raise Refused(401, "unauthenticated", "sign in with Microsoft Entra ID")
    claims = _claims(header)
    object_id = next((v for t, v in claims if t in _OBJECT_ID), None)
    if not object_id:
        raise Refused(401, "unauthenticated", "the signed-in principal has no object id")
    name = next((v for t, v in claims if t in _NAME), "")
    roles = {v for t, v in claims if t in _ROLE}
    needed = ALLOWED[operation]
    if not roles & needed:
        who = printable(name or object_id, limit=100)
        raise Refused(403, "forbidden", f"{who} has none of the app roles {sorted(needed)} needed to {operation}")
    return Caller(f"entra:{object_id}" + (f" ({printable(name, limit=100)})" if name else ""), verified=True)


def _claims(header: str) -> list[tuple[str, str]]:
    try:
        principal = json.loads(base64.b64decode(header, validate=False))
        role_type = principal.get("role_typ")
        found = []
        for claim in principal.get("claims", []):
            kind, value = claim.get("typ"), claim.get("val")
            if isinstance(kind, str) and isinstance(value, str):
                found.append(("roles" if kind == role_type else kind, value))
        return found
    except (ValueError, binascii.Error, AttributeError, TypeError):
        raise Refused(401, "unauthenticated", f"{PRINCIPAL_HEADER} is not a principal") from None


def recorded_by(actor: str, claimed: Any) -> str:
    """requested_by as stored: the actor, with what the body claimed as a note."""
    from shared.redact import printable

    if not isinstance(claimed, str) or not claimed.strip() or claimed == actor:
        return actor[:200]
    return f"{actor} (on behalf of {printable(claimed, limit=80)})"[:200]
