"""The ``rmserve demo`` commands: every demo builder and recipe is a subcommand of the one CLI."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from rmserve.cli import app, demo_app


def test_every_demo_builder_and_recipe_is_a_demo_subcommand():
    names = {command.name for command in demo_app.registered_commands}
    assert names == {"build", "build-moe", "build-dmoerm", "train-head", "train-heads"}
    for name in sorted(names):
        result = CliRunner().invoke(app, ["demo", name, "--help"])
        assert result.exit_code == 0, result.output


def test_trained_demos_without_their_data_file_say_which_file_they_need(tmp_path: Path):
    missing = tmp_path / "hh.jsonl.gz"
    for command in ("build-moe", "build-dmoerm"):
        result = CliRunner().invoke(
            app, ["demo", command, "--data", str(missing), "--cache-dir", str(tmp_path / "cache")]
        )
        assert result.exit_code == 2, command
        assert str(missing) in result.output


def test_recipes_need_no_module_entry_point():
    """The recipes are library code: no argparse mains beside the CLI."""
    recipes = Path(__file__).resolve().parents[2] / "rmserve" / "training" / "recipes"
    for file in recipes.glob("*.py"):
        text = file.read_text()
        assert "argparse" not in text and '__name__ == "__main__"' not in text, file.name
