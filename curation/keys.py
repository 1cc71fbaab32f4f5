"""Pseudonymous keys: keyed hashes of original identifiers.

Raw identifiers (PatientID, StudyInstanceUID, file names) must never reach an index or a shard,
yet the same patient must map to the same key across runs so that splits and caches are stable.
An HMAC with a secret does both: without the secret the key cannot be reversed by hashing
guesses. The secret comes from the environment variable `M3_CURATE_KEY`, else from the
manifest's `key`, else a public default that is fine for demo data only.
"""

from __future__ import annotations

import hashlib
import hmac
import os

ENV_VAR = "M3_CURATE_KEY"
DEFAULT_KEY = "m3-curate-public-demo-key"


def resolve_secret(manifest_key: str | None) -> str:
    """The secret in force: environment first, then the manifest, then the public default."""
    return os.environ.get(ENV_VAR) or manifest_key or DEFAULT_KEY


class Keyer:
    """Turns identifier parts into a 16-hex-digit keyed hash.

    >>> k = Keyer("secret")
    >>> k("patient", "12345") == k("patient", "12345") != k("patient", "12346")
    True
    >>> len(k("patient", "12345"))
    16
    """

    def __init__(self, secret: str):
        self.secret = secret  # passed on to the processes and tasks that scan in parallel
        self._keyed = hmac.new(secret.encode(), digestmod=hashlib.sha256)  # copied per call: the key is hashed once

    def __call__(self, *parts: object) -> str:
        h = self._keyed.copy()
        h.update("\x1f".join(str(p) for p in parts).encode("utf-8", "surrogateescape"))
        return h.hexdigest()[:16]

    def __getstate__(self) -> str:
        return self.secret

    def __setstate__(self, secret: str) -> None:
        self.__init__(secret)  # type: ignore[misc]
