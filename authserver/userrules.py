"""What makes a username, a group name and a profile claim valid, and how usernames
are compared. Pure: the config parser and the user directory both ask here."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any

MAX_USERNAME_LENGTH = 128
MAX_GROUP_LENGTH = 128

# OIDC Core 5.1 standard claims a profile may hold, by JSON type.
STRING_CLAIMS = (
    "name",
    "given_name",
    "family_name",
    "middle_name",
    "nickname",
    "email",
    "phone_number",
    "locale",
    "zoneinfo",
    "picture",
    "website",
    "profile",
    "gender",
    "birthdate",
)
BOOLEAN_CLAIMS = ("email_verified", "phone_number_verified")
OBJECT_CLAIMS = ("address",)
# Claims tokengate sets from the user itself: a profile cannot hold them.
MANAGED_CLAIMS = {
    "sub": "is the user's id, set by tokengate",
    "preferred_username": "is the user's username, set by tokengate",
    "updated_at": "is set by tokengate when the user changes",
    "groups": "is the user's groups: list them under groups, not in the profile",
}
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")


def username_key(username: str) -> str:
    """The username as compared: NFKC, case-folded, NFKC again (folding can undo a
    normalization). Unique in the directory."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", username).casefold())


def _text_problem(text: str, limit: int) -> str | None:
    if not text:
        return "must not be empty"
    if len(text) > limit:
        return f"must be at most {limit} characters, got {len(text)}"
    if text != text.strip():
        return "must not start or end with whitespace"
    for c in text:
        category = unicodedata.category(c)
        if category[0] == "C" or category in ("Zl", "Zp"):
            return (
                "must not hold control, format, private-use or unassigned characters, "
                f"got U+{ord(c):04X}"
            )
    return None


def username_problem(username: str) -> str | None:
    """Why ``username`` cannot be a username, if so."""
    problem = _text_problem(username, MAX_USERNAME_LENGTH)
    if problem is None and not username_key(username).strip():
        return "must not be only whitespace once normalized"
    return problem


def group_problem(name: str) -> str | None:
    """Why ``name`` cannot be a group's name, if so. Group names are compared exactly."""
    return _text_problem(name, MAX_GROUP_LENGTH)


def claim_problem(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be the profile's ``name``, if so. Keys other than the
    standard claims hold any JSON value."""
    if name in MANAGED_CLAIMS:
        return MANAGED_CLAIMS[name]
    if name in STRING_CLAIMS:
        if not isinstance(value, str) or not value:
            return "must be a non-empty string"
        if name == "email" and not _EMAIL.fullmatch(value):
            return f"must be an email address (name@domain), got {value!r}"
    elif name in BOOLEAN_CLAIMS:
        if not isinstance(value, bool):
            return "must be true or false"
    elif name in OBJECT_CLAIMS and (
        not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values())
    ):
        return "must be a mapping of strings (formatted, street_address, locality, ...)"
    return None
