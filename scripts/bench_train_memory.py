"""Peak training memory per parameter, side by side in one run: full fine-tuning and adapters.

    python scripts/bench_train_memory.py [--device cpu|cuda] [--scenarios full,lora]
        [--model qwen3-0.6b|tiny] [--steps 3] [--max-length 128] [--snapshot-steps 1]
        [--snapshot-memory-gb GB] [--gradient-checkpointing] [--json PATH]

Builds a model of Qwen3-0.6B's shape (``--model tiny``: a toy shape, for a smoke test in
seconds) with random weights, saves it with ``save_pretrained`` (safetensors, bf16 as the
released model) beside realm's byte tokenizer, and registers it as a hero by its folder
(``model.path``, the path a downloaded model takes). In one temporary realm, each scenario
gets its own campaign and trains ONE real job as the daemon does: a child ``python -m
trainer.run_job`` (CUDA_VISIBLE_DEVICES from ``daemon.devices``: "" on CPU, "0" with ``--device
cuda``), governor on, a few optimizer steps of micro batch 1 on a generated dataset. Its record
gives the peak host memory (the child's ``ru_maxrss``) and on CUDA the peak allocation, both
measured in the child, with the dtypes, the trainable parameters and the governor's snapshot.

Scenarios: ``full`` (fp32, every weight trains), ``lora`` (fp32 base, r 16, all-linear),
``full-bf16``, ``lora-bf16`` (bf16 weights; the adapter trains in fp32) and ``qlora`` (4-bit
base, CUDA and bitsandbytes only). Default: full,lora on CPU; full-bf16,lora-bf16,qlora on CUDA.

Bytes per parameter = (peak - baseline) / base parameters. The host baseline is the peak RSS of
a child that only imports torch, transformers, peft and realm's trainer modules, measured the
same way in the same run (and printed); the CUDA baseline is 0 (the allocator counts only the
job's tensors). ``--snapshot-steps`` (default 1) sets governor.snapshot_steps so that a few
steps reach the governor's steady state (both of its snapshot slots hold weights and AdamW
moments, as in a long job); with the realm default of 25 a 3-step job holds only the start
snapshot, before any moment exists.

Targets, printed and not asserted: full fine-tuning at most 20 bytes per parameter of host
memory on CPU; LoRA in bf16 on CUDA at most 2.5 bytes per base parameter of CUDA memory plus
its adapter (16 bytes per trainable parameter: fp32 weight, gradient and two AdamW moments).
A scenario that fails prints its error and the others still run. A child whose resident memory
passes ``--max-host-gb`` (default: the memory available at the start less 1.5 GiB) is killed
and reported with the memory it had reached, so the benchmark never drives the machine into
its OOM killer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from core.paths import RealmPaths, init_layout  # noqa: E402
from core.training_queue import TrainingQueue  # noqa: E402
from daemon.lock import DeviceSet  # noqa: E402
from daemon.protocol import JobFiles  # noqa: E402
from guild.campaigns import activate, create_campaign  # noqa: E402
from guild.heroes.from_folder import add_hero_from_folder  # noqa: E402
from trainer.data.synthetic import write_dataset  # noqa: E402

GiB = 1 << 30
HERO = "bench"
SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
                 tie_word_embeddings=True, max_position_embeddings=1024, rope_theta=10000.0,
                 rms_norm_eps=1e-6),
}
FULL: dict = {}
"""No adapter section: adapter.method's default is none (the resolver reads the string "none"
given in a layer as null, which the key refuses)."""
LORA = {"method": "lora", "r": 16, "alpha": 32.0, "target_modules": "all-linear"}
SCENARIOS = {
    "full": {"adapter": FULL, "training": {"param_dtype": "fp32"}},
    "lora": {"adapter": LORA, "training": {"param_dtype": "fp32"}},
    "full-bf16": {"adapter": FULL, "training": {"param_dtype": "bf16"}},
    "lora-bf16": {"adapter": LORA, "training": {"param_dtype": "bf16"}},
    "qlora": {"adapter": {**LORA, "method": "qlora"}, "training": {"param_dtype": "bf16"}},
}
DEFAULTS = {"cpu": "full,lora", "cuda": "full-bf16,lora-bf16,qlora"}
FULL_HOST_TARGET = 20.0
"""Bytes per parameter of host memory, full fine-tuning on CPU."""
LORA_CUDA_TARGET = 2.5
"""Bytes per base parameter of CUDA memory, LoRA in bf16, plus the adapter's own."""
ADAPTER_BYTES = 16
"""Per trainable adapter parameter: fp32 weight, gradient, two AdamW moments."""
TRAINER_IMPORTS = ("import torch, transformers, peft\n"
                   "import trainer.run_job, trainer.engine, trainer.adapters, trainer.model, "
                   "trainer.governor, trainer.checkpoint, trainer.data.cache\n"
                   "import resource\n"
                   "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")


def build_model_folder(folder: Path, shape: dict, device: str) -> dict:
    """Random Qwen3 weights (safetensors, bf16 as Qwen3-0.6B ships) and the byte tokenizer in
    ``folder``: {"params" (tied embeddings counted once), "cuda" (torch sees a GPU)}; nothing
    is built for ``device`` cuda without a GPU. Runs in a child (``build_in_child``)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from trainer.model import build_byte_tokenizer

    if device == "cuda" and not torch.cuda.is_available():
        return {"params": None, "cuda": False}
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**shape, architectures=["Qwen3ForCausalLM"]))
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    build_byte_tokenizer().save_pretrained(folder)
    return {"params": model.num_parameters(), "cuda": torch.cuda.is_available()}


def build_in_child(folder: Path, args, env: dict) -> dict:
    """The model is built in a child so that this process stays small: on Linux a child's
    ru_maxrss starts from its parent's peak RSS when it was spawned (exec keeps the high-water
    mark of the memory it replaces), so a parent that had held the model would inflate every
    job's measured peak and the baseline."""
    out = subprocess.run([sys.executable, __file__, "--model", args.model, "--device",
                          args.device, "--build-only", str(folder)],
                         env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"building the model failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_env(devices: str) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path,
            "CUDA_VISIBLE_DEVICES": DeviceSet.parse(devices).visible}


def baseline_bytes(env: dict) -> int:
    """Peak RSS of a child that imports what a training child imports, and nothing more."""
    out = subprocess.run([sys.executable, "-c", TRAINER_IMPORTS], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def make_realm(base: Path, folder: Path, devices: str) -> RealmPaths:
    paths = RealmPaths(base)
    base.mkdir(parents=True)
    init_layout(paths)
    (base / "config.json").write_text(json.dumps({"daemon": {"devices": devices}}))
    add_hero_from_folder(paths, HERO, folder)
    return paths


def overrides_for(name: str, args) -> dict:
    scenario = SCENARIOS[name]
    training = {**scenario["training"], "micro_batch_size": 1, "grad_accum": 1,
                "max_steps": args.steps, "warmup_steps": 1,
                "gradient_checkpointing": args.gradient_checkpointing}
    governor = {"enabled": True, "snapshot_steps": args.snapshot_steps}
    if args.snapshot_memory_gb is not None:
        governor["snapshot_memory_gb"] = args.snapshot_memory_gb
    out = {"training": training, "governor": governor, "data": {"max_length": args.max_length},
           "checkpoint": {"save_steps": 10_000, "keep_last": 1},
           "logging": {"status_every_seconds": 0}}
    return {**out, "adapter": dict(scenario["adapter"])} if scenario["adapter"] else out


def wait_watched(proc: subprocess.Popen, timeout: float, max_rss: int) -> tuple[int, int, str]:
    """(exit code, highest sampled RSS, why it was killed or ""): the child is killed when it
    passes the time limit or ``max_rss`` resident bytes."""
    deadline, sampled, killed = time.monotonic() + timeout, 0, ""
    try:
        watched = psutil.Process(proc.pid)
    except psutil.Error:
        watched = None
    while True:
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, sampled, killed
        try:
            sampled = max(sampled, watched.memory_info().rss if watched else 0)
        except psutil.Error:
            pass
        if not killed and sampled > max_rss:
            killed = f"resident memory passed --max-host-gb {max_rss / GiB:.1f} GiB"
        elif not killed and time.monotonic() > deadline:
            killed = f"still running after --timeout {timeout:.0f} s"
        if killed and proc.returncode is None:
            proc.kill()
        time.sleep(0.2)


def run_job(paths: RealmPaths, name: str, env: dict, args) -> tuple[dict, float, int, str]:
    """One job of the active campaign in a child, as the daemon runs it: (the child's outcome as
    a record, seconds, highest sampled RSS, why the watcher killed it)."""
    queue = TrainingQueue(paths.base)
    queue.add(write_dataset(paths.base / f"{name}.jsonl", args.examples, seed=0))
    job = queue.claim_next()
    sidecar = paths.base / (job.dataset_path + ".job.json")
    log = paths.base / f"{name}.log"
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "trainer.run_job", "--base-dir",
                                 str(paths.base), "--job", str(sidecar)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        code, sampled, killed = wait_watched(proc, args.timeout, int(args.max_host_gb * GiB))
    seconds = time.perf_counter() - start
    outcome = JobFiles.of(paths.status, job.id).read_outcome()
    record = {**outcome.results, "kind": outcome.kind, "last_error": outcome.reason} \
        if outcome else {"kind": None, "last_error": None}
    if record["kind"] == "completed":
        queue.complete(queue.find(job.id))
        return record, seconds, sampled, killed
    record["last_error"] = record["last_error"] or killed or f"no outcome; exit code {code}"
    record["log_tail"] = [line[:500] for line in
                          log.read_text(errors="replace").strip().splitlines()[-5:]]
    queue.fail(queue.find(job.id), record["last_error"])
    return record, seconds, sampled, killed


def scenario_row(name: str, paths: RealmPaths, env: dict, args, base: dict) -> dict:
    """Train the scenario's job in its own campaign; its row of the table."""
    row = {"scenario": name, "base_params": base["params"], "status": "failed"}
    try:
        create_campaign(paths, name, HERO, overrides=overrides_for(name, args))
    except Exception as exc:  # noqa: BLE001 - a bad scenario is reported, the others run
        return {**row, "error": f"campaign: {exc}"}
    activate(paths, f"{HERO}/{name}")
    record, seconds, sampled, killed = run_job(paths, name, env, args)
    data = (record.get("metadata") or {}).get("data") or {}
    memory, adapter = data.get("memory") or {}, data.get("adapter") or {}
    governor = record.get("governor") or {}
    row.update(seconds=round(seconds, 1), sampled_rss_peak_bytes=sampled,
               status="ok" if record["kind"] == "completed" else (record["kind"] or "killed"),
               error=record["last_error"] if record["kind"] != "completed" else None,
               log_tail=record.get("log_tail"),
               trainable_params=adapter.get("trainable_params"),
               param_dtype=data.get("param_dtype"),
               optimizer_state_dtype=data.get("optimizer_state_dtype"),
               snapshot_mode=governor.get("snapshot_mode"),
               snapshot_bytes=governor.get("snapshot_bytes"),
               host_peak_bytes=memory.get("host_peak_bytes"),
               cuda_peak_bytes=memory.get("cuda_peak_bytes"),
               cuda_train_peak_bytes=memory.get("cuda_train_peak_bytes"))
    row["host_bytes_per_param"] = per_param(row["host_peak_bytes"], base["baseline"], base)
    row["cuda_bytes_per_param"] = per_param(row["cuda_peak_bytes"], 0, base)
    row.update(target_for(name, args.device, row))
    return row


def per_param(peak: int | None, baseline: int, base: dict) -> float | None:
    return None if peak is None else round((peak - baseline) / base["params"], 2)


def target_for(name: str, device: str, row: dict) -> dict:
    """The row's target (printed, not asserted) and whether it was met."""
    if name == "full" and device == "cpu":
        limit, got, what = FULL_HOST_TARGET, row["host_bytes_per_param"], "host"
    elif name == "lora-bf16" and device == "cuda":
        adapter = ADAPTER_BYTES * (row["trainable_params"] or 0) / row["base_params"]
        limit, got, what = round(LORA_CUDA_TARGET + adapter, 2), row["cuda_bytes_per_param"], \
            "CUDA"
    else:
        return {"target": None, "target_met": None}
    return {"target": f"{what} <= {limit} B/param",
            "target_met": None if got is None else got <= limit}


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / (1 << 20):.0f} MiB"


def fmt_count(n) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} M"


def print_table(rows: list[dict], base: dict) -> None:
    head = ("scenario", "params", "trainable", "param/optim", "snapshot", "host peak", "host B/p",
            "CUDA peak", "CUDA B/p", "CUDA train", "s", "target")
    lines = [head]
    for r in rows:
        snap = r.get("snapshot_mode") or ""
        snap = f"{snap} {fmt_bytes(r.get('snapshot_bytes'))}".strip()
        met = {True: " (met)", False: " (MISSED)", None: ""}[r.get("target_met")]
        lines.append((r["scenario"], fmt_count(r["base_params"]), fmt_count(
            r.get("trainable_params")), f"{r.get('param_dtype') or '-'}/"
            f"{r.get('optimizer_state_dtype') or '-'}", snap, fmt_bytes(r.get("host_peak_bytes")),
            _num(r.get("host_bytes_per_param")), fmt_bytes(r.get("cuda_peak_bytes")),
            _num(r.get("cuda_bytes_per_param")), fmt_bytes(r.get("cuda_train_peak_bytes")),
            _num(r.get("seconds")),
            (r.get("target") or "-") + met))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    print(f"baseline (child importing torch, transformers, peft, realm trainer): "
          f"{fmt_bytes(base['baseline'])} peak RSS; base parameters {base['params']:,}")
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['scenario']}: {r['status']}: {r.get('error')}"
                  + (f" (sampled RSS peak {fmt_bytes(r.get('sampled_rss_peak_bytes'))})"
                     if r.get("sampled_rss_peak_bytes") else ""))
    print(f"targets (not asserted): full on CPU <= {FULL_HOST_TARGET} B/param host; lora-bf16 on "
          f"CUDA <= {LORA_CUDA_TARGET} B/param CUDA + {ADAPTER_BYTES} B per trainable parameter")


def _num(x) -> str:
    return "-" if x is None else f"{x:g}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--scenarios", default=None,
                        help=f"comma list of {', '.join(SCENARIOS)} (default: {DEFAULTS})")
    parser.add_argument("--model", choices=tuple(SHAPES), default="qwen3-0.6b")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--snapshot-steps", type=int, default=1)
    parser.add_argument("--snapshot-memory-gb", type=float, default=None,
                        help="governor.snapshot_memory_gb (only when given)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per job")
    parser.add_argument("--max-host-gb", type=float,
                        default=psutil.virtual_memory().available / GiB - 1.5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--build-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.scenarios = [s for s in (args.scenarios or DEFAULTS[args.device]).split(",") if s]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.build_only:
        print(json.dumps(build_model_folder(args.build_only, SHAPES[args.model], args.device)))
        return 0
    # a SIGTERM (timeout) unwinds: the temporary realm is removed; the children, in this process
    # group, got the same signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    devices = "0" if args.device == "cuda" else "cpu"
    env = child_env(devices)
    with tempfile.TemporaryDirectory(prefix="realm-bench-mem-") as tmp:
        folder = Path(tmp) / "model"
        built = build_in_child(folder, args, env)
        if args.device == "cuda" and not built["cuda"]:
            print("--device cuda: torch sees no CUDA device", file=sys.stderr)
            return 2
        base = {"params": built["params"], "baseline": baseline_bytes(env)}
        paths = make_realm(Path(tmp) / "realm", folder, devices)
        rows: list[dict] = []
        for name in args.scenarios:
            rows.append(scenario_row(name, paths, env, args, base))
            print_progress(rows[-1])
            if args.json:  # after each scenario: a run cut short keeps what it measured
                write_json(args, base, rows)
    print_table(rows, base)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def print_progress(row: dict) -> None:
    print(f"{row['scenario']}: {row['status']} in {row.get('seconds', 0)} s, host peak "
          f"{fmt_bytes(row.get('host_peak_bytes'))}, CUDA peak "
          f"{fmt_bytes(row.get('cuda_peak_bytes'))}", flush=True)


def write_json(args, base: dict, rows: list[dict]) -> None:
    args.json.write_text(json.dumps({
        "device": args.device, "model": args.model, "steps": args.steps,
        "max_length": args.max_length, "snapshot_steps": args.snapshot_steps,
        "base_params": base["params"], "baseline_host_bytes": base["baseline"],
        "bench_process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
