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


@pytest.fixture()
def mp1():
    """A 1-process gloo group with TP=PP=1 model-parallel state (re-initialised per test)."""
    from megatron_patch import parallel
    parallel.init_distributed()
    parallel.initialize_model_parallel(tp=1, pp=1)
    yield
