"""Scope names of the trust policy: which scopes could apply to an image name, most specific first.

Role: pure string logic shared by the loader (``policy.model``: which scope of ``policy.json`` covers a
drop-in's scope) and the decision (``policy.trust``: which scope judges an image). Trust boundary: the names
come from image references and policy files; nothing here touches the system.
"""

from __future__ import annotations


def repository(ref: str) -> str:
    """``ref`` without its tag or digest."""
    repo = ref.split("@", 1)[0]
    last = repo.rsplit("/", 1)[-1]
    return repo[: len(repo) - len(last)] + last.split(":", 1)[0]


def candidate_scopes(reference: str) -> list[str]:
    """Scopes that could apply to an image name, most specific first (then the transport default ``""``).

    Matching is on path segments: ``example.com/etc`` covers ``example.com/etc/x`` but not ``example.com/etcd``.
    The order: the full reference (with its tag or digest), the repository, each parent path, the host, then
    ``*.domain`` wildcards. Every transport matches on the image's name (for local sources, the name it is
    stored under: a file path says nothing about what an image is). Given a scope instead of a name, the same
    list is the scope itself followed by every scope that covers all the names it covers.
    """
    repo = repository(reference)
    parts = repo.split("/")
    out = [reference, *("/".join(parts[:i]) for i in range(len(parts), 0, -1))]
    labels = parts[0].split(":", 1)[0].split(".")
    out += ["*." + ".".join(labels[i:]) for i in range(1, len(labels))]
    seen: list[str] = []
    for s in [*out, ""]:
        if s not in seen:
            seen.append(s)
    return seen
