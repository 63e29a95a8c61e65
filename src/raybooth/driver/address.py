"""Is a Ray cluster there? Before attaching to one by --address or RAY_ADDRESS, its address is
tried with one TCP connection: ray.init would retry a cluster that is not there for more than 10
minutes, printing nothing."""

from __future__ import annotations

import socket

from raybooth.errors import RayboothError

REACH_TIMEOUT_S = 5.0  # for a cluster's address to answer a TCP connection


def check_reachable(target: str, named_by: str) -> bool:
    """Fail in seconds, in one line, where no cluster answers at `target` (from --address or
    RAY_ADDRESS): ray.init would retry the GCS for more than 10 minutes, printing nothing; a TCP
    connection is all that is tried. True where a loopback address answers as written but not as
    Ray makes it (the machine's own address): a Ray on loopback alone, as raybooth's own is."""
    from ray._common.network_utils import is_localhost, parse_address
    from ray._private import services

    local = f"or {'drop --address' if named_by == '--address' else 'unset RAY_ADDRESS'} for a Ray raybooth starts here"
    client = target.startswith("ray://")
    try:  # Ray Client's server, or the GCS ("auto" looked up as Ray looks it up), as ray.init connects
        written = (target.removeprefix("ray://").split("/")[0] if client else
                   services.get_ray_address_from_environment(target, None) if target == "auto" else target)
        address = written if client else services.canonicalize_bootstrap_address(written)
    except ConnectionError:  # "auto", with no Ray on this machine
        raise RayboothError(f"no Ray cluster runs on this machine for {named_by}={target}: start one "
                            f"(ray start --head), {local}") from None
    except ValueError:  # not an address Ray reads: ray.init says so
        return False
    host_port = address and "://" not in address and parse_address(address)
    if not host_port or not host_port[1].isdigit() or (error := refused(*host_port)) is None:
        return False
    if (as_written := parse_address(written)) != host_port and is_localhost(as_written[0]) and not refused(*as_written):
        return True
    tried = "" if address in target else f" at {address}"
    reason = (error.strerror or str(error) or type(error).__name__).lower()
    raise RayboothError(f"no Ray cluster answers at {target}, from {named_by} ({reason}{tried}): start it, {local}")


def refused(host: str, port: str) -> OSError | None:
    """Why a TCP connection to host:port fails, if it does."""
    try:
        socket.create_connection((host, int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as error:
        return error
    return None
