"""What the mirror says (see mirror.py): the one redactor for every message the trainer and the mirror print or
write, the secrets of a URL and its options that a message is scrubbed of, and each failure as one line that says
what to do."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote


class MirrorError(Exception):
    """A mirror that cannot be used: one line that says what to do (bad URL, no bucket, no permission)."""


def one_line(e: BaseException) -> str:
    """An exception as one short line: its type and message."""
    text = " ".join(str(e).split()) or "no message"
    return f"{type(e).__name__}: {text[:300]}"


def what_to_do(e: BaseException, local: bool) -> str:
    """The fix for a failed request to the mirror (local: a folder, not an object store)."""
    text = f"{type(e).__name__} {e}".lower()
    if local and isinstance(e, PermissionError):
        return "no permission: fix the folder's permissions, or choose another --mirror"
    if isinstance(e, PermissionError) or "accessdenied" in text or "access denied" in text \
            or "invalidaccesskeyid" in text or "signaturedoesnotmatch" in text or "forbidden" in text:
        return ("no permission: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws) and "
                "that they may list, write and delete under this prefix")
    if "nocredentials" in text or "unable to locate credentials" in text:
        return "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or configure ~/.aws"
    if isinstance(e, FileNotFoundError) or "nosuchbucket" in text or "does not exist" in text:
        return "the bucket (or folder) does not exist: create it, or fix --mirror"
    return "the mirror is unreachable or refused the request: check the URL, AWS_ENDPOINT_URL and the network"


SECRET_OPTIONS = ("secret", "password", "token", "account_key", "sas_token", "client_secret", "credential")


def userinfo_end(rest: str) -> int | None:
    """In a URL's text after '://', the index of the '@' that ends user[:secret], or None if it has none. Read from the
    right: a password may hold '@' (s3://KEY:p@ss@bucket/p), and an AWS secret '/' and '+', so the userinfo ends at
    the LAST '@' whose left part is a user (no '/') with a secret, or a user alone without '/'. (A path that holds '@'
    as well as credentials in the URL is ambiguous: it is then read as part of the secret, so the host is wrong and
    the check at start fails, but nothing of the secret is ever shown. Percent-encode such an '@' as %40.)"""
    for at in reversed([i for i, c in enumerate(rest) if c == "@"]):
        user, colon, _ = rest[:at].partition(":")
        if user and "/" not in user and (colon or "/" not in rest[:at]):
            return at
    return None


def split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """(url without user:secret@, user, secret), the user and secret percent-decoded (%40 is '@')."""
    scheme, sep, rest = url.partition("://")
    at = userinfo_end(rest) if sep else None
    if at is None:
        return url, None, None
    user, colon, secret = rest[:at].partition(":")
    return f"{scheme}://{rest[at + 1:]}", unquote(user), unquote(secret) if colon else None


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
    rest = url.partition("://")[2]
    raw = rest[:userinfo_end(rest)] if user else ""  # user:secret as written (percent-encoded, maybe)
    found = [secret, raw, raw.partition(":")[2], os.environ.get("AWS_SECRET_ACCESS_KEY"),
             os.environ.get("AWS_SESSION_TOKEN")]
    found += [str(v) for k, v in options.items() if k in SECRET_OPTIONS and v]
    if user and len(user) >= 8:
        found.append(user)
    query = clean_url.partition("?")[2] if "://" in clean_url else ""
    found += [v for _, _, v in (p.partition("=") for p in query.split("&"))]
    return [s for s in found if s and len(s) >= 3]
