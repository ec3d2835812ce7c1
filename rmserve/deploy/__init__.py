"""Deployment on engines other than a single process: Ray Serve (``rmserve.deploy.ray``)."""
