"""Micro-batches for the pipeline schedules, resumable from a consumed-samples count.

Megatron-LM's pretraining sampler order: the global batch of iteration ``i`` holds samples
``[c, c + GBS)`` with ``c`` the samples consumed before it; within it, micro-batch ``j`` of
data-parallel rank ``r`` holds ``c + j*MBS*DP + r*MBS + [0, MBS)``. The same global batch
for any DP size, so TP/PP/DP layouts see the same data, and a restart at ``c`` continues
exactly where the run stopped.

Batches are dicts of [b, s] tensors: tokens, labels (valid ids), loss_mask (float),
position_ids — what ``forward_step`` reads; packed SFT adds the THD boundaries of the
micro-batch (``cu_seqlens``, ``max_seqlen``: training/packed_seq.py).
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from megatron_patch.data.sft_encode import IGNORE_INDEX
from megatron_patch.training import packed_seq


class CyclicShuffled:
    """Index ``k`` of an endless stream over a finite dataset: epoch ``k // n`` visits the
    samples in a permutation seeded by (seed, epoch). Pure function of k (resumable)."""

    def __init__(self, dataset, seed: int, shuffle: bool = True):
        self.dataset, self.seed, self.shuffle = dataset, seed, shuffle
        self._perm_epoch, self._perm = None, None

    def __len__(self):
        return len(self.dataset)

    def _index(self, k: int) -> int:
        n = len(self.dataset)
        epoch, pos = divmod(int(k), n)
        if not self.shuffle:
            return pos
        if epoch != self._perm_epoch:
            self._perm = np.random.RandomState((self.seed + 7919 * epoch) % 2**32).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def __getitem__(self, k: int):
        return self.dataset[self._index(k)]

    def num_tokens(self, k: int) -> Optional[int]:
        inner = getattr(self.dataset, "num_tokens", None)
        return inner(self._index(k)) if inner else None


def real_tokens(dataset, start: int, count: int, seq_len: int) -> int:
    """Tokens (not padding) in samples ``[start, start + count)`` of a stream: from the
    dataset's ``num_tokens`` when it pads (SFT), else every position (pretraining samples
    are full). The same on every rank: no data is read, no collective needed."""
    fn = getattr(dataset, "num_tokens", None)
    if fn is None:
        return count * seq_len
    return sum(seq_len if n is None else n for n in map(fn, range(start, start + count)))


def sft_sample(item: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """SFTDataset item ({input_ids, labels with -100}) -> training sample: the loss mask is
    exactly the answer tokens; -100 labels become id 0 (a valid id, masked out)."""
    ids = torch.as_tensor(item["input_ids"]).long()
    labels = torch.as_tensor(item["labels"]).long()
    mask = labels != IGNORE_INDEX
    sample = {"tokens": ids, "labels": torch.where(mask, labels, torch.zeros_like(labels)),
              "loss_mask": mask.float(),
              "position_ids": torch.arange(ids.numel(), dtype=torch.long)}
    if "position_ids" in item:
        sample["position_ids"] = torch.as_tensor(item["position_ids"]).long()
    if "cu_seqlens" in item:  # packed samples: attention restarts at each (packed_seq.py)
        sample["cu_seqlens"] = torch.as_tensor(item["cu_seqlens"])
    return sample


def pretrain_sample(item: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {"tokens": item["tokens"].long(), "labels": item["labels"].long(),
            "loss_mask": item["loss_mask"].float(), "position_ids": item["position_ids"].long()}


def collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "cu_seqlens"}
    if "cu_seqlens" in samples[0]:
        batch.update(packed_seq.merge_rows([s["cu_seqlens"] for s in samples],
                                           samples[0]["tokens"].numel()))
    return batch


class MicroBatches:
    """Iterator of this DP rank's micro-batches, starting after ``consumed`` samples."""

    def __init__(self, dataset, to_sample, global_batch_size: int, micro_batch_size: int,
                 dp_size: int, dp_rank: int, consumed: int = 0,
                 limit: Optional[int] = None):
        assert global_batch_size % (micro_batch_size * dp_size) == 0
        self.dataset, self.to_sample = dataset, to_sample
        self.gbs, self.mbs, self.dp, self.dp_rank = global_batch_size, micro_batch_size, \
            dp_size, dp_rank
        self.per_rank = global_batch_size // (micro_batch_size * dp_size)
        self.consumed = consumed      # samples of complete global batches handed out
        self._j = 0                   # micro-batch within the current global batch
        self.limit = limit            # total samples available (None: endless)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        base = self.consumed + self._j * self.mbs * self.dp + self.dp_rank * self.mbs
        if self.limit is not None and base + self.mbs > self.limit:
            raise StopIteration
        batch = collate([self.to_sample(self.dataset[base + i]) for i in range(self.mbs)])
        self._j += 1
        if self._j == self.per_rank:
            self._j = 0
            self.consumed += self.gbs
        return batch


class Replay:
    """Every model chunk (virtual pipeline stage) calls next() once per micro-batch: hand
    each of them the same micro-batch sequence."""

    def __init__(self, source: Iterator, n: int):
        self.source, self.n = source, n
        self.queues: List[list] = [[] for _ in range(n)]

    def view(self, i: int):
        replay = self

        class _View:
            def __iter__(self):
                return self

            def __next__(self):
                q = replay.queues[i]
                if not q:
                    b = next(replay.source)
                    for other in replay.queues:
                        other.append(b)
                return q.pop(0)
        return _View()

    def views(self) -> list:
        return [self.view(i) for i in range(self.n)]
