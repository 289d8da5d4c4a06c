"""Evaluation: top-1 / top-5 error and loss over the whole eval split, each example exactly once.

`evaluate_variables` is the eval loop the trainer runs after its epochs; `evaluate` is
`evaluate.py`: any checkpoint (`gg_jax.checkpoints.load`) on the config's dataset, and for a
released checkpoint ("pretrained:NAME") the accuracy its authors publish beside the measured one.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from gg_jax import checkpoints, data, sharding, summary
from gg_jax.training import steps as steps_lib
from gg_jax.training import validation


def eval_batch_size(config) -> int:
    return int(config.eval.batch_size or config.batch_size)


def evaluate_variables(eval_step, variables, config, mesh) -> dict[str, float]:
    """Top-1/top-5 error and loss over the whole eval split, each example exactly once."""
    batches = data.create_eval_iterator(
        config.dataset.name,
        data_dir=config.dataset.data_dir,
        global_batch_size=eval_batch_size(config),
        image_size=config.image_size,
        resize_size=config.eval.resize_size,
        ten_crop=config.eval.ten_crop,
        resize_mode=config.eval.resize_mode,
        mirror_crop=config.eval.mirror_crop,
        mesh=mesh,
        dtype=jnp.dtype(config.model.dtype or "float32"),
        num_workers=config.dataset.num_workers,
    )
    totals = None
    for batch in batches:
        out = eval_step(variables, batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = steps_lib.host_scalars(totals)
    count = totals["count"]
    return {
        "top1_error": 1.0 - totals["top1_correct"] / count,
        "top5_error": 1.0 - totals["top5_correct"] / count,
        "loss": totals["loss_sum"] / count,
        "num_examples": int(round(count)),
    }


def published_accuracy(meta, config) -> dict:
    """For a released checkpoint (`meta["pretrained"]`): the published top-1/top-5 error (fractions,
    as the measured ones), where they come from and how they were measured; a logged warning when
    `config.eval` measures otherwise. Empty for other checkpoints."""
    name = meta.get("pretrained")
    if not name:
        return {}
    from gg_jax import pretrained

    if name in pretrained.names():
        published = pretrained.entry(name).published
    elif meta.get("published"):
        published = pretrained.Published(**meta["published"])
    else:
        return {}
    used = (bool(config.eval.ten_crop), bool(config.eval.mirror_crop), config.eval.resize_mode)
    used += (int(config.eval.resize_size), int(config.image_size))
    if used != (published.ten_crop, False, "shorter", published.resize_size, published.image_size):
        logging.warning(
            "%s's published error was measured with %s; this evaluation differs (to match: "
            "--config.eval.ten_crop=%s --config.eval.mirror_crop=False --config.eval.resize_mode=shorter "
            "--config.eval.resize_size=%d --config.image_size=%d).",
            name,
            published.protocol,
            published.ten_crop,
            published.resize_size,
            published.image_size,
        )
    return {
        "published_top1_error": round(published.top1_error / 100, 6),
        "published_top5_error": round(published.top5_error / 100, 6),
        "published_protocol": published.protocol,
        "published_source": published.source,
    }


def evaluate(
    config: ml_collections.ConfigDict, workdir: str | None = None, checkpoint: str | None = None
) -> dict[str, float]:
    """Top-1/top-5 error over the whole eval split of `config.dataset`.

    checkpoint: anything `gg_jax.checkpoints.load` reads (a training workdir, one of its
      `checkpoints/<step>` directories, a converted variables directory, "pretrained:NAME");
      default: the latest of `workdir`. Its model must be `config.model.name`; the options set in
      `config.model` apply over the checkpoint's (precision, dtype, ...).
    The results are logged, returned, and (if `workdir` is given) written to its
    TensorBoard summaries as eval/top1_error and eval/top5_error. For a released checkpoint
    they include `published_top1_error`, `published_top5_error` (fractions),
    `published_protocol` and `published_source` (`published_accuracy`).
    """
    path = checkpoint or workdir
    if not path:
        raise validation.ConfigError("Give --workdir (evaluates its latest checkpoint) or --checkpoint=PATH.")
    validation.check_eval_config(config)
    if workdir:
        validation.check_writable(workdir, hint=validation.EVAL_HINT, create=False)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(eval_batch_size(config), mesh.size, field="eval.batch_size")
    info = data.get_dataset_info(config.dataset.name, config.dataset.data_dir)
    options = {k: v for k, v in config.model.items() if k != "name"}
    model, host_variables, meta = checkpoints.load(os.fspath(path), name=config.model.name, **options)
    if int(meta["num_classes"]) != info.num_classes:
        raise checkpoints.CheckpointMismatchError(
            f"{path} holds {meta['model']} with {meta['num_classes']} classes, but {info.name} has "
            f"{info.num_classes}: evaluate it on a dataset with its classes, or fine-tune it first "
            "(config.init_from)."
        )
    variables_sharding = sharding.replicated_tree(host_variables, mesh)
    variables = sharding.put_replicated(host_variables, variables_sharding)
    step = int(meta.get("step", 0))
    eval_step = steps_lib.jit_eval_step(model, mesh, variables_sharding)
    metrics = evaluate_variables(eval_step, variables, config, mesh)
    crops = "10 crops" if config.eval.ten_crop else "2 crops (mirrored)" if config.eval.mirror_crop else "1 crop"
    logging.info(
        "%s on %s/%s (%d examples, %s): top-1 error %.4f, top-5 error %.4f, loss %.4f.",
        path,
        info.name,
        info.eval_split,
        metrics["num_examples"],
        crops,
        metrics["top1_error"],
        metrics["top5_error"],
        metrics["loss"],
    )
    published = published_accuracy(meta, config)
    if published:
        logging.info(
            "Published for %s: top-1 error %.4f, top-5 error %.4f (%s; %s).",
            meta["pretrained"],
            published["published_top1_error"],
            published["published_top5_error"],
            published["published_protocol"],
            published["published_source"],
        )
    if workdir:
        writer = summary.create_writer(workdir, just_logging=jax.process_index() > 0)
        writer.write_scalars(step, {"eval/top1_error": metrics["top1_error"], "eval/top5_error": metrics["top5_error"]})
        writer.close()
    return {**metrics, "step": step, **published}
