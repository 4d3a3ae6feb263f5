"""A fine-tuned classifier out to Hugging Face's *ForSequenceClassification (BERT, GPT-2, Llama).

Those classes fix the readout, so only a head that is the same function exports:

    BertForSequenceClassification   tanh pooler on [CLS], dropout, `classifier` (with a bias):
                                    pretune's `--finetune.pool cls` (an encoder's default with an NSP pooler)
    GPT2ForSequenceClassification,  `score` (no bias) on h_n at the last token that is not
    LlamaForSequenceClassification  `pad_token_id`: pretune's `--finetune.pool last` with
                                    `--finetune.head-bias false`

LoRA adapters are merged into the body first (`load_classifier` does). `pad_token_id` of a
decoder must not be the extract token that ends every text (`<e>`, data/encoding.py), or HF
would read the token before it: a special token other than it is used, and where the
vocabulary has none (GPT-2's byte-level BPE holds only <|endoftext|>) the export adds one,
`<|padding|>` (GPT-NeoX's name, which pretune's tokenizer knows as a pad), with one more
embedding row (zeros: HF never reads a pad's output, and a causal model's real tokens never
attend to the pads after them), so batches of texts of any length classify as one at a time.
The config's `id2label`, `label2id` and `problem_type` come from the run; a model card
(README.md) is written beside the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import PretuneError
from .hf_config import _FAMILIES, _tokenizer_config, hf_config, hf_family

CLASSES = {"bert": "BertForSequenceClassification", "gpt2": "GPT2ForSequenceClassification",
           "llama": "LlamaForSequenceClassification"}
PROBLEM = {"single": "single_label_classification", "regression": "regression",
           "multi": "multi_label_classification"}


def check_exportable(cfg, ft: dict, where: str) -> str:
    """The family, or one line saying which settings export (before any weights are read)."""
    base = cfg.replace(lm_head=False, nsp_head=False)
    fam = hf_family(base)
    if fam not in CLASSES:
        raise PretuneError(f"a fine-tuned {fam} classifier has no Hugging Face *ForSequenceClassification "
                           "export here", where, "export BERT, GPT-2 or Llama-family runs")
    pool, bias = ft.get("head", "cls" if not cfg.causal else "last"), ft.get("head_bias", True)
    if fam == "bert" and pool != "cls":
        raise PretuneError(f"BertForSequenceClassification reads the pooled [CLS]; this run's head reads "
                           f"'{pool}'", where, "fine-tune with --finetune.pool cls to export")
    if fam != "bert" and (pool != "last" or bias):
        what = f"reads '{pool}'" if pool != "last" else "has a bias in W_y"
        raise PretuneError(f"{CLASSES[fam]} reads the last token with no bias in `score`; this run's head {what}",
                           where, "fine-tune with --finetune.pool last --finetune.head-bias false to export")
    return fam


def _pad_token_id(tok, fam: str):
    if tok is None:
        return None
    if fam == "bert":
        return tok.pad_id if tok.pad_id is not None else 0
    extract = tok.eos_id if tok.eos_id is not None else tok.sep_id  # data/encoding.TextEncoder's <e>
    for i in (tok.pad_id, tok.unk_id, tok.bos_id, tok.cls_id, tok.sep_id, tok.mask_id):
        if i is not None and i != extract:
            return i
    return None


PAD = "<|padding|>"


def with_pad_token(tok, tensors: dict, cfg: dict) -> tuple:
    """(tokenizer, tensors, config) with a dedicated pad token where a decoder's vocabulary has none
    but its extract token: `PAD` added to a copy of the tokenizer, the embedding grown to hold its
    id (unless the model's rows already do), `vocab_size` and `pad_token_id` set."""
    from tokenizers import Tokenizer as HFTokenizer

    from ..tokenizer.core import Tokenizer
    if tok is None or cfg.get("pad_token_id") is not None:
        return tok, tensors, cfg
    raw = HFTokenizer.from_str(tok._tok.to_str())
    raw.add_special_tokens([PAD])
    tok2 = Tokenizer(raw, tok.name)
    pid = tok2.pad_id
    key = next(k for k in tensors if k.endswith("wte.weight") or k.endswith("embed_tokens.weight"))
    W = tensors[key]
    if pid >= W.shape[0]:
        tensors = {**tensors, key: torch.cat([W, W.new_zeros(pid + 1 - W.shape[0], W.shape[1])]).contiguous()}
    return tok2, tensors, {**cfg, "vocab_size": max(cfg["vocab_size"], pid + 1), "pad_token_id": pid}


def classifier_tensors(model, fam: str) -> dict[str, torch.Tensor]:
    """The HF class's tensors: the base model's under its prefix, then the head's."""
    from .hf_weights import tensors_for_hf
    body = model.body
    base = body.config.replace(lm_head=False, nsp_head=False)
    out, _ = tensors_for_hf(body, base, _FAMILIES[fam][2])
    h = model.head
    W = h.out.weight.detach().float().cpu().contiguous()
    if fam == "bert":
        out["bert.pooler.dense.weight"] = h.pooler.weight.detach().float().cpu().contiguous()
        out["bert.pooler.dense.bias"] = h.pooler.bias.detach().float().cpu().contiguous()
        out["classifier.weight"] = W
        out["classifier.bias"] = (h.out.bias.detach().float().cpu() if h.out.bias is not None
                                  else torch.zeros(W.shape[0])).contiguous()
    else:
        out["score.weight"] = W
    return out


def classifier_config(model, fam: str, labels: list[str], kind: str, tok=None) -> dict:
    base = model.body.config.replace(lm_head=False, nsp_head=False)
    cfg = hf_config(base, fam, tok)
    names = labels if kind != "regression" else labels[:1]
    cfg.update(architectures=[CLASSES[fam]], vocab_size=base.vocab_size, problem_type=PROBLEM[kind],
               id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)},
               pad_token_id=_pad_token_id(tok, fam))
    if fam == "bert":
        cfg["classifier_dropout"] = model.head.drop.p
    return cfg


def export_classifier(model, tok, out_dir: str | Path, info: dict, results: dict | None = None,
                      source: dict | None = None) -> Path:
    """Write `model` (a Classifier, adapters merged) as a *ForSequenceClassification folder, atomically."""
    from ..models.lora import lora_modules
    from .hf_weights import write_hf_folder
    if lora_modules(model):
        raise PretuneError("the model still carries LoRA adapters", None, "merge them first (models.lora.merge_lora)")
    fam = check_exportable(model.body.config, {"head": model.head.pool, "head_bias": model.head.out.bias is not None},
                           str(out_dir))
    kind = info.get("kind", "single")
    tensors = classifier_tensors(model, fam)
    cfg = classifier_config(model, fam, info["labels"], kind, tok)
    if fam != "bert":
        tok, tensors, cfg = with_pad_token(tok, tensors, cfg)
    return write_hf_folder(out_dir, tensors, cfg, tok, fam, source,
                           {"README.md": model_card(cfg, info, results or {}, source or {})})


def model_card(cfg: dict, info: dict, results: dict, source: dict) -> str:
    """What it is, the data, the metrics, how to load it."""
    cls = cfg["architectures"][0]
    kind = info.get("kind", "single")
    sizes = info.get("sizes", {})
    test = {k: v for k, v in (results.get("test") or {}).items() if k not in ("confusion", "per_label_f1")}
    read = {"single": "probs = out.logits.softmax(-1)", "regression": "value = out.logits[:, 0]",
            "multi": f"probs = out.logits.sigmoid()  # labels: probs >= {results.get('threshold') or 0.5}"}[kind]
    if cls.startswith("Bert"):
        pad = ""
    elif cfg.get("pad_token_id") is not None:
        pad = (f"\nBatches: pad each row on the right with `pad_token_id` {cfg['pad_token_id']} and pass "
               "`attention_mask`; the score is read at the last token that is not the pad.\n")
    else:
        pad = ("\nThe tokenizer has no token to pad with besides the one that ends every text, so `pad_token_id` is "
               "unset: classify one text at a time, or a batch of texts of one length.\n")
    lines = [
        f"# {info.get('name', 'classifier')}: a pretune fine-tuned {cls}", "",
        f"A {cfg['model_type']} classifier fine-tuned with pretune ({source.get('objective', results.get('objective', ''))}"
        f" objective{', LoRA adapters merged' if source.get('adapter') else ''}), exported to Hugging Face's `{cls}`.",
        "", "## Data", "",
        f"- task: `{info.get('name')}` ({info.get('source', '')}), problem type `{cfg['problem_type']}`",
        f"- labels: {', '.join(info.get('labels', []))}",
        f"- examples: {sizes.get('train', '?')} train / {sizes.get('val', '?')} validation / {sizes.get('test', '?')} test",
        "", "## Test metrics", "", "```", json.dumps(test, indent=2), "```", "",
        "## How to load it", "", "```python",
        "from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast",
        f"model = AutoModelForSequenceClassification.from_pretrained('{{folder}}').eval()",
        "tok = PreTrainedTokenizerFast(tokenizer_file='{folder}/tokenizer.json')",
        "ids = tok('a fine film')['input_ids']  # pretune's template: " +
        ("[CLS] text [SEP]" if cls.startswith("Bert") else "<s> text <e> (the end-of-text token ends it)"),
        "out = model(input_ids=torch.tensor([ids]))", read, "```", pad,
    ]
    return "\n".join(lines) + "\n"
