"""Generation from a Megatron checkpoint equals transformers' generate.

The tiny random Llama is converted HF -> Megatron (TP=2) -> HF (mg2hf). Greedy tokens from
the Megatron checkpoint, loaded at TP=2 and at PP=2, equal
``LlamaForCausalLM.generate(do_sample=False)`` on the mg2hf output for several prompts, for
the full-recompute path and for the KV-cached engine (all prompts as one left-padded
batch); stopping on an EOS id matches too, and so do the continuation log-probabilities
lm-eval scores with. Sampling: same seed -> same tokens on every rank (both paths), top-k=1
and a tiny top-p reduce to greedy, and the filters keep exactly the intended tokens.
"""
import pytest
import torch

from mp_utils import run_distributed

PROMPTS = ["What is 2 + 3?", "Hello! How are you today?", "Which planet is known as the"]
NEW = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megatron_patch.evaluation.tiny_model import write_tiny_set
    return write_tiny_set(str(tmp_path_factory.mktemp("tiny_gen")), tp=2)


@pytest.fixture(scope="module")
def reference(tiny):
    """transformers on the mg2hf output: prompt ids, greedy continuations, and for each
    prompt an EOS test (the 6th greedy token declared EOS)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny["hf_back"])
    hf = LlamaForCausalLM.from_pretrained(tiny["hf_back"], dtype=torch.float32).eval()
    ids = [tok.encode(p) for p in PROMPTS]

    def run(prompt, eos, n):
        x = torch.tensor([prompt])
        out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                          max_new_tokens=n, eos_token_id=eos, pad_token_id=eos or 1)
        return out[0, len(prompt):].tolist()

    greedy = [run(p, None, NEW) for p in ids]
    eos_cases = []
    for p, g in zip(ids[:2], greedy):
        eos = g[5]
        eos_cases.append((p, eos, run(p, eos, NEW)))
    # scoring (what lm-eval's loglikelihood uses): log p(continuation | context)
    score_items = [(ids[0] + g[:3], g[3:8]) for g in greedy[:2]] + [(ids[2], [5, 6, 7])]
    scores = []
    with torch.no_grad():
        for ctx, cont in score_items:
            whole = torch.tensor([ctx + cont])
            logp = torch.log_softmax(hf(whole).logits[0, :-1].float(), dim=-1)
            rows = logp[len(ctx) - 1:]
            t = torch.tensor(cont)
            scores.append((float(rows.gather(1, t[:, None]).sum()),
                           bool((rows.argmax(-1) == t).all())))
    return {"ids": ids, "greedy": greedy, "eos": eos_cases,
            "score_items": [((ctx + cont)[:-1], cont) for ctx, cont in score_items],
            "scores": scores}


def _generate_layouts(rank, world, mcore, ids, eos_cases, new, score_items):
    from megatron_patch import parallel
    from megatron_patch.inference.engine import KVCacheEngine
    from megatron_patch.inference.generate import SamplingParams, generate
    from megatron_patch.inference.loading import load_model, resolve_arch
    from megatron_patch.inference.runner import ModelRunner

    arch = resolve_arch(mcore)
    out = {}
    for tp, pp in ((2, 1), (1, 2)):  # TP=1 greedy: test_chat_cli (and the eval tests)
        parallel.initialize_model_parallel(tp, pp)
        runner = ModelRunner(load_model(mcore, arch, "fp32"), arch)
        greedy = [generate(runner, p, SamplingParams(max_new_tokens=new)) for p in ids]
        eos = [generate(runner, p, SamplingParams(max_new_tokens=new), eos_ids=[e])
               for p, e, _ in eos_cases]
        res = {"greedy": greedy, "eos": eos, "scores": runner.score(score_items)}
        kv = KVCacheEngine(runner)
        res["kv_greedy"] = kv.generate_batch(ids, SamplingParams(max_new_tokens=new))
        res["kv_eos"] = [kv.generate(p, SamplingParams(max_new_tokens=new), eos_ids=[e])
                         for p, e, _ in eos_cases]
        res["kv_sampled"] = kv.generate_batch(
            ids, [SamplingParams(max_new_tokens=6, temperature=0.9, seed=s) for s in (7, 8, 9)])
        if (tp, pp) == (2, 1):
            def sample(**kw):
                return generate(runner, ids[0], SamplingParams(max_new_tokens=6, **kw))
            res["sampled"] = [sample(temperature=0.9, seed=7), sample(temperature=0.9, seed=7),
                              sample(temperature=0.9, seed=8)]
            res["top_k1"] = sample(temperature=1.5, top_k=1, seed=3)
            res["top_p_tiny"] = sample(temperature=1.5, top_p=1e-6, seed=3)
            streamed = []
            generate(runner, ids[1], SamplingParams(max_new_tokens=5), on_token=streamed.append)
            res["streamed"] = streamed
        out[(tp, pp)] = res
    return out


def test_greedy_matches_transformers_at_tp_and_pp(tiny, reference):
    got = run_distributed(_generate_layouts, 2, tiny["mcore"], reference["ids"],
                          reference["eos"], NEW, reference["score_items"])
    for layout, res in got[0].items():
        for r in range(2):  # every rank returns the same tokens
            assert got[r][layout]["greedy"] == res["greedy"], (layout, r)
        for p, mine, kv, ref in zip(PROMPTS, res["greedy"], res["kv_greedy"],
                                    reference["greedy"]):
            assert mine == ref, f"{layout} {p!r}: {mine} != {ref}"
            assert kv == ref, f"{layout} KV {p!r}: {kv} != {ref}"
        for (_, e, ref), mine, kv in zip(reference["eos"], res["eos"], res["kv_eos"]):
            assert mine == ref and mine[-1] == e and e not in mine[:-1], (layout, mine, ref)
            assert kv == ref, (layout, kv, ref)
        assert got[1][layout]["kv_sampled"] == res["kv_sampled"]  # ranks agree on draws
        for r in range(2):
            for (a, ga), (b, gb) in zip(got[r][layout]["scores"], reference["scores"]):
                assert abs(a - b) < 1e-4 and ga == gb, (layout, r, a, b)
    print(f"greedy == transformers for {len(PROMPTS)} prompts x {NEW} tokens at TP2 and PP2")
    s = got[0][(2, 1)]
    assert s["sampled"][0] == s["sampled"][1] and s["sampled"][0] != s["sampled"][2]
    assert s["kv_sampled"][0] == s["sampled"][0]  # same seed, same draws on both paths
    assert got[1][(2, 1)]["sampled"] == s["sampled"]
    assert s["top_k1"] == reference["greedy"][0][:6]
    assert s["top_p_tiny"] == reference["greedy"][0][:6]
    assert s["streamed"] == reference["greedy"][1][:5]


def test_sampling_filters():
    from megatron_patch.inference.generate import SamplingParams, next_token

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    assert next_token(logits, SamplingParams()) == 0
    draws = {next_token(logits, SamplingParams(temperature=1.0, top_k=2), g) for _ in range(300)}
    assert draws == {0, 1}
    draws = {next_token(logits, SamplingParams(temperature=1.0, top_p=0.7), g) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the third is cut
    draws = {next_token(logits, SamplingParams(temperature=1.0, top_p=0.5), g) for _ in range(100)}
    assert draws == {0}
    draws = {next_token(logits, SamplingParams(temperature=1.0), g) for _ in range(600)}
    assert draws == {0, 1, 2, 3}
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(top_k=-1), dict(max_new_tokens=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_eos_ids(tiny, tmp_path):
    import json

    from megatron_patch.inference.generate import eos_ids_of
    from megatron_patch.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny["hf"])
    eot = tok.token_id("<|eot_id|>")
    assert eos_ids_of(tok, tiny["mcore"]) == sorted({tok.eos_id, eot})  # its generation config
    assert eos_ids_of(tok, None) == sorted({tok.eos_id, eot})          # no config: eos + eot
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert eos_ids_of(tok, str(tmp_path)) == sorted({tok.eos_id, 7})
