"""lm-eval end to end on the bundled task, offline.

A tiny random Llama is converted HF -> Megatron (TP=2) -> HF (mg2hf) with the converter,
like a user's trained checkpoint. Then:
- ``run_eval.sh`` (accelerate launch -m lm_eval --model hf) on the mg2hf output writes a
  results JSON whose accuracy we read;
- the ``megatron_patch`` lm-eval model on the Megatron checkpoint, at TP=2 and at TP=1 (with
  2 processes: data parallel 2), gives the same per-item loglikelihoods and accuracy;
- the same through ``run_eval.sh`` on the Megatron checkpoint (python -m megatron_patch.evaluation).
A random model scores near chance; the point is that the paths agree.
"""
import csv
import glob
import json
import os
import subprocess
import sys

import pytest

from mp_utils import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(REPO, "LM-Evaluation-Harness")
TASKS_DIR = os.path.join(HARNESS, "tasks")
TASK = "mp_tiny_mmlu"
BUNDLED_DIR = os.path.join(REPO, "megatron_patch", "evaluation", "assets", TASK)  # its CSVs
N_ITEMS = 36  # test questions of the bundled task
TOL = 1e-4    # fp32: the two paths differ only by summation order


def _env():
    env = dict(os.environ)
    venv_bin = os.path.dirname(sys.executable)
    env.update(PATH=venv_bin + os.pathsep + env.get("PATH", ""), MP_PYTHON=sys.executable,
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", DEVICE="cpu", TQDM_DISABLE="1", PYTHONIOENCODING="utf-8")
    return env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megatron_patch.evaluation.tiny_model import write_tiny_set
    return write_tiny_set(str(tmp_path_factory.mktemp("tiny_eval")), tp=2)


def read_run(out_dir):
    """(results dict, {(question, choice): loglikelihood}) of one lm-eval output folder."""
    res = glob.glob(os.path.join(out_dir, "**", "results_*.json"), recursive=True)
    assert len(res) == 1, res
    with open(res[0]) as f:
        results = json.load(f)
    lls = {}
    for path in glob.glob(os.path.join(out_dir, "**", "samples_*.jsonl"), recursive=True):
        with open(path) as f:
            for line in f:
                s = json.loads(line)
                lls.update(_sample_lls(s))
    return results, lls


def _sample_lls(s):
    return {(s["doc"]["question"], i): float(r[0][0]) for i, r in enumerate(s["resps"])}


def run_script(model_path, out_dir, env_extra=None, timeout=240):
    env = _env()
    env.update(env_extra or {})
    cmd = ["sh", os.path.join(HARNESS, "run_eval.sh"), model_path, TASK, "8", out_dir,
           "--log_samples"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


@pytest.fixture(scope="module")
def hf_run(tiny, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf_results"))
    p = run_script(tiny["hf_back"], out)
    assert "accelerate" in p.stderr and "-m lm_eval" in p.stderr  # the launcher line
    return read_run(out)


def test_hf_accelerate_writes_results(hf_run):
    results, lls = hf_run
    acc = results["results"][TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert results["config"]["model"] == "hf"
    assert results["n-samples"][f"{TASK}_arithmetic"]["effective"] == 18
    assert len(lls) == 4 * N_ITEMS
    assert abs(acc - accuracy(lls)) < 1e-9  # the JSON's number is the items' argmax
    print(f"hf (accelerate) {TASK} acc = {acc:.4f} over {N_ITEMS} items")


def accuracy(lls):
    """Fraction of questions whose best-scored choice is the answer (bundled CSVs)."""
    answers = {}
    for split in ("arithmetic", "general_science"):
        with open(os.path.join(BUNDLED_DIR, "test", f"{split}_test.csv")) as f:
            for row in csv.reader(f):
                answers[row[0]] = "ABCD".index(row[5])
    right = sum(max(range(4), key=lambda i: lls[(q, i)]) == a for q, a in answers.items())
    return right / len(answers)


GEN_CONTEXTS = ["What is 2 + 3?\nAnswer:", "Hello! How are you today?",
                "The following are multiple choice questions"]
ROLLING = ["Which planet do people live on? Earth, of course. " * 3, "What is 7 + 8?"]


@pytest.fixture(scope="module")
def hf_direct(tiny):
    """lm-eval's HF model in this process: generate_until (greedy, with and without a stop
    string taken from its own output) and loglikelihood_rolling."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=tiny["hf_back"], device="cpu", batch_size=1, dtype="float32")

    def gen(reqs):
        return lm.generate_until([Instance("generate_until", {}, r, i)
                                  for i, r in enumerate(reqs)], disable_tqdm=True)

    plain = [(c, {"until": [], "max_gen_toks": 8, "do_sample": False}) for c in GEN_CONTEXTS]
    first = gen(plain)
    stops = [(c, {"until": [o[3:5] if len(o) >= 5 else "\n\n"], "max_gen_toks": 8,
                  "do_sample": False}) for c, o in zip(GEN_CONTEXTS, first)]
    reqs = plain + stops
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                        for i, t in enumerate(ROLLING)], disable_tqdm=True)
    return {"gen_requests": reqs, "gen": first + gen(stops), "rolling": rolling}


def _evaluate_megatron(rank, world, mcore, tasks_dir, gen_requests):
    """Both layouts in one pair of processes: TP=2, then TP=1 with data parallel 2; then the
    model's generate_until (batches of 4, KV cache) and loglikelihood_rolling at TP=2."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from megatron_patch.evaluation.__main__ import register

    register()
    out = {}
    for tp in (2, 1):
        res = simple_evaluate(
            model="megatron_patch", model_args={"load": mcore, "tp": tp}, tasks=[TASK],
            batch_size=8, log_samples=True,
            task_manager=TaskManager(include_path=tasks_dir, include_defaults=False))
        if res is not None:
            lls = {}
            for samples in res["samples"].values():
                for s in samples:
                    lls.update(_sample_lls(s))
            out[tp] = (res["results"][TASK]["acc,none"], lls)
    from lm_eval.api.instance import Instance

    from megatron_patch.evaluation.lm_model import MegatronPatchLM

    # batch_size 4: generate_until decodes left-padded batches with the KV-cached engine
    lm = MegatronPatchLM(load=mcore, tp=2, batch_size=4)
    out["gen"] = lm.generate_until([Instance("generate_until", {}, r, i)
                                    for i, r in enumerate(gen_requests)], disable_tqdm=True)
    out["rolling"] = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(ROLLING)],
        disable_tqdm=True)
    return out


def test_megatron_patch_model_matches_hf_tp1_tp2(tiny, hf_run, hf_direct):
    hf_results, hf_lls = hf_run
    hf_acc = hf_results["results"][TASK]["acc,none"]
    got = run_distributed(_evaluate_megatron, 2, tiny["mcore"], TASKS_DIR,
                          hf_direct["gen_requests"])
    assert 1 not in got[1] and 2 not in got[1]  # only rank 0 returns lm-eval results
    for r in range(2):  # generate_until / loglikelihood_rolling: every rank, same answers
        assert got[r]["gen"] == hf_direct["gen"], (got[r]["gen"], hf_direct["gen"])
        for a, b in zip(got[r]["rolling"], hf_direct["rolling"]):
            assert abs(a - b) < 1e-3, (a, b)
    for tp in (2, 1):
        acc, lls = got[0][tp]
        assert set(lls) == set(hf_lls), f"TP={tp}: different items"
        worst = max(abs(lls[k] - hf_lls[k]) for k in hf_lls)
        print(f"megatron_patch TP={tp}: acc {acc:.4f} (hf {hf_acc:.4f}), max |dll| {worst:.2e}")
        assert worst < TOL, f"TP={tp}: loglikelihoods differ by {worst}"
        assert acc == hf_acc


@pytest.mark.slow
def test_run_script_on_megatron_checkpoint(tiny, hf_run, tmp_path):
    """The user's command on a Megatron checkpoint: python -m megatron_patch.evaluation
    under accelerate (one process, TP=1 from the TP=2 files)."""
    hf_results, hf_lls = hf_run
    p = run_script(tiny["mcore"], str(tmp_path), {"TP": "1"})
    assert "-m megatron_patch.evaluation" in p.stderr
    results, lls = read_run(str(tmp_path))
    assert results["config"]["model"] == "megatron_patch"
    assert results["results"][TASK]["acc,none"] == hf_results["results"][TASK]["acc,none"]
    assert max(abs(lls[k] - hf_lls[k]) for k in hf_lls) < TOL
