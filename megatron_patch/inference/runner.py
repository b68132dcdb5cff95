"""Forward passes of a megatron-core Llama for inference, at any TP/PP.

Every rank of one model-parallel group (TP x PP) calls the same method with the same tokens.
Pipeline stages hand hidden states on with point-to-point send/recv; the last stage gathers
the vocab-parallel logits over TP and cuts them to the real vocabulary. Results the caller
needs everywhere (next token, scores) are broadcast from the last stage over the pipeline
group, so each rank returns the same values.

``logits`` runs the whole sequence (the full-recompute reference and scoring); ``forward``
also takes a megatron-core inference context, which the KV-cached engine (``engine``) uses.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_patch.models.llama.arch import LlamaArch


class ModelRunner:
    def __init__(self, model, arch: LlamaArch, device: Optional[torch.device] = None):
        self.model = model.eval()
        self.arch = arch
        self.vocab_size = arch.vocab_size
        p = next(model.parameters())
        self.device = device or p.device
        self.dtype = p.dtype
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.first = parallel_state.is_pipeline_first_stage()
        self.last = parallel_state.is_pipeline_last_stage()
        self.config_dir: Optional[str] = None  # where generation_config.json was found

    @property
    def max_length(self) -> int:
        return self.arch.max_position_embeddings

    # ---- one forward pass --------------------------------------------------------------
    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """tokens [b, s] -> fp32 logits [b, s, vocab] on the last pipeline stage, None on
        the others (they still take part). Causal attention, positions 0..s-1."""
        b, s = tokens.shape
        pos = torch.arange(s, device=self.device).unsqueeze(0).expand(b, -1)
        return self.forward(tokens, pos)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None,
                inference_context=None) -> Optional[torch.Tensor]:
        """One pass through the pipeline. With a megatron-core ``inference_context`` (KV
        cache) the model keeps only the last position: logits [b, 1, vocab]."""
        tokens = tokens.to(self.device)
        position_ids = position_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        b, s = tokens.shape
        if not self.first:
            hidden = torch.empty(s, b, self.arch.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            self.model.set_input_tensor(hidden)
        kw = {}
        if inference_context is not None:  # megatron gathers the TP logits itself then
            kw = dict(inference_context=inference_context, runtime_gather_output=True)
        out = self.model(tokens, position_ids, attention_mask, **kw)
        if not self.last:
            dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
            return None
        if self.tp > 1 and inference_context is None:
            out = gather_from_tensor_model_parallel_region(out)
        return out[..., : self.vocab_size].float()

    def share(self, value: Optional[torch.Tensor], shape, dtype) -> torch.Tensor:
        """``value`` computed on the last stage -> the same tensor on every stage."""
        if self.pp == 1:
            return value
        if value is None:
            value = torch.empty(shape, dtype=dtype, device=self.device)
        value = value.to(self.device).contiguous()
        dist.broadcast(value, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
        return value

    # ---- scoring -----------------------------------------------------------------------
    @torch.no_grad()
    def score(self, batch: list) -> list:
        """``batch``: list of (input_tokens, target_tokens); the targets are the last
        len(target) positions' next tokens, i.e. inputs = (ctx + cont)[:-1], targets = cont.
        Returns [(sum log p(target), every target token is the argmax)] on every rank."""
        lens = [len(inp) for inp, _ in batch]
        width = max(lens)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for i, (inp, _) in enumerate(batch):
            tokens[i, : len(inp)] = torch.tensor(inp, dtype=torch.long)  # right padding
        logits = self.logits(tokens)
        out = None
        if logits is not None:
            logp = torch.log_softmax(logits, dim=-1)
            out = torch.empty(len(batch), 2, dtype=torch.float64, device=logp.device)
            for i, (inp, tgt) in enumerate(batch):
                n = len(tgt)
                rows = logp[i, lens[i] - n: lens[i]]
                t = torch.tensor(tgt, dtype=torch.long, device=rows.device)
                out[i, 0] = rows.gather(1, t.unsqueeze(1)).sum().double()
                out[i, 1] = float(bool((rows.argmax(dim=-1) == t).all()))
        out = self.share(out, (len(batch), 2), torch.float64)
        return [(float(a), bool(g)) for a, g in out.tolist()]
