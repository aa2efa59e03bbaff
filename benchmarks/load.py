"""Loading at size: a random bf16 HF checkpoint with the real GLM-4.1V-9B tensor shapes, loaded onto simulated
devices (fsdp x tensor) in a fresh process; peak host RSS against the checkpoint's size, and the load time.

    python -m benchmarks.load write /work/tmp/ckpt9b --layers 8 --vision-layers 8   # real shapes, fewer layers
    python -m benchmarks.load load /work/tmp/ckpt9b --mesh fsdp=4,tensor=2            # one fresh process per load
    python -m benchmarks.load compare /work/tmp/ckpt9b --old-rev main                 # old vs new, back to back

`write` streams the files (one tensor's bytes at a time, random finite bf16), so it needs no memory to speak of.
`load` runs `load_hf_checkpoint` in a subprocess with `--xla_force_host_platform_device_count` devices and the
system malloc, waits for every array, and prints one JSON line: checkpoint bytes, peak RSS (ru_maxrss of that
process), the RSS after importing jax (the baseline), their ratios and the wall time. `--old-rev REV` loads with
`glmv_jax/checkpoint/hf.py` as it was at git revision REV (the loader before this change), for comparison.
Without --layers the checkpoint is the full 9B (about 20 GB): only on a machine with the memory to spare.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARD_BYTES = 5 << 30
CHUNK = 64 << 20


def scaled_config(layers: int | None, vision_layers: int | None):
    """The 9B preset with `layers` decoder and `vision_layers` vision blocks (real per-tensor shapes)."""
    from glmv_jax import load_config

    config = load_config("glm41v_9b")
    text = dataclasses.replace(config.text, num_layers=layers or config.text.num_layers)
    vision = dataclasses.replace(config.vision, depth=vision_layers or config.vision.depth)
    return dataclasses.replace(config, text=text, vision=vision).validate()


def write(path: Path, layers: int | None, vision_layers: int | None, seed: int = 0) -> int:
    """Write config.json, model-*.safetensors and the index; returns the bytes of tensor data written."""
    from glmv_jax.checkpoint.hf import INDEX_FILE, _keys, weight_map
    from glmv_jax.config import to_hf_dict

    config = scaled_config(layers, vision_layers)
    path.mkdir(parents=True, exist_ok=True)
    tensors = [(key, entry.hf_shape) for entry in weight_map(config) for key in _keys(entry)]
    shards, current, size = [], [], 0
    for key, shape in tensors:
        nbytes = math.prod(shape) * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((key, shape))
        size += nbytes
    shards.append(current)
    rng = np.random.default_rng(seed)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, items in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, shape in items:
            nbytes = math.prod(shape) * 2
            header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(path / name, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for key, shape in items:
                left = math.prod(shape)
                while left:
                    n = min(left, CHUNK // 2)
                    # random bits with the exponent's top bit cleared: finite bf16 of magnitude < 2
                    f.write((rng.integers(0, 1 << 16, n, dtype=np.uint16) & 0xBFFF).tobytes())
                    left -= n
    index = {"metadata": {"total_size": sum(math.prod(s) * 2 for s in dict(tensors).values())},
             "weight_map": {key: name for name, items in zip(names, shards) for key, _ in items}}
    (path / INDEX_FILE).write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(to_hf_dict(config, dtype="bfloat16"), indent=2))
    return index["metadata"]["total_size"]


def _old_loader(rev: str):
    """`load_hf_checkpoint` of glmv_jax/checkpoint/hf.py at git revision `rev`, imported from a temp file."""
    import importlib.util
    import tempfile

    source = subprocess.run(["git", "show", f"{rev}:glmv_jax/checkpoint/hf.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    file = Path(tempfile.mkdtemp()) / "hf_old.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location("hf_old", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules["hf_old"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.load_hf_checkpoint


def load_here(path: Path, mesh_text: str, dtype: str, old_rev: str | None) -> dict:
    """Load in this process (started by `load`): the measurement, as a dict."""
    import resource

    import jax

    from glmv_jax import sharding as mesh_lib

    jax.devices()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loader = _old_loader(old_rev) if old_rev else __import__("glmv_jax").load_hf_checkpoint
    mesh = mesh_lib.make_mesh(**mesh_lib.parse_mesh(mesh_text))
    start = time.perf_counter()
    _, params = loader(path, dtype=dtype, mesh=mesh)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    held = sum(s.data.nbytes for leaf in jax.tree.leaves(params) for s in leaf.addressable_shards)
    ckpt = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {"loader": f"old ({old_rev})" if old_rev else "new", "mesh": mesh_text, "dtype": dtype,
            "checkpoint_gb": ckpt / 1e9, "device_bytes_gb": held / 1e9, "peak_rss_gb": peak / 1e9,
            "baseline_rss_gb": baseline / 1e9, "peak_rss_over_checkpoint": peak / ckpt,
            "peak_above_baseline_over_checkpoint": (peak - baseline) / ckpt, "load_s": seconds}


def load(path: Path, mesh_text: str, dtype: str, old_rev: str | None) -> dict:
    """Run `load_here` in a fresh process with as many simulated CPU devices as the mesh has."""
    from glmv_jax.sharding import parse_mesh

    devices = math.prod(parse_mesh(mesh_text).values())
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    env.pop("GLIBC_TUNABLES", None)
    args = [sys.executable, "-m", "benchmarks.load", "_load", str(path), "--mesh", mesh_text, "--dtype", dtype]
    if old_rev:
        args += ["--old-rev", old_rev]
    out = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"load failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["write", "load", "compare", "_load"])
    parser.add_argument("path", type=Path)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the 9B's 40)")
    parser.add_argument("--vision-layers", type=int, default=None, help="vision blocks (default: the 9B's 24)")
    parser.add_argument("--mesh", default="fsdp=4,tensor=2")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--old-rev", default=None, help="git revision whose loader to measure (compare: main)")
    args = parser.parse_args(argv)
    if args.command == "write":
        start = time.perf_counter()
        total = write(args.path, args.layers, args.vision_layers)
        print(json.dumps({"written_gb": total / 1e9, "write_s": time.perf_counter() - start}))
    elif args.command == "_load":
        print(json.dumps(load_here(args.path, args.mesh, args.dtype, args.old_rev)))
    elif args.command == "load":
        print(json.dumps(load(args.path, args.mesh, args.dtype, args.old_rev)))
    else:  # old, then new, back to back
        for rev in (args.old_rev or "main", None):
            print(json.dumps(load(args.path, args.mesh, args.dtype, rev)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
