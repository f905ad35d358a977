"""`jfexport serve --ray`: a local Ray instance running the Serve application until a signal."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import threading
from pathlib import Path

from .settings import ServeSettings

log = logging.getLogger("jfexport.serve")

APP = "janusflow"


def _descendants(root: int) -> set[int]:
    """`root` and every process below it (Ray's GCS, raylet, workers and replicas), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # the process ended meanwhile
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def _listening(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket the processes listen on beyond the loopback."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    exposed = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(raw)
            if not address.is_loopback:
                try:
                    name = Path(f"/proc/{inodes[fields[9]]}/comm").read_text().strip()
                except OSError:
                    name = "?"
                exposed.append((str(address), int(hex_port, 16), name))
    return sorted(set(exposed))


def report_exposed_ports(host: str) -> list[tuple[str, int, str]]:
    """Log, as a warning, every port of this Ray instance listening beyond the loopback when `host` is local.

    Ray binds its control ports (GCS, raylet, object manager, workers, dashboard agent) on all
    interfaces whatever address it is told to advertise: no option keeps them on 127.0.0.1.
    """
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: what it resolves to is the operator's choice
        local = False
    if not local or not Path("/proc/net/tcp").exists():
        return []
    exposed = _listening(_descendants(os.getpid()))
    if exposed:
        log.warning("Ray listens beyond 127.0.0.1 on %d port(s), although --host is %s: %s. Ray has no option to "
                    "bind them to the loopback: firewall them, or run on a host no one else can reach",
                    len(exposed), host, ", ".join(f"{a}:{p} ({n})" for a, p, n in exposed))
    return exposed


def serve_on_ray(args: dict, host: str, port: int) -> int:
    """Run the app with args' replicas on Ray's proxy at host:port; SIGTERM/Ctrl-C shut it down, exit 0.

    On a signal the application is deleted first, with the proxy still up: each replica stops
    taking requests and finishes those in flight (up to args' grace) before it stops, and only then
    is the proxy shut down (shutting Serve down at once would cut the connections it holds).
    """
    import ray
    from ray import serve

    from .ray_app import build_app

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)  # its routine lines (where it listens, stopping) whatever the CLI's -v
    # Ray's own traffic stays on the loopback interface unless the server listens beyond it.
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1" if host in ("127.0.0.1", "localhost") else None)
    # Right after ray.init, which installs a SIGTERM handler of its own that exits at once (leaving Ray's
    # agents behind), and before the deployment, which takes seconds: a signal meanwhile stops it as
    # one after it does, once serve.run returns.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(args), name=APP, route_prefix="/")
        log.info("Ray Serve: %s replica(s) on http://%s:%d", args.get("replicas", 1), host, port)
        report_exposed_ports(host)
        while not stop.wait(0.5):  # a timed wait lets the signal handler run promptly
            pass
        log.info("stopping Ray Serve: replicas finish their in-flight requests (up to %g s), then the proxy stops",
                 ServeSettings.from_options(args).grace)
        serve.delete(APP, _blocking=True)
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0
