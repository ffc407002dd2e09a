"""The `qlora-lite` command: parses arguments and dispatches; the work lives in the modules."""

from __future__ import annotations

import sys

import click

from .errors import QloraError


class _Group(click.Group):
    """Turn our input errors into one clear line instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (QloraError, FileNotFoundError, FileExistsError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="qlora-lite")
def main():
    """QLoRA fine-tuning for one consumer GPU."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a recipe value.")
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in the run folder.")
@click.option("--demo", is_flag=True, help="Also show eval loss and a generation before vs after training.")
def run(recipe, overrides, resume, demo):
    """Fine-tune with RECIPE (a YAML file)."""
    from .recipe import load_recipe
    from .train import run_recipe

    sys.exit(run_recipe(load_recipe(recipe, overrides), resume=resume, demo=demo))


if __name__ == "__main__":
    main()
