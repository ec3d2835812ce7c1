"""The Ray Serve application's arguments and the shipped Serve config (deploy/ray/serve.yaml), offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema
from typer.testing import CliRunner

from rmserve.cli import app
from rmserve.deploy.ray import RayArgs, build

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_serve_config_is_valid_and_builds():
    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy/ray/serve.yaml").read_text()))
    (application,) = config.applications
    assert application.import_path == "rmserve.deploy.ray:build"
    args = RayArgs.model_validate(application.args)
    assert args.num_gpus == 1 and args.max_replicas > args.min_replicas
    deployment = build(application.args)._bound_deployment  # nothing started
    assert deployment.max_ongoing_requests == 4 * 64  # four full batches of single-input requests
    assert deployment._deployment_config.autoscaling_config.target_ongoing_requests == 64


def test_a_fixed_number_of_replicas_has_no_autoscaling():
    deployment = build(
        {"min_replicas": 3, "max_replicas": 3, "settings": {"max_batch_size": 8}}
    )._bound_deployment
    assert deployment.num_replicas == 3 and deployment._deployment_config.autoscaling_config is None
    assert deployment.max_ongoing_requests == 32


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"min_replicas": 2, "max_replicas": 1}, "max_replicas"),
        ({"settings": {"port": 9000}}, "settings.port"),
        ({"settings": {"config": "x.yaml"}}, "settings.config"),
        ({"replicas": 2}, "replicas"),
        ({"settings": {"max_batch_size": 0}}, "max_batch_size"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(args, message):
    with pytest.raises((ValidationError, ValueError), match=message):
        build(args)


def test_serve_ray_refuses_bad_arguments_before_starting_ray(tmp_path):
    result = CliRunner().invoke(app, ["serve-ray", "--replicas", "2", "--max-replicas", "1"])
    assert result.exit_code == 2 and "max_replicas (1) is below min_replicas (2)" in result.output
    config = tmp_path / "c.yaml"
    config.write_text("port: 9000\n")
    result = CliRunner().invoke(app, ["serve-ray", "--config", str(config)])
    assert result.exit_code == 2 and "settings.port has no meaning under Ray Serve" in result.output
