"""Fixtures shared by the test modules of one pytest process (one xdist worker)."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def _persistent_compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache per worker, shared with the subprocesses its tests
    start (`tests.runs.subprocess_env` names the same directory): every
    `trainer.train_and_evaluate` call jits fresh functions, so without it the training tests
    would compile the same few programs again and again."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.getbasetemp() / "jax_cache"))
    # Only programs worth it: the many small test programs would only add writes.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    yield


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(workdir, TrainResult) of one step of the tiny demo model (tests.runs.TINY),
    trained in this process: its checkpoint of step 1 and final evaluation. Shared by the
    tests that need a trained run, which must only add files to it."""
    from gg_jax.training import trainer
    from tests import runs

    workdir = tmp_path_factory.mktemp("tiny_run") / "run"
    return workdir, trainer.train_and_evaluate(runs.tiny_config(num_train_steps=1), str(workdir))


# Whole training runs in subprocesses (minutes each) go first, so that pytest-xdist hands
# them out to the workers early instead of leaving one worker running one of them alone at
# the end.
_LONG_MODULES_FIRST = ("test_training_demo.py", "test_training_distributed.py", "test_training_resume.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in _LONG_MODULES_FIRST)  # stable: same order otherwise


@pytest.fixture
def x64():
    """float64 enabled in JAX for one test (the float64 references of the accuracy tests)."""
    import jax

    with jax.enable_x64(True):
        yield
