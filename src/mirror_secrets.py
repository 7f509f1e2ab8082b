"""What of a mirror URL and its options must never be shown (see mirror.py): the one redactor for every message
the trainer and the mirror print or write, and the list of secrets a message is scrubbed of."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote

SECRET_OPTIONS = ("secret", "password", "token", "account_key", "sas_token", "client_secret", "credential")


def split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """(url without user:secret@, user, secret). A secret may hold an unescaped '/', as AWS secret keys do."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url, None, None
    userinfo, at, host_path = rest.partition("@")
    user, colon, secret = userinfo.partition(":")
    if not at or "/" in user or (not colon and "/" in userinfo):
        return url, None, None
    return f"{scheme}://{host_path}", unquote(user), unquote(secret) if colon else None


def redact_url(url: str) -> str:
    """The URL as it may be shown or logged: without user:secret@ (a secret may hold '/', as AWS secret keys do) and
    without a query string (SAS tokens, signatures). The one redactor: the trainer uses it too."""
    clean = split_userinfo(url)[0]
    if "://" in clean and "?" in clean:
        clean = clean.partition("?")[0] + "?***"
    return clean


def secrets_in(url: str, options: dict[str, Any]) -> list[str]:
    """Every string a message must never show: the URL's user:secret and its query values, the AWS secret
    variables, secret storage options, and an access key id (not secret by itself, but nobody's business)."""
    clean_url, user, secret = split_userinfo(url)
    found = [secret, url.partition("://")[2].partition("@")[0] if user else None,
             os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_SESSION_TOKEN")]
    found += [str(v) for k, v in options.items() if k in SECRET_OPTIONS and v]
    if user and len(user) >= 8:
        found.append(user)
    query = clean_url.partition("?")[2] if "://" in clean_url else ""
    found += [v for _, _, v in (p.partition("=") for p in query.split("&"))]
    return [s for s in found if s and len(s) >= 3]
