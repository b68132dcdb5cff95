"""Every collective megatron-core calls on the cpu backend, checked on gloo against its
definition (sum / max / concatenation), in fp32, bf16 and fp16."""
import torch

from mp_utils import run_distributed

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _collectives(rank, world):
    import torch.distributed as dist
    out = {}
    for dt in DTYPES:
        x = (torch.arange(8, dtype=torch.float32) * (rank + 1) + rank).to(dt)
        res = {}
        g = torch.empty(8 * world, dtype=dt)
        dist.all_gather_into_tensor(g, x)
        res["all_gather_into_tensor"] = g
        lst = [torch.empty(8, dtype=dt) for _ in range(world)]
        dist.all_gather(lst, x)
        res["all_gather"] = torch.cat(lst)
        rs = torch.empty(8 // world, dtype=dt)
        dist.reduce_scatter_tensor(rs, x)
        res["reduce_scatter_tensor"] = rs
        y = x.clone()
        dist.all_reduce(y)
        res["all_reduce_sum"] = y
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.MAX)
        res["all_reduce_max"] = y
        y = x.clone()
        dist.broadcast(y, src=1)
        res["broadcast"] = y
        out[str(dt)] = {k: v.float() for k, v in res.items()}
    return out


def test_gloo_collectives_match_definitions():
    world = 2
    results = run_distributed(_collectives, world)
    for dt in DTYPES:
        xs = [(torch.arange(8, dtype=torch.float32) * (r + 1) + r).to(dt).float() for r in range(world)]
        total = sum(xs)
        for rank, res in enumerate(results):
            r = res[str(dt)]
            torch.testing.assert_close(r["all_gather_into_tensor"], torch.cat(xs))
            torch.testing.assert_close(r["all_gather"], torch.cat(xs))
            torch.testing.assert_close(r["reduce_scatter_tensor"], total.chunk(world)[rank].to(dt).float())
            torch.testing.assert_close(r["all_reduce_sum"], total.to(dt).float())
            torch.testing.assert_close(r["all_reduce_max"], torch.maximum(*xs))
            torch.testing.assert_close(r["broadcast"], xs[1])
