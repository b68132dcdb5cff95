"""The ``megatron_patch`` model type of lm-eval: evaluate a Megatron (megatron-core) checkpoint
directly, at the TP/PP given in model_args, with no conversion to HF.

    accelerate launch --main_process_port 29051 --num_processes 2 -m megatron_patch.evaluation \
        --model megatron_patch --model_args load=<ckpt>,tokenizer=<HF tokenizer dir>,tp=2 \
        --tasks mmlu_local --include_path LM-Evaluation-Harness/tasks --batch_size 8

model_args: load (required), tokenizer (default: hf_config, then load), tp, pp (default 1),
precision fp32|bf16|fp16 (default fp32 on CPU, bf16 on GPU), hf_config / model_size (where the
architecture comes from when <load>/config.json is absent), max_length (default the model's
context), max_gen_toks (256), add_bos_token (default: the tokenizer's own behaviour),
engine kv|recompute (generate_until: KV-cached batched decoding, default, or the reference
full-recompute path; both give the same greedy text).

Processes: launch TP*PP*DP of them (torchrun or accelerate launch); lm-eval splits documents
over the DP replicas, and the ranks of one model-parallel group run every forward together.
Scoring follows lm-eval's HF model (``--model hf``) request for request: same tokenisation,
same left truncation, log-softmax in fp32, so the two give the same numbers on the same weights.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

log = logging.getLogger(__name__)


class MegatronPatchLM(TemplateLM):
    backend = "causal"

    def __init__(self, load: Optional[str] = None, tokenizer: Optional[str] = None, tp: int = 1,
                 pp: int = 1, precision: Optional[str] = None, hf_config: Optional[str] = None,
                 model_size: Optional[str] = None, batch_size=1, max_batch_size=None,
                 max_length: Optional[int] = None, max_gen_toks: int = 256,
                 add_bos_token: Optional[bool] = None, device=None, seed: int = 1234,
                 engine: str = "kv", **unused):
        super().__init__()
        import megatron_patch  # noqa: F401  (activates the device backend)
        from megatron.core import parallel_state

        from megatron_patch import parallel
        from megatron_patch.backends import active_backend
        from megatron_patch.inference.engine import ENGINES, make_engine
        from megatron_patch.inference.loading import find_checkpoint, load_model, resolve_arch
        from megatron_patch.inference.runner import ModelRunner
        from megatron_patch.tokenizer import load_tokenizer

        if unused:
            log.warning("megatron_patch: ignoring model_args %s", sorted(unused))
        if not load:
            raise ValueError("megatron_patch model: model_args must give load=<Megatron "
                             "checkpoint directory>")
        if engine not in ENGINES:
            raise ValueError(f"megatron_patch model: engine={engine}: one of "
                             f"{'|'.join(sorted(ENGINES))}")
        load = os.path.expanduser(str(load))
        ckpt = find_checkpoint(load)  # one clear error for a wrong path, before anything heavy
        self.arch = resolve_arch(load, hf_config, model_size)
        tok_dir = tokenizer or next(
            (d for d in (hf_config, load, ckpt.root) if d and os.path.isdir(str(d)) and
             os.path.exists(os.path.join(str(d), "tokenizer_config.json"))), None)
        if tok_dir is None:
            raise ValueError("megatron_patch model: no tokenizer; pass tokenizer=<HF tokenizer "
                             "directory> in model_args")
        self.tok = load_tokenizer(str(tok_dir))
        self.tokenizer = self.tok.hf
        self._tok_dir = str(tok_dir)
        self.add_bos_token = add_bos_token

        tp, pp = int(tp), int(pp)
        backend = active_backend()
        if precision is None:
            precision = "fp32" if backend.name == "cpu" else "bf16"
        _, world, local_rank = parallel.init_distributed()
        if world % (tp * pp):
            raise ValueError(f"megatron_patch model: {world} processes is not a multiple of "
                             f"TP*PP = {tp * pp}")
        parallel.initialize_model_parallel(tp, pp, seed=int(seed))
        self._device = backend.device(local_rank)
        model = load_model(load, self.arch, precision)
        self.runner = ModelRunner(model, self.arch, self._device)
        self._dp_group = parallel_state.get_data_parallel_group()
        self._rank = parallel_state.get_data_parallel_rank()
        self._world_size = parallel_state.get_data_parallel_world_size()
        self._max_length = int(max_length) if max_length else None
        self._max_gen_toks = int(max_gen_toks)
        bs = str(batch_size)
        if bs.startswith("auto"):
            log.warning("megatron_patch: batch_size=auto is not supported; using 1 (set "
                        "--batch_size N)")
            bs = "1"
        self.batch_size_per_gpu = max(1, int(bs))
        self.engine = make_engine(self.runner, engine, self.batch_size_per_gpu)
        self._load, self._precision, self._tp, self._pp = load, precision, tp, pp
        from megatron_patch.inference.generate import eos_ids_of
        self._eos_ids = eos_ids_of(self.tok, next(
            (d for d in (hf_config, load, ckpt.root) if d and os.path.isfile(
                os.path.join(str(d), "generation_config.json"))), None))

    # ---- properties lm-eval reads ------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or self.arch.max_position_embeddings

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer_name(self) -> str:
        return self._tok_dir.replace("/", "__")

    def get_model_info(self) -> dict:
        return {"megatron_checkpoint": self._load, "tp": self._tp, "pp": self._pp,
                "precision": self._precision}

    # ---- data-parallel plumbing (lm-eval splits documents over DP replicas) -------------
    def all_gather(self, tensor):
        if self._world_size <= 1:
            return tensor
        t = tensor.reshape(-1) if tensor.dim() == 0 else tensor
        out = [torch.empty_like(t) for _ in range(self._world_size)]
        dist.all_gather(out, t.contiguous(), group=self._dp_group)
        return torch.cat(out)

    def gather_object(self, obj, dst=0):
        if self._world_size <= 1:
            return [obj]
        result = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, result, dst=dist.get_global_rank(self._dp_group, dst),
                           group=self._dp_group)
        return result

    def barrier(self):
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    # ---- tokenisation (same rules as lm-eval's HF model) ----------------------------------------
    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   left_truncate_len: Optional[int] = None, **kwargs) -> list:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            bos = self.tokenizer.decode(self.prefix_token_id)
            if bos and string.startswith(bos):
                add_special_tokens = False
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **kw)
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)

    # ---- scoring ---------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: [((context, continuation), context_ids, continuation_ids)]."""
        items = []
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError("empty continuation")
            whole = (ctx + cont)[-(self.max_length + 1):]
            items.append((i, whole[:-1], cont))
        # longest first: padding waste stays small and a too-long input fails at once
        items.sort(key=lambda x: (-len(x[1]) - 1, x[1]))
        out = [None] * len(items)
        bs = self.batch_size
        for start in tqdm(range(0, len(items), bs), disable=disable_tqdm or self.rank != 0,
                          desc="megatron_patch loglikelihood"):
            chunk = items[start:start + bs]
            scores = self.runner.score([(inp, cont) for _, inp, cont in chunk])
            for (i, _, _), sc in zip(chunk, scores):
                out[i] = sc
        for (key, _, _), sc in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, sc)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        results = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm or self.rank != 0):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows],
                                                disable_tqdm=True)
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            results.append(total)
        return results

    # ---- generation ------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False):
        from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                          postprocess_generated_text)

        from megatron_patch.inference.sampling import SamplingParams

        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        jobs = []  # (ids, params, stop strings, lm-eval's `until`)
        for context, gen_kwargs in [r.args for r in requests]:
            kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos_text)
            max_new = int(kw.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for the context "
                                 f"(max_length {self.max_length})")
            sample = bool(kw.get("do_sample")) and float(kw.get("temperature") or 0) > 0
            params = SamplingParams(
                max_new_tokens=max_new,
                temperature=float(kw.get("temperature") or 0) if sample else 0.0,
                top_k=int(kw.get("top_k") or 0) if sample else 0,
                top_p=float(kw.get("top_p") or 1.0) if sample else 1.0,
                seed=int(kw.get("seed", 1234)))
            ids = self.tok_encode(context, left_truncate_len=self.max_length - max_new)
            jobs.append((ids, params, [s for s in until if s], until))

        def stop_test(stops):
            def stop(new):
                tail = self.tokenizer.decode(new[-32:])
                return any(s in tail for s in stops)
            return stop if stops else None

        # longest first (as lm-eval's HF model): rows of a batch have similar lengths
        order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][0]))
        results = [None] * len(jobs)
        bs = self.batch_size
        for start in tqdm(range(0, len(order), bs), disable=disable_tqdm or self.rank != 0,
                          desc="megatron_patch generate_until"):
            chunk = order[start:start + bs]
            outs = self.engine.generate_batch(
                [jobs[i][0] for i in chunk], [jobs[i][1] for i in chunk],
                eos_ids=self._eos_ids, stops=[stop_test(jobs[i][2]) for i in chunk])
            for i, new in zip(chunk, outs):
                results[i] = postprocess_generated_text(self.tok_decode(new), stop=jobs[i][3],
                                                        think_end_token=None)
        for (context, gen_kwargs), text in zip([r.args for r in requests], results):
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results
