"""`python -m gg_jax.pretrained`: see `gg_jax.pretrained.command`."""

from gg_jax import cli
from gg_jax.pretrained.command import main

if __name__ == "__main__":
    cli.run_tool(main)
