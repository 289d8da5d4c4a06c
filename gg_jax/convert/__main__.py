"""`python -m gg_jax.convert`: see `gg_jax.convert.command`."""

from gg_jax import cli
from gg_jax.convert.command import main

if __name__ == "__main__":
    cli.run_tool(main)
