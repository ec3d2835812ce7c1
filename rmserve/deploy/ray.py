"""rmserve as a Ray Serve application: each replica a whole rmserve server on one device.

A replica (``RewardModelReplica``) loads its models in its constructor, so Ray routes to it only once it can
score, then serves rmserve's own app (``create_app``: every route, its batcher, its metrics) as its ingress,
built in the replica by ``serve.ingress``'s late-bound factory. Ray Serve's proxy spreads requests over the
replicas; each replica batches what reaches it.

- ``build(args)`` is the application ``serve run`` and ``serve deploy`` import
  (``import_path: rmserve.deploy.ray:build``, deploy/ray/serve.yaml); ``args`` is a ``RayArgs``: the
  rmserve settings (the YAML config's keys) and the deployment's replicas and resources.
- ``rmserve serve-ray`` starts a local Ray instance and runs the application (``run``).

``max_ongoing_requests`` (Ray's default is 5) defaults to four full batches of single-input requests per
replica, so a replica's batcher still forms full batches; autoscaling targets one full batch waiting per
replica. A replica shutting down drains as ``rmserve serve`` does on SIGTERM (its lifespan closes the
batchers), within ``graceful_shutdown_timeout_s`` (``shutdown_timeout_s`` plus a margin).
"""

from __future__ import annotations

from typing import Any

import ray
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application

from rmserve.api.app import create_app
from rmserve.config import Settings
from rmserve.logs import configure_logging
from rmserve.scoring.loading import load_models


class RayArgs(BaseModel):
    """The application's arguments (``args`` in a Serve config).

    Attributes:
        settings: rmserve settings, as the YAML config's keys (``models``, ``max_batch_size``, ...); what
            they leave unset comes from each replica's ``RMSERVE_*`` environment, then the defaults.
        min_replicas, max_replicas: the autoscaling range (equal: a fixed number of replicas).
        num_gpus, num_cpus: what each replica reserves (one GPU per replica on GPU nodes).
        max_ongoing_requests: requests a replica takes at once (default: 4 x max_batch_size).
        target_ongoing_requests: autoscaling's target per replica (default: max_batch_size).
    """

    model_config = ConfigDict(extra="forbid")

    settings: dict[str, Any] = Field(default_factory=dict)
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    num_gpus: float = Field(0, ge=0)
    num_cpus: float = Field(1, ge=0)
    max_ongoing_requests: int | None = Field(None, ge=1)
    target_ongoing_requests: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> RayArgs:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas}); raise it."
            )
        for key in ("host", "port", "config"):
            if key in self.settings:
                raise ValueError(
                    f"settings.{key} has no meaning under Ray Serve: "
                    + (
                        "the proxy listens (http_options in the Serve config)"
                        if key != "config"
                        else "give the config's keys in settings"
                    )
                    + "; remove it."
                )
        return self


@serve.ingress()
class RewardModelReplica:
    """One rmserve server: loads the models (blocking the replica's start until they are loaded), then serves
    ``create_app`` over them."""

    def __init__(self, settings: dict[str, Any]) -> None:
        # what ``settings`` leave unset comes from this replica's RMSERVE_* environment
        self.settings = Settings(**settings)
        configure_logging(self.settings.log_level, self.settings.log_format)  # as rmserve serve does
        self.models, self.specs = load_models(self.settings)

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.settings, models=self.models, specs=self.specs)


def build(args: dict[str, Any]) -> Application:
    """The Ray Serve application for ``args`` (a ``RayArgs``'s fields).

    Raises:
        pydantic.ValidationError: ``args`` or its settings are invalid (the message names the field).
    """
    parsed = RayArgs.model_validate(args)
    settings = Settings(**parsed.settings)  # fail here, before any replica starts
    batch = settings.max_batch_size
    max_ongoing = parsed.max_ongoing_requests or 4 * batch
    target = parsed.target_ongoing_requests or float(min(batch, max_ongoing))
    scaling = None
    if parsed.max_replicas > parsed.min_replicas:
        scaling = {
            "min_replicas": parsed.min_replicas,
            "max_replicas": parsed.max_replicas,
            "target_ongoing_requests": target,
            "upscale_delay_s": 10.0,
            "downscale_delay_s": 300.0,
        }
    deployment = serve.deployment(
        name="rmserve",
        num_replicas=None if scaling else parsed.min_replicas,
        autoscaling_config=scaling,
        max_ongoing_requests=max_ongoing,
        ray_actor_options={"num_gpus": parsed.num_gpus, "num_cpus": parsed.num_cpus},
        graceful_shutdown_timeout_s=settings.shutdown_timeout_s + 10,
        graceful_shutdown_wait_loop_s=2.0,
        health_check_period_s=10.0,
    )(RewardModelReplica)
    return deployment.bind(parsed.settings)


def run(args: dict[str, Any], *, host: str, port: int) -> None:
    """Start a local Ray instance with Serve's proxy on ``host:port`` and run the application until
    interrupted."""
    ray.init()
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(args), name="rmserve", route_prefix="/", blocking=True)
