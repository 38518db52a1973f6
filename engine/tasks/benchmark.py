"""What `engine.bench` measures, as a library (engine.tools.gpu_check runs it too): latency, throughput and
scaling of the sharded model on synthetic inputs.

Inputs have the model's shape (a VQA checkpoint: one question + one S×S image per
sample; NLVR2: two images; retrieval: a text-only and an image-only pass) and
realistic question lengths. Each iteration is the task's forward on the device,
synchronised before and after, with all ranks started together; an iteration's
latency is the slowest rank's. The peak is measured here too, on every rank at
once, in the same dtype and threads: the best torch.mm rate over the GEMM shapes
this forward itself runs, so that "fraction of peak" says how close the model
comes to what the machine's GEMMs reach on its own work. On CUDA the forward runs
as a per-bucket CUDA graph (engine.runtime.graphs; --no-cuda-graphs: eagerly), and
the report gives each rank's device memory: weights, the forward's measured
activations, the graph pool. engine.bench's rank 0 prints a summary and
writes the JSON.
"""
from __future__ import annotations

import platform
import resource
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..layers.attention_choice import time_attention
from ..layers.int8 import gemm_peak_gops
from ..layers.kernels import Gemm, bf16_matmul_units, gemm_peak_gflops, record_gemms
from ..models import ModelConfig, MultiwayModel, family_of
from ..models.tasks import TASKS
from ..runtime.distributed import ParallelContext
from ..runtime.graphed import task_graphs
from ..runtime.graphs import GraphRunner
from ..runtime.loading import DTYPES, load_model
from ..runtime.shards import read_manifest
from .calibration import Calibration
from .cli import Engine, pick_task, start_engine
from .metrics import percentiles_ms

QUESTION_TOKENS = (6, 17)  # VQAv2 questions are ~6-16 WordPiece tokens with [CLS] and [SEP]


def forward_gflop(cfg: ModelConfig, task: str) -> float:
    """Multiply-add FLOPs (×2) of one sample's forward: every matmul, attention over all T + n positions."""
    D, F, P = cfg.embed_dim, cfg.ffn_dim, cfg.patch_size

    def encoder(tokens: int) -> int:
        per_layer = 2 * tokens * (4 * D * D + 2 * D * F) + 2 * 2 * tokens * tokens * D  # linears + qkᵀ, pv
        return cfg.depth * per_layer

    patches = 2 * (cfg.grid ** 2) * (3 * P * P) * D
    joint = encoder(cfg.joint_tokens) + patches + 2 * D * D  # + pooler
    if task == "vqa":
        total = joint + 2 * (D * 2 * D + 2 * D * cfg.vqa_labels)
    elif task == "nlvr2":
        total = 2 * joint + 2 * (2 * D * 2 * D + 2 * D * 2)
    else:  # irtr: a text-only and an image-only pass, each with its projection
        total = encoder(cfg.max_text_len) + encoder(cfg.num_image_tokens) + patches + 2 * 2 * D * D
    return total / 1e9


def synthetic_inputs(cfg: ModelConfig, task: str, batch: int, device: torch.device,
                     seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random questions of VQA length (padded to T) and random normalised images."""
    gen = torch.Generator().manual_seed(seed)
    T, S = cfg.max_text_len, cfg.image_size
    lengths = torch.randint(QUESTION_TOKENS[0], min(QUESTION_TOKENS[1], T) + 1, (batch,), generator=gen)
    masks = (torch.arange(T)[None, :] < lengths[:, None]).long()
    special = family_of(cfg).text_ids
    ids = torch.randint(special.lowest, cfg.vocab_size, (batch, T), generator=gen)
    ids = ids.masked_fill(masks == 0, special.pad)
    ids[:, 0] = special.first
    ids[torch.arange(batch), lengths - 1] = special.last
    tensors = {"text_ids": ids, "text_masks": masks}
    for name in TASKS[task].inputs:
        if name.startswith("image"):
            tensors[name] = torch.rand(batch, 3, S, S, generator=gen) * 2 - 1
    return {k: v.to(device) for k, v in tensors.items()}


def recorded_forward(model: MultiwayModel, task: str,
                     inputs: Dict[str, torch.Tensor]) -> Tuple[Dict[Gemm, int], Dict[str, torch.Tensor]]:
    """One untimed forward: the linear-layer GEMMs this rank runs in it, counted by (M, K, N, int8), and its
    outputs."""
    with record_gemms() as gemms:
        outputs = TASKS[task].run(model, inputs)
    return gemms, outputs


def gemm_shapes(gemms: Dict[Gemm, int]) -> List[Tuple[int, int, int]]:
    """The distinct (M, K, N) among recorded GEMMs."""
    return sorted({(m, k, n) for m, k, n, _ in gemms})


def int8_gflop(gemms: Dict[Gemm, int]) -> float:
    """FLOPs (×2 per multiply-add) of the recorded GEMMs that ran in int8."""
    return sum(count * 2 * m * k * n for (m, k, n, int8), count in gemms.items() if int8) / 1e9


def time_at_peaks(gflop: float, ranks: List[Dict[str, Any]]) -> Dict[str, float]:
    """int8's roofline for one sample on one tensor-parallel group (`ranks`): each rank's int8 linears at its
    W8A8 peak and the rest of the forward (attention, the fp32 first layer, patch embedding, heads; split evenly
    over the ranks) at its fp32 peak; the slowest rank sets the time."""
    int8 = [r["int8_gflop"] for r in ranks]
    rest = (gflop - sum(int8)) / len(ranks)
    seconds = max(i / r["peak"] + rest / r["fp32_peak"] for i, r in zip(int8, ranks))
    return {"int8_gflop_per_sample": sum(int8), "other_gflop_per_sample": gflop - sum(int8),
            "fp32_peak_gflop_per_s_per_rank": [r["fp32_peak"] for r in ranks], "ms_per_sample": 1e3 * seconds}


def peak_gflops(shapes: List[Tuple[int, int, int]], dtype: str, device: torch.device) -> float:
    """The best torch.mm rate over the forward's own GEMM shapes (CPU); a square GEMM of that size elsewhere.
    int8: the best W8A8 linear rate over those shapes (engine.layers.int8), on either device."""
    if dtype == "int8":
        return gemm_peak_gops(shapes, device)
    dtype = DTYPES[dtype]
    if device.type == "cpu":
        return gemm_peak_gflops(shapes, dtype)
    m, k, n = max(shapes, key=lambda s: s[0] * s[1] * s[2])
    a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
    torch.mm(a, b)
    getattr(torch, device.type).synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        torch.mm(a, b)
    getattr(torch, device.type).synchronize(device)
    return 10 * 2 * m * k * n / (time.perf_counter() - start) / 1e9


def attention_rate(model: MultiwayModel, device: torch.device, peak: float) -> Optional[Dict[str, Any]]:
    """One layer's attention of this rank's heads at one sample's tokens, with the kernel the loader chose, timed
    apart from the forward (CPU): its ms, GFLOP/s (q kᵀ and p v) and fraction of this rank's GEMM peak."""
    if device.type != "cpu":
        return None
    cfg, kernel = model.cfg, model.attention_options.kernel
    heads, tokens = cfg.num_heads // model.ctx.tp_size, cfg.joint_tokens
    seconds = time_attention(heads, tokens, cfg.head_dim, model.has_position_bias, model.compute_dtype, (kernel,),
                             repeats=5)[kernel]
    rate = 4 * tokens * tokens * cfg.head_dim * heads / seconds / 1e9
    return {"kernel": kernel, "ms_per_layer": 1e3 * seconds, "gflop_per_s": rate, "fraction_of_peak": rate / peak}


def device_name(device: torch.device) -> str:
    if device.type == "cpu":
        isa = cpu_isa(_cpu_flags())
        # What the kernels use can be less than the CPU has (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA): say both.
        aten = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()
        onednn_bf16 = "yes" if bf16_matmul_units() else "no"
        return (f"cpu: {_cpu_model()} ({torch.get_num_threads()} threads/rank, {isa}; ATen {aten}, "
                f"oneDNN bf16 {onednn_bf16})")
    module = getattr(torch, device.type)
    return f"{device.type}: {module.get_device_name(device)}"


# The flags that decide which kernels pay: VNNI for int8, AVX512-BF16 and AMX for bf16.
ISA_EXTRAS = ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_isa(flags: set) -> str:
    """E.g. "avx512f+avx512_vnni+avx512_bf16": the widest vector ISA and the extensions int8 and bf16 use."""
    base = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else platform.machine()
    return "+".join([base] + [f for f in ISA_EXTRAS if f in flags])


def _cpuinfo_field(field: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def _cpu_flags() -> set:
    return set(_cpuinfo_field("flags").split())


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _module_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _comm(ctx: ParallelContext, purpose: Optional[str] = None) -> Tuple[float, int]:
    """All-reduce host seconds and calls so far: of one purpose, or of the forward's (all but idle pings)."""
    purposes = [purpose] if purpose else [p for p in ctx.comm_calls if p != "ping"]
    return (sum(ctx.comm_seconds.get(p, 0.0) for p in purposes), sum(ctx.comm_calls.get(p, 0) for p in purposes))


def time_forward(engine: Engine, task: str, inputs: Dict[str, torch.Tensor], warmup: int,
                 iters: int, graphs: GraphRunner) -> Dict[str, Any]:
    """Per-iteration latency (this rank) and the all-reduce time spent in the timed iterations, in total and call
    by call (in a graph's replay the all-reduce runs inside the graph and is not counted)."""
    ctx = engine.ctx
    for _ in range(warmup):
        graphs(task, inputs)
    seconds: List[float] = []
    (comm_before, calls_before), (subln_before, _) = _comm(ctx), _comm(ctx, "subln")
    ctx.comm_log = calls = []
    try:
        for _ in range(iters):
            ctx.barrier()  # start together: the slowest rank is the latency
            ctx.synchronize()
            start = time.perf_counter()
            graphs(task, inputs)
            ctx.synchronize()
            seconds.append(time.perf_counter() - start)
    finally:
        ctx.comm_log = None
    (comm_after, calls_after), (subln_after, _) = _comm(ctx), _comm(ctx, "subln")
    return {"seconds": seconds, "comm_s": comm_after - comm_before, "comm_calls": calls_after - calls_before,
            "subln_s": subln_after - subln_before, "comm_log": calls}


def allreduce_waits(logs: Sequence[Sequence[float]]) -> Tuple[float, List[float]]:
    """One tensor-parallel group's all-reduce seconds, call by call on each rank, split into the calls' own cost
    and each rank's wait for a slower peer. The last rank to reach a call waits for no one, so the shortest of
    a call's times is its own cost (moving and adding the data); what a rank spent beyond that, it waited.
    Returns (the calls' own seconds, each rank's waiting seconds)."""
    own = [min(times) for times in zip(*logs)]
    return sum(own), [sum(t - o for t, o in zip(log, own)) for log in logs]


def compare_fp32(shard_dir: Path, engine: Engine, task: str, inputs: Dict[str, torch.Tensor],
                 got: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """How far this dtype's outputs are from an fp32 copy of the same shard on the same inputs."""
    reference = load_model(shard_dir, engine.ctx, "fp32", engine.manifest)
    want = TASKS[task].run(reference, inputs)
    del reference
    return output_agreement(got, want)


def output_agreement(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Per output: the max absolute difference and the min per-sample cosine; for logits, top-1 agreement."""
    report: Dict[str, Any] = {
        "max_abs_diff": {name: float((got[name].float() - want[name]).abs().max()) for name in want},
        "min_cosine": {name: float(torch.nn.functional.cosine_similarity(
            got[name].float().flatten(1), want[name].float().flatten(1), dim=-1).min()) for name in want},
    }
    logits = next((name for name in ("vqa_logits", "nlvr2_logits") if name in want), None)
    if logits:
        report["top1_agreement"] = float((got[logits].argmax(-1) == want[logits].argmax(-1)).float().mean())
    return report


def run_bench(shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int], timeout_s: float,
              batch_size: int, warmup: int, iters: int, task: Optional[str], check_fp32: bool,
              cuda_graphs: bool = True, calibration: Optional[Calibration] = None) -> Dict[str, Any]:
    """The report of one configuration (rank 0; {} elsewhere); int8 calibrated on `calibration`'s samples, if
    given (--check-fp32 then sets that calibrated model against fp32)."""
    task = pick_task(read_manifest(shard_dir).config, task)
    engine = start_engine(shard_dir, device, dtype, threads, timeout_s, calibration)
    return bench_engine(engine, shard_dir, task, batch_size, warmup, iters, check_fp32, cuda_graphs)


def bench_engine(engine: Engine, shard_dir: Path, task: str, batch_size: int, warmup: int, iters: int,
                 check_fp32: bool = False, cuda_graphs: bool = True) -> Dict[str, Any]:
    """The report of one configuration on a loaded engine (rank 0; {} elsewhere)."""
    ctx, model, dtype, cfg = engine.ctx, engine.model, engine.dtype, engine.manifest.config
    inputs = synthetic_inputs(cfg, task, batch_size, ctx.device)
    graphs = task_graphs(model, ctx.device, enabled=cuda_graphs)

    timed = time_forward(engine, task, inputs, warmup, iters, graphs)
    ctx.barrier()
    gemms, outputs = recorded_forward(model, task, inputs)  # the peaks' shapes and --check-fp32's outputs at once
    shapes = gemm_shapes(gemms)
    peak = peak_gflops(shapes, dtype, ctx.device)
    fp32_peak = peak if dtype != "int8" else peak_gflops(shapes, "fp32", ctx.device)
    attention = attention_rate(model, ctx.device, fp32_peak)
    accuracy = compare_fp32(shard_dir, engine, task, inputs, outputs) \
        if check_fp32 and dtype != "fp32" else None
    mine = {
        "seconds": timed["seconds"], "comm_s": timed["comm_s"], "comm_calls": timed["comm_calls"],
        "comm_log": timed["comm_log"], "subln_s": timed["subln_s"], "peak": peak, "fp32_peak": fp32_peak,
        "int8_gflop": int8_gflop(gemms) / batch_size,
        "load_s": engine.load_s, "rss": _peak_rss_bytes(), "weights": _module_bytes([*model.parameters(), *model.buffers()]),
        "position_bias": _module_bytes(model.cached_position_biases()),
        "linear_kernels": model.linear_kernels, "attention_kernel": model.attention_kernel, "attention": attention,
        "gemm_shapes": [list(shape) for shape in shapes],
        "cuda_graphs": graphs.mode(task, batch_size), "device_memory": graphs.memory.report(),
    }
    ranks = ctx.gather_objects(mine)
    if not ctx.is_main:
        return {}
    return summarise(ranks, ctx, cfg, task, dtype, batch_size, warmup, accuracy, engine.calibration)


def summarise(ranks: List[Dict[str, Any]], ctx: ParallelContext, cfg: ModelConfig, task: str, dtype: str,
              batch_size: int, warmup: int, accuracy: Optional[Dict[str, Any]],
              calibration: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    per_iter = [max(r["seconds"][i] for r in ranks) for i in range(len(ranks[0]["seconds"]))]
    latency = percentiles_ms(per_iter)
    iters = len(per_iter)
    samples_per_s = ctx.dp_size * batch_size / (latency["mean"] / 1e3)
    gflop = forward_gflop(cfg, task)
    peak = sum(r["peak"] for r in ranks)
    # on accelerators an all-reduce's host time is its launch's: who waited for whom is not seen there
    own_s, waits_s = allreduce_waits([r["comm_log"] for r in ranks[:ctx.tp_size]]) \
        if ctx.device.type == "cpu" else (None, None)
    report = {
        "tp": ctx.tp_size, "world_size": ctx.world_size, "threads_per_rank": torch.get_num_threads(),
        "batch_size": batch_size, "dtype": dtype, "task": task, "device": device_name(ctx.device),
        "calibration": calibration,  # int8's --calibration samples (Calibration.identity), or None
        "torch": torch.__version__, "warmup": warmup, "iters": iters,
        "model": {"family": cfg.family, "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
                  "image_size": cfg.image_size, "tokens": cfg.joint_tokens},
        "latency_ms": latency,
        "latency_ms_per_sample": latency["mean"] / batch_size,
        "samples_per_s": samples_per_s,
        "gflop_per_sample": gflop,
        "achieved_gflop_per_s": gflop * samples_per_s,
        "peak_gflop_per_s": peak,
        "peak_gflop_per_s_per_rank": [r["peak"] for r in ranks],
        "peak_gemm_shapes": ranks[0]["gemm_shapes"],
        "linear_kernels_per_rank": [r["linear_kernels"] for r in ranks],
        "attention_kernel_per_rank": [r["attention_kernel"] for r in ranks],
        # CPU: one layer's attention with that kernel timed apart, against the rank's (fp32 for int8) GEMM peak
        "attention_per_rank": [r["attention"] for r in ranks],
        "fraction_of_peak": gflop * samples_per_s / peak,
        "weights_bytes_per_rank": [r["weights"] for r in ranks],
        "cuda_graphs": ranks[0]["cuda_graphs"],
        # device ranks: measured activation peaks by task and batch, graph pool, free/total (None on the CPU)
        "device_memory_per_rank": [r["device_memory"] for r in ranks],
        "position_bias_bytes_per_rank": [r["position_bias"] for r in ranks],
        "peak_rss_bytes_per_rank": [r["rss"] for r in ranks],
        "load_s_per_rank": [r["load_s"] for r in ranks],
        "allreduce_ms_per_forward": 1e3 * max(r["comm_s"] for r in ranks) / iters,
        "allreduce_calls_per_forward": ranks[0]["comm_calls"] / iters,
        # CPU: of that time, the calls' own cost and what each rank of the first group spent waiting for a slower
        # one (ranks that run unevenly, as on a busy host, wait at every all-reduce: tp scaling shows it)
        "allreduce_own_ms_per_forward": None if own_s is None else 1e3 * own_s / iters,
        "allreduce_wait_ms_per_forward_per_rank": None if waits_s is None else [1e3 * w / iters for w in waits_s],
        # BEiT-3: the share of the all-reduce time spent on the Sub-LN statistics (0 for VLMo)
        "subln_allreduce_ms_per_forward": 1e3 * max(r["subln_s"] for r in ranks) / iters,
    }
    if dtype == "int8":  # its fraction_of_peak is against the W8A8 rate, though much of the forward stays fp32
        roofline = time_at_peaks(gflop, ranks[:ctx.tp_size])
        roofline["fraction"] = samples_per_s / ctx.dp_size * roofline["ms_per_sample"] / 1e3
        report["int8_roofline"] = roofline
    if accuracy is not None:
        report["vs_fp32"] = accuracy
    return report
