"""`--harness lm-eval`: the tasks scored by lm-evaluation-harness itself, on the in-memory model
(`HFLM(pretrained=model, tokenizer=...)`), so a figure is lm-eval's number, not a
reimplementation's.

lm-eval fetches its datasets from the hub. Offline, the tasks whose local files in the benchmark
data folder hold what lm-eval's own task reads are handed to lm-eval as task configs that point
it at those files, with lm-eval's own prompt templates (ARC: "Question: ...\\nAnswer:", BoolQ:
"passage\\nQuestion: ...?\\nAnswer:", WinoGrande's partial scoring, LAMBADA's last word). MMLU
and TruthfulQA are lm-eval's own task configs, read from its installed YAML, given the local rows
in memory in the hub dataset's shape. Tasks whose local layout has lost a field lm-eval's
template needs (HellaSwag's two context fragments, WikiText's page boundaries) are read from the
hub: `--data-dir hub`. (`reconstructed_hellaswag` rebuilds HellaSwag's fields as well as the file
allows, for measuring agreement only, never for a reported lm-eval score.)
"""

from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..core.errors import RankcutError
from ..core.model_facts import get_tokenizer
from ..data.benchmarks import (
    find_data_dir,
    hellaswag_records,
    mmlu_records,
    require_file,
    truthfulqa_records,
)

# rankcut's task names → lm-eval's registered ones (read from the hub)
LM_EVAL_NAMES = {"wikitext2": "wikitext", "lambada": "lambada_openai"}

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}


def _local(name: str, path: Path, **template: Any) -> dict[str, Any]:
    """An lm-eval task config that reads one local JSONL file as its test split."""
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "metadata": {"version": 1.0, "source": str(path)}, **template}


def _arc(folder: str) -> Callable[[Path], dict[str, Any]]:
    def config(data_dir: Path) -> dict[str, Any]:
        # the file's query is lm-eval's "Question: {{question}}" already
        path = require_file(data_dir / folder / f"{folder}.jsonl", folder)
        return _local(folder, path, output_type="multiple_choice", doc_to_text="{{query}}\nAnswer:",
                      doc_to_target="{{gold}}", doc_to_choice="{{choices}}", metric_list=[_ACC, _ACC_NORM])
    return config


def _boolq_text(doc: dict[str, Any]) -> str:
    """lm-eval's "{{passage}}\\nQuestion: {{question}}?\\nAnswer:" from the file's
    "Passage: {passage}\\nQuestion: {question}?"."""
    query = doc["query"]
    return (query[len("Passage: "):] if query.startswith("Passage: ") else query) + "\nAnswer:"


def _boolq(data_dir: Path) -> dict[str, Any]:
    path = require_file(data_dir / "boolq" / "boolq.jsonl", "boolq")
    return _local("boolq", path, output_type="multiple_choice", doc_to_text=_boolq_text,
                  doc_to_target="{{gold}}", doc_to_choice=["no", "yes"], metric_list=[_ACC])


def _winogrande_gold(doc: dict[str, Any]) -> int:
    return int(doc["gold"])  # lm-eval's partial scoring: the text is the index of the right context


def _winogrande(data_dir: Path) -> dict[str, Any]:
    path = require_file(data_dir / "winogrande" / "winogrande.jsonl", "winogrande")
    return _local("winogrande", path, output_type="multiple_choice", doc_to_text=_winogrande_gold,
                  doc_to_target="{{continuation}}", doc_to_choice="{{context_options}}", metric_list=[_ACC])


def _lambada(data_dir: Path) -> dict[str, Any]:
    path = require_file(data_dir / "lambada" / "lambada_openai.jsonl", "lambada")
    return _local("lambada_openai", path, output_type="loglikelihood", doc_to_text="{{context}}",
                  doc_to_target="{{' ' + continuation}}",
                  metric_list=[{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                               _ACC])


def lm_eval_task_config(relative: str) -> dict[str, Any]:
    """One of lm-eval's own task configs, read from its installed YAML (includes merged, its
    functions resolved): the templates and metrics are lm-eval's, not a copy of them."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(Path(lm_eval.__file__).parent / "tasks" / relative, resolve_func=True)


def _in_memory(rows: Callable[[], list[dict[str, Any]]], split: str) -> Callable[..., Any]:
    """lm-eval's `custom_dataset` hook: the local rows as a dataset split, nothing written to disk."""
    def dataset(**_: Any) -> Any:  # lm-eval passes the task's metadata
        import datasets

        return datasets.DatasetDict({split: datasets.Dataset.from_list(rows())})
    return dataset


def _with_local_rows(config: dict[str, Any], rows: Callable[[], list[dict[str, Any]]], source: Path,
                     **changes: Any) -> dict[str, Any]:
    split = config.get("test_split") or config.get("validation_split") or "test"
    config = {k: v for k, v in config.items() if k not in ("tag", "group", "dataset_name", "training_split",
                                                           "fewshot_split", "fewshot_config")}
    return {**config, "custom_dataset": _in_memory(rows, split), "dataset_path": "local",
            "metadata": {**(config.get("metadata") or {}), "source": str(source)}, **changes}


def _mmlu(data_dir: Path) -> dict[str, Any]:
    """lm-eval's MMLU (its default template) over every subject as one task: each row carries its
    subject's description from lm-eval's own per-subject YAML, put first as lm-eval puts it."""
    template = lm_eval_task_config("mmlu/default/_default_template_yaml")
    descriptions: dict[str, str] = {}

    def rows() -> list[dict[str, Any]]:
        out = mmlu_records(data_dir)
        for row in out:
            subject = row["subject"]
            if subject not in descriptions:
                descriptions[subject] = lm_eval_task_config(f"mmlu/default/mmlu_{subject}.yaml")["description"]
            row["description"] = descriptions[subject]
        return out

    return _with_local_rows(template, rows, data_dir / "mmlu" / "test", task="mmlu",
                            doc_to_text="{{description}}" + template["doc_to_text"])


def _truthfulqa(which: str) -> Callable[[Path], dict[str, Any]]:
    def config(data_dir: Path) -> dict[str, Any]:
        path = require_file(data_dir / "truthfulqa" / "mc_task.json", "truthfulqa")
        return _with_local_rows(lm_eval_task_config(f"truthfulqa/truthfulqa_{which}.yaml"),
                                lambda: truthfulqa_records(data_dir), path)
    return config


def reconstructed_hellaswag(data_dir: Path) -> dict[str, Any]:
    """lm-eval's own HellaSwag task (its preprocessing, template and metrics) over the local rows
    with their context fields rebuilt by `hellaswag_records`: for measuring how closely rankcut's
    reader follows lm-eval's preprocessing, not a score to report as lm-eval's."""
    path = require_file(data_dir / "hellaswag" / "hellaswag_val_full.txt", "hellaswag")
    return _with_local_rows(lm_eval_task_config("hellaswag/hellaswag.yaml"), lambda: hellaswag_records(data_dir),
                            path, test_split="validation")


LOCAL_TASKS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "arc_easy": _arc("arc_easy"), "arc_challenge": _arc("arc_challenge"), "boolq": _boolq,
    "winogrande": _winogrande, "lambada": _lambada, "mmlu": _mmlu,
    "truthfulqa_mc1": _truthfulqa("mc1"), "truthfulqa_mc2": _truthfulqa("mc2"),
}


def task_specs(tasks: list[str], data_dir: str | os.PathLike | None = None) -> list[str | dict[str, Any]]:
    """What lm-eval is given for each task: a config over the local file, or (with
    `data_dir="hub"`) lm-eval's own registered task. Refuses, before any work, a task that has
    no faithful local form."""
    if str(data_dir) == "hub":
        return [LM_EVAL_NAMES.get(t, t) for t in tasks]
    offline = [t for t in tasks if t not in LOCAL_TASKS]
    if offline:
        raise RankcutError(f"--harness lm-eval reads {', '.join(offline)} from the hub only (its local file lacks "
                           f"what lm-eval's template needs); offline it scores {', '.join(LOCAL_TASKS)} from the "
                           "data folder. Give --data-dir hub where the hub is reachable, or drop --harness for "
                           "rankcut's own scorer")
    folder = find_data_dir(data_dir)
    return [LOCAL_TASKS[t](folder) for t in tasks]


def run_lm_eval(model: nn.Module, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on the in-memory model; `limit`: the first N items of each
    task, as lm-eval takes them."""
    specs = task_specs(tasks, data_dir)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise RankcutError("--harness lm-eval needs lm-eval: pip install 'rankcut[lmeval]'") from None
    if str(data_dir) != "hub":  # local files only: no half-minute of hub retries per dataset
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    wrapped = HFLM(pretrained=model, tokenizer=get_tokenizer(model), batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=wrapped, tasks=specs, limit=limit, log_samples=False)
    return {"harness": "lm-eval", "lm_eval_version": version("lm_eval"),
            "results": out.get("results", {}), "versions": out.get("versions", {})}
