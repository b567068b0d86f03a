"""lm-eval (EleutherAI's lm-evaluation-harness) runs on our HF export (issue 23).

`lm_eval --model hf --model_args pretrained=<export dir>` over a local multiple-choice task (a YAML
task over a jsonl file: the hub is never reached) scores every choice with the same log-likelihood
our own model gives it. Skips when lm-eval is not installed (it is not a dev dependency: it brings
~40 packages, scipy and scikit-learn among them); `pip install -e '.[eval]'` adds it.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitnet.data.tokenizer import load_tokenizer
from bitnet.cli.export import main as export_main
from bitnet.export import to_ternary_inference

from .test_export import bf16_twin, save_ckpt, tiny_model

HAS_LM_EVAL = all(importlib.util.find_spec(m) is not None for m in ("lm_eval", "transformers", "accelerate"))
pytestmark = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is not installed (pip install -e '.[eval]')")

DOCS = [
    {"context": "The State of the Union is", "choices": [" strong", " a banana", " blue"], "label": 0},
    {"context": "Mr. Speaker, Mr. Vice President, members of", "choices": [" Congress", " the band"], "label": 0},
    {"context": "We must balance the", "choices": [" budget", " bicycle", " books"], "label": 0},
    {"context": "The people of the United  ", "choices": ["States", "Kingdom"], "label": 0},  # trailing spaces
]

TASK_YAML = """task: bitnet_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""


def write_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "bitnet_local_mc.yaml").write_text(TASK_YAML.format(data=data))
    return folder


@torch.no_grad()
def our_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context) under our model, tokenized as lm-eval does for a causal model:
    trailing spaces of the context move to the continuation; the pair is encoded whole (with the
    tokenizer's BOS, as the export's tokenizer adds it) and split at the context's length."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation, add_bos=True)
    n_ctx = len(tok.encode(context, add_bos=True))
    ids = torch.tensor([whole])
    logprobs = torch.log_softmax(model(ids[:, :-1]).double(), dim=-1)[0]
    return sum(logprobs[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))


def test_lm_eval_cli_scores_match_ours(tmp_path):
    model = tiny_model(seed=5)
    ckpt = save_ckpt(tmp_path / "run", model)
    export = tmp_path / "hf"
    assert export_main([str(ckpt), "--format", "hf", "--out", str(export), "--quiet"]) == 0
    tasks = write_task(tmp_path / "tasks")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home"), "TORCHDYNAMO_DISABLE": "1"}  # eager BitLinear: same numbers, no 30 s build
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={export},dtype=float32", "--tasks", "bitnet_local_mc",
           "--include_path", str(tasks), "--device", "cpu", "--batch_size", "1",
           "--output_path", str(tmp_path / "out"), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = [json.loads(line) for f in sorted((tmp_path / "out").rglob("samples_bitnet_local_mc_*.jsonl"))
               for line in f.read_text().splitlines()]
    assert len(samples) == len(DOCS)
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    acc = results["results"]["bitnet_local_mc"]["acc,none"]

    ours = to_ternary_inference(bf16_twin(model)).eval()  # the export stores bf16 embedding and norms
    tok = load_tokenizer("llama2")
    correct = 0
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = DOCS[sample["doc_id"]]
        theirs = [resp[0][0] for resp in sample["resps"]]
        mine = [our_loglikelihood(ours, tok, doc["context"], c) for c in doc["choices"]]
        assert len(theirs) == len(mine)
        for a, b in zip(theirs, mine):
            assert abs(float(a) - b) < 1e-3, (sample["doc_id"], theirs, mine)
        correct += int(max(range(len(mine)), key=mine.__getitem__) == doc["label"])
    assert acc == pytest.approx(correct / len(DOCS))
