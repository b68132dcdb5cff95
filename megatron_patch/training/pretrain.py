"""Training entry, one process per device (started by torchrun from run_mcore_llama.sh)::

    python -m megatron_patch.training.pretrain --generation llama3_1 [--timestamp T] \
        -- <the 25 launcher arguments>

The arguments are parsed and validated by ``arguments.build_config`` -- the same code the
launcher's plan ran before starting anything (docs/launcher.md).
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    from megatron_patch.training.lifetime import tie_to_launcher
    tie_to_launcher()  # before anything slow: a worker must not outlive its launcher
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--generation", required=True)
    p.add_argument("--timestamp", default=None)
    p.add_argument("args", nargs="*", help="the 25 launcher arguments")
    ns = p.parse_args(argv)
    from megatron_patch.training.arguments import build_config
    from megatron_patch.training.config import ConfigError
    prog = os.environ.get("MP_LAUNCHER_NAME", "pretrain")
    try:
        cfg = build_config(ns.args, ns.generation, timestamp=ns.timestamp)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2

    from megatron_patch import parallel
    from megatron_patch.checkpoint import UnsafeCheckpointError
    from megatron_patch.data.problems import InputError
    from megatron_patch.fsutil import os_error_message
    from megatron_patch.training.config import TrainingStopped
    from megatron_patch.training.loop import train
    parallel.init_distributed()
    # Every rank meets these errors alike (checks before any collective, or decisions
    # shared by a collective): rank 0 says it, once.
    say = int(os.environ.get("RANK", "0")) == 0
    try:
        train(cfg)
    except (ConfigError, UnsafeCheckpointError, InputError) as exc:
        if say:
            print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:  # a missing file, a full disk (a checkpoint save), permissions
        if os.environ.get("MP_DEBUG") == "1":
            raise
        if say:
            msg = os_error_message(exc) if exc.errno is not None else str(exc)
            print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
        return 2
    except (ValueError, KeyError) as exc:  # a checkpoint or dataset that does not fit
        if os.environ.get("MP_DEBUG") == "1":
            raise
        if say:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"{prog}: error: {msg} (MP_DEBUG=1 shows where)", file=sys.stderr,
                  flush=True)
        return 2
    except TrainingStopped as exc:
        if say:
            print(f"{prog}: stopped: {exc}", file=sys.stderr, flush=True)
        return 3
    finally:
        parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
