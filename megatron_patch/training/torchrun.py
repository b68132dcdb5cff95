"""torchrun (``torch.distributed.run``) as the launcher calls it, with one difference: a
rendezvous that times out because nodes are missing ends with one line naming how many
joined and what to do, instead of the elastic agent's traceback.

    python -m megatron_patch.training.torchrun <torchrun arguments>

Node 0 hosts the rendezvous store and waits up to the launcher's MP_RDZV_TIMEOUT for the
other nodes; the other nodes check that node 0 is reachable before they start
(launch_plan.wait_for_master)."""
from __future__ import annotations

import os
import re
import sys


def missing_nodes_line(exc: BaseException, timeout: str | None = None) -> str | None:
    """One line for torch's "Timed out after N seconds waiting for clients. J/W clients
    joined." (one client per node), else None. ``timeout``: the configured seconds."""
    m = re.search(r"Timed out after (\d+) seconds waiting for clients\. (\d+)/(\d+) clients "
                  r"joined", str(exc))
    if m is None:
        return None
    secs, joined, want = m.groups()
    node = os.environ.get("RANK", "0")
    ranks = "RANK=1" if want == "2" else f"RANK=1..{int(want) - 1}"
    return (f"ENV=dlc node {node}: only {joined} of {want} nodes joined within "
            f"{timeout or secs} s (MP_RDZV_TIMEOUT); start the other nodes with the same "
            f"MASTER_ADDR, MASTER_PORT and WORLD_SIZE={want} ({ranks}), or raise MP_RDZV_TIMEOUT")


def _rdzv_timeout(argv) -> str | None:
    """The timeout=N of --rdzv_conf in torchrun's arguments."""
    for i, a in enumerate(argv):
        conf = argv[i + 1] if a == "--rdzv_conf" and i + 1 < len(argv) else \
            a.split("=", 1)[1] if a.startswith("--rdzv_conf=") else None
        m = re.search(r"(?:^|,)timeout=(\d+)", conf or "")
        if m:
            return m.group(1)
    return None


def main(argv=None) -> int:
    from torch.distributed import DistStoreError
    from torch.distributed.run import main as torchrun_main
    try:
        torchrun_main(argv)
    except DistStoreError as exc:
        line = missing_nodes_line(exc, _rdzv_timeout(sys.argv[1:] if argv is None else argv))
        if line is None:
            raise
        prog = os.environ.get("MP_LAUNCHER_NAME", "torchrun")
        print(f"{prog}: error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
