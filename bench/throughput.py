"""Training speed against the machine's limit (a benchmark that prints figures).

    python bench/throughput.py                           # tiny, base, bart-base shapes on this CPU
    python bench/throughput.py --shapes base --steps 100
    python bench/throughput.py --device cuda --bf16 --tf32 --fused-adamw --compile --shapes bart-base
        --patients 31250 --epochs 2 --num-workers 4    (one command: 25,000 training patients per epoch)

For each model shape, on the built-in (MIMIC-shaped) cohort, with the loaders, model, optimizer and
step of `promptehr.train` (forward, backward, grad clip, AdamW, schedule): training rows/s and code
tokens/s in steady state (the first `--warmup` steps are one-time warm-up and are not timed),
achieved FLOP/s against a matmul peak measured in the same run, peak memory, collator rows/s on one
core, generation patients/s, and the MLflow logging overhead per step. `--epochs N` then times N
whole training epochs wall clock (new epoch plan, DataLoader and workers, every step, device synced).

FLOPs (matmul only, 2 per multiply-add; training = 3x forward). Per row with L_e encoder and L_d decoder
positions (the 2 prompt positions included), d = d_model, f = ffn dim, V = vocabulary:
  encoder layer   L_e (8 d^2 + 4 d f) + 4 L_e^2 d
  decoder layer   L_d (8 d^2 + 4 d^2 + 4 d f) + 4 d^2 L_e + 4 L_d^2 d + 4 L_d L_e d
                  (self-attention projections, cross-attention Q/O, FFN; cross K/V on the encoder
                  states; self-attention scores counted in full, not halved for the causal mask)
  LM head         2 d V (L_d - 2)
"Useful" FLOPs use each row's true lengths; "executed" FLOPs use the padded batch shape. The ratio
to the matmul peak uses the useful figure (MFU-style); executed/useful shows the padding waste.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from promptehr.cli import add_config_arguments, overrides_of, setup_logging
from promptehr.config import ModelConfig, load_config
from promptehr.data import load_patients, split_patients
from promptehr.engine import (
    autocast_context,
    build_loader,
    build_optimizer,
    compiled_step_model,
    seed_everything,
    training_step,
)
from promptehr.model import N_PROMPTS, PromptBartWithDemographicPrediction
from promptehr.tokenizer import DiagnosisCodeTokenizer

ROOT = Path(__file__).resolve().parents[1]

logger = logging.getLogger("bench.throughput")

SHAPES = {  # name: (config file, overrides); bart-base = the ModelConfig defaults on base.yaml
    "tiny": ("experiments/tiny.yaml", []),
    "base": ("experiments/base.yaml", []),
    "bart-base": ("experiments/base.yaml", None),
}


# ------------------------------------------------------------------ machine


class CpuMeter:
    """Share of the machine's CPU time used by OTHER processes since `start()` (Linux /proc/stat):
    other engineers' jobs on a shared 2-core box make timings noisy; this says when."""

    def __init__(self):
        self.start()

    @staticmethod
    def _machine():
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:9]]
        return sum(v) - v[3] - v[4], sum(v)  # busy, total (jiffies)

    def start(self):
        self.busy0, self.total0 = self._machine()
        self.own0 = sum(os.times()[:2])

    def other_share(self) -> float:
        try:
            busy, total = self._machine()
        except OSError:
            return float("nan")
        hz = os.sysconf("SC_CLK_TCK")
        own = (sum(os.times()[:2]) - self.own0) * hz
        return max(0.0, (busy - self.busy0 - own) / max(total - self.total0, 1))


def peak_rss_reset() -> None:
    try:  # Linux: writing 5 resets VmHWM, so each shape gets its own high-water mark
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device, dtype=torch.float32, n=2048, seconds=2.0) -> float:
    """FLOP/s of a large square matmul (2 n^3 per product), best of repeated timings."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    best, end = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t) / 4)
    return 2 * n**3 / best


# ------------------------------------------------------------------ FLOPs


def row_flops(m: ModelConfig, vocab: int, le: np.ndarray, ld: np.ndarray) -> np.ndarray:
    """Forward matmul FLOPs of rows with `le` encoder and `ld` decoder positions (prompts included)."""
    d = m.d_model
    enc = m.encoder_layers * (le * (8 * d * d + 4 * d * m.encoder_ffn_dim) + 4 * le * le * d)
    dec = m.decoder_layers * (
        ld * (12 * d * d + 4 * d * m.decoder_ffn_dim) + 4 * d * d * le + 4 * ld * ld * d + 4 * ld * le * d
    )
    return enc + dec + 2 * d * vocab * (ld - N_PROMPTS)


def batch_flops(m: ModelConfig, vocab: int, batch) -> tuple[float, float]:
    """(useful, executed) training FLOPs of one batch: 3x the forward."""
    le = batch["attention_mask"].sum(1).numpy() + N_PROMPTS
    ld = (batch["labels"] != -100).sum(1).numpy() + N_PROMPTS
    n = len(le)
    useful = row_flops(m, vocab, le, ld).sum()
    executed = n * row_flops(
        m, vocab, np.array(batch["input_ids"].shape[1] + N_PROMPTS), np.array(batch["labels"].shape[1] + N_PROMPTS)
    )
    return 3.0 * float(useful), 3.0 * float(executed)


# ------------------------------------------------------------------ one shape


def shape_config(name: str, args):
    path, overrides = SHAPES[name]
    extra = overrides_of(args)
    if args.patients:
        extra.append(f"data.synthetic.n_patients={args.patients}")
    cfg = load_config(ROOT / path, [*(overrides or []), *extra, f"training.num_workers={args.num_workers}"])
    if overrides is None:  # bart-base: the ModelConfig defaults, then any model.* override given
        model_over = [o for o in extra if o.startswith("model.")]
        cfg.model = load_config(None, model_over).model if model_over else ModelConfig()
    cfg.training.device = args.device
    cfg.training.precision = "bf16" if args.bf16 else cfg.training.precision
    cfg.training.compile = args.compile or cfg.training.compile
    return cfg


def measure_shape(name: str, args, peak: float) -> dict:
    cfg = shape_config(name, args)
    tcfg = cfg.training
    device = torch.device(args.device)
    seed_everything(tcfg.seed)
    patients, _, _ = load_patients(cfg.data)
    train_patients, val_patients = split_patients(patients, cfg.data.val_fraction, cfg.data.split_seed)
    tokenizer = DiagnosisCodeTokenizer.from_patients(train_patients, cfg.model.visit_order)
    train_loader, _, train_collator, _ = build_loader(cfg, tokenizer, train_patients)
    vocab = len(tokenizer)

    # collator alone, in this process (one core: numpy, no torch threads involved)
    ds = train_loader.dataset
    t = time.perf_counter()
    n_rows = n_batches = 0
    for idx in train_loader.batch_sampler:
        n_rows += train_collator([ds[i] for i in idx])["labels"].shape[0]
        n_batches += 1
    collate_s = time.perf_counter() - t
    rows_per_patient = n_rows / len(ds)

    peak_rss_reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = PromptBartWithDemographicPrediction(tokenizer, cfg).to(device)
    optimizer = build_optimizer(model, tcfg, device)
    if args.fused_adamw:  # the same parameter groups, fused kernel
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
        optimizer = torch.optim.AdamW(groups, lr=tcfg.learning_rate, fused=True)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, tcfg.warmup_steps, 10**6)
    step_model = compiled_step_model(model, tcfg)
    autocast = autocast_context(device, tcfg.precision)
    n_params = sum(p.numel() for p in model.parameters())
    slow = name == "bart-base" and device.type == "cpu"  # seconds per step here: fewer steps
    warmup, steps = (min(args.warmup, 2), args.steps_bart_cpu) if slow else (args.warmup, args.steps)
    model.train()
    sums = torch.zeros(4, device=device)
    records = []  # (seconds, data seconds, rows, code tokens, useful flops, executed flops)
    meter = CpuMeter()
    it = iter(train_loader)
    done = 0
    while done < warmup + steps:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(train_loader)
            continue
        t1 = time.perf_counter()
        useful, executed = batch_flops(cfg.model, vocab, batch)
        codes = int((batch["labels"] >= tokenizer.n_special).sum())
        # the step of promptehr.train.train, itself
        sums += training_step(model, step_model, batch, optimizer, scheduler, tcfg.max_grad_norm, autocast, device)
        if done + 1 == warmup:
            sync(device)
            meter.start()
        if done >= warmup:
            sync(device)  # per-step timing needs the device done (CPU: no-op)
            records.append((time.perf_counter() - t0, t1 - t0, batch["labels"].shape[0], codes, useful, executed))
        done += 1
    other = meter.other_share()
    timed_epochs = [
        time_epoch(train_loader, train_collator, epoch, model, step_model, optimizer, scheduler, tcfg, autocast, device)
        for epoch in range(1, args.epochs + 1)
    ]
    loss = float(sums[0]) / done
    rec = np.array(records)
    secs = rec[:, 0].sum()
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else peak_rss_gib()

    result = {
        "shape": name,
        "params_M": n_params / 1e6,
        "d_model": cfg.model.d_model,
        "layers": f"{cfg.model.encoder_layers}+{cfg.model.decoder_layers}",
        "batch_patients": tcfg.batch_size,
        "steps": steps,
        "median_step_ms": 1000 * statistics.median(rec[:, 0]),
        "rows_per_s": rec[:, 2].sum() / secs,
        "code_tokens_per_s": rec[:, 3].sum() / secs,
        "useful_flops_per_s": rec[:, 4].sum() / secs,
        "executed_flops_per_s": rec[:, 5].sum() / secs,
        "data_wait_share": rec[:, 1].sum() / secs,
        "memory_gib": memory,
        "other_cpu_share": other,
        "collator_rows_per_s": n_rows / collate_s,
        "rows_per_patient": rows_per_patient,
        "loss": loss,
        "n_train_patients": len(train_patients),
    }
    result["peak_share_useful"] = result["useful_flops_per_s"] / peak
    result["peak_share_executed"] = result["executed_flops_per_s"] / peak
    result["epoch_s"] = len(train_patients) * rows_per_patient / result["rows_per_s"]
    result["timed_epochs"] = timed_epochs
    if args.gen_patients and (name != "bart-base" or device.type == "cuda"):
        result["generation_patients_per_s"] = generation_speed(model, tokenizer, train_patients, args.gen_patients)
    return result


def time_epoch(train_loader, train_collator, epoch, model, step_model, optimizer, scheduler, tcfg, autocast, device) -> dict:
    """One whole training epoch, wall clock, as `promptehr.train.train` runs it: a new epoch's rows
    and batches, the DataLoader (and its workers, started anew as in training), every step, the
    device synchronised at the end. Validation, logging and checkpoints are not included."""
    train_loader.batch_sampler.set_epoch(epoch)
    train_collator.set_epoch(epoch)
    sync(device)
    t0 = time.perf_counter()
    wait = 0.0
    rows = steps = 0
    it = iter(train_loader)
    while True:
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        wait += time.perf_counter() - t
        training_step(model, step_model, batch, optimizer, scheduler, tcfg.max_grad_norm, autocast, device)
        rows += batch["labels"].shape[0]
        steps += 1
    sync(device)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rows": rows, "steps": steps, "data_wait_share": wait / seconds}


def generation_speed(model, tokenizer, train_patients, n: int) -> float:
    """patients/s of `generate_patients` (demographics of training patients); see bench/generation.py."""
    from promptehr.generate import SamplingConfig, generate_patients

    rng = np.random.default_rng(0)
    picks = rng.choice(len(train_patients), n)
    t = time.perf_counter()
    generate_patients(
        model,
        tokenizer,
        [train_patients[i].age for i in picks],
        [train_patients[i].sex for i in picks],
        SamplingConfig(),
        seed=0,
    )
    return n / (time.perf_counter() - t)


def logging_overhead(n_calls: int = 200) -> dict:
    """Seconds per `MLflowTracker.log_metrics` call (async) and per call including the background
    write (flush time spread over the calls), against a sqlite store in a temp dir."""
    from promptehr.tracking import MLflowTracker

    with tempfile.TemporaryDirectory(prefix="bench-mlflow-") as tmp:
        tracker = MLflowTracker(f"sqlite:///{tmp}/mlflow.db", "bench-throughput", register_model=False)
        tracker.start()
        metrics = {
            "train/loss": 1.0,
            "train/lm_loss": 1.0,
            "train/age_loss": 0.1,
            "train/sex_loss": 0.7,
            "train/learning_rate": 1e-3,
            "train/rows_per_second": 500.0,
        }
        calls = []
        t_all = time.perf_counter()
        for step in range(n_calls):
            t = time.perf_counter()
            tracker.log_metrics({k: v + step for k, v in metrics.items()}, step=step)
            calls.append(time.perf_counter() - t)
        t = time.perf_counter()
        tracker.flush()
        flush = time.perf_counter() - t
        total = time.perf_counter() - t_all
        tracker.end()
    return {
        "call_s": statistics.median(calls),
        "call_mean_s": float(np.mean(calls)),
        "flush_s": flush,
        "per_call_total_s": total / n_calls,
    }


# ------------------------------------------------------------------ main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,base,bart-base")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per shape")
    parser.add_argument("--steps-bart-cpu", type=int, default=6, help="timed steps for bart-base on CPU")
    parser.add_argument("--warmup", type=int, default=8, help="untimed warm-up steps (first steps are slow)")
    parser.add_argument("--patients", type=int, default=None, help="cohort size (default: the config's)")
    add_config_arguments(parser, config=False)  # --overrides: for every shape
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (training.precision=bf16)")
    parser.add_argument("--tf32", action="store_true", help="TF32 matmuls (float32_matmul_precision=high, as train() sets)")
    parser.add_argument("--fused-adamw", action="store_true", help="force AdamW(fused=True)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (training.compile=true)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--gen-patients", type=int, default=64, help="patients for the generation timing (0: skip)")
    parser.add_argument(
        "--epochs", type=int, default=0, help="after the step timings, also time this many whole training epochs, wall clock"
    )
    parser.add_argument("--no-logging-bench", action="store_true")
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    device = torch.device(args.device)

    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "unknown CPU",
        )
        if Path("/proc/cpuinfo").exists()
        else "unknown CPU"
    )
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu}, {os.cpu_count()} cores"
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}  {where}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"flags: bf16={args.bf16} tf32={args.tf32} fused_adamw={args.fused_adamw} compile={args.compile} "
        f"workers={args.num_workers}"
    )
    peak_dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = matmul_peak(device, peak_dtype, n=4096 if device.type == "cuda" else 2048)
    print(f"matmul peak ({str(peak_dtype).split('.')[-1]}, measured now): {peak / 1e9:.1f} GFLOP/s")

    results = []
    for name in args.shapes.split(","):
        r = measure_shape(name.strip(), args, peak)
        results.append(r)
        logger.warning("%s done", name)
    print("\nsteady state (warm-up steps excluded); FLOP/s are matmul FLOPs, see the docstring for the formula")
    head = (
        f"{'shape':<10}{'params':>8}{'step ms':>9}{'rows/s':>9}{'codes/s':>9}{'GFLOP/s':>9}{'%peak':>7}"
        f"{'exec%':>7}{'mem GiB':>8}{'collate rows/s':>15}{'x model':>8}{'gen pat/s':>10}{'busy':>6}"
    )
    print(head)
    for r in results:
        gen = r.get("generation_patients_per_s")
        print(
            f"{r['shape']:<10}{r['params_M']:>7.2f}M{r['median_step_ms']:>9.1f}{r['rows_per_s']:>9.0f}"
            f"{r['code_tokens_per_s']:>9.0f}{r['useful_flops_per_s'] / 1e9:>9.1f}{100 * r['peak_share_useful']:>6.1f}%"
            f"{100 * r['peak_share_executed']:>6.1f}%{r['memory_gib']:>8.2f}{r['collator_rows_per_s']:>15.0f}"
            f"{r['collator_rows_per_s'] / r['rows_per_s']:>7.0f}x{(f'{gen:.1f}' if gen else '-'):>10}"
            f"{100 * r['other_cpu_share']:>5.0f}%"
        )
    print(
        "  %peak: useful FLOP/s / matmul peak; exec%: with padding counted; busy: CPU share other processes "
        "used during the timed steps (timings are unreliable above ~5%); mem: peak RSS (CPU) or "
        "max_memory_allocated (CUDA)"
    )
    for r in results:
        print(
            f"  {r['shape']}: {r['n_train_patients']} training patients x {r['rows_per_patient']:.2f} rows -> "
            f"one epoch {r['epoch_s']:.1f}s at this rate; data wait {100 * r['data_wait_share']:.1f}% of step time"
        )
    for r in results:
        for i, e in enumerate(r["timed_epochs"], 1):
            print(
                f"  {r['shape']}: timed epoch {i}: {e['seconds']:.1f}s wall for {r['n_train_patients']} training "
                f"patients ({e['rows']} rows, {e['steps']} steps of batch {r['batch_patients']} patients), "
                f"{e['rows'] / e['seconds']:.0f} rows/s, data wait {100 * e['data_wait_share']:.1f}%"
            )
    bart = next((r for r in results if r["shape"] == "bart-base"), None)
    if bart is not None:
        rows = 25_000 * bart["rows_per_patient"]
        print(
            f"  bart-base, one epoch of 25,000 MIMIC-shaped training patients ({rows:.0f} rows): "
            f"{rows / bart['rows_per_s']:.0f}s at the steady-state rate measured here on {device.type} "
            f"(--patients 31250 --epochs 2 times such epochs whole)"
        )
        if device.type == "cpu":
            flops = rows * bart["useful_flops_per_s"] / bart["rows_per_s"]
            steps = math.ceil(rows / (bart["rows_per_patient"] * bart["batch_patients"]))
            print(
                f"  PROJECTION, not measured: {flops / 1e15:.2f} PFLOP of useful matmuls per epoch -> an H100 at "
                f"400 / 100 TFLOP/s useful bf16 (about 40% / 10% of its dense peak) needs {flops / 400e12:.1f}s / "
                f"{flops / 100e12:.1f}s, plus {steps} steps x the per-step overhead (each 1 ms adds {steps / 1000:.1f}s)"
            )
    if not args.no_logging_bench:
        lo = logging_overhead()
        base = next((r for r in results if r["shape"] == "base"), results[0])
        step_s = base["median_step_ms"] / 1000
        every = load_config(ROOT / "experiments" / "base.yaml").training.log_every_n_steps
        print(
            f"\nMLflow log_metrics (async, sqlite in a temp dir, 6 metrics): {1e3 * lo['call_s']:.2f} ms per call "
            f"(mean {1e3 * lo['call_mean_s']:.2f}), {1e3 * lo['per_call_total_s']:.2f} ms per call with the background "
            f"write; = {100 * lo['per_call_total_s'] / step_s:.1f}% of a {base['shape']} step if logged every step, "
            f"{100 * lo['per_call_total_s'] / step_s / every:.2f}% at log_every_n_steps={every}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
