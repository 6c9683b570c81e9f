"""What a misbehaving browser or authenticator can send to the passkey checks
(:class:`authserver.passkeys.Passkeys`): valid answers from :mod:`tests.softauthn`
with their bytes and JSON mutated. Every one is refused with a reason; none raises,
none is accepted, and the stored counter moves only for a valid signature."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authserver.passkeys import Passkeys
from authserver.relyingparty import relying_party
from authserver.sqlite_store import SqliteStore
from authserver.store import StoreWorker, UserRecord
from tests.softauthn import Authenticator, b64url, unb64url
from tokengate.jsonlog import AuditLog
from tokengate.metrics import Metrics

ORIGIN = "https://id.example.com"
NOW = 1_800_000_000


class Lines:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def write(self, line: dict[str, Any]) -> None:
        self.lines.append(line)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Any:
    store = SqliteStore(tmp_path_factory.mktemp("passkeys-fuzz"))
    store.add_user(UserRecord("u1", "ann", "ann", "x", {}, (), False, "cli", NOW, NOW))
    rp = relying_party(ORIGIN, "Acme")
    assert rp is not None
    io = StoreWorker()
    lines = Lines()
    passkeys = Passkeys(
        store=store, io=io, rp=rp, audit=AuditLog(lines), metrics=Metrics(), clock=lambda: NOW
    )
    device = Authenticator(ORIGIN)
    options = json.loads(passkeys.registration_options("u1", "ann", "Ann", [], True).options)
    created = device.create(options)
    record = asyncio.run(
        passkeys.register("u1", json.dumps(created), options["challenge"], True, {})
    )
    assert record is not None
    yield passkeys, device, store, lines
    io.close()
    store.close()


def mutate(credential: dict[str, Any], data: st.DataObject) -> str:
    """One field of the answer changed: a byte of a base64url value flipped, cut or
    lengthened, a value replaced by another JSON type, or a key dropped."""
    response = credential["response"]
    names = [("top", k) for k in credential] + [("response", k) for k in response]
    where, key = data.draw(st.sampled_from(names))
    target = credential if where == "top" else response
    value = target[key]
    how = data.draw(st.sampled_from(["flip", "cut", "grow", "type", "drop"]))
    if how == "drop":
        del target[key]
    elif how == "type":
        target[key] = data.draw(
            st.one_of(st.none(), st.integers(), st.text(max_size=8), st.lists(st.integers()))
        )
    elif isinstance(value, str) and value:
        raw = bytearray(unb64url(value)) if _is_b64(value) else bytearray(value.encode())
        if how == "flip" and raw:
            i = data.draw(st.integers(0, 4096)) % len(raw)  # drawn alike for any length
            raw[i] ^= data.draw(st.integers(1, 255))
        elif how == "cut":
            raw = raw[: data.draw(st.integers(0, 4096)) % max(1, len(raw))]
        else:
            raw += data.draw(st.binary(min_size=1, max_size=64))
        target[key] = b64url(bytes(raw))
    else:
        target[key] = "@@"
    return json.dumps(credential)


def _is_b64(text: str) -> bool:
    return all(c.isalnum() or c in "-_" for c in text)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_a_mutated_signature_is_refused_never_raised(setup: Any, data: st.DataObject) -> None:
    passkeys, device, store, _ = setup
    options = json.loads(passkeys.authentication_options(None, True).options)
    good = device.get(options)
    before = store.passkey(good["id"]).sign_count
    bad = mutate(json.loads(json.dumps(good)), data)
    if bad == json.dumps(good):
        return
    verified = asyncio.run(
        passkeys.verify(bad, options["challenge"], None, True, {}, "passwordless")
    )
    if verified.ok:  # only a change the signature does not cover: a transport hint, ...
        assert (
            json.loads(bad)["response"]["authenticatorData"]
            == good["response"]["authenticatorData"]
        )
        assert json.loads(bad)["response"]["signature"] == good["response"]["signature"]
        return
    assert verified.reason in {"bad_passkey", "unknown_passkey", "user_not_verified", "replayed"}
    assert store.passkey(good["id"]).sign_count == before  # nothing moved


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_a_mutated_registration_is_refused_never_raised(setup: Any, data: st.DataObject) -> None:
    passkeys, _, store, _ = setup
    options = json.loads(passkeys.registration_options("u1", "ann", "Ann", [], True).options)
    good = Authenticator(ORIGIN).create(options)
    bad = mutate(json.loads(json.dumps(good)), data)
    count = len(store.passkeys("u1"))
    record = asyncio.run(passkeys.register("u1", bad, options["challenge"], True, {}))
    if record is not None:
        # "none" attestation: nothing signs the attestation object (its flags, its
        # credential id), so only the client data's type, challenge and origin, the RP
        # id's hash and the structure are checked, and those must be as sent
        client = json.loads(unb64url(json.loads(bad)["response"]["clientDataJSON"]))
        expected = json.loads(unb64url(good["response"]["clientDataJSON"]))
        for key in ("type", "challenge", "origin"):
            assert client[key] == expected[key]
        assert len(store.passkeys("u1")) == count + 1
    else:
        assert len(store.passkeys("u1")) == count


def test_the_first_valid_signature_counts_and_its_replay_does_not(setup: Any) -> None:
    passkeys, device, _, lines = setup
    options = json.loads(passkeys.authentication_options(None, True).options)
    good = json.dumps(device.get(options))
    first = asyncio.run(passkeys.verify(good, options["challenge"], None, True, {}, "passwordless"))
    again = asyncio.run(passkeys.verify(good, options["challenge"], None, True, {}, "passwordless"))
    assert (first.ok, first.user_id, first.amr) == (True, "u1", "hwk")
    assert (again.ok, again.reason) == (False, "replayed")
    assert lines.lines[-1]["reason"] == "replayed" and "credential" not in lines.lines[-1]
