"""Joining a Ray cluster at an address (`--address` or `RAY_ADDRESS`), checked before Ray tries.

`ray.init(address=HOST:PORT)` waits without end where nothing listens at that address, waits
minutes where something that is not a Ray head answers (the dashboard's port, say), and prints
a warning a second for 20 s before a bare `ConnectionError` where the head wants a token this
shell does not send, or sends a wrong one. `ray start --head` turns token authentication on by
default, and an explicit address never turns it on in the driver: that takes
RAY_AUTH_MODE=token. So the address is asked first, with deadlines, the way Ray would ask it: a
TCP connection, then the head's GCS for its cluster id over gRPC, with the token Ray would
send. Each way it can fail has its own message saying what to do. Shared by the build and the fine-tune, which
must not depend on each other.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from curation.errors import CurationError
from curation.signals import stop_on_sigterm

CONNECT_TIMEOUT_S = 5.0
ANSWER_TIMEOUT_S = 10.0
TOKEN_HINT = ("set RAY_AUTH_MODE=token in this shell, with the cluster's token (`ray get-auth-token` on the head) in "
              "RAY_AUTH_TOKEN or ~/.ray/auth_token")
TOKEN_PLACES = "put the head's (`ray get-auth-token` there) in RAY_AUTH_TOKEN, ~/.ray/auth_token or the file RAY_AUTH_TOKEN_PATH names"


def cluster_address(address: str | None) -> str | None:
    """The address to join (`address`, else `RAY_ADDRESS`), checked; None for a Ray of our own.
    `auto`, `local` and Ray Client (`ray://`) addresses are left to Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        return None
    if address.startswith(("http://", "https://")):
        raise CurationError(
            f"Ray address {address!r} is the dashboard (jobs API) address: submit with "
            f"`ray job submit --address {address} --working-dir . -- python -m curation build MANIFEST`, "
            "or give `--address` the cluster's GCS address (HOST:6379)"
        )
    if address not in ("auto", "local") and not address.startswith("ray://"):
        check_head(address)
    return address


def join(address: str, **init: Any) -> None:
    """`ray.init(address=...)`, its `ConnectionError` (a token refused, a head gone meanwhile)
    as a message that says what to check; SIGTERM then stops the command as before
    (`curation.signals`)."""
    import ray

    try:
        ray.init(address=address, **init)
        stop_on_sigterm()
    except ray.exceptions.AuthenticationError as e:
        raise CurationError(f"could not join the Ray cluster at {address}: {e}") from None
    except ConnectionError as e:
        raise CurationError(f"could not join the Ray cluster at {address}: {e}. Is its head still running? "
                            f"If it uses token authentication, {TOKEN_HINT}") from None


def check_head(address: str, *, connect_s: float = CONNECT_TIMEOUT_S, answer_s: float = ANSWER_TIMEOUT_S) -> None:
    """Refuse `address` unless a Ray head's GCS answers there within the deadlines."""
    host, port = host_port(address)
    try:
        socket.create_connection((host, port), timeout=connect_s).close()
    except OSError as e:
        raise CurationError(
            f"no Ray cluster answers at {address} ({e.strerror or e}): start its head there with "
            f"`ray start --head --port={port}`, or give `--address` (or RAY_ADDRESS) the head's GCS address "
            "(HOST:6379 unless `ray start --head` had another --port)"
        ) from None
    _ask_cluster_id(address, f"{host}:{port}", answer_s)


def host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise CurationError(f"Ray address {address!r}: expected HOST:PORT (the head's GCS address, HOST:6379 by default), "
                            "`auto` or ray://HOST:PORT")
    return host.strip("[]"), int(port)


def _ask_cluster_id(address: str, target: str, answer_s: float) -> None:
    """The GCS's cluster id, asked as Ray would: with this shell's token when RAY_AUTH_MODE is
    `token`, else without one (a head with token authentication then answers UNAUTHENTICATED)."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    token_mode = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    metadata = _token_metadata() if token_mode else ()
    if token_mode and metadata == ():
        raise CurationError(f"RAY_AUTH_MODE=token, but this shell has no token to send to {address}: {TOKEN_PLACES}")
    with grpc.insecure_channel(target) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(gcs_service_pb2.GetClusterIdRequest(),
                                                                               timeout=answer_s, metadata=metadata or None)
            return
        except grpc.RpcError as e:
            code = e.code()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if metadata is None:  # token mode, and this Ray cannot say what it would send: Ray checks the token itself
            return
        if token_mode:
            raise CurationError(f"the Ray cluster at {address} refused this shell's token: {TOKEN_PLACES}")
        raise CurationError(f"the Ray cluster at {address} uses token authentication: {TOKEN_HINT}")
    said = f"no answer within {answer_s:g} s" if code == grpc.StatusCode.DEADLINE_EXCEEDED else f"gRPC: {code.name.lower()}"
    raise CurationError(
        f"{address} answers, but not as a Ray head's GCS ({said}): give `--address` "
        "the GCS port (6379 unless `ray start --head` had another --port); the dashboard's port (8265) takes "
        "`ray job submit`, not `--address`"
    )


def _token_metadata() -> tuple[tuple[str, str], ...] | None:
    """The token Ray would send (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) as
    gRPC metadata, () when there is none. Ray keeps its token loader in `ray._raylet`; where
    that is not there (another Ray) or fails, None: the token is left to Ray."""
    try:
        from ray._raylet import AuthenticationTokenLoader

        loader = AuthenticationTokenLoader.instance()
        if not loader.has_token(ignore_auth_mode=True):
            return ()
        return tuple(loader.get_token_for_http_header().items())
    except Exception:  # noqa: BLE001  (no loader, or one that fails: `join` reports what Ray says)
        return None
