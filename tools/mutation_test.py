"""Mutation testing over a curated list of mutants of the critical modules.

Each mutant is one small deliberate bug (a swapped argument, an off-by-one, a dropped
restore) written as an exact text replacement in one file, with the test files that a
reviewer would expect to catch it. For each mutant the tool copies the repository's tracked
files once into a scratch directory (the repository itself is never modified), applies the
replacement there, runs those tests with ``pytest -x`` (the scratch copy first on
PYTHONPATH, so subprocesses such as torchrun workers import the mutated code too) and
reverts. A mutant is *killed* when the tests fail, *survived* when they pass.
``--full-on-survivors`` runs each survivor against the whole suite before calling it one.

The list fails loudly when it goes stale: a replacement whose text no longer occurs exactly
once in its file is an error, not a skip. Run outside CI (it takes ~15-30 min on 2 cores):

    .venv/bin/python tools/mutation_test.py                 # all mutants
    .venv/bin/python tools/mutation_test.py --only qkv_kv_swapped_pack,rng_rank0_only
    .venv/bin/python tools/mutation_test.py --list

Exit status: 0 when every mutant is killed, 1 when any survives, 2 on a stale list.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str          # relative to the repository root
    old: str           # must occur exactly once in the file
    new: str
    tests: tuple       # test files (relative) expected to catch it
    what: str          # the bug, in words


P = "megatron_patch/"
MAP = P + "models/llama/mapping.py"
CONV_TESTS = ("tests/test_convert_hand_layout.py", "tests/test_convert_roundtrip.py",
              "tests/test_hf_parity.py")

MUTANTS: List[Mutant] = [
    # ---- HF <-> megatron-core mapping ---------------------------------------------------
    Mutant("qkv_kv_swapped_pack", MAP,
           "torch.cat([q.view(g, r * d, h), k.view(g, d, h), v.view(g, d, h)], dim=1)",
           "torch.cat([q.view(g, r * d, h), v.view(g, d, h), k.view(g, d, h)], dim=1)",
           CONV_TESTS, "k and v swapped inside each query group when packing"),
    Mutant("qkv_kv_swapped_both", MAP,
           "q, k, v = w.view(g, (r + 2) * d, h).split([r * d, d, d], dim=1)",
           "q, v, k = w.view(g, (r + 2) * d, h).split([r * d, d, d], dim=1)",
           CONV_TESTS, "k and v swapped when unpacking (export)"),
    Mutant("gate_up_reversed", MAP, "        return torch.cat(hf, dim=0)\n",
           "        return torch.cat(hf[::-1], dim=0)\n",
           CONV_TESTS, "fc1 built as cat(up, gate)"),
    Mutant("gate_up_plain_split", MAP,
           "return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]], dim=0)",
           "return w.chunk(tp, dim=0)[rank]",
           CONV_TESTS, "fc1 sharded as one block (TP rank 0 gets only gate rows)"),
    Mutant("fc2_wrong_tp_dim", MAP,
           '(_L + "mlp.down_proj.weight",), "copy", 1)',
           '(_L + "mlp.down_proj.weight",), "copy", 0)',
           CONV_TESTS, "fc2 (row-parallel) sharded on dim 0"),
    Mutant("proj_wrong_tp_dim", MAP,
           '(_L + "self_attn.o_proj.weight",), "copy", 1)',
           '(_L + "self_attn.o_proj.weight",), "copy", 0)',
           CONV_TESTS, "attention output projection sharded on dim 0"),
    Mutant("vocab_pad_ones", MAP,
           "w = torch.cat([w, w.new_zeros(padded_vocab - w.shape[0], w.shape[1])])",
           "w = torch.cat([w, w.new_ones(padded_vocab - w.shape[0], w.shape[1])])",
           CONV_TESTS + ("tests/test_convert_check.py",), "vocabulary padding rows not zero"),
    # (mapping.unpack cuts the padding too, but every reader has cut it here already)
    Mutant("vocab_cut_from_end", P + "checkpoint/load.py",
           'return full[: arch.vocab_size] if rule.kind == "vocab" else full',
           'return full[full.shape[0] - arch.vocab_size:] if rule.kind == "vocab" else full',
           CONV_TESTS, "export keeps the last vocab_size rows instead of the first"),
    Mutant("vp_chunk_order", MAP, "idx = vp_stage * pp + pp_rank",
           "idx = pp_rank * (vp or 1) + vp_stage",
           ("tests/test_convert_roundtrip.py", "tests/test_checkpoint_layout.py",
            "tests/test_convert_hand_layout.py"),
           "virtual pipeline chunks numbered stage-major instead of megatron's order"),
    Mutant("local_norm_names_swapped", MAP,
           '"mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}',
           '"mlp.linear_fc1.layer_norm_weight": "input_layernorm.weight"}',
           CONV_TESTS, "local-spec name of the pre-MLP norm"),
    # ---- rotary embedding / model config -------------------------------------------------
    Mutant("rope_odd_dims", P + "models/llama/rope.py", "torch.arange(0, dim, 2,",
           "torch.arange(1, dim, 2,", ("tests/test_hf_parity.py",),
           "rotary frequencies from the odd dimensions"),
    Mutant("rope_llama3_low_freq_key", P + "models/llama/rope.py",
           'low_freq_factor=float(scaling.get("low_freq_factor", 1.0))',
           'low_freq_factor=float(scaling.get("high_freq_factor", 1.0))',
           ("tests/test_hf_parity.py", "tests/test_arch_config.py"),
           "llama3 rope scaling reads the wrong factor"),
    Mutant("rope_linear_multiplies", P + "models/llama/rope.py",
           'return freqs / float(scaling["factor"])', 'return freqs * float(scaling["factor"])',
           ("tests/test_hf_parity.py", "tests/test_arch_config.py"),
           "linear rope scaling multiplies the frequencies"),
    Mutant("norm_eps_fixed", P + "models/llama/config.py", "layernorm_epsilon=arch.norm_eps",
           "layernorm_epsilon=1e-6", ("tests/test_hf_parity.py", "tests/test_arch_config.py"),
           "RMSNorm epsilon not taken from config.json"),
    Mutant("vocab_loss_mask_offset", P + "models/llama/provider.py",
           "start = parallel_state.get_tensor_model_parallel_rank() * v_local", "start = 0",
           ("tests/test_vocab_padding_loss.py",), "padded-vocab loss mask ignores the TP shard"),
    # ---- launcher arguments -> TrainConfig ------------------------------------------------
    Mutant("do_reads_fl", P + "training/arguments.py", "distributed_optimizer=do,",
           "distributed_optimizer=fl,", ("tests/test_config_wiring.py",),
           "DO argument read from FL"),
    Mutant("min_lr_is_lr", P + "training/arguments.py", "optim=OptimizerConfig(lr=lr, min_lr=min_lr,",
           "optim=OptimizerConfig(lr=lr, min_lr=lr,", ("tests/test_config_wiring.py",),
           "MIN_LR ignored"),
    Mutant("ac_layers_ignored", P + "training/arguments.py",
           "recompute_num_layers=ac_layers)", "recompute_num_layers=1)",
           ("tests/test_config_wiring.py",), "MP_AC_LAYERS ignored"),
    Mutant("recompute_method_block", P + "models/llama/config.py",
           'recompute_granularity="full", recompute_method="uniform",',
           'recompute_granularity="full", recompute_method="block",',
           ("tests/test_config_wiring.py",), "AC=full recomputes blocks instead of uniform groups"),
    # ---- data encoders --------------------------------------------------------------------
    Mutant("sft_labels_not_shifted", P + "data/sft_encode.py",
           "labels[:k] = token_labels[1:k + 1]", "labels[:k] = token_labels[:k]",
           ("tests/test_data_sft.py", "tests/test_train_data.py"),
           "SFT targets not shifted to the next token"),
    Mutant("sft_answer_overlap_ge", P + "data/sft_encode.py",
           "train[inside] = offsets[inside, 1] > starts[k[inside]]",
           "train[inside] = offsets[inside, 1] >= starts[k[inside]]",
           ("tests/test_data_sft.py",), "a token ending where the answer starts is learned"),
    Mutant("sft_has_loss_window", P + "data/sft_encode.py",
           "return bool((labels[1:seq_len + 1] != IGNORE_INDEX).any())",
           "return bool((labels[:seq_len] != IGNORE_INDEX).any())",
           ("tests/test_data_sft.py",), "answer-in-window test off by one (drops samples whose "
           "only answer token is the window's last target)"),
    Mutant("pack_capacity_ge", P + "data/sft_encode.py", "if current and used + n > capacity:",
           "if current and used + n >= capacity:",
           ("tests/test_data_sft.py", "tests/test_sft_packing_attention.py"),
           "packing leaves a row one sample short when it fits exactly"),
    Mutant("eod_prepended", P + "data/pretrain_preprocess.py", "docs = [d + eod for d in docs]",
           "docs = [eod + d for d in docs]", ("tests/test_data_preprocess.py",),
           "end-of-document token written before the document"),
    # ---- training loss / checkpointing / backend patches ------------------------------------
    Mutant("loss_mask_ignored", P + "training/forward_step.py",
           "loss = torch.sum(output_tensor.float().view(-1) * mask)",
           "loss = torch.sum(output_tensor.float().view(-1))",
           ("tests/test_train_data.py", "tests/test_distributed_equivalence.py"),
           "prompt and padding tokens count in the SFT loss"),
    Mutant("reported_loss_per_microbatch", P + "training/forward_step.py",
           "return total[0] / total[1].clamp(min=1.0)",
           "return total[0] / (total[1].clamp(min=1.0) * len(losses))",
           ("tests/test_distributed_equivalence.py", "tests/test_train_resume.py"),
           "reported loss divided by the micro-batch count again"),
    Mutant("rng_rank0_only", P + "training/checkpointing.py",
           "set_rng_state(rngs[dp_rank] if dp_rank < len(rngs) else rngs[0])",
           "set_rng_state(rngs[0])", ("tests/test_resume_rng.py",),
           "every DP rank resumes DP rank 0's RNG streams"),
    Mutant("rng_tracker_not_restored", P + "training/checkpointing.py",
           'tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])',
           "tensor_parallel.get_cuda_rng_tracker().get_states()", ("tests/test_resume_rng.py",),
           "the TP RNG tracker (dropout streams) not restored"),
    Mutant("p2p_same_tag", P + "backends/cpu.py", "_TAG_FWD, _TAG_BWD = 1, 2",
           "_TAG_FWD, _TAG_BWD = 1, 1", ("tests/test_pipeline_p2p_tags.py",),
           "pipeline p2p directions share one gloo tag"),
    Mutant("cp_chunk_order", P + "transformer/cp_attention.py",
           "where[r], where[2 * cp_size - 1 - r] = 2 * r, 2 * r + 1",
           "where[r], where[2 * cp_size - 1 - r] = 2 * r + 1, 2 * r",
           ("tests/test_cp_attention.py", "tests/test_cp_training.py"),
           "all-gathered K/V chunks put in the wrong order"),
    Mutant("meta_rope_permutation", P + "conversion/meta_files.py",
           "return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)",
           "return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)",
           ("tests/test_convert_meta.py",), "Meta q/k rows permuted the wrong way"),
    Mutant("meta_ffn_rounding", P + "conversion/meta_files.py",
           "return multiple_of * ((hidden + multiple_of - 1) // multiple_of)",
           "return multiple_of * (hidden // multiple_of)", ("tests/test_convert_meta.py",),
           "Meta FFN width rounded down"),
]


def tracked_files(root: str) -> List[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if f and os.path.isfile(os.path.join(root, f))]


def scratch_copy(root: str) -> str:
    dst = tempfile.mkdtemp(prefix="mutants-")
    for rel in tracked_files(root):
        os.makedirs(os.path.dirname(os.path.join(dst, rel)) or dst, exist_ok=True)
        shutil.copy2(os.path.join(root, rel), os.path.join(dst, rel))
    return dst


def stale(mutants, root: str) -> List[str]:
    problems = []
    for m in mutants:
        path = os.path.join(root, m.file)
        text = open(path).read() if os.path.exists(path) else ""
        n = text.count(m.old)
        if n != 1:
            problems.append(f"{m.id}: the text to replace occurs {n} times in {m.file}")
        for t in m.tests:
            if not os.path.exists(os.path.join(root, t)):
                problems.append(f"{m.id}: test file {t} does not exist")
    return problems


def run_tests(scratch: str, tests, timeout: int) -> tuple:
    env = dict(os.environ, PYTHONPATH=scratch + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MP_PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           "-p", "no:warnings", *tests]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True,
                           timeout=timeout)
        rc, tail = r.returncode, (r.stdout + r.stderr).strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        rc, tail = -1, ["timed out"]
    return rc, time.time() - t0, tail


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated mutant ids")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--full-on-survivors", action="store_true",
                    help="run each survivor against the whole suite before reporting it")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per test run")
    ap.add_argument("--report", help="write the results as JSON to this file")
    args = ap.parse_args(argv)

    mutants = MUTANTS
    if args.only:
        want = set(args.only.split(","))
        unknown = want - {m.id for m in MUTANTS}
        if unknown:
            print(f"error: unknown mutant id(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        mutants = [m for m in MUTANTS if m.id in want]
    if args.list:
        for m in mutants:
            print(f"{m.id:32s} {m.file}: {m.what}")
        return 0
    problems = stale(mutants, ROOT)
    if problems:
        print("error: the mutant list is stale:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2

    scratch = scratch_copy(ROOT)
    results = []
    try:
        for i, m in enumerate(mutants, 1):
            path = os.path.join(scratch, m.file)
            original = open(path).read()
            with open(path, "w") as f:
                f.write(original.replace(m.old, m.new, 1))
            try:
                rc, secs, tail = run_tests(scratch, m.tests, args.timeout)
                status = "killed" if rc not in (0, 5) else "survived"
                if status == "survived" and args.full_on_survivors:
                    rc, more, tail = run_tests(scratch, ["tests"], args.timeout * 4)
                    secs += more
                    status = "killed (suite)" if rc not in (0, 5) else "survived"
            finally:
                with open(path, "w") as f:
                    f.write(original)
            results.append(dict(id=m.id, file=m.file, what=m.what, status=status,
                                seconds=round(secs, 1), tests=list(m.tests), tail=tail))
            print(f"[{i}/{len(mutants)}] {status:14s} {m.id} ({secs:.0f} s)", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    killed = sum(r["status"] != "survived" for r in results)
    print(f"\nmutation score: {killed}/{len(results)} killed")
    for r in results:
        if r["status"] == "survived":
            print(f"  survived: {r['id']} ({r['file']}): {r['what']}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
