"""Sign-on policies (Okta's presets): how people must sign in to an app. Pure.

    authserver:
      sign_on: {policy: password, mfa_if: {groups: [admins]}}   # the org's default
      clients:
        - client_id: payroll
          sign_on: {policy: password+mfa}                       # this app's own

``password``: a password, and a second factor for members of ``mfa_if.groups`` or,
with ``mfa_if.new_device``, on a browser that has not given one before (no
remembered-device cookie); ``password+mfa``: a password and a second factor (an
authenticator code or a passkey), always; ``passwordless``: a passkey that verified
its user (PIN or biometric), no password. An authorization request's ``acr_values``
may ask for more than the policy (step-up), never for less. Users who must use a
factor and have none enroll one on the spot (under ``passwordless``: a passkey, after
their password and any second factor they have).

What happened is said in tokens as RFC 8176 ``amr`` values and an ``acr``
(:data:`ACR_PASSWORD` or :data:`ACR_MFA`):

- ``pwd``: a password alone;
- ``pwd otp mfa``: a password and an authenticator code (or a recovery code);
- ``pwd hwk mfa`` / ``pwd swk mfa``: a password and a passkey;
- ``hwk mfa`` / ``swk mfa``: a passkey alone that verified its user (something held
  and something known or biometric: two factors).

``hwk`` is a passkey bound to its device; ``swk`` a synced one (backup eligible), whose
private key leaves the device.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from authserver.policyconfig import as_group
from tokengate.yamlconf import Node, as_bool, list_of, one_of

Preset = Literal["password", "password+mfa", "passwordless"]
PRESETS: tuple[Preset, ...] = ("password", "password+mfa", "passwordless")
Requirement = Literal["password", "mfa", "passkey"]  # what a sign-in must prove

ACR_PASSWORD = "urn:tokengate:loa:1fa"  # noqa: S105 - one factor: a password
ACR_MFA = "urn:tokengate:loa:2fa"  # two: a password and an authenticator code
ACR_VALUES = (ACR_PASSWORD, ACR_MFA)  # weakest first
AMR_PASSWORD = ("pwd",)
AMR_MFA = ("pwd", "otp", "mfa")
PASSKEY_AMR = ("hwk", "swk")  # a passkey bound to its device; a synced one


@dataclass(frozen=True, slots=True)
class SignOnPolicy:
    preset: Preset = "password"
    mfa_groups: frozenset[str] = frozenset()  # with "password": MFA for these members
    mfa_new_device: bool = False  # with "password": MFA on a browser not remembered


DEFAULT_SIGN_ON = SignOnPolicy()


def needs_mfa(
    policy: SignOnPolicy,
    groups: Iterable[str],
    acr_values: Iterable[str],
    known_device: bool = True,
) -> bool:
    """Whether this sign-in needs a second factor: by the policy, the user's groups,
    the browser being new to the user, or an ``acr_values`` whose every value we know
    asks for more than a password (values we do not know are ignored, as OIDC Core
    5.5.1.1 lets a server do)."""
    if policy.preset == "password+mfa" or policy.mfa_groups.intersection(groups):
        return True
    if policy.mfa_new_device and not known_device:
        return True
    known = [value for value in acr_values if value in ACR_VALUES]
    return bool(known) and ACR_PASSWORD not in known


def required(
    policy: SignOnPolicy,
    groups: Iterable[str],
    acr_values: Iterable[str],
    known_device: bool = True,
) -> Requirement:
    """What this sign-in must prove: a password alone, a second factor too, or (the
    ``passwordless`` preset) a passkey."""
    if policy.preset == "passwordless":
        return "passkey"
    return "mfa" if needs_mfa(policy, groups, acr_values, known_device) else "password"


def satisfies(amr: Iterable[str], requirement: Requirement) -> bool:
    """Whether a sign-in that proved ``amr`` meets ``requirement``."""
    amr = tuple(amr)
    if requirement == "passkey":
        return has_passkey(amr)
    return requirement == "password" or has_mfa(amr)


def has_mfa(amr: Iterable[str]) -> bool:
    return "mfa" in amr


def has_passkey(amr: Iterable[str]) -> bool:
    return any(value in PASSKEY_AMR for value in amr)


def passkey_amr(backup_eligible: bool) -> str:
    return "swk" if backup_eligible else "hwk"


def acr_of(amr: Iterable[str]) -> str:
    return ACR_MFA if has_mfa(amr) else ACR_PASSWORD


def as_sign_on(node: Node) -> SignOnPolicy:
    f = node.fields(required=("policy",), optional=("mfa_if",))
    preset = f.get("policy", one_of(*PRESETS), "password") or "password"
    groups: tuple[str, ...] = ()
    new_device = False
    if f.has("mfa_if"):
        if preset == "password+mfa":
            f.node_at("mfa_if").error(f"policy {preset} asks every user for a second factor")
        elif preset == "passwordless":
            f.node_at("mfa_if").error(f"policy {preset} asks every user for a passkey")
        m = f.node_at("mfa_if").fields(optional=("groups", "new_device"))
        groups = m.get("groups", list_of(as_group), ()) or ()
        new_device = bool(m.get("new_device", as_bool, False))
        if m.has("groups") and not groups:
            m.node_at("groups").error("must name at least one group")
        if not groups and not new_device:
            f.node_at("mfa_if").error("must say when: groups, new_device: true, or both")
    return SignOnPolicy(preset=preset, mfa_groups=frozenset(groups), mfa_new_device=new_device)  # type: ignore[arg-type]
