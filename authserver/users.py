"""The org-wide user directory: who may sign in, with what password, profile and groups.

Users live in the store (:class:`authserver.store.UserRecord`). Each has an opaque id
that never changes (the ``sub`` of its tokens; never derived from the username) and a
username that is unique once compared as :func:`username_key` (NFKC, case-folded:
``Alice``, ``alice`` and its full-width form are one user). A user comes from the config
(``authserver.users``, applied at start and at each reload) or from the command line
(``tokengate users add``); the command line never changes a config user.

:class:`UserDirectory` is what the command line and sign-in use. Store calls run on the
store's thread and password hashing on the password threads, never on the event loop.
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from authserver.passwords import (
    EnvPassword,
    PasswordWorker,
    hash_password,
    needs_rehash,
    password_problem,
    verify_password,
)
from authserver.store import Store, StoreWorker, UsernameTaken, UserRecord, UserSource
from authserver.userrules import (
    claim_problem,
    group_problem,
    username_key,
    username_problem,
)
from tokengate.jsonlog import log_event, rfc3339

if TYPE_CHECKING:
    from authserver.config import UserConfig


def new_user_id() -> str:
    """A user id: ``u`` and 22 URL-safe characters (128 random bits)."""
    return "u" + secrets.token_urlsafe(16)


# --------------------------------------------------------------------------- users


@dataclass(frozen=True, slots=True)
class User:
    """A user as the rest of tokengate sees it: never its password hash."""

    id: str
    username: str
    profile: Mapping[str, Any]
    groups: tuple[str, ...]
    disabled: bool
    source: UserSource
    created_at: int
    updated_at: int

    @classmethod
    def of(cls, record: UserRecord) -> User:
        return cls(
            id=record.id,
            username=record.username,
            profile=record.profile,
            groups=record.groups,
            disabled=record.disabled,
            source=record.source,
            created_at=record.created_at,
            updated_at=record.updated_at,
        )

    def to_json(self) -> dict[str, Any]:
        """For ``tokengate users show``: times in RFC 3339."""
        return {
            "id": self.id,
            "username": self.username,
            "profile": dict(self.profile),
            "groups": list(self.groups),
            "disabled": self.disabled,
            "source": self.source,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
        }


class UserError(Exception):
    """A change the directory refuses."""


class UserExists(UserError):
    def __init__(self, username: str) -> None:
        super().__init__(f"a user named {username!r} exists already")


class UserNotFound(UserError):
    def __init__(self, ref: str) -> None:
        super().__init__(f"no user {ref!r}")


class UserReadOnly(UserError):
    def __init__(self, username: str) -> None:
        super().__init__(
            f"{username!r} is declared in the config (authserver.users): change it there"
        )


class InvalidUser(UserError, ValueError):
    """A username, password, profile value or group that is not acceptable."""


@dataclass(frozen=True, slots=True)
class Authenticated:
    user: User
    rehashed: bool = False  # its hash was upgraded to the current parameters


@dataclass(frozen=True, slots=True)
class Refused:
    reason: Literal["bad_credentials", "disabled"]
    user: User | None  # None: no such user


SignInOutcome = Authenticated | Refused


@dataclass(frozen=True, slots=True)
class ConfigSync:
    """What applying ``authserver.users`` changed, by username."""

    created: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    adopted: tuple[tuple[str, str], ...] = ()  # (username, id) of CLI users taken over

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.deleted or self.adopted)


class UserDirectory:
    """The users in the store, for the command line and for sign-in."""

    def __init__(
        self,
        store: Store,
        io: StoreWorker,
        passwords: PasswordWorker,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.io = io
        self.passwords = passwords
        self.clock = clock
        # stored hash -> fingerprint of the config's ${ENV} password it was found to
        # match: a reload with the same password does not verify it again
        self._confirmed: dict[str, bytes] = {}

    # -- lookups ---------------------------------------------------------------

    async def get(self, user_id: str) -> User | None:
        record = await self.io.call(self.store.user, user_id)
        return None if record is None else User.of(record)

    async def find(self, username: str) -> User | None:
        """The user with this username (compared as :func:`username_key`)."""
        if username_problem(username) is not None:
            return None
        record = await self.io.call(self.store.user_by_key, username_key(username))
        return None if record is None else User.of(record)

    async def resolve(self, ref: str) -> User | None:
        """The user named ``ref``, else the user whose id is ``ref``."""
        return await self.find(ref) or await self.get(ref)

    async def list(self) -> list[User]:
        return [User.of(r) for r in await self.io.call(self.store.users)]

    # -- changes (command line users only) -------------------------------------

    async def add(
        self,
        username: str,
        password: str,
        *,
        profile: Mapping[str, Any] | None = None,
        groups: Iterable[str] = (),
    ) -> User:
        """A new user, source ``cli``. InvalidUser, UserExists."""
        profile = dict(profile or {})
        groups = tuple(groups)
        check_new_user(username, profile, groups)
        _check_password(password)
        password_hash = await self.passwords.hash(password)
        now = int(self.clock())
        record = UserRecord(
            id=new_user_id(),
            username=username,
            username_key=username_key(username),
            password_hash=password_hash,
            profile=MappingProxyType(profile),
            groups=tuple(sorted(set(groups))),
            disabled=False,
            source="cli",
            created_at=now,
            updated_at=now,
        )
        try:
            await self.io.call(self.store.add_user, record)
        except UsernameTaken:
            raise UserExists(username) from None
        return User.of(record)

    async def set_disabled(self, user_id: str, disabled: bool) -> User:
        return await self._change(user_id, lambda r: dataclasses.replace(r, disabled=disabled))

    async def set_password(self, user_id: str, password: str) -> User:
        _check_password(password)
        password_hash = await self.passwords.hash(password)
        return await self._change(
            user_id, lambda r: dataclasses.replace(r, password_hash=password_hash)
        )

    async def change_groups(
        self, user_id: str, add: Iterable[str] = (), remove: Iterable[str] = ()
    ) -> User:
        added, removed = _checked_groups(add), set(remove)

        def change(record: UserRecord) -> UserRecord:
            groups = (set(record.groups) | added) - removed
            return dataclasses.replace(record, groups=tuple(sorted(groups)))

        return await self._change(user_id, change)

    async def delete(self, user_id: str) -> User:
        return await self.io.call(self._delete, user_id)

    def _delete(self, user_id: str) -> User:
        with self.store.exclusive():
            record = self._writable(user_id)
            self.store.remove_user(record.id)
        return User.of(record)

    async def _change(self, user_id: str, change: Callable[[UserRecord], UserRecord]) -> User:
        return await self.io.call(self._change_now, user_id, change)

    def _change_now(self, user_id: str, change: Callable[[UserRecord], UserRecord]) -> User:
        """On the store's thread: read, check and write in one transaction."""
        with self.store.exclusive():
            record = self._writable(user_id)
            changed = change(record)
            if changed != record:
                changed = dataclasses.replace(changed, updated_at=int(self.clock()))
                self.store.update_user(changed)
        return User.of(changed)

    def _writable(self, user_id: str) -> UserRecord:
        record = self.store.user(user_id)
        if record is None:
            raise UserNotFound(user_id)
        if record.source == "config":
            raise UserReadOnly(record.username)
        return record

    # -- sign-in -------------------------------------------------------------

    async def authenticate(self, username: str, password: str) -> SignInOutcome:
        """Check a username and password. The password is verified off the loop, and
        for a user that does not exist (or a disabled one) as for any other, so the
        time taken does not tell them apart. A stored hash with weaker parameters is
        replaced after a successful verification. Callers show one message for every
        refusal; the reason is for audit and metrics."""
        record = None
        if username_problem(username) is None:
            record = await self.io.call(self.store.user_by_key, username_key(username))
        if record is None:
            await self.passwords.verify_unknown(password)
            return Refused("bad_credentials", None)
        user = User.of(record)
        verified = await self.passwords.verify(record.password_hash, password)
        if not verified and needs_rehash(record.password_hash):
            # a weaker stored hash answers faster than an unknown user's: as slow as one
            await self.passwords.verify_unknown(password)
        if not verified:
            return Refused("bad_credentials", user)
        if record.disabled:
            return Refused("disabled", user)
        if needs_rehash(record.password_hash):
            new_hash = await self.passwords.hash(password)
            replaced = await self.io.call(
                self.store.replace_password_hash,
                record.id,
                record.password_hash,
                new_hash,
                int(self.clock()),
            )
            if replaced:
                log_event("users.password_rehashed", user_id=record.id)
                return Authenticated(user, rehashed=True)
        return Authenticated(user)

    # -- the config's users --------------------------------------------------

    def apply_config(self, declared: tuple[UserConfig, ...]) -> ConfigSync:
        """Make the store's config users those of ``declared``: create or update them
        (matched by username_key; their id never changes), delete config users it no
        longer declares, take over a command line user of the same username. Users
        made with the command line are otherwise never touched.

        Blocks until done (start and reload wait for it): reads and writes on the
        store's thread, hashing and verifying on the password threads. A stored hash
        that still matches a ``${ENV}`` password is kept, not made again."""
        current = {r.username_key: r for r in self.io.run(self.store.users)}
        env_users = [u for u in declared if u.password is not None]
        to_verify = [
            (u, current[u.username_key].password_hash)
            for u in env_users
            if u.username_key in current and not needs_rehash(current[u.username_key].password_hash)
        ]
        matched: dict[str, str] = {}  # username_key -> stored hash matching its password
        unconfirmed = []
        for u, stored in to_verify:
            assert u.password is not None
            if self._confirmed.get(stored) == u.password.fingerprint:
                matched[u.username_key] = stored
            else:
                unconfirmed.append((u, stored))
        checks = [functools.partial(_verify_env, stored, u.password) for u, stored in unconfirmed]
        for (u, stored), ok in zip(unconfirmed, self.passwords.run(checks), strict=True):
            if ok:
                matched[u.username_key] = stored
        need_hash = [u for u in env_users if u.username_key not in matched]
        made = self.passwords.run([functools.partial(_hash_env, u.password) for u in need_hash])
        fresh = {u.username_key: h for u, h in zip(need_hash, made, strict=True)}
        sync, env_hashes = self.io.run(
            self._write_config_users, declared, matched, fresh, int(self.clock())
        )
        fingerprints = {u.username_key: u.password.fingerprint for u in env_users if u.password}
        self._confirmed = {h: fingerprints[key] for key, h in env_hashes.items()}
        return sync

    def _write_config_users(
        self,
        declared: tuple[UserConfig, ...],
        matched: dict[str, str],
        fresh: dict[str, str],
        now: int,
    ) -> tuple[ConfigSync, dict[str, str]]:
        created, updated, deleted, adopted = [], [], [], []
        env_hashes: dict[str, str] = {}
        with self.store.exclusive():
            existing = {r.username_key: r for r in self.store.users()}
            for u in declared:
                record = existing.get(u.username_key)
                password_hash, declared_hash = _config_password(u, record, matched, fresh)
                if password_hash is None:  # changed meanwhile: the next reload sees it
                    continue
                if u.password is not None:
                    env_hashes[u.username_key] = password_hash
                if record is None:
                    self.store.add_user(
                        UserRecord(
                            id=new_user_id(),
                            username=u.username,
                            username_key=u.username_key,
                            password_hash=password_hash,
                            profile=u.profile,
                            groups=u.groups,
                            disabled=u.disabled,
                            source="config",
                            created_at=now,
                            updated_at=now,
                            declared_hash=declared_hash,
                        )
                    )
                    created.append(u.username)
                    continue
                new = dataclasses.replace(
                    record,
                    username=u.username,
                    password_hash=password_hash,
                    declared_hash=declared_hash,
                    profile=u.profile,
                    groups=u.groups,
                    disabled=u.disabled,
                    source="config",
                )
                if new == record:
                    continue
                self.store.update_user(dataclasses.replace(new, updated_at=now))
                if record.source != "config":
                    adopted.append((u.username, record.id))
                else:
                    updated.append(u.username)
            keys = {u.username_key for u in declared}
            for record in existing.values():
                if record.source == "config" and record.username_key not in keys:
                    self.store.remove_user(record.id)
                    deleted.append(record.username)
        sync = ConfigSync(tuple(created), tuple(updated), tuple(deleted), tuple(adopted))
        return sync, env_hashes


def _config_password(
    user: UserConfig,
    record: UserRecord | None,
    matched: dict[str, str],
    fresh: dict[str, str],
) -> tuple[str | None, str | None]:
    """(password_hash, declared_hash) to store for a config user."""
    if user.password_hash is not None:
        if (
            record is not None
            and record.source == "config"
            and record.declared_hash == user.password_hash
        ):
            return record.password_hash, record.declared_hash  # perhaps upgraded since
        return user.password_hash, user.password_hash
    key = user.username_key
    if key in fresh:
        return fresh[key], None
    if record is not None and record.password_hash == matched.get(key):
        return record.password_hash, None
    return None, None


def _verify_env(stored: str, password: EnvPassword) -> bool:
    return verify_password(stored, password.reveal())


def _hash_env(password: EnvPassword) -> str:
    return hash_password(password.reveal())


def check_new_user(username: str, profile: Mapping[str, Any], groups: Iterable[str]) -> None:
    """InvalidUser unless a user could have this username, profile and groups."""
    problem = username_problem(username)
    if problem is not None:
        raise InvalidUser(f"username: {problem}")
    for name, value in profile.items():
        problem = claim_problem(name, value)
        if problem is not None:
            raise InvalidUser(f"{name}: {problem}")
    _checked_groups(groups)


def _check_password(password: str) -> None:
    problem = password_problem(password)
    if problem is not None:
        raise InvalidUser(f"password: {problem}")


def _checked_groups(groups: Iterable[str]) -> set[str]:
    out = set()
    for name in groups:
        problem = group_problem(name)
        if problem is not None:
            raise InvalidUser(f"group {name!r}: {problem}")
        out.add(name)
    return out
