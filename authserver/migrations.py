"""Versioned schema migrations for both store backends.

Each backend has one ordered list; a store records the versions applied in
``schema_migrations``. :func:`migrate` applies the missing ones in order under the
store's lock, in one transaction, so replicas (or ``tokengate db migrate``) starting
together apply each exactly once. Migrations only ever add: a replica of the previous
release keeps working on a store migrated ahead of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from authserver.sqlstore import SqlStore
from authserver.store import MigrationResult


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    apply: Callable[[SqlStore], None]


def statements(*sql: str) -> Callable[[SqlStore], None]:
    def apply(store: SqlStore) -> None:
        for block in sql:
            for statement in block.split(";"):
                if statement.strip():
                    store._q(statement)

    return apply


def whole(*sql: str) -> Callable[[SqlStore], None]:
    """Statements run one each, as written (a function's body has semicolons)."""

    def apply(store: SqlStore) -> None:
        for statement in sql:
            store._q(statement)

    return apply


def migrate(
    store: SqlStore, migrations: Sequence[Migration], now: int | None = None
) -> MigrationResult:
    """Bring ``store`` up to the newest of ``migrations``."""
    now = int(time.time()) if now is None else now
    with store.exclusive():
        store._q(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)"
        )
        done = {row[0] for row in store._q("SELECT version FROM schema_migrations")}
        applied = []
        for migration in migrations:
            if migration.version in done:
                continue
            migration.apply(store)
            store._q(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, now),
            )
            applied.append(migration.version)
    versions = done | set(applied)
    return MigrationResult(
        applied=tuple(applied),
        version=max(versions, default=0),
        known=max((m.version for m in migrations), default=0),
    )


# --------------------------------------------------------------------------- SQLite

_SQLITE_BASE = """
CREATE TABLE IF NOT EXISTS signing_keys (
    server TEXT NOT NULL, kid TEXT NOT NULL, alg TEXT NOT NULL,
    created_at INTEGER NOT NULL, activate_at INTEGER NOT NULL,
    PRIMARY KEY (server, kid)
);
CREATE TABLE IF NOT EXISTS revoked_tokens (
    jti TEXT PRIMARY KEY, server TEXT NOT NULL, exp INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS revocation_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, jti TEXT NOT NULL, server TEXT NOT NULL,
    exp INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS revocation_log_exp ON revocation_log (exp);
CREATE TABLE IF NOT EXISTS used_assertions (
    client_id TEXT NOT NULL, jti TEXT NOT NULL, exp INTEGER NOT NULL,
    PRIMARY KEY (client_id, jti)
);
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY, username TEXT NOT NULL, username_key TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL, declared_hash TEXT, profile TEXT NOT NULL,
    disabled INTEGER NOT NULL, source TEXT NOT NULL,
    created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    session_hash TEXT PRIMARY KEY, sid TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL,
    auth_time INTEGER NOT NULL, created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
    idle_expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS interactions (
    cookie_hash TEXT PRIMARY KEY, server TEXT NOT NULL, params TEXT NOT NULL,
    csrf TEXT NOT NULL, expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS auth_codes (
    code_hash TEXT PRIMARY KEY, record TEXT NOT NULL, expires_at INTEGER NOT NULL,
    state TEXT NOT NULL, jtis TEXT NOT NULL, keep_until INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS grants (
    family TEXT PRIMARY KEY, record TEXT NOT NULL, session_id TEXT NOT NULL,
    user_id TEXT NOT NULL, offline INTEGER NOT NULL, revoked INTEGER NOT NULL,
    jtis TEXT NOT NULL, expires_at INTEGER NOT NULL, keep_until INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS grants_session ON grants (session_id);
CREATE INDEX IF NOT EXISTS grants_user ON grants (user_id);
CREATE TABLE IF NOT EXISTS grant_tokens (
    family TEXT NOT NULL, jti TEXT NOT NULL, exp INTEGER NOT NULL,
    PRIMARY KEY (family, jti)
);
CREATE TABLE IF NOT EXISTS refresh_tokens (
    token_hash TEXT PRIMARY KEY, family TEXT NOT NULL, state TEXT NOT NULL,
    idle_expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS refresh_tokens_family ON refresh_tokens (family);
CREATE TABLE IF NOT EXISTS consents (
    user_id TEXT NOT NULL, client_id TEXT NOT NULL, scope TEXT NOT NULL,
    granted_at INTEGER NOT NULL, PRIMARY KEY (user_id, client_id, scope)
);
CREATE TABLE IF NOT EXISTS user_groups (
    user_id TEXT NOT NULL REFERENCES users (id), name TEXT NOT NULL,
    PRIMARY KEY (user_id, name)
);
"""


def _sqlite_base(store: SqlStore) -> None:
    """The schema as it was before versions were recorded. Idempotent: a store from
    then gets what it lacks, and its data carried into the newer tables."""
    logged = store._q(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'revocation_log'"
    ).fetchone()
    statements(_SQLITE_BASE)(store)
    if logged is None:  # a store from before the feed: what it revoked joins it
        store._q(
            "INSERT INTO revocation_log (jti, server, exp) "
            "SELECT jti, server, exp FROM revoked_tokens ORDER BY exp"
        )
    # a store whose families listed their access tokens in grants.jtis (JSON)
    store._q(
        "INSERT OR IGNORE INTO grant_tokens (family, jti, exp) "
        "SELECT g.family, json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]') "
        "FROM grants g, json_each(g.jtis) j WHERE g.jtis != '[]'"
    )
    store._q("UPDATE grants SET jtis = '[]' WHERE jtis != '[]'")


_SECOND_FACTORS = """
CREATE TABLE user_totp (
    user_id TEXT PRIMARY KEY, secret {blob} NOT NULL, created_at {int} NOT NULL,
    confirmed_at {int}, last_step {int} NOT NULL DEFAULT 0
);
CREATE TABLE recovery_codes (
    user_id TEXT NOT NULL, code_hash TEXT NOT NULL, used_at {int},
    PRIMARY KEY (user_id, code_hash)
);
ALTER TABLE sessions ADD COLUMN amr TEXT NOT NULL DEFAULT '["pwd"]';
ALTER TABLE interactions ADD COLUMN progress TEXT
"""

_ATTEMPTS = """
ALTER TABLE user_totp ADD COLUMN attempts {int} NOT NULL DEFAULT 0;
ALTER TABLE user_totp ADD COLUMN window_start {int} NOT NULL DEFAULT 0
"""

_DEVICES = """
CREATE TABLE known_devices (
    device_hash TEXT NOT NULL, user_id TEXT NOT NULL, created_at {int} NOT NULL,
    last_seen {int} NOT NULL, PRIMARY KEY (device_hash, user_id)
)
"""

_PASSKEYS = """
CREATE TABLE passkeys (
    credential_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, public_key {blob} NOT NULL,
    sign_count {int} NOT NULL, backup_eligible INTEGER NOT NULL, transports TEXT NOT NULL,
    aaguid TEXT NOT NULL, created_at {int} NOT NULL, last_used_at {int}
);
CREATE INDEX passkeys_user ON passkeys (user_id)
"""

_FUNCTIONS = "a refresh and a new token family in one statement each"

SQLITE = (
    Migration(1, "base schema", _sqlite_base),
    Migration(
        2,
        "signing keys' private parts in the store",
        statements("ALTER TABLE signing_keys ADD COLUMN private_key BLOB"),
    ),
    Migration(
        3,
        "second factors: authenticator apps, recovery codes, how a session signed in",
        statements(_SECOND_FACTORS.format(blob="BLOB", int="INTEGER")),
    ),
    Migration(4, "remembered devices", statements(_DEVICES.format(int="INTEGER"))),
    Migration(5, "second-factor attempts", statements(_ATTEMPTS.format(int="INTEGER"))),
    Migration(6, "passkeys", statements(_PASSKEYS.format(blob="BLOB", int="INTEGER"))),
    Migration(7, _FUNCTIONS, lambda store: None),  # SQLite runs the store's code in-process
)

# --------------------------------------------------------------------------- PostgreSQL
# Times are BIGINT (seconds); seq columns are sequences. Every write that hands out a
# revocation_log seq holds the feed's lock to commit, so seqs commit in order and a
# feed cursor never skips a row committed late.

_POSTGRES_BASE = """
CREATE TABLE signing_keys (
    server TEXT NOT NULL, kid TEXT NOT NULL, alg TEXT NOT NULL,
    created_at BIGINT NOT NULL, activate_at BIGINT NOT NULL, seq BIGSERIAL NOT NULL,
    PRIMARY KEY (server, kid)
);
CREATE TABLE revoked_tokens (
    jti TEXT PRIMARY KEY, server TEXT NOT NULL, exp BIGINT NOT NULL
);
CREATE TABLE revocation_log (
    seq BIGSERIAL PRIMARY KEY, jti TEXT NOT NULL, server TEXT NOT NULL, exp BIGINT NOT NULL
);
CREATE INDEX revocation_log_exp ON revocation_log (exp);
CREATE TABLE used_assertions (
    client_id TEXT NOT NULL, jti TEXT NOT NULL, exp BIGINT NOT NULL,
    PRIMARY KEY (client_id, jti)
);
CREATE TABLE users (
    id TEXT PRIMARY KEY, username TEXT NOT NULL, username_key TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL, declared_hash TEXT, profile TEXT NOT NULL,
    disabled INTEGER NOT NULL, source TEXT NOT NULL,
    created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL
);
CREATE TABLE sessions (
    session_hash TEXT PRIMARY KEY, sid TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL,
    auth_time BIGINT NOT NULL, created_at BIGINT NOT NULL, expires_at BIGINT NOT NULL,
    idle_expires_at BIGINT NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id);
CREATE TABLE interactions (
    cookie_hash TEXT PRIMARY KEY, server TEXT NOT NULL, params TEXT NOT NULL,
    csrf TEXT NOT NULL, expires_at BIGINT NOT NULL
);
CREATE TABLE auth_codes (
    code_hash TEXT PRIMARY KEY, record TEXT NOT NULL, expires_at BIGINT NOT NULL,
    state TEXT NOT NULL, jtis TEXT NOT NULL, keep_until BIGINT NOT NULL
);
CREATE TABLE grants (
    family TEXT PRIMARY KEY, record TEXT NOT NULL, session_id TEXT NOT NULL,
    user_id TEXT NOT NULL, offline INTEGER NOT NULL, revoked INTEGER NOT NULL,
    jtis TEXT NOT NULL, expires_at BIGINT NOT NULL, keep_until BIGINT NOT NULL
);
CREATE INDEX grants_session ON grants (session_id);
CREATE INDEX grants_user ON grants (user_id);
CREATE TABLE grant_tokens (
    family TEXT NOT NULL, jti TEXT NOT NULL, exp BIGINT NOT NULL,
    PRIMARY KEY (family, jti)
);
CREATE TABLE refresh_tokens (
    token_hash TEXT PRIMARY KEY, family TEXT NOT NULL, state TEXT NOT NULL,
    idle_expires_at BIGINT NOT NULL
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family);
CREATE TABLE consents (
    user_id TEXT NOT NULL, client_id TEXT NOT NULL, scope TEXT NOT NULL,
    granted_at BIGINT NOT NULL, PRIMARY KEY (user_id, client_id, scope)
);
CREATE TABLE user_groups (
    user_id TEXT NOT NULL REFERENCES users (id), name TEXT NOT NULL,
    PRIMARY KEY (user_id, name)
)
"""

# PostgreSQL: the two writes every refresh and every code exchange make run server-side,
# one statement each instead of five to seven (each costs the driver more CPU than the
# server spends on it). They do what SqlStore.use_refresh and SqlStore.start_family
# do, in the same order and under the same row locks; the store's shared tests hold
# both backends to the same answers. READ COMMITTED: each statement in a function sees
# what committed before it began, so the token's row is read after its family's lock.
_USE_REFRESH = """
CREATE OR REPLACE FUNCTION tokengate_use_refresh(
    p_token TEXT, p_now BIGINT, p_successor TEXT, p_idle BIGINT, p_jti TEXT, p_exp BIGINT,
    OUT status TEXT, OUT record TEXT
) LANGUAGE plpgsql AS $$
DECLARE
    g grants%ROWTYPE;
    t refresh_tokens%ROWTYPE;
BEGIN
    UPDATE grants SET revoked = revoked
        WHERE family = (SELECT family FROM refresh_tokens WHERE token_hash = p_token)
        RETURNING * INTO g;
    IF NOT FOUND THEN
        RETURN;  -- no such token: status NULL
    END IF;
    IF g.revoked <> 0 THEN
        status := 'revoked';
    ELSE
        SELECT * INTO t FROM refresh_tokens WHERE token_hash = p_token;
        IF NOT FOUND THEN
            RETURN;  -- retired with its family since the statement above began
        ELSIF t.state <> 'active' THEN
            status := 'reused';  -- changing nothing: the caller revokes the family
        ELSIF t.idle_expires_at <= p_now OR g.expires_at <= p_now THEN
            status := 'expired';
        ELSE
            UPDATE refresh_tokens SET state = 'used' WHERE token_hash = p_token;
            INSERT INTO refresh_tokens (token_hash, family, state, idle_expires_at)
                VALUES (p_successor, g.family, 'active', LEAST(p_idle, g.expires_at));
            INSERT INTO grant_tokens (family, jti, exp) VALUES (g.family, p_jti, p_exp);
            IF p_exp > g.keep_until THEN
                UPDATE grants SET keep_until = p_exp WHERE family = g.family;
            END IF;
            status := 'ok';
        END IF;
    END IF;
    record := g.record;
END
$$
"""

_START_FAMILY = """
CREATE OR REPLACE FUNCTION tokengate_start_family(
    p_family TEXT, p_record TEXT, p_session TEXT, p_user TEXT, p_offline INTEGER,
    p_expires BIGINT, p_token TEXT, p_idle BIGINT, p_jti TEXT, p_exp BIGINT
) RETURNS BOOLEAN LANGUAGE plpgsql AS $$
DECLARE
    c auth_codes%ROWTYPE;
BEGIN
    UPDATE auth_codes SET state = state WHERE code_hash = p_family RETURNING * INTO c;
    IF FOUND THEN  -- a code's family: the code records its access token too
        IF c.state <> 'redeemed' THEN
            RETURN FALSE;
        END IF;
        UPDATE auth_codes
            SET jtis = (c.jtis::jsonb || to_jsonb(p_jti))::text,
                keep_until = GREATEST(c.keep_until, p_exp)
            WHERE code_hash = p_family;
    END IF;
    INSERT INTO grants (family, record, session_id, user_id, offline, revoked, jtis,
                        expires_at, keep_until)
        VALUES (p_family, p_record, p_session, p_user, p_offline, 0, '[]',
                p_expires, GREATEST(p_expires, p_exp));
    INSERT INTO grant_tokens (family, jti, exp) VALUES (p_family, p_jti, p_exp);
    INSERT INTO refresh_tokens (token_hash, family, state, idle_expires_at)
        VALUES (p_token, p_family, 'active', p_idle);
    RETURN TRUE;
END
$$
"""

POSTGRES = (
    Migration(1, "base schema", statements(_POSTGRES_BASE)),
    Migration(
        2,
        "signing keys' private parts in the store",
        statements("ALTER TABLE signing_keys ADD COLUMN private_key BYTEA"),
    ),
    Migration(
        3,
        "second factors: authenticator apps, recovery codes, how a session signed in",
        statements(_SECOND_FACTORS.format(blob="BYTEA", int="BIGINT")),
    ),
    Migration(4, "remembered devices", statements(_DEVICES.format(int="BIGINT"))),
    Migration(5, "second-factor attempts", statements(_ATTEMPTS.format(int="BIGINT"))),
    Migration(6, "passkeys", statements(_PASSKEYS.format(blob="BYTEA", int="BIGINT"))),
    Migration(7, _FUNCTIONS, whole(_USE_REFRESH, _START_FAMILY)),
)
