"""Test helpers for gg_jax (torch-free; safe to import without PyTorch)."""

from gg_jax.testing.reference_weights import (  # noqa: F401
    DEFAULT_LAYOUT_PATH,
    load_layout,
    make_state_dict,
)
