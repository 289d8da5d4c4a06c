"""Global batches over several (fake CPU) devices: sharding and exactly-once evaluation."""

import os
import textwrap

import pytest

from gg_jax.data import testing
from tests import runs

_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec
    from gg_jax import data
    from gg_jax.data import digits

    n = int(sys.argv[1])
    name, data_dir = sys.argv[2], sys.argv[3]
    assert jax.device_count() == n, jax.devices()

    def check_global(x, shape):
      assert isinstance(x, jax.Array) and x.shape == shape, (type(x), x.shape)
      assert x.sharding.spec == PartitionSpec("data")
      assert len(x.addressable_shards) == n
      assert {s.data.shape[0] for s in x.addressable_shards} == {shape[0] // x.sharding.mesh.shape["data"]}

    # Exactly-once eval of digits: 360 = 7.5 batches of 48.
    seen, batches = [], 0
    for b in data.create_eval_iterator("digits", global_batch_size=48, image_size=16):
      check_global(b["image"], (48, 16, 16, 3))
      check_global(b["mask"], (48,))
      seen += list(np.asarray(b["label"])[np.asarray(b["mask"])])
      batches += 1
    assert batches == data.num_eval_batches(data.get_dataset_info("digits"), 48) == 8
    assert len(seen) == 360
    assert (np.bincount(seen, minlength=10) == np.bincount(digits.load("test")[1], minlength=10)).all()

    # Exactly-once eval of a TFDS split (13 examples, unique labels), ten crops.
    seen = []
    for b in data.create_eval_iterator(name, data_dir=data_dir, global_batch_size=n, image_size=16,
                                       resize_size=20, ten_crop=True, num_workers=0):
      check_global(b["image"], (n, 10, 16, 16, 3))
      seen += list(np.asarray(b["label"])[np.asarray(b["mask"])])
    assert len(seen) == 13 and len(set(seen)) == 13, seen

    # Train: global arrays, deterministic resume through the global iterator.
    it = data.create_train_iterator(name, data_dir=data_dir, global_batch_size=2 * n, image_size=16,
                                    num_workers=0)
    ref = [next(it) for _ in range(3)]
    check_global(ref[0]["image"], (2 * n, 16, 16, 3))
    check_global(ref[0]["label"], (2 * n,))
    resumed = data.create_train_iterator(name, data_dir=data_dir, global_batch_size=2 * n,
                                         image_size=16, num_workers=0, start_step=2)
    np.testing.assert_array_equal(np.asarray(next(resumed)["image"]), np.asarray(ref[2]["image"]))
    # The state is the next step's, whatever was prefetched to the devices.
    assert resumed.get_state()["step"] == 3 and it.get_state()["step"] == 3
    resumed.set_state({"step": 1})
    np.testing.assert_array_equal(np.asarray(next(resumed)["label"]), np.asarray(ref[1]["label"]))

    try:
      data.create_train_iterator("digits", global_batch_size=n + 1)
    except ValueError as e:
      assert "not divisible by the number of devices" in str(e), e
    else:
      raise AssertionError("no error for a batch not divisible by the device count")

    if n == 8:
      # A 2-D mesh: the batch is split over 'data' (4) and replicated over 'model' (2).
      mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
      b = next(data.create_train_iterator("digits", global_batch_size=12, image_size=8, mesh=mesh))
      assert b["image"].shape == (12, 8, 8, 3) and b["image"].sharding.mesh is mesh
      assert {s.data.shape[0] for s in b["image"].addressable_shards} == {3}
    print("OK")
    """
)


@pytest.fixture(scope="module")
def fake_tfds(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds_md"))
    return testing.write_tfds_dataset(data_dir, train=40, validation=13, num_shards=3), data_dir


@pytest.mark.parametrize("num_devices", [2, 8])
def test_global_batches_and_exactly_once_eval(fake_tfds, num_devices):
    name, data_dir = fake_tfds
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
    proc = runs.run(["-c", _SCRIPT, str(num_devices), name, data_dir], env, check=False)
    assert proc.returncode == 0 and "OK" in proc.stdout, runs.tail(proc)
