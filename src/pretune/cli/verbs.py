"""The verbs of the `pretune` command: each a function, named as "module:function" and imported only
when its verb runs (or when `pretune --help` lists them)."""

from __future__ import annotations

# verb -> "module:function"; modules are imported only when their verb runs.
VERBS: dict[str, str] = {
    "prepare": "pretune.data.prepare:prepare_cmd",
    "curate": "pretune.data.curate:curate_cmd",
    "pretrain": "pretune.training.pretrain:pretrain_cmd",
    "generate": "pretune.inference.generate:generate_cmd",
    "fill-mask": "pretune.inference.generate:fill_mask_cmd",
    "demo": "pretune.recipes.demo:demo_cmd",
    "cost": "pretune.planning.report:cost_cmd",
    "bench": "pretune.cli.bench:bench_cmd",
    "embed": "pretune.inference.embed:embed_cmd",
    "import": "pretune.interop:import_cmd",
    "export": "pretune.interop:export_cmd",
    "finetune": "pretune.tasks.finetune:finetune_cmd",
    "classify": "pretune.inference.classify:classify_cmd",
    "evaluate": "pretune.evaluation.classification:evaluate_cmd",
    "serve": "pretune.serve.cli:serve_cmd",
}
