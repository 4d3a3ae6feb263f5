"""Does `_weight_int8pack_mm` itself cap int8 decoding? GPT-2-small shape, batch 1, alternating in
one process: transformers fp32 `generate`, pretune int8 `generate` (its lean decoder step,
inference/decode.py), the same with the step turned off (`Transformer.forward` per token), the int8
matrix products of a token alone (nothing else), the output head's alone, and a copy for the bandwidth.

    python benchmarks/int8_cap.py --threads 1 --new-tokens 32
"""

import statistics

from _common import parser

if __name__ == "__main__":
    ap = parser(__doc__.split("\n")[0], rounds=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    import torch

    from pretune.inference import decode
    from pretune.inference.generate import generate
    from pretune.models.quantize import Int8Linear, quantize_model
    from pretune.models.transformer import Transformer
    from pretune_bench import cases, harness

    harness.set_threads(a.threads)
    NT = a.new_tokens
    cfg, _, _ = harness._config(harness.GPT_SHAPES["gpt2"])
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    hf = cases.hf_gpt2(model).eval()
    quantize_model(model, "int8")
    x = torch.randint(cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    lins = [m for m in model.modules() if isinstance(m, Int8Linear)]
    head = [m for m in lins if m.out_features == cfg.padded_vocab_size]
    xs = {k: torch.randn(1, k, dtype=torch.bfloat16) for k in {m.in_features for m in lins}}

    def products(ms):
        def f():
            for _ in range(NT):
                for m in ms:
                    torch._weight_int8pack_mm(xs[m.in_features], m.weight, m.scales)
        return f

    def ours():
        generate(model, x, NT, temperature=0.0)

    def ours_forward():
        decode.ENABLED = False
        try:
            generate(model, x, NT, temperature=0.0)
        finally:
            decode.ENABLED = True

    @torch.no_grad()
    def theirs():
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NT, min_new_tokens=NT, do_sample=False,
                    use_cache=True, pad_token_id=0, eos_token_id=None)

    src = torch.ones(64 << 20)
    dst = torch.empty_like(src)

    def copy():
        for _ in range(4):
            dst.copy_(src)

    fns = {"transformers fp32 generate": theirs, "pretune int8 generate": ours,
           "  model.forward per token": ours_forward,
           "int8 products alone": products(lins), "the head's alone": products(head), "copy": copy}
    t = harness.alternate(fns, a.rounds, a.warmup)
    med = {k: statistics.median(v["wall"]) for k, v in t.items()}
    bw = 4 * 2 * src.numel() * 4 / med.pop("copy")
    mb = sum(m.weight.numel() for m in lins) / 1e6
    print(f"{torch.get_num_threads()} thread(s); copy bandwidth {bw / 1e9:.1f} GB/s; int8 weights a token reads "
          f"{mb:.0f} MB (the head {sum(m.weight.numel() for m in head) / 1e6:.0f} MB)")
    ref = med["transformers fp32 generate"]
    for k, v in med.items():
        print(f"  {k:28} {v / NT * 1e3:7.2f} ms/token   transformers' step over it: {ref / v:.2f}x")
