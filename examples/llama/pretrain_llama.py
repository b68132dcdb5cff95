"""Training entry for run_mcore_llama.sh (one process per device, started by torchrun).

    python pretrain_llama.py --generation llama3_1 [--timestamp T] -- <the 25 launcher args>

The arguments are parsed and validated by megatron_patch.training.config (the same code
the launcher ran before starting anything); see examples/llama/run_mcore_llama.sh.
"""
from __future__ import annotations

import argparse
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:  # run from a source checkout without pip install
    sys.path.insert(0, _ROOT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--generation", required=True)
    p.add_argument("--timestamp", default=None)
    p.add_argument("args", nargs="*", help="the 25 launcher arguments")
    ns = p.parse_args(argv)
    import warnings
    # megatron-core's notes that it falls back from Transformer Engine/apex to local code
    # (the backend chose that on purpose), and torch's renamed-collective notices
    warnings.filterwarnings("ignore", message=".*(Apex|apex|Transformer Engine).*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated.*")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
    warnings.filterwarnings("ignore", message=".*grad attribute of a Tensor that is not a leaf.*")
    from megatron_patch.training.config import ConfigError, build_config
    prog = os.environ.get("MP_LAUNCHER_NAME", "pretrain_llama.py")
    try:
        cfg = build_config(ns.args, ns.generation, timestamp=ns.timestamp)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2

    import megatron_patch  # noqa: F401  (selects and activates the device backend)
    from megatron_patch import parallel
    from megatron_patch.training.loop import train
    parallel.init_distributed()
    try:
        train(cfg)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
