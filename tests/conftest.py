import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import warnings  # noqa: E402

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The shared training world of train_helpers.make_world (tokenizer, preprocessed
    corpus, HF model and its release checkpoint), built once per pytest process; a module
    that needs another world defines its own ``world``."""
    from train_helpers import make_world
    return make_world(str(tmp_path_factory.getbasetemp() / "train_world"))


@pytest.fixture(scope="module")
def process_group_closed_after_module():
    """For modules that run the converter in-process: its CHECK initialises a 1-process
    group that outlives the call; tear it down at the module's end (when the module did not
    start with one) so later modules begin without it."""
    import torch.distributed as dist
    was = dist.is_initialized()
    yield
    if not was and dist.is_initialized():
        from megatron_patch import parallel
        parallel.destroy()


@pytest.fixture()
def mp1():
    """A 1-process gloo group with TP=PP=1 model-parallel state (re-initialised per test)."""
    from megatron_patch import parallel
    parallel.init_distributed()
    parallel.initialize_model_parallel(tp=1, pp=1)
    yield


# Longest files first: the suite runs on two pytest-xdist workers, one file per worker at a
# time (tests/run.sh: --dist loadfile), handed out in collection order. Alphabetical order
# would leave the longest files (minutes each, measured with --durations) for the end, where
# one worker runs them while the other idles.
SLOWEST_FIRST = ["test_quickstart.py", "test_parallel_layouts_resume.py",
                 "test_parallel_layouts.py", "test_train_resume.py", "test_cp_training.py",
                 "test_dist_checkpoint.py", "test_eval_harness.py", "test_fp8.py",
                 "test_train_dist_format.py", "test_memory_switches_parallel.py",
                 "test_server.py", "test_train_parallel.py"]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable otherwise
