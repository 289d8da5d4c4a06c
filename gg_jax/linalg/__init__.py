"""Pure matrix functions behind global covariance pooling and 3G-Net.

Every function here takes batched arrays (`[..., N, C]` features or `[..., C, C]`
matrices) and computes in float32 whatever the input dtype: narrower inputs (bf16,
float16) are upcast; float64 input (with `jax_enable_x64`) stays float64, so the
functions can be checked against float64 references and with
`jax.test_util.check_grads`. All functions are `jit`/`vmap`/`grad` friendly.

Every function that multiplies matrices takes `matmul_precision`, the algorithm of its
float32 products (forward and backward), one of `MATMUL_PRECISIONS`:

  "highest"  `jax.lax.Precision.HIGHEST`: float32 products (on TPUs: 6 bf16 passes);
  "bf16_6x"  `DotAlgorithmPreset.BF16_BF16_F32_X6`: operands split into 3 bf16 pieces,
             6 bf16 products accumulated in float32;
  "tf32_3x"  `DotAlgorithmPreset.TF32_TF32_F32_X3`: 2 TF32 pieces, 3 TF32 products;
  "auto"     (default) `default_matmul_precision(platform)` for the platform of the
             default backend, resolved when the function is traced.

All of them are float32-accurate: the errors of the root, the whole head and their
gradients against float64 stay within 2x of float32 HIGHEST's. A single-pass bf16/TF32
product (what default precision gives on TPUs and GPUs) is not: Newton-Schulz iterations
drift with it, so it is not offered.
XLA:CPU computes every float32 product in float32 (and rejects the TF32 presets), so on
CPU every setting runs as "highest"; float64 products are always float64.

Equation numbers refer to Wang et al., "Deep Global Generalized Gaussian Networks",
CVPR 2019 ("the paper"); "reference" means the released PyTorch implementation as
described in the project's reference notes.
"""

from __future__ import annotations

from gg_jax.linalg.covariance import SCALE_BOUND, covariance, gram, pow2, scale_features, scaled_covariance
from gg_jax.linalg.precision import (
    COMPUTE_DTYPE,
    HIGHEST,
    MATMUL_PRECISIONS,
    MatmulPrecision,
    compute_dtype,
    default_matmul_precision,
    lax_precision,
)
from gg_jax.linalg.roots import inv_sqrtm_newton_schulz, regularized_sqrtm, sqrtm_eigh, sqrtm_newton_schulz
from gg_jax.linalg.vectors import gaussian_embedding_matrix, l2_normalize, signed_sqrt, triu_indices, triu_vector

__all__ = [
    "HIGHEST",
    "COMPUTE_DTYPE",
    "compute_dtype",
    "MATMUL_PRECISIONS",
    "MatmulPrecision",
    "default_matmul_precision",
    "lax_precision",
    "gram",
    "covariance",
    "scaled_covariance",
    "scale_features",
    "sqrtm_newton_schulz",
    "inv_sqrtm_newton_schulz",
    "sqrtm_eigh",
    "regularized_sqrtm",
    "triu_vector",
    "triu_indices",
    "signed_sqrt",
    "l2_normalize",
    "gaussian_embedding_matrix",
    "SCALE_BOUND",
    "pow2",
]
