"""Offline task data in the official layouts, and the three user mistakes that must end in
one clear error: missing task data, an unknown task name, a wrong model/checkpoint path."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(REPO, "LM-Evaluation-Harness")
TASKS_DIR = os.path.join(HARNESS, "tasks")


@pytest.fixture(scope="module")
def preflight():
    from megatron_patch.evaluation import preflight
    return preflight


@pytest.fixture(scope="module")
def local_data():
    from megatron_patch.evaluation import task_data
    return task_data


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    for k in ("MMLU_DIR", "CMMLU_DIR", "CEVAL_DIR", "EVAL_DATA_DIR"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """One subject of each benchmark in its official file layout."""
    root = tmp_path_factory.mktemp("eval_data")

    def write(rel, text):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")

    rows = "Q one?,a,b,c,d,A\n\"Q, two?\",a,b,c,d,C\n"
    write("mmlu/data/dev/anatomy_dev.csv", rows)        # MMLU's data.tar unpacks to data/
    write("mmlu/data/test/anatomy_test.csv", rows)
    write("cmmlu/dev/agronomy.csv", ",Question,A,B,C,D,Answer\n0,问题一,甲,乙,丙,丁,B\n")
    write("cmmlu/test/agronomy.csv", ",Question,A,B,C,D,Answer\n0,问题一,甲,乙,丙,丁,B\n"
          "1,问题二,甲,乙,丙,丁,D\n")
    write("ceval/dev/law_dev.csv", "id,question,A,B,C,D,answer,explanation\n"
          "0,题一,甲,乙,丙,丁,A,因为\n")
    write("ceval/val/law_val.csv", "id,question,A,B,C,D,answer\n0,题一,甲,乙,丙,丁,C\n")
    write("ceval/test/law_test.csv", "id,question,A,B,C,D,answer\n0,题一,甲,乙,丙,丁,\n")
    return root


# ---- task data ------------------------------------------------------------------------------
def test_official_layouts_load(local_data, official):
    meta = {"mmlu_dir": str(official / "mmlu"), "cmmlu_dir": str(official / "cmmlu"),
            "ceval_dir": str(official / "ceval")}
    mm = local_data.load("mmlu", "anatomy", ["dev", "test"], **meta)
    assert mm["test"][1] == {"question": "Q, two?", "A": "a", "B": "b", "C": "c", "D": "d",
                             "answer": "C"}
    cm = local_data.load("cmmlu", "agronomy", ["dev", "test"], **meta)
    assert cm["test"].num_rows == 2 and cm["test"][1]["question"] == "问题二"
    ce = local_data.load("ceval", "law", ["dev", "validation", "test"], **meta)
    assert ce["validation"][0]["answer"] == "C" and ce["test"][0]["answer"] == ""
    bundled = local_data.load("bundled", "arithmetic", ["dev", "test"])
    assert bundled["test"].num_rows == 18 and bundled["dev"].num_rows == 5


def test_tasks_are_indexed_and_build(official):
    """lm-eval finds every offline task, and the Chinese ones build from the official files."""
    from lm_eval.tasks import TaskManager, get_task_dict

    tm = TaskManager(include_path=TASKS_DIR, include_defaults=False,
                     metadata={"cmmlu_dir": str(official / "cmmlu"),
                               "ceval_dir": str(official / "ceval")})
    names = set(tm.all_tasks)
    for group, n in (("mmlu_local", 57), ("cmmlu_local", 67), ("ceval_local-valid", 52),
                     ("mp_tiny_mmlu", 2)):
        assert group in names
        prefix = group + "_"
        assert len([t for t in names if t.startswith(prefix)]) == n, group
    tasks = get_task_dict(["cmmlu_local_agronomy", "ceval_local-valid_law"], tm)
    ce = tasks["ceval_local-valid_law"]
    doc = next(iter(ce.validation_docs()))
    assert ce.doc_to_text(doc).endswith("D. 丁\n答案：") and ce.doc_to_target(doc) == 2
    cm = tasks["cmmlu_local_agronomy"]
    assert "农学" in cm.config.description and len(list(cm.test_docs())) == 2


def test_missing_task_data(preflight, official, tmp_path, monkeypatch):
    args = ["--model", "hf", "--model_args", f"pretrained={tmp_path}", "--include_path",
            TASKS_DIR]
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(preflight.PreflightError, match="MMLU data folder not given: set "
                       "MMLU_DIR="):
        preflight.run(args + ["--tasks", "mmlu_local"])
    monkeypatch.setenv("MMLU_DIR", str(official / "mmlu"))
    preflight.run(args + ["--tasks", "mmlu_local_anatomy"])  # present: fine
    with pytest.raises(preflight.PreflightError, match=r"MMLU data missing: .*"
                       r"abstract_algebra_dev.csv not found \(and 111 more of the 114 files"):
        preflight.run(args + ["--tasks", "mmlu_local"])  # the group needs every subject
    monkeypatch.setenv("EVAL_DATA_DIR", str(official))
    with pytest.raises(preflight.PreflightError, match=r"C-Eval data missing: .*"
                       r"dev/accountant_dev.csv not found \(and 101 more of the 104"):
        preflight.run(args + ["--tasks", "ceval_local-valid"])
    bad = tmp_path / "bad" / "data" / "test"
    bad.mkdir(parents=True)
    (bad / "anatomy_test.csv").write_text("Q?,a,b,c,d,E\n")
    from megatron_patch.evaluation import task_data as local_data
    with pytest.raises(local_data.TaskDataError, match=r"anatomy_test.csv:1: answer 'E'"):
        local_data.load("mmlu", "anatomy", ["test"], mmlu_dir=str(tmp_path / "bad"))


def test_missing_task_data_from_run_script(tmp_path):
    """What the user sees: one line, exit status 2, nothing launched."""
    (tmp_path / "config.json").write_text("{}")
    env = dict(os.environ, MP_PYTHON=sys.executable, MMLU_DIR=str(tmp_path / "nowhere"))
    p = subprocess.run(["sh", os.path.join(HARNESS, "run_eval.sh"), str(tmp_path), "mmlu", "4"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert errors == [f"error: MMLU data folder {tmp_path / 'nowhere'} (from MMLU_DIR) does "
                      "not exist; expected layout data/{dev,val,test}/<subject>_{dev,val,test}"
                      ".csv (MMLU's data.tar)"], p.stderr
    assert "accelerate" not in p.stderr


# ---- task names -----------------------------------------------------------------------------
def test_unknown_task_name(preflight, tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    args = ["--model", "hf", "--model_args", f"pretrained={tmp_path}", "--include_path",
            TASKS_DIR]
    # the fast scan knows lm-eval's own tasks and ours
    assert preflight.check_tasks(["hellaswag", "mp_tiny_mmlu", "mmlu", "ceval-valid"],
                                 [TASKS_DIR], {}, exact=False)
    # a name the scan misses is confirmed against lm-eval's real index (stubbed here: the
    # real one takes ~10 s to build)
    import lm_eval.tasks

    class FakeIndex:
        def __init__(self, include_path=None, **kw):
            self.all_tasks = ["only_in_the_real_index"]

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", FakeIndex)
    assert preflight.check_tasks(["only_in_the_real_index"], [TASKS_DIR], {})
    with pytest.raises(preflight.PreflightError) as e:
        preflight.run(args + ["--tasks", "mp_tiny_mmlx"])
    msg = str(e.value)
    assert msg.startswith("unknown task 'mp_tiny_mmlx'; did you mean mp_tiny_mmlu")
    assert "mmlu_local" in msg and "cmmlu_local" in msg and "ceval_local-valid" in msg
    with pytest.raises(preflight.PreflightError, match="add --include_path"):
        preflight.run(["--model", "hf", "--model_args", f"pretrained={tmp_path}", "--tasks",
                       "mp_tiny_mmlu"])


# ---- model / checkpoint paths ------------------------------------------------------------------
def test_wrong_model_paths(preflight, tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    (hf_dir / "model.safetensors").write_bytes(b"")
    tasks = ["--tasks", "mp_tiny_mmlu", "--include_path", TASKS_DIR]
    cases = [
        (["--model", "hf", "--model_args", f"pretrained={tmp_path}/nope"],
         f"model directory not found: {tmp_path}/nope"),
        (["--model", "hf", "--model_args", f"pretrained={tmp_path}"],
         "is not an HF model directory (no config.json)"),
        (["--model", "megatron_patch", "--model_args", f"load={tmp_path}/nope"],
         f"checkpoint directory not found: {tmp_path}/nope"),
        (["--model", "megatron_patch", "--model_args", f"load={hf_dir}"],
         "is not a Megatron checkpoint: no latest_checkpointed_iteration.txt and no mp_rank_* "
         "folders (it is an HF model directory: use --model hf"),
        (["--model", "megatron_patch"], "needs --model_args load="),
    ]
    for argv, message in cases:
        with pytest.raises(preflight.PreflightError) as e:
            preflight.run(argv + tasks)
        assert message in str(e.value), (argv, str(e.value))


def test_wrong_checkpoint_path_in_library_and_clis(tmp_path, capsys):
    from megatron_patch.evaluation.lm_model import MegatronPatchLM
    from megatron_patch.inference import chat, generate
    from megatron_patch.inference.loading import CheckpointError, find_checkpoint

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        find_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="not a Megatron checkpoint.*HF model directory"):
        MegatronPatchLM(load=str(tmp_path))
    assert generate.main(["--load", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert chat.main(["--load", str(tmp_path / "nope")]) == 2
    # python -m megatron_patch.evaluation (lm-eval's CLI + our model): checked before lm-eval
    from megatron_patch.evaluation.__main__ import main as eval_main
    assert eval_main(["--model", "megatron_patch", "--model_args", f"load={tmp_path / 'nope'}",
                      "--tasks", "mp_tiny_mmlu", "--include_path", TASKS_DIR]) == 2
    err = capsys.readouterr().err.splitlines()
    msg = f"error: checkpoint directory not found: {tmp_path / 'nope'}"
    assert err == [f"generate: {msg}", f"chat: {msg}", msg]


def test_run_script_argument_errors(tmp_path):
    env = dict(os.environ, MP_PYTHON=sys.executable)
    script = os.path.join(HARNESS, "run_eval.sh")
    for args, message in (
            ([str(tmp_path / "nope"), "mp_tiny_mmlu", "8"],
             f"MODEL_PATH={tmp_path / 'nope'}: no such directory"),
            ([str(tmp_path), "mp_tiny_mmlu", "8"], f"MODEL_PATH={tmp_path}: neither an HF "
             "model directory"),
            ([str(tmp_path), "mp_tiny_mmlu", "x"], "BATCH_SIZE=x: a positive integer or auto"),
            ([str(tmp_path), "mp_tiny_mmlu"], "expected at least 3 arguments")):
        p = subprocess.run(["sh", script] + args, capture_output=True, text=True, env=env,
                           timeout=30)
        assert p.returncode == 2, p.stderr
        assert p.stderr.count("\n") == 1, p.stderr
        assert p.stderr.startswith(f"run_eval.sh: error: {message}"), p.stderr
