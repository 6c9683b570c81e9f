"""The installed tokengate's version (``tokengate --version``, ``tokengate_build_info``)."""

from __future__ import annotations

from importlib import metadata


def _installed() -> str:
    try:
        return metadata.version("tokengate")
    except metadata.PackageNotFoundError:  # run from a source tree never installed
        return "0+unknown"


VERSION = _installed()
