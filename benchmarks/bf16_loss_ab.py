"""pretune's bf16 training step with the fused bf16 output layer + loss against autocast's plain
cross-entropy on the (N, V) logits (the path before issue 19), pretune on both sides, alternating.

    python benchmarks/bf16_loss_ab.py --shape mini --rounds 5
"""

import statistics

from _common import parser

if __name__ == "__main__":
    ap = parser(__doc__.split("\n")[0], rounds=5)
    ap.add_argument("--shape", default="mini", help="mini or gpt2")
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F

    from pretune.models.transformer import Transformer
    from pretune.objectives.registry import pretrain_loss
    from pretune_bench.harness import GPT_SHAPES, _config, _trainer, alternate, set_threads

    set_threads(a.threads or 1)
    cfg, B, T = _config(GPT_SHAPES[a.shape])
    x = torch.randint(cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}

    def plain(model, b):
        lg = model.logits(model(b["input_ids"]))[..., :model.config.vocab_size]
        return F.cross_entropy(lg.flatten(0, 1).float(), b["targets"].flatten()), {}

    trs = {}
    for name, fn in (("fused", pretrain_loss), ("plain", plain)):
        torch.manual_seed(0)
        trs[name] = _trainer(Transformer(cfg), batch, fn, "bf16")
    t = alternate({k: tr.train_step for k, tr in trs.items()}, a.rounds, a.warmup, True, f"bf16 loss {a.shape}")
    med = {k: statistics.median(v["wall"]) for k, v in t.items()}
    print(f"{a.shape}: fused {B * T / med['fused']:,.1f} tok/s, plain {B * T / med['plain']:,.1f} tok/s, "
          f"fused/plain {med['plain'] / med['fused']:.3f}x [{a.rounds} rounds, {torch.get_num_threads()} threads]")
