"""A Llama-2-7B-shaped checkpoint pruned and healed without ever holding it whole (issue 28 item 5).

    python bench/bench_stream_7b.py write --dir /work/tmp7b          # random bf16 weights, ~13.5 GB of shards
    python bench/bench_stream_7b.py prune --dir /work/tmp7b          # 50% magnitude, streamed: masks.safetensors
    python bench/bench_stream_7b.py prune --method wanda             # 50% Wanda, its norms one layer at a time
    python bench/bench_stream_7b.py heal --dir /work/tmp7b           # one step per block, 128-token sequences
    python bench/bench_stream_7b.py report                           # bench/results/stream_7b_cpu.{json,md}
    (--shape tiny: the same on a 4-layer toy, to try the script in seconds)

Each phase is its own process, so its peak resident memory (``ru_maxrss``: every page the process ever had
resident, file pages of memory-mapped shards included) is that phase's alone; each appends its numbers to
``bench/results/stream_7b_cpu.json``. The weights are random (a shape, not a model): the losses say
nothing about quality, only that the run trains. The heal phase reads the output back: its index and config,
and every tensor of one layer, with the masked positions checked zero.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from starfish_fast.checkpoint import save_json_atomic, save_safetensors_atomic  # noqa: E402
from starfish_fast.models.hf_shards import INDEX_NAME, SHARD_NAME, ShardedCheckpoint  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "stream_7b_cpu.json"
SHAPES = {"7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                     num_hidden_layers=32, vocab_size=32000, max_position_embeddings=4096),
          "tiny": dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4,
                       num_hidden_layers=4, vocab_size=320, max_position_embeddings=256)}
SHARD_BYTES = {"7b": 5 * 10**9, "tiny": 100_000}          # save_pretrained's max_shard_size 5GB: 3 shards at 7B


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20          # ru_maxrss is KiB on Linux


def record(phase: str, values: dict) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[phase] = {**values, "peak_rss_gib": round(peak_rss_gib(), 3),
                      "device": "CPU, 2 cores, 24 GB (this machine)", "torch": torch.__version__}
    save_json_atomic(results, RESULTS)
    print(json.dumps({phase: results[phase]}, indent=1))


# ----------------------------------------------------------------------------- write
def write(args) -> None:
    """Random bf16 weights (std 0.02, norms 1) in shards of at most SHARD_BYTES, one shard in memory at a time."""
    import transformers

    config = transformers.LlamaConfig(**SHAPES[args.shape], torch_dtype="bfloat16")
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    shapes = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    groups, group, size = [], [], 0
    for key, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if group and size + nbytes > SHARD_BYTES[args.shape]:
            groups.append(group)
            group, size = [], 0
        group.append(key)
        size += nbytes
    groups.append(group)
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    generator, weight_map, start = torch.Generator().manual_seed(0), {}, time.perf_counter()
    for number, keys in enumerate(groups):
        tensors = {key: (torch.ones(shapes[key]) if "norm" in key else
                         torch.randn(shapes[key], generator=generator) * 0.02).to(torch.bfloat16) for key in keys}
        name = SHARD_NAME.format(number + 1, len(groups))
        save_safetensors_atomic(tensors, directory / name, {"format": "pt"})
        weight_map.update({key: name for key in keys})
        del tensors
    total = sum(2 * math.prod(shape) for shape in shapes.values())
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(directory)
    record(f"write_{args.shape}", {"shards": len(groups), "bytes": total, "weights": total // 2,
                                   "seconds": round(time.perf_counter() - start, 1)})


# ----------------------------------------------------------------------------- prune
def prune(args) -> None:
    """Magnitude 50% per layer (masks_magnitude50, what heal reads), or Wanda 50% (``--method wanda``: its input
    norms one decoder layer at a time over ``--sequences`` x 128 random tokens)."""
    from starfish_fast.streaming import StreamedLM, stream_prune

    start = time.perf_counter()
    lm = StreamedLM.open(args.dir)
    out = Path(args.dir) / f"masks_{args.method}50.safetensors"
    calib = [torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.sequences, 128),
                           generator=torch.Generator().manual_seed(1))] if args.method == "wanda" else None
    summary = stream_prune(lm, out, args.method, sparsity=0.5, calib=calib)
    seconds = time.perf_counter() - start
    phase = f"prune_{args.shape}" if args.method == "magnitude" else f"prune_{args.method}_{args.shape}"
    record(phase, {"method": f"{args.method} 50% per {'layer' if args.method == 'magnitude' else 'output row'}, "
                             f"streamed" + (f" ({args.sequences} x 128 tokens)" if calib else ""),
                   "tensors": len(summary["layers"]), "weights_pruned": summary["pruned"],
                   "weights_in_scope": summary["total"], "sparsity": summary["sparsity"],
                   "seconds": round(seconds, 1), "bytes_read": lm.weights.bytes_read,
                   "mask_file_bytes": out.stat().st_size})


# ----------------------------------------------------------------------------- heal
def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def timed(source, blocks: list) -> None:
    """Each block's seconds from its open to its close's end and the resident memory then, through the source."""
    open_, close = source.open, source.close
    marks = {}

    def timed_open(i):
        marks[i] = time.perf_counter()
        result = open_(i)
        marks[f"{i}.opened"] = time.perf_counter() - marks[i]
        return result

    def timed_close(i, student):
        start = time.perf_counter()
        close(i, student)
        blocks.append({"block": i, "seconds": round(time.perf_counter() - marks[i], 2),
                       "open_s": round(marks[f"{i}.opened"], 2), "close_s": round(time.perf_counter() - start, 2),
                       "rss_gib": round(rss_gib(), 3)})
        print(json.dumps(blocks[-1]), flush=True)

    source.open, source.close = timed_open, timed_close


def heal(args) -> None:
    """``streaming.heal_streaming`` (the sequential loop, ``sequential.heal_sequential``) for one step per block."""
    from starfish_fast import HealConfig
    from starfish_fast.streaming import HFShardSource, StreamedLM, block_masks, heal_streaming

    output = Path(args.dir + "_healed")
    called = time.perf_counter()
    lm = StreamedLM.open(args.dir)
    masks = block_masks(lm, mask_path=Path(args.dir) / "masks_magnitude50.safetensors")
    source = HFShardSource(lm, masks, output)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.sequences, 128),
                        generator=torch.Generator().manual_seed(0))
    config = HealConfig(order="sequential", epochs=1, batch_size=args.sequences, lr=args.lr, device="cpu",
                        progress=False, log_every=1)
    blocks: list[dict] = []
    timed(source, blocks)
    result = heal_streaming(source, [ids], config)
    trained = sum(math.prod(shape) for shape in masks.keys.values()) // len(source)
    record(f"heal_{args.shape}", {
        "sequences": args.sequences, "seq_len": 128, "steps_per_block": 1, "lr": args.lr, "blocks": len(source),
        "loop": "streaming.heal_streaming -> sequential.heal_sequential (HealConfig order=sequential, mode fast)",
        "plan": result.plan.summary(), "seconds_per_block_mean": round(sum(b["seconds"] for b in blocks) / len(blocks), 2),
        "seconds_total": round(time.perf_counter() - called, 1), "heal_seconds": round(result.heal_seconds, 1),
        "block_weights": source.peak_held // 2, "peak_weights_held": source.peak_held,
        "trained_weights_per_block": trained, "bytes_read": lm.weights.bytes_read,
        "losses": [round(h["loss"], 6) for h in result.history], "per_block": blocks,
        "read_back": read_back(output, lm, masks)})


def read_back(output: Path, lm, masks) -> dict:
    """The output as transformers sees it: its config (AutoConfig), its index complete, one layer's tensors read
    and its masked positions zero; the whole model built on the meta device from the config."""
    import transformers

    from starfish_fast.models.hf_shards import MaskFile

    config = transformers.AutoConfig.from_pretrained(output)
    written = ShardedCheckpoint.open(output)
    assert set(written.keys()) == set(lm.weights.keys()), "the output's index lacks tensors"
    mask_file, layer = MaskFile(output / "masks.safetensors"), lm.blocks[len(lm.blocks) // 2] + "."
    checked = 0
    for key in [key for key in written.keys() if key.startswith(layer)]:
        value = written.read(key)
        assert value.dtype == lm.weights.dtype(key) and tuple(value.shape) == lm.weights.shape(key)
        if key in masks.keys:
            assert not value[~mask_file.read(key)].any(), f"{key}: masked positions not zero"
            assert torch.equal(mask_file.read(key), masks.read(key))
            checked += 1
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return {"config": type(config).__name__, "index_tensors": len(written.keys()), "layer_checked": layer[:-1],
            "masked_tensors_checked_zero": checked, "meta_model_parameters": sum(p.numel() for p in model.parameters()),
            "shards": len(set(written.weight_map.values()))}


# ----------------------------------------------------------------------------- report
# Llama-2 shapes: per decoder layer, hidden h, MLP width f, key/value width kv (grouped-query attention at 70B)
LLAMA_SHAPES = {"Llama-2-7B": (4096, 11008, 4096), "Llama-2-13B": (5120, 13824, 5120), "Llama-2-70B": (8192, 28672, 1024)}
DEVICES = {"A10 24 GB": 24, "A100/H100 80 GB": 80}


def block_weights(h: int, f: int, kv: int) -> int:
    return 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h            # q, o; k, v; gate, up, down; two norms


def report(args) -> None:
    """The .md beside the JSON: what was measured, and the per-block device memory of larger shapes (arithmetic)."""
    results = json.loads(RESULTS.read_text())
    heal_7b = results.get("heal_7b")
    lines = ["# Streaming prune and sequential heal of a Llama-2-7B-shaped checkpoint (CPU)", "",
             "`python bench/bench_stream_7b.py write|prune|heal|report` on this machine (2 cores, 24 GB, no GPU); "
             "random bf16 weights, so the losses mean nothing beyond the run training. Each phase is one process; "
             "peak RSS is its `ru_maxrss`.", "", "| phase | seconds | peak RSS (GiB) | notes |", "|---|---|---|---|"]
    for phase in ("write_7b", "prune_7b", "prune_wanda_7b", "heal_7b"):
        if phase in results:
            r = results[phase]
            seconds = r.get("seconds", r.get("seconds_total"))
            notes = {"write_7b": f"{r.get('shards')} shards, {r.get('bytes', 0) / 1e9:.1f} GB",
                     "prune_7b": f"sparsity {r.get('sparsity', 0):.4f}, mask file {r.get('mask_file_bytes', 0) / 1e9:.2f} GB "
                                 f"(bit-packed)",
                     "prune_wanda_7b": f"{r.get('method')}, sparsity {r.get('sparsity', 0):.4f}",
                     "heal_7b": f"{r.get('blocks')} blocks, {r.get('seconds_per_block_mean')} s per block, "
                                f"{r.get('sequences')} x 128 tokens, 1 step per block"}[phase]
            lines.append(f"| {phase[:-3].replace('_', ' ')} | {seconds} | {r['peak_rss_gib']:.2f} | {notes} |")
    if heal_7b:
        lines += ["", _memory_table(heal_7b)]
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _memory_table(heal_7b: dict) -> str:
    """Per-block device memory of sequential healing: the measured 7B block's weights and trained weights, in bytes
    per weight as this run holds them at its peak (fp32 student weights; per trained weight its fp32 gradient, two
    fp32 Adam moments and a bool mask; the dense twin is freed once it gave the targets, before training), scaled by
    each shape's block size; beside it the three activation streams of a 128 x 2048-token calibration set (fp32),
    which the teacher store keeps on the host (pinned or disk) where the device is short."""
    measured = block_weights(*LLAMA_SHAPES["Llama-2-7B"])
    trained_per_weight = heal_7b["trained_weights_per_block"] / measured
    rows = ["Arithmetic, not measured on a GPU: from the measured 7B block (weights x 4 bytes + trained weights x 13 "
            "bytes for the fp32 gradient, two Adam moments and a bool mask; the dense twin, 4 bytes a weight, is "
            "freed before training), scaled by each shape's block size. The streams column (inputs, targets, carried "
            "outputs for 128 x 2048 calibration tokens, fp32) lives on the device only where it fits, else pinned "
            "host memory or disk.", "",
            "| shape | weights per block | block on the device (GiB) | streams, 128 x 2048 tokens (GiB) | "
            + " | ".join(DEVICES) + " |", "|---|---|---|---|" + "---|" * len(DEVICES)]
    for name, shape in LLAMA_SHAPES.items():
        weights = block_weights(*shape)
        gib = weights * (4 + trained_per_weight * 13) / 2**30
        streams = 3 * 128 * 2048 * shape[0] * 4 / 2**30
        fits = " | ".join("block and streams fit" if gib + streams < size * 0.9 else
                          "block fits, streams on the host" if gib < size * 0.9 else "does not fit"
                          for size in DEVICES.values())
        rows.append(f"| {name} | {weights / 1e6:.1f} M | {gib:.1f} | {streams:.1f} | {fits} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("write", "prune", "heal", "report"))
    parser.add_argument("--dir", default="/work/tmp7b/llama2_7b_shape")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--method", choices=("magnitude", "wanda"), default="magnitude", help="prune: the mask maker")
    args = parser.parse_args()
    torch.set_num_threads(2)
    {"write": write, "prune": prune, "heal": heal, "report": report}[args.phase](args)


if __name__ == "__main__":
    main()
