"""The whole configuration file: sections parsed by their owners, validated once."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from authserver.config import (
    AuthServerConfig,
    deprecated_grant_warnings,
    parse_authserver,
    templates_dir_problem,
)
from gateway.config import GatewayConfig, parse_gateway
from gateway.routing import shadow_warnings
from tokengate.limits import ADMIN_LIMITS, Limits, as_limits
from tokengate.portal.config import PortalConfig, parse_portal
from tokengate.ratelimit import as_redis_url
from tokengate.yamlconf import (
    UNEXPECTED,
    ConfigError,
    ConfigErrors,
    Listen,
    Node,
    as_bool,
    as_int,
    as_listen,
    as_str,
    parse_yaml,
    root,
)

DEFAULT_PATH = Path("config/tokengate.yaml")
SECTIONS = ("version", "authserver", "gateway", "admin", "echo", "portal", "audit", "redis")


@dataclass(frozen=True, slots=True)
class AuditConfig:
    path: str  # "-" is stdout; anything else a file, appended as JSON lines
    required: bool = False  # True: /readyz answers 503 while audit lines are being lost


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Listen  # /healthz, /readyz, /metrics
    limits: Limits = ADMIN_LIMITS


@dataclass(frozen=True, slots=True)
class EchoConfig:
    listen: Listen  # the built-in echo upstream (tokengate.echo)


@dataclass(frozen=True, slots=True)
class Config:
    authserver: AuthServerConfig | None
    gateway: GatewayConfig | None
    admin: AdminConfig | None
    echo: EchoConfig | None
    audit: AuditConfig
    portal: PortalConfig | None = None  # the demo web portal (tokengate.portal)
    redis: str | None = None  # redis:// URL: rate limits shared by every process and replica

    @property
    def warnings(self) -> tuple[str, ...]:
        """What is valid but surely not meant, or unwise: routes that earlier ones
        shadow, and clients using grants RFC 9700 deprecates."""
        routes = shadow_warnings(self.gateway.routes) if self.gateway is not None else ()
        grants = deprecated_grant_warnings(self.authserver) if self.authserver is not None else ()
        return (*grants, *routes)


def default_path(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(environ.get("TOKENGATE_CONFIG") or DEFAULT_PATH)


def load_config(
    path: Path, environ: Mapping[str, str] | None = None, *, check_files: bool = False
) -> Config:
    """Read and validate ``path``; raises :class:`ConfigErrors` listing every problem.

    Relative file paths in it (``authserver.data_dir``, ``audit.path``) are relative to
    the file's directory, whatever the working directory: ``tokengate keys`` run from
    elsewhere finds the store the server uses. That directory is the one ``path`` names,
    with the directory's own symlinks resolved, but not the file's: a Kubernetes
    ConfigMap's file links into a directory that changes with every update.

    ``check_files``: also what ``tokengate run`` would refuse to start with, an audit
    file it cannot open for appending (``run`` and ``check`` ask for it)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigErrors([ConfigError(str(path), f"cannot read ({exc})")]) from None
    return parse_config(
        text,
        environ,
        source=str(path),
        check_files=check_files,
        # the directory's own symlinks resolved (as the kernel resolves "link/.."),
        # not the file's: a ConfigMap's file links into a directory that changes
        base_dir=Path(os.path.realpath(path.absolute().parent)),
    )


def parse_config(
    text: str,
    environ: Mapping[str, str] | None = None,
    *,
    source: str = "config",
    check_files: bool = False,
    base_dir: Path | None = None,
) -> Config:
    """Validate a config's text: :class:`ConfigErrors` listing every problem, never any
    other exception (``tokengate check`` and hot reload rely on it).

    ``base_dir``: what relative file paths in it are relative to (the config file's
    directory); None leaves them relative to the working directory."""
    try:
        return _parse_config(text, environ, source, check_files, base_dir)
    except ConfigErrors:
        raise
    except RecursionError:  # not expected: parse_yaml bounds nesting
        raise ConfigErrors([ConfigError(source, "is nested too deeply")]) from None
    except Exception as exc:  # config can never crash anything
        error = ConfigError(source, f"{UNEXPECTED} ({type(exc).__name__})")
        raise ConfigErrors([error]) from None


def _parse_config(
    text: str,
    environ: Mapping[str, str] | None,
    source: str,
    check_files: bool,
    base_dir: Path | None,
) -> Config:
    top = root(parse_yaml(text, source), environ)
    if top.value is None:
        raise ConfigErrors([ConfigError(source, "is empty")])
    f = top.fields(optional=SECTIONS)
    f.get("version", _version, 1)
    authserver = f.get("authserver", parse_authserver, None)
    gateway = f.get("gateway", parse_gateway, None)
    admin = f.get("admin", _admin, None)
    echo = f.get("echo", _echo, None)
    portal = f.get("portal", parse_portal, None)
    audit = f.get("audit", _audit, AuditConfig("-"))
    redis = f.get("redis", as_redis_url, None)
    if base_dir is not None:
        authserver, audit = _relative_to(base_dir, authserver, audit)
    if check_files and audit is not None:
        problem = audit_path_problem(audit.path)
        if problem is not None:
            top.report.add("audit.path", problem)
    data_dir = authserver.data_dir if authserver is not None else None
    if check_files and data_dir is not None and data_dir.exists() and not data_dir.is_dir():
        top.report.add("authserver.data_dir", f"{data_dir} is not a directory")
    templates = authserver.sign_in.templates_dir if authserver is not None else None
    if check_files and templates is not None:
        problem = templates_dir_problem(templates)
        if problem is not None:
            top.report.add("authserver.sign_in.templates_dir", problem)
    served = ("authserver", "gateway", "echo", "portal")
    if top.is_mapping() and not any(f.has(s) for s in served):
        top.error("nothing to serve: add an authserver, gateway, echo or portal section")
    listens = [
        (n, c.listen)
        for n, c in (
            ("authserver", authserver),
            ("gateway", gateway),
            ("echo", echo),
            ("portal", portal),
        )
        if c and c.listen is not None  # None: its problem is reported already
    ]
    for i, (name, listen) in enumerate(listens):
        for other, earlier in listens[:i]:
            if listen == earlier and listen.port != 0:
                top.report.add(f"{name}.listen", f"{listen} is also {other}.listen")
    top.report.raise_if_any()
    return Config(
        authserver=authserver,
        gateway=gateway,
        admin=admin,
        echo=echo,
        audit=audit,
        portal=portal,
        redis=redis,
    )


def _relative_to(
    base_dir: Path, authserver: AuthServerConfig | None, audit: AuditConfig | None
) -> tuple[AuthServerConfig | None, AuditConfig | None]:
    """Every file path the config holds, relative ones made relative to ``base_dir``.

    Absolute paths are kept as they are, and so is ``audit.path: "-"`` (stdout). A
    new file path in the config belongs here too."""
    if authserver is not None and not authserver.data_dir.is_absolute():
        authserver = dataclasses.replace(authserver, data_dir=base_dir / authserver.data_dir)
    templates = authserver.sign_in.templates_dir if authserver is not None else None
    if authserver is not None and templates is not None and not templates.is_absolute():
        sign_in = dataclasses.replace(authserver.sign_in, templates_dir=base_dir / templates)
        authserver = dataclasses.replace(authserver, sign_in=sign_in)
    if audit is not None and audit.path not in (None, "-") and not Path(audit.path).is_absolute():
        audit = dataclasses.replace(audit, path=str(base_dir / audit.path))
    return authserver, audit


def _version(node: Node) -> int:
    if as_int(node) != 1:
        raise ConfigError(node.path, f"unsupported version {node.value!r}; this is version 1")
    return 1


def _admin(node: Node) -> AdminConfig:
    f = node.fields(required=("listen",), optional=("limits",))
    return AdminConfig(
        listen=f.get("listen", as_listen),
        limits=f.get("limits", lambda n: as_limits(n, ADMIN_LIMITS), ADMIN_LIMITS),
    )


def _echo(node: Node) -> EchoConfig:
    f = node.fields(required=("listen",))
    return EchoConfig(listen=f.get("listen", as_listen))


def _audit(node: Node) -> AuditConfig:
    f = node.fields(optional=("path", "required"))
    return AuditConfig(path=f.get("path", as_str, "-"), required=f.get("required", as_bool, False))


def audit_path_problem(path: str) -> str | None:
    """Why ``tokengate run`` could not open ``path`` for appending audit lines, if so."""
    if path == "-":
        return None
    target = Path(path)
    try:
        if target.is_dir():
            return f"{path} is a directory"
        if target.exists():
            return None if os.access(target, os.W_OK) else f"file {path} is not writable"
        parent = target.parent
        if not parent.is_dir():
            return f"directory {parent} does not exist"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"directory {parent} is not writable"
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte
        return f"cannot be used ({exc})"
    return None
