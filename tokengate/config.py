"""The whole configuration file: sections parsed by their owners, validated once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from authserver.config import AuthServerConfig, parse_authserver
from tokengate.yamlconf import (
    ConfigError,
    ConfigErrors,
    Node,
    as_int,
    as_str,
    parse_yaml,
    root,
)

DEFAULT_PATH = Path("config/tokengate.yaml")
SECTIONS = ("version", "authserver", "audit")


@dataclass(frozen=True, slots=True)
class AuditConfig:
    path: str  # "-" is stdout; anything else a file, appended as JSON lines


@dataclass(frozen=True, slots=True)
class Config:
    authserver: AuthServerConfig | None
    audit: AuditConfig


def default_path(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(environ.get("TOKENGATE_CONFIG") or DEFAULT_PATH)


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate ``path``; raises :class:`ConfigErrors` listing every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigErrors([ConfigError(str(path), f"cannot read ({exc})")]) from None
    return parse_config(text, environ, source=str(path))


def parse_config(
    text: str, environ: Mapping[str, str] | None = None, *, source: str = "config"
) -> Config:
    top = root(parse_yaml(text, source), environ)
    if top.value is None:
        raise ConfigErrors([ConfigError(source, "is empty")])
    f = top.fields(optional=SECTIONS)
    f.get("version", _version, 1)
    authserver = f.get("authserver", parse_authserver, None)
    audit = f.get("audit", _audit, AuditConfig("-"))
    if top.is_mapping() and not f.has("authserver"):
        top.error("nothing to serve: add an authserver section")
    top.report.raise_if_any()
    return Config(authserver=authserver, audit=audit)


def _version(node: Node) -> int:
    if as_int(node) != 1:
        raise ConfigError(node.path, f"unsupported version {node.value!r}; this is version 1")
    return 1


def _audit(node: Node) -> AuditConfig:
    f = node.fields(optional=("path",))
    return AuditConfig(path=f.get("path", as_str, "-"))
