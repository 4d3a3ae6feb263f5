"""Accelerators and their published peaks: what an MFU figure is measured against.

Every peak here is the vendor's *dense* figure in FLOP/s, per device (one GPU,
one TPU chip). Vendors headline the 2:4 structured-sparsity figure, which is
twice the dense one and which no dense Transformer training reaches; those
figures are kept apart in `sparse` so a claim quoted in them can be recognised
(the A10G's "250 TFLOP/s" is its sparse bf16 figure; dense is 125).

"cpu" is this machine, measured by `pretune bench --peak` (see peak.py): the
matrix-multiply rate torch reaches here, not a datasheet number.

The table is the one source for every reader: the cost planner (`get_hardware`, its
`--hardware` help), the device lookup of a running GPU (`from_device_name`, through each
row's `patterns`) and scripts/gpu_check.py. New hardware is one row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import PretuneError


T = 1e12  # TFLOP/s


# The precisions a training run can name, and the peak they use on a device.
# fp32 on a GPU means the plain CUDA-core rate unless TF32 matmuls are enabled
# (PyTorch leaves them off by default: torch.backends.cuda.matmul.allow_tf32).
DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8")


@dataclass(frozen=True)
class Hardware:
    name: str
    label: str
    peak: dict[str, float]  # dense FLOP/s per precision
    sparse: dict[str, float] = field(default_factory=dict)  # the vendor's 2:4-sparsity figures
    power_w: float | None = None  # board power (TDP) or measured mean, per device; see `power_note`
    memory_gb: float | None = None
    default_dtype: str = "bf16"  # the precision a training run on it would use
    power_note: str = "TDP"
    note: str = ""
    source: str = ""
    # lower-case substrings of torch.cuda.get_device_name(), matched against " <name> " (so a space
    # marks a word's edge: " l4 " is the L4, not the L40S); the longest match names the device
    patterns: tuple[str, ...] = ()

    def peak_for(self, dtype: str) -> float:
        """Dense peak FLOP/s for `dtype`; a PretuneError naming the supported ones otherwise."""
        if dtype not in self.peak:
            have = ", ".join(self.peak)
            raise PretuneError(f"{self.name} has no published {dtype} peak", None,
                               f"use one of {have} (--precision)")
        return self.peak[dtype]


HARDWARE: dict[str, Hardware] = {
    # NVIDIA Tesla V100 datasheet (SXM2): 15.7 TFLOPS FP32, 125 TFLOPS tensor (FP16 in, FP32 acc), 300 W.
    # No bf16 (Volta), no sparsity.
    "v100": Hardware("v100", "NVIDIA V100 SXM2", {"fp32": 15.7 * T, "fp16": 125 * T}, {},
                     300, 32, default_dtype="fp16",
                     source="NVIDIA V100 Tensor Core GPU datasheet", patterns=("v100",)),
    # NVIDIA A100 datasheet (SXM4 40/80GB): FP32 19.5; TF32 156 | 312*; BF16/FP16 312 | 624*;
    # INT8 624 | 1248* TOPS; 400 W. (* = with sparsity.) The PCIe card has the same peaks at 250-300 W.
    "a100": Hardware("a100", "NVIDIA A100 SXM4",
                     {"fp32": 19.5 * T, "tf32": 156 * T, "bf16": 312 * T, "fp16": 312 * T, "int8": 624 * T},
                     {"tf32": 312 * T, "bf16": 624 * T, "fp16": 624 * T, "int8": 1248 * T}, 400, 80,
                     source="NVIDIA A100 Tensor Core GPU datasheet", patterns=("a100",)),
    # NVIDIA H100 datasheet (SXM5): FP32 67; TF32 989*; BF16/FP16 1,979*; FP8 3,958* (all * = sparse,
    # "specifications 1/2 lower without sparsity"): dense 494.7 / 989.4 / 1,978.9. Up to 700 W.
    "h100": Hardware("h100", "NVIDIA H100 SXM5",
                     {"fp32": 67 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T,
                      "fp8": 1978.9 * T, "int8": 1978.9 * T},
                     {"tf32": 989.4 * T, "bf16": 1978.9 * T, "fp16": 1978.9 * T, "fp8": 3957.8 * T,
                      "int8": 3957.8 * T}, 700, 80,
                     source="NVIDIA H100 Tensor Core GPU datasheet",
                     patterns=("h100 sxm", "h100")),  # "NVIDIA H100 80GB HBM3" is the SXM part
    # H100 PCIe: FP32 51; BF16 1,513* (756 dense); 300-350 W.
    "h100-pcie": Hardware("h100-pcie", "NVIDIA H100 PCIe",
                          {"fp32": 51 * T, "tf32": 378 * T, "bf16": 756 * T, "fp16": 756 * T, "fp8": 1513 * T},
                          {"tf32": 756 * T, "bf16": 1513 * T, "fp16": 1513 * T, "fp8": 3026 * T}, 350, 80,
                          source="NVIDIA H100 Tensor Core GPU datasheet", patterns=("h100 pcie",)),
    # H100 NVL (the same datasheet's NVL column, per GPU): FP32 60; TF32 835*; BF16/FP16 1,671*;
    # FP8/INT8 3,341* (* = sparse, dense is half); 94 GB; 350-400 W.
    "h100-nvl": Hardware("h100-nvl", "NVIDIA H100 NVL",
                         {"fp32": 60 * T, "tf32": 417.5 * T, "bf16": 835.5 * T, "fp16": 835.5 * T,
                          "fp8": 1670.5 * T, "int8": 1670.5 * T},
                         {"tf32": 835 * T, "bf16": 1671 * T, "fp16": 1671 * T, "fp8": 3341 * T, "int8": 3341 * T},
                         400, 94, source="NVIDIA H100 Tensor Core GPU datasheet (H100 NVL)",
                         patterns=("h100 nvl",)),
    # NVIDIA H200 datasheet (SXM): the H100's compute (same GH100 die) with 141 GB HBM3e; up to 700 W.
    "h200": Hardware("h200", "NVIDIA H200 SXM",
                     {"fp32": 67 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T,
                      "fp8": 1978.9 * T, "int8": 1978.9 * T},
                     {"tf32": 989.4 * T, "bf16": 1978.9 * T, "fp16": 1978.9 * T, "fp8": 3957.8 * T,
                      "int8": 3957.8 * T}, 700, 141,
                     source="NVIDIA H200 Tensor Core GPU datasheet", patterns=("h200",)),
    # The A10G is AWS's variant of the A10 (G5 instances, up to 8 per instance); NVIDIA publishes no
    # A10G datasheet. The A10 datasheet: FP32 31.2; TF32 62.5 | 125*; BF16/FP16 125 | 250*;
    # INT8 250 | 500*; 150 W. Those are used here as an upper bound: comparisons of the two cards
    # (e.g. Baseten's "A10 vs A10G") report the A10G with *less* tensor throughput than the A10.
    "a10g": Hardware("a10g", "NVIDIA A10G (AWS G5; A10 datasheet figures)",
                     {"fp32": 31.2 * T, "tf32": 62.5 * T, "bf16": 125 * T, "fp16": 125 * T, "int8": 250 * T},
                     {"tf32": 125 * T, "bf16": 250 * T, "fp16": 250 * T, "int8": 500 * T}, 150, 24,
                     note="the often-quoted 250 TFLOP/s is the sparse figure; dense bf16 is 125 (an upper "
                          "bound for the A10G)",
                     source="NVIDIA A10 Tensor Core GPU datasheet", patterns=("a10g", " a10 ")),
    # NVIDIA L40S datasheet: FP32 91.6; TF32 183 | 366*; BF16/FP16 362.05 | 733*; FP8/INT8 733 | 1,466*;
    # 48 GB GDDR6; 350 W.
    "l40s": Hardware("l40s", "NVIDIA L40S",
                     {"fp32": 91.6 * T, "tf32": 183 * T, "bf16": 362.05 * T, "fp16": 362.05 * T,
                      "fp8": 733 * T, "int8": 733 * T},
                     {"tf32": 366 * T, "bf16": 733 * T, "fp16": 733 * T, "fp8": 1466 * T, "int8": 1466 * T},
                     350, 48, source="NVIDIA L40S datasheet", patterns=("l40s",)),
    # NVIDIA L4 datasheet: FP32 30.3; TF32 120*; BF16/FP16 242*; FP8/INT8 485* (* = sparse only; dense
    # is half); 24 GB GDDR6; 72 W.
    "l4": Hardware("l4", "NVIDIA L4",
                   {"fp32": 30.3 * T, "tf32": 60 * T, "bf16": 121 * T, "fp16": 121 * T, "fp8": 242.5 * T,
                    "int8": 242.5 * T},
                   {"tf32": 120 * T, "bf16": 242 * T, "fp16": 242 * T, "fp8": 485 * T, "int8": 485 * T},
                   72, 24, source="NVIDIA L4 Tensor Core GPU datasheet", patterns=(" l4 ",)),
    # Cloud TPU v2: 180 TFLOPS per 4-chip device (Google I/O 2017, Cloud TPU docs) = 45 per chip, bf16.
    # BERT (Devlin et al. 2018) trained on "16 Cloud TPUs (64 TPU chips)" of this generation.
    "tpu-v2": Hardware("tpu-v2", "Google TPU v2 (per chip)", {"bf16": 45 * T}, {}, None, 16,
                       note="MXUs multiply in bf16; fp32 matmuls run as several bf16 passes",
                       source="Google Cloud TPU documentation (v2: 180 TFLOPS per 4-chip board)"),
    # Cloud TPU v3 docs: "Peak compute per chip 123 teraflops (bf16)"; measured min/mean/max power
    # 123/220/262 W (the mean is used).
    "tpu-v3": Hardware("tpu-v3", "Google TPU v3 (per chip)", {"bf16": 123 * T}, {}, 220, 32,
                       power_note="measured mean",
                       source="cloud.google.com/tpu/docs/v3"),
    # Cloud TPU v4 docs: "Peak compute per chip 275 teraflops (bf16 or int8)"; measured min/mean/max
    # power 90/170/192 W.
    "tpu-v4": Hardware("tpu-v4", "Google TPU v4 (per chip)", {"bf16": 275 * T, "int8": 275 * T}, {}, 170, 32,
                       power_note="measured mean",
                       source="cloud.google.com/tpu/docs/v4"),
}


ALIASES = {"a10": "a10g", "h100-sxm": "h100", "v3": "tpu-v3", "v4": "tpu-v4", "v2": "tpu-v2",
           "tpuv2": "tpu-v2", "tpuv3": "tpu-v3", "tpuv4": "tpu-v4", "a100-sxm": "a100", "a100-pcie": "a100"}


def known() -> list[str]:
    return [*HARDWARE, "cpu"]


def from_device_name(device_name: str) -> Hardware | None:
    """The table row for a CUDA device name (torch.cuda.get_device_name), or None: the row with the
    longest of its `patterns` in " <name> ", lower-cased (the most specific: "h100 nvl" over "h100")."""
    s = f" {device_name.lower()} "
    best, best_len = None, 0
    for hw in HARDWARE.values():
        for pat in hw.patterns:
            if pat in s and len(pat) > best_len:
                best, best_len = hw, len(pat)
    return best
