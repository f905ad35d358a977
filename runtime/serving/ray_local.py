"""`jfexport serve --ray`: a local Ray instance running the Serve application until a signal."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("jfexport.serve")


def serve_on_ray(args: dict, host: str, port: int) -> int:
    """Run the app with args' replicas on Ray's proxy at host:port; SIGTERM/Ctrl-C shut it down, exit 0."""
    import ray
    from ray import serve

    from .ray_app import build_app

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)  # its routine lines (where it listens, stopping) whatever the CLI's -v
    # Ray's own traffic stays on the loopback interface unless the server listens beyond it.
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1" if host in ("127.0.0.1", "localhost") else None)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(args), name="janusflow", route_prefix="/")
        # After ray.init, which installs a SIGTERM handler of its own that exits at once.
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        log.info("Ray Serve: %s replica(s) on http://%s:%d", args.get("replicas", 1), host, port)
        while not stop.wait(0.5):  # a timed wait lets the signal handler run promptly
            pass
        log.info("stopping Ray Serve (replicas finish in-flight requests first)")
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0
