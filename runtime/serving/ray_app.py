"""The Ray Serve application: replicas that each hold one runtime, behind Ray's HTTP proxy.

    serve run jfexport.runtime.serving.ray_app:build_app engines=engines/default replicas=2

or in a `serve deploy` config file:

    applications:
      - name: janusflow
        route_prefix: /
        import_path: jfexport.runtime.serving.ray_app:build_app
        args: {engines: /models/janusflow-engines, num_gpus: 1}
        deployments:
          - name: JanusFlow
            autoscaling_config: {min_replicas: 1, max_replicas: 8, target_ongoing_requests: 16}

Each replica serves the same OpenAI routes as `jfexport serve`; Ray's proxy spreads requests
over the replicas and replaces one that dies or fails its health check.
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve
from ray.serve.config import BackpressureConfig

from jfexport import defaults

from .app import build_app as build_asgi_app
from .loading import load_runtime
from .settings import SETTINGS_OPTIONS, ServeSettings, at_least_zero, positive_int

DEPLOYMENT = "JanusFlow"


@serve.deployment(name=DEPLOYMENT, health_check_period_s=5, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=defaults.GRACE_S)
@serve.ingress()
class JanusFlowDeployment:
    def __init__(self, engines: str, settings: ServeSettings = ServeSettings()):
        self.runtime = load_runtime(engines, settings)
        replica = serve.get_replica_context().replica_id.unique_id
        self._asgi_app_built = build_asgi_app(self.runtime, settings, replica_id=f"{replica}:{os.getpid()}")

    def __serve_build_asgi_app__(self):
        return self._asgi_app_built

    def check_health(self) -> None:
        """Ray restarts a replica whose scheduler no longer answers."""
        self.runtime.stats()

    def __del__(self):
        if hasattr(self, "runtime"):  # absent when loading failed
            self.runtime.close()


def _gpus(value: Any) -> float:
    if value not in (None, "auto"):
        return at_least_zero("num_gpus", value)
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


APP_ARGS = frozenset({"engines", "replicas", "num_cpus", "num_gpus"})


def build_app(args: dict[str, Any]) -> serve.Application:
    """The app builder of `serve run` / `serve deploy`.

    args: engines (folder, required), replicas (default 1; a config file's autoscaling_config
    replaces it), num_gpus ("auto": 1 per replica when this machine has a CUDA GPU), num_cpus
    (per replica, default 1), and the settings of `ServeSettings.from_options`: backend,
    precision, max_queue, api_key (default: the JFEXPORT_API_KEY environment variable), model
    (the model id), request_timeout (seconds), max_body_mb, max_image_mb, grace (seconds a
    stopping replica gives its in-flight requests). A setting out of range, or an argument not listed
    here, refuses to start, naming it.
    """
    if not args.get("engines"):
        raise ValueError("the Ray Serve app needs engines=DIR (a `jfexport build` folder)")
    unknown = sorted(set(args) - APP_ARGS - SETTINGS_OPTIONS)
    if unknown:  # a misspelt option (max_queu) would otherwise be dropped without a word
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; the app takes "
                         f"{', '.join(sorted(APP_ARGS | SETTINGS_OPTIONS))}")
    actor_options: dict[str, Any] = {"num_cpus": at_least_zero("num_cpus", args.get("num_cpus", 1))}
    if gpus := _gpus(args.get("num_gpus")):
        actor_options["num_gpus"] = gpus
    settings = ServeSettings.from_options({"api_key": os.environ.get("JFEXPORT_API_KEY"), **args})
    # serve.deployment made the class a Deployment; Ray's stubs still type it as the class.
    # Bounded at both ends, as `jfexport serve` is: a replica takes max_queue requests at once (past
    # its scheduler's queue, that scheduler answers 429), and each proxy holds at most max_queue more
    # waiting for a replica, answering 429 with Retry-After past them (Ray's default queues without end).
    deployment = JanusFlowDeployment.options(  # type: ignore[attr-defined]
        num_replicas=positive_int("replicas", args.get("replicas", 1)), ray_actor_options=actor_options,
        graceful_shutdown_timeout_s=settings.grace, max_ongoing_requests=settings.max_queue,
        max_queued_requests=settings.max_queue, backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1))
    return deployment.bind(str(args["engines"]), settings)
