"""Tokenizing throughput (images/s) of a realistically sized diffusers VQModel, here.

  python jobs/bench_tokenizer.py                       # LDM VQ-f8: 256x256 -> 32x32 ids, 16384 codes
  python jobs/bench_tokenizer.py --preset ldm-vq-f4 --batches 3 --batch-size 4
  python jobs/bench_tokenizer.py --tokenizer diffusers:PATH    # a model of your own
  python jobs/bench_tokenizer.py --smoke-test          # a tiny model, seconds

The presets are the architectures of public VQ models built with random weights (throughput does
not depend on the weights; no download): saved with save_pretrained and loaded back through
``load_tokenizer("diffusers:DIR")``, the path every job takes. Timed: uint8 pixels -> ids
(``Tokenizer.encode_pixels``: normalisation, encoder, nearest code) on random images, after one
untimed warm-up batch. Device: the accelerator when there is one, else the CPU (threads: torch's).
Prints a table (with the CPU seconds per image and the load average: on a shared CPU the wall
time also holds the other jobs' share), then one JSON line.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from tokray.cli import parse_args, print_result, print_table, run_main

_DOWN, _UP = "DownEncoderBlock2D", "UpDecoderBlock2D"
PRESETS = {
    # CompVis latent-diffusion vq-f4: ch 128, ch_mult (1, 2, 4), z 3, 8192 codes
    "ldm-vq-f4": dict(block_out_channels=(128, 256, 512), latent_channels=3, num_vq_embeddings=8192,
                      layers_per_block=2, sample_size=256),
    # CompVis latent-diffusion vq-f8: ch 128, ch_mult (1, 2, 2, 4), z 4, 16384 codes (SeiT's 32x32 grid)
    "ldm-vq-f8": dict(block_out_channels=(128, 256, 256, 512), latent_channels=4, num_vq_embeddings=16384,
                      layers_per_block=2, sample_size=256),
    # taming-transformers ImageNet VQGAN f16: ch 128, ch_mult (1, 1, 2, 2, 4), z 256, 16384 codes
    "taming-vq-f16": dict(block_out_channels=(128, 128, 256, 256, 512), latent_channels=256,
                          num_vq_embeddings=16384, layers_per_block=2, sample_size=256),
    "tiny": dict(block_out_channels=(16, 32), latent_channels=4, num_vq_embeddings=64, layers_per_block=1,
                 norm_num_groups=8, sample_size=32),
}


def build_preset(name: str, out_dir: str) -> str:
    """A randomly initialised VQModel of preset ``name`` saved to ``out_dir``; returns its tokenizer spec."""
    from diffusers import VQModel

    cfg = dict(PRESETS[name])
    levels = len(cfg["block_out_channels"])
    torch.manual_seed(0)
    VQModel(down_block_types=(_DOWN,) * levels, up_block_types=(_UP,) * levels, **cfg).save_pretrained(out_dir)
    return f"diffusers:{out_dir}"


def bench(spec: str, batches: int, batch_size: int, dtype: str, device=None) -> dict:
    from tokray.data.tokenizer import load_tokenizer
    from tokray.devices import local_device

    device = torch.device(device) if device else local_device()
    t0 = time.perf_counter()
    tok, _ = load_tokenizer(spec)
    load_s = time.perf_counter() - t0
    tok.to(device, {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
    rng = np.random.default_rng(0)
    s = tok.image_size
    pixels = [rng.integers(0, 256, (batch_size, s, s, 3), dtype=np.uint8) for _ in range(batches + 1)]
    tok.encode_pixels(pixels[0])  # warm-up: allocator, kernels
    if device.type != "cpu":
        torch.accelerator.synchronize()
    times = []
    cpu0 = time.process_time()
    for p in pixels[1:]:
        t = time.perf_counter()
        ids = tok.encode_pixels(p)  # returns on the CPU: includes the copy back
        times.append(time.perf_counter() - t)
    cpu_s = time.process_time() - cpu0  # on a shared CPU, wall time also counts the other jobs' share
    images = batches * batch_size
    return {"tokenizer": spec, "parameters_m": tok.num_parameters / 1e6, "image_size": s,
            "grid": f"{tok.grid[0]}x{tok.grid[1]}", "codes": tok.codebook_size, "batch_size": batch_size,
            "batches": batches, "device": str(device), "dtype": dtype, "threads": torch.get_num_threads(),
            "images_per_s": images / sum(times), "ms_per_image": 1000 * sum(times) / images,
            "cpu_seconds_per_image": cpu_s / images, "load_average": os.getloadavg()[0],
            "batch_seconds": [round(t, 3) for t in times], "load_seconds": load_s, "ids_shape": list(ids.shape),
            "fingerprint": tok.fingerprint}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ldm-vq-f8", choices=sorted(PRESETS), help="architecture (random weights)")
    p.add_argument("--tokenizer", help="benchmark this tokenizer spec instead (diffusers:PATH, PATH.safetensors)")
    p.add_argument("--batches", type=int, default=3, help="timed batches (after one warm-up batch)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (bfloat16: autocast, as tokenize_images runs big tokenizers on GPUs)")
    p.add_argument("--device", help="cpu, cuda, ... (default: the accelerator if any, else cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--smoke-test", action="store_true", help="the tiny preset, 1 batch of 2 (seconds)")
    args = parse_args(p)
    if args.smoke_test:
        args.preset, args.batches, args.batch_size, args.tokenizer = "tiny", 1, 2, None
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.tokenizer or build_preset(args.preset, os.path.join(tmp, args.preset))
        res = bench(spec, args.batches, args.batch_size, args.dtype, args.device)
    res["preset"] = "" if args.tokenizer else args.preset
    if not args.tokenizer:
        res["tokenizer"] = f"{args.preset} (random weights)"
    print_table([res], ["preset", "parameters_m", "image_size", "grid", "codes", "batch_size", "batches", "device",
                        "dtype", "threads", "images_per_s", "ms_per_image", "cpu_seconds_per_image", "load_average"])
    return print_result(res)


if __name__ == "__main__":
    run_main(main)
