"""``python -m rmserve``: the same as the ``rmserve`` console script."""

from rmserve.cli import app

app()
