"""`variables_io.load_model`: any gg_jax checkpoint (converted variables or a training run) as a model."""

import dataclasses

import jax
import numpy as np
import pytest
import test_training_common as common

from gg_jax import models, variables_io
from gg_jax.training import trainer


def _same_model(a, b) -> bool:
    """Models of `models.create`: equal fields, the head factories (functools.partial) by function and options."""

    def fields(model):
        out = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in ("parent", "name")}
        head = out.pop("head")
        return out, getattr(head, "func", head), getattr(head, "args", ()), getattr(head, "keywords", {})

    return type(a) is type(b) and fields(a) == fields(b)


def _assert_trees_equal(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_load_model_reads_variables_dirs_and_training_runs(tmp_path, tiny_run):
    # A variables directory, as the converter writes it.
    model = models.create("resnet18_isqrt", num_classes=7, reduction_dim=8)
    variables = jax.device_get(model.init(jax.random.PRNGKey(1), np.zeros((1, 32, 32, 3), np.float32), train=False))
    meta = {"model": "resnet18_isqrt", "num_classes": 7, "model_options": {"reduction_dim": 8}}
    variables_io.save_variables(str(tmp_path / "converted"), variables, meta)
    loaded_model, loaded, loaded_meta = variables_io.load_model(str(tmp_path / "converted"))
    assert _same_model(loaded_model, model) and loaded_meta["num_classes"] == 7
    _assert_trees_equal(loaded, variables)

    # A training workdir (its latest step), and one step directory of it.
    workdir, result = tiny_run
    for path in (workdir, workdir / "checkpoints" / "1"):
        loaded_model, loaded, loaded_meta = variables_io.load_model(str(path))
        assert loaded_meta["model"] == "resnet18_3g" and loaded_meta["step"] == 1
        assert _same_model(loaded_model, trainer.create_model(common.tiny_config(), 10))
        _assert_trees_equal(loaded, jax.device_get(result.state.variables))

    with pytest.raises(FileNotFoundError, match="holds no gg_jax checkpoint"):
        variables_io.load_model(str(tmp_path))
