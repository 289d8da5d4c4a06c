"""gg_jax: 3G-Net (Deep Global Generalized Gaussian Networks, CVPR 2019) in JAX/Flax.

`gg_jax.linalg`: pure matrix functions (covariance, Newton-Schulz square root, ...).
`gg_jax.layers`: Flax linen heads (the 3G layer and the global pooling baselines).
`gg_jax.nnx`: the same heads as Flax NNX modules.
`gg_jax.models`: ResNet 3G-Nets and baselines by name (`gg_jax.models.create`).
`gg_jax.export`: a trained model as a serialized `jax.export` artifact (`python -m gg_jax.export`).
"""

__version__ = "0.1.0"
