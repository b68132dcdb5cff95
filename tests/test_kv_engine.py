"""KV-cached batched generation (inference.engine) against independent references.

One tiny random Llama (HF weights loaded straight into megatron-core, one process):
- greedy tokens of the KV engine equal a plain greedy loop over transformers' full forward
  pass, and the full-recompute path, for prompts of very different lengths;
- a left-padded batch gives each row exactly what the row gives alone (padding masked in
  prefill and decode, rows leaving the batch at different steps, batches split by size);
- EOS, stop tests, per-row max_new_tokens and the context limit end rows as in the
  reference; sampling with a seed draws the same tokens batched or alone;
- repetition penalty equals transformers' RepetitionPenaltyLogitsProcessor, presence /
  frequency penalties follow OpenAI's formula (hand-computed).
TP=2 / PP=2: tests/test_generate_mcore.py.
"""
from types import SimpleNamespace

import pytest
import torch

TEXTS = ["What is 2 + 3?", "Hi",
         "The following are multiple choice questions (with answers) about general science. "
         "Which planet is known as the red planet?",
         "Tell me about the weather, the sea, the mountains and the stars.",
         "Hello! How are you today? I am a small language model."]
NEW = 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from megatron_patch import parallel
    from megatron_patch.evaluation.tiny_model import write_tiny_hf
    from megatron_patch.inference.engine import KVCacheEngine, RecomputeEngine
    from megatron_patch.inference.loading import model_from_hf_state
    from megatron_patch.inference.runner import ModelRunner
    from megatron_patch.models.llama.arch import LlamaArch
    from megatron_patch.tokenizer import load_tokenizer

    d = write_tiny_hf(str(tmp_path_factory.mktemp("kv") / "hf"))
    hf = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    parallel.init_distributed()
    parallel.initialize_model_parallel(1, 1)
    arch = LlamaArch.from_hf_config(f"{d}/config.json")
    runner = ModelRunner(model_from_hf_state(hf.state_dict(), arch), arch)
    tok = load_tokenizer(d)
    ids = [tok.encode(t) for t in TEXTS]
    assert len({len(i) for i in ids}) == len(ids) and max(map(len, ids)) > 5 * min(map(len, ids))
    return SimpleNamespace(hf=hf, tok=tok, runner=runner, ids=ids, kv=KVCacheEngine(runner),
                           rc=RecomputeEngine(runner))


def hf_greedy(hf, prompt, n, processor=None):
    """Greedy decoding by hand on transformers' full forward pass (no cache, no generate)."""
    x = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            scores = hf(x).logits[:, -1].float()
            if processor is not None:
                scores = processor(x, scores)
            x = torch.cat([x, scores.argmax(-1, keepdim=True)], dim=1)
    return x[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def reference(tiny):
    return [hf_greedy(tiny.hf, p, NEW) for p in tiny.ids]


def test_greedy_equals_transformers_and_recompute(tiny, reference):
    from megatron_patch.inference.sampling import SamplingParams

    sp = SamplingParams(max_new_tokens=NEW)
    alone = [tiny.kv.generate(p, sp) for p in tiny.ids]
    assert alone == reference
    assert [tiny.rc.generate(p, sp) for p in tiny.ids[:2]] == reference[:2]
    assert len({tuple(r[:8]) for r in reference}) == len(reference)  # not one repeated answer
    # one left-padded batch; and batches of 2 (split) in a different order
    assert tiny.kv.generate_batch(tiny.ids, sp) == reference
    tiny.kv.max_batch_size = 2
    try:
        order = [4, 1, 3, 0, 2]
        got = tiny.kv.generate_batch([tiny.ids[i] for i in order], sp)
    finally:
        tiny.kv.max_batch_size = 8
    assert got == [reference[i] for i in order]


def test_rows_end_independently(tiny, reference):
    """EOS, per-row stop tests and max_new_tokens end rows at different steps; the rows left
    keep decoding from the right cache rows."""
    from megatron_patch.inference.sampling import SamplingParams

    eos = reference[2][6]  # row 2 stops at its 7th token, other rows where they emit it
    lens = [NEW, 3, NEW, 11, NEW]
    params = [SamplingParams(max_new_tokens=n) for n in lens]
    stops = [None, None, None, None, lambda new: len(new) == 9]
    streamed = {}
    got = tiny.kv.generate_batch(tiny.ids, params, eos_ids=[eos], stops=stops,
                                 on_token=lambda r, t: streamed.setdefault(r, []).append(t))
    for i, (ref, out) in enumerate(zip(reference, got)):
        want = ref[:lens[i]]
        if eos in want:
            want = want[:want.index(eos) + 1]
        if i == 4:
            want = want[:9]
        assert out == want, i
        assert streamed[i] == out, i
        assert out == tiny.rc.generate(tiny.ids[i], params[i], eos_ids=[eos], stop=stops[i])
    assert len(got[2]) == 7 and len(got[1]) == 3 and len(got[4]) == 9 and len(got[0]) > 11


def test_context_limit(tiny):
    from megatron_patch.inference.sampling import SamplingParams

    room = 4
    long_prompt = (tiny.ids[2] * 20)[: tiny.runner.max_length - room]
    sp = SamplingParams(max_new_tokens=10)
    got = tiny.kv.generate_batch([long_prompt, tiny.ids[0]], sp)
    assert len(got[0]) == room and got[0] == tiny.rc.generate(long_prompt, sp)
    assert got[1] == tiny.rc.generate(tiny.ids[0], sp)
    full = long_prompt + [1] * room
    assert tiny.kv.generate(full, sp) == []


def test_sampling_batched_equals_alone(tiny):
    from megatron_patch.inference.sampling import SamplingParams

    params = [SamplingParams(max_new_tokens=12, temperature=0.9, seed=s, top_k=k, top_p=p)
              for s, k, p in ((1, 0, 1.0), (2, 20, 1.0), (3, 0, 0.9), (4, 50, 0.8), (1, 0, 1.0))]
    batched = tiny.kv.generate_batch(tiny.ids, params)
    alone = [tiny.rc.generate(p, sp) for p, sp in zip(tiny.ids, params)]
    assert batched == alone
    assert tiny.kv.generate(tiny.ids[0], params[0]) == batched[0]
    other = tiny.kv.generate(tiny.ids[0], SamplingParams(max_new_tokens=12, temperature=0.9,
                                                         seed=99))
    assert other != batched[0]  # the seed matters


def test_repetition_penalty_equals_transformers(tiny):
    from transformers import RepetitionPenaltyLogitsProcessor

    from megatron_patch.inference.sampling import SamplingParams

    sp = SamplingParams(max_new_tokens=16, repetition_penalty=1.8)
    ref = [hf_greedy(tiny.hf, p, 16, RepetitionPenaltyLogitsProcessor(1.8)) for p in tiny.ids]
    assert tiny.kv.generate_batch(tiny.ids, sp) == ref
    assert ref != [hf_greedy(tiny.hf, p, 16) for p in tiny.ids]  # the penalty changed them


def test_penalties_by_hand():
    from megatron_patch.inference.sampling import SamplingParams, apply_penalties, next_token

    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0])
    got = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), prompt=[1], new=[3])
    assert got.tolist() == [2.0, -2.0, 0.5, 1.5, 1.0]  # negative * p, positive / p
    got = apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
                          prompt=[0], new=[3, 3, 4])
    # OpenAI: logit - count * frequency - (count > 0) * presence, generated tokens only
    assert got.tolist() == [2.0, -1.0, 0.5, 3.0 - 0.5 - 0.5, 1.0 - 0.25 - 0.5]
    assert next_token(logits, SamplingParams(frequency_penalty=2.0), new=[3]) == 0
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=3)
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0)


def test_bf16_padded_row_equals_alone(tiny):
    """Each row gets its own rotary positions: in bf16 a row padded by ~300 slots gives the
    same first logits bit for bit and the same tokens as alone. (With megatron's slot
    positions, position + padding, rounding of the rotary table moves the logits by ~0.03
    and the greedy tokens part after a few steps.)"""
    from megatron_patch.inference.engine import KVCacheEngine
    from megatron_patch.inference.loading import model_from_hf_state
    from megatron_patch.inference.runner import ModelRunner
    from megatron_patch.inference.sampling import SamplingParams

    arch = tiny.runner.arch
    runner = ModelRunner(model_from_hf_state(tiny.hf.state_dict(), arch, "bf16"), arch)

    class Recording(KVCacheEngine):  # keeps the first logits row 0 is chosen from
        first = None

        def _choose(self, logits, rows, *args):
            if self.first is None:
                self.first = logits[0].clone()
            return super()._choose(logits, rows, *args)

    short = tiny.ids[1] + tiny.ids[0]
    long = (tiny.ids[2] * 20)[:300]
    sp = SamplingParams(max_new_tokens=12)
    alone, both = Recording(runner), Recording(runner)
    assert both.generate_batch([short, long], sp)[0] == alone.generate(short, sp)
    assert torch.equal(both.first, alone.first)
