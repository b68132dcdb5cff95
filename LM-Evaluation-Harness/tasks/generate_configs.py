"""Write the lm-eval task YAMLs of this folder from catalog.py.

    python LM-Evaluation-Harness/tasks/generate_configs.py

One folder per benchmark: a template (``_template_yaml``, not indexed as a task), a group
YAML and one YAML per subject, plus ``utils.py`` (lm-eval resolves ``!function utils.load``
next to the YAML; it forwards to ../local_data.py).
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import catalog  # noqa: E402

SHIM = '''"""`!function utils.load` resolves next to the YAML; the loader is ../local_data.py."""
import importlib.util
import os
import sys

_NAME = "megatron_patch_eval_local_data"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        _NAME, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "local_data.py"))
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _mod
    try:
        _spec.loader.exec_module(_mod)
    except BaseException:
        del sys.modules[_NAME]
        raise
load = sys.modules[_NAME].load
'''

CHOICES = '"{{question.strip()}}\\nA. {{A}}\\nB. {{B}}\\nC. {{C}}\\nD. {{D}}\\n'


def template(test_split_key: str, test_split: str, answer_word: str, version: int) -> str:
    return (
        "# shared by every subject of this folder (written by ../generate_configs.py)\n"
        "custom_dataset: !function utils.load\n"
        f"{test_split_key}: {test_split}\n"
        "fewshot_split: dev\n"
        "fewshot_config:\n  sampler: first_n\n"
        "output_type: multiple_choice\n"
        f"doc_to_text: {CHOICES}{answer_word}\"\n"
        'doc_to_choice: ["A", "B", "C", "D"]\n'
        "doc_to_target: \"{{['A', 'B', 'C', 'D'].index(answer)}}\"\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        f"metadata:\n  version: {version}\n")


BENCHMARKS = {
    # folder: (group, task prefix, benchmark key, subjects, splits, description, template args)
    "mmlu_local": dict(
        group="mmlu_local", prefix="mmlu_local_", benchmark="mmlu", subjects=catalog.MMLU,
        splits=["dev", "test"],
        describe=lambda s, v: ("The following are multiple choice questions (with answers) "
                               f"about {s.replace('_', ' ')}.\n\n"),
        template=("test_split", "test", "Answer:", 1)),
    "cmmlu_local": dict(
        group="cmmlu_local", prefix="cmmlu_local_", benchmark="cmmlu", subjects=catalog.CMMLU,
        splits=["dev", "test"],
        describe=lambda s, zh: f"以下是关于{zh}的单项选择题，请直接给出正确答案的选项。\n\n",
        template=("test_split", "test", "答案：", 1)),
    "ceval_local": dict(
        group="ceval_local-valid", prefix="ceval_local-valid_", benchmark="ceval",
        subjects=catalog.CEVAL, splits=["dev", "validation"],
        describe=lambda s, zh: f"以下是中国关于{zh}考试的单项选择题，请选出其中的正确答案。\n\n",
        template=("validation_split", "validation", "答案：", 1)),
    "mp_tiny_mmlu": dict(
        group="mp_tiny_mmlu", prefix="mp_tiny_mmlu_", benchmark="bundled",
        subjects=catalog.BUNDLED, splits=["dev", "test"],
        describe=lambda s, name: ("The following are multiple choice questions (with answers) "
                                  f"about {name}.\n\n"),
        template=("test_split", "test", "Answer:", 1)),
}


def task_table() -> dict:
    """task or group name -> (benchmark, [subjects], [splits]); used by the preflight."""
    table = {}
    for b in BENCHMARKS.values():
        subs = list(b["subjects"])
        table[b["group"]] = (b["benchmark"], subs, b["splits"])
        for s in subs:
            table[b["prefix"] + s] = (b["benchmark"], [s], b["splits"])
    return table


def _q(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def main() -> None:
    for folder, b in BENCHMARKS.items():
        d = os.path.join(HERE, folder)
        os.makedirs(d, exist_ok=True)
        for name in os.listdir(d):  # drop stale subject files
            if name.endswith(".yaml"):
                os.remove(os.path.join(d, name))
        with open(os.path.join(d, "utils.py"), "w") as f:
            f.write(SHIM)
        with open(os.path.join(d, "_template_yaml"), "w") as f:
            f.write(template(*b["template"]))
        for s, extra in b["subjects"].items():
            with open(os.path.join(d, f"{b['prefix']}{s}.yaml"), "w") as f:
                f.write(f"task: {_q(b['prefix'] + s)}\n"
                        f"task_alias: {_q(s)}\n"
                        "include: _template_yaml\n"
                        f"description: {_q(b['describe'](s, extra))}\n"
                        "dataset_kwargs:\n"
                        f"  benchmark: {b['benchmark']}\n"
                        f"  subject: {s}\n"
                        f"  splits: {json.dumps(b['splits'])}\n")
        with open(os.path.join(d, f"_{b['group']}.yaml"), "w") as f:
            f.write(f"group: {_q(b['group'])}\n"
                    "task:\n" + "".join(f"  - {_q(b['prefix'] + s)}\n" for s in b["subjects"]) +
                    "aggregate_metric_list:\n"
                    "  - metric: acc\n    aggregation: mean\n    weight_by_size: true\n"
                    "  - metric: acc_norm\n    aggregation: mean\n    weight_by_size: true\n"
                    "metadata:\n  version: 1\n")
    print(f"wrote task YAMLs under {HERE}")


if __name__ == "__main__":
    main()
