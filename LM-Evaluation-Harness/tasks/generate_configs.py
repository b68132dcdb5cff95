"""Write the lm-eval task YAMLs of this folder from megatron_patch.evaluation.task_catalog.

    python LM-Evaluation-Harness/tasks/generate_configs.py

One folder per benchmark: a template (``_template_yaml``, not indexed as a task), a group
YAML and one YAML per subject, plus ``utils.py`` (lm-eval resolves ``!function utils.load``
to a file next to the YAML; it re-exports the one loader, megatron_patch.evaluation.task_data).
"""
from __future__ import annotations

import json
import os

from megatron_patch.evaluation.task_catalog import BENCHMARKS

HERE = os.path.dirname(os.path.abspath(__file__))

SHIM = '''"""lm-eval resolves `!function utils.load` next to the YAML: the loader is
megatron_patch.evaluation.task_data (written by ../generate_configs.py)."""
from megatron_patch.evaluation.task_data import load  # noqa: F401
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
