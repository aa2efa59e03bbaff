"""What the trainer's vision layout costs at data-parallel scale: XLA's cost analysis (FLOPs and bytes per
device, nothing run) of the vision tower's forward on a data x fsdp x tensor mesh of simulated CPU devices, for
the same images laid out three ways (attention through the "xla" impl, whose scores the cost analysis counts):

  flat    one sequence of every image of the global batch (the trainer's layout before visual blocks): patches
          split over data x fsdp x context, keys all-gathered over them, N x N scores per device row
  blocks  one flat sequence per data x fsdp block (the trainer's default now): S x (N/S)^2 scores
  framed  blocks of one image per row (data.frame_patches): images x W^2 scores

    python -m benchmarks.vision_blocks [--preset glm41v_9b] [--side 448] [--images 4,16,64]
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def cost(config, pixels_shape, grids_shape, pixel_spec, grid_spec, mesh, impl: str = "xla") -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from glmv_jax import sharding as mesh_lib
    from glmv_jax.model.glmv import init_params
    from glmv_jax.model.vision import VisionTower

    params = jax.eval_shape(lambda: init_params(config))["vision"]
    abstract = (jax.ShapeDtypeStruct(pixels_shape, jnp.bfloat16), jax.ShapeDtypeStruct(grids_shape, jnp.int32))
    shardings = (NamedSharding(mesh, mesh_lib.spec(pixel_spec)), NamedSharding(mesh, mesh_lib.spec(grid_spec)))
    tower = VisionTower(config.vision, jnp.bfloat16, attention_impl=impl)
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda p, x, g: tower.apply({"params": p}, x, g), in_shardings=(None, *shardings))
        compiled = fn.lower(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params),
                            *abstract).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return {"flops": float(analysis.get("flops", 0.0)), "bytes": float(analysis.get("bytes accessed", 0.0))}


def main(argv=None) -> None:
    from glmv_jax import load_config, sharding as mesh_lib

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="glm41v_9b")
    parser.add_argument("--side", type=int, default=448, help="image side in pixels (square images)")
    parser.add_argument("--images", default="4,16,64", help="images in the global batch")
    parser.add_argument("--mesh", default="data=2,fsdp=2,tensor=2")
    parser.add_argument("--impl", default="xla", help="attention impl: xla (every score in one masked product, as "
                        "XLA counts it; the cpu impl's chunk loop is counted once by the cost analysis)")
    args = parser.parse_args(argv)
    config = load_config(args.preset)
    v = config.vision
    mesh = mesh_lib.make_mesh(**mesh_lib.parse_mesh(args.mesh))
    blocks = mesh_lib.axis_size(mesh, mesh_lib.BATCH)
    side = args.side // v.patch_size // v.spatial_merge_size * v.spatial_merge_size
    patches = side * side
    for n in map(int, args.images.split(",")):
        per = n // blocks
        layouts = {
            "flat": ((n * patches, v.patch_dim), (n, 3), ("patches", None), (None, None)),
            "blocks": ((blocks, per * patches, v.patch_dim), (blocks, per, 3), ("visual_blocks", "block_patches"),
                       ("visual_blocks", None, None)),
            "framed": ((blocks, per, patches, v.patch_dim), (blocks, per, 3), ("visual_blocks", "block_patches"),
                       ("visual_blocks", None, None)),
        }
        row = {"images": n, "patches_per_image": patches, "mesh": dict(mesh.shape)}
        for name, shapes in layouts.items():
            row[name] = cost(config, *shapes, mesh, args.impl)
        row["flat_over_blocks_flops"] = row["flat"]["flops"] / row["blocks"]["flops"]
        row["flat_over_framed_flops"] = row["flat"]["flops"] / row["framed"]["flops"]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
