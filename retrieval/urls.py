"""URL helpers shared by the jobs and the service."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

# Where the jobs (`build-index`, `index rollback`, `features push`) find the Redis URL when
# no flag gives it: the service's own variables, so one environment serves them all.
REDIS_URL_ENV = "RETRIEVAL_REDIS_URL"
REDIS_URL_FILE_ENV = "RETRIEVAL_REDIS_URL_FILE"


def redact_url(url: str) -> str:
    """`url` without its password, for logs and error messages.

    >>> redact_url("redis://user:secret@host:6379/0")
    'redis://user:***@host:6379/0'
    >>> redact_url("redis://127.0.0.1:6379/0")
    'redis://127.0.0.1:6379/0'
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def read_url_file(path: str | Path) -> str:
    """The URL held by the file at `path` (e.g. a Docker secret), surrounding space removed.

    Raises:
        ValueError: the file cannot be read or is empty (its content is never quoted).
    """
    try:
        url = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"the Redis URL file {str(path)!r} cannot be read ({type(exc).__name__})"
        ) from None
    if not url:
        raise ValueError(f"the Redis URL file {str(path)!r} is empty")
    return url


def resolve_redis_url(
    url: str | None, url_file: str | Path | None, environ: Mapping[str, str] | None = None
) -> str | None:
    """A job's Redis URL: `url` or the content of `url_file` (the flags), else the
    `RETRIEVAL_REDIS_URL` / `RETRIEVAL_REDIS_URL_FILE` variables, else None.

    A URL given as a flag shows in every process listing, password included; the variable
    or the file keeps it out of them.

    >>> resolve_redis_url(None, None, {"RETRIEVAL_REDIS_URL": "redis://h:6379/0"})
    'redis://h:6379/0'
    >>> resolve_redis_url("redis://flag:6379/0", None, {"RETRIEVAL_REDIS_URL": "redis://h/0"})
    'redis://flag:6379/0'
    >>> resolve_redis_url(None, None, {}) is None
    True

    Raises:
        ValueError: both a URL and a file are given at the same level, or the file cannot
            be read or is empty.
    """
    if url and url_file:
        raise ValueError("give the Redis URL or a file holding it, not both")
    if url:
        return url
    if url_file:
        return read_url_file(url_file)
    env = os.environ if environ is None else environ
    from_env, file_from_env = env.get(REDIS_URL_ENV), env.get(REDIS_URL_FILE_ENV)
    if from_env and file_from_env:
        raise ValueError(f"set {REDIS_URL_ENV} or {REDIS_URL_FILE_ENV}, not both")
    if from_env:
        return from_env
    if file_from_env:
        return read_url_file(file_from_env)
    return None


def add_redis_url_arguments(parser: argparse.ArgumentParser, help_url: str) -> None:
    """A CLI's `--redis-url` and `--redis-url-file`, one or the other (read them with
    `resolve_redis_url`, which falls back to the variables)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--redis-url",
        help=f"{help_url} (default: {REDIS_URL_ENV}); a password here shows in process "
        "listings: prefer the variable or --redis-url-file",
    )
    group.add_argument(
        "--redis-url-file",
        type=Path,
        help=f"a file holding that Redis URL, e.g. a Docker secret (default: {REDIS_URL_FILE_ENV})",
    )
