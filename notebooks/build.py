"""Writes the example notebooks (quickstart, finetune, rl) as nbformat v4 JSON without outputs.

The notebooks' source of truth is this file: edit the cells here and run

    .venv/bin/python notebooks/build.py

(tests/test_notebooks.py checks that the .ipynb files equal what this script writes, then executes each one
on CPU). Cell ids are fixed (`<notebook>-<index>`), so building twice gives the same bytes.
"""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
REPO_URL = "https://github.com/OWNER/glmv-jax"   # placeholder: the repository's URL (used in Colab only)


def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(text: str):
    return new_code_cell(textwrap.dedent(text).strip("\n"))


# ----------------------------------------------------------------------------------------- shared cells
def install_cell():
    return code(f'''
    # Set-up. In a checkout installed with `make install` (or `pip install -e .`) glmv_jax is importable and this
    # cell does nothing. In Colab or a fresh environment it clones the repository (the model presets and the
    # training configs live in its configs/ folder) and installs it with its dependencies.
    import importlib.util
    import os
    import sys

    REPO_URL = "{REPO_URL}"  # placeholder: set to the repository's URL

    if importlib.util.find_spec("glmv_jax") is None:
        !git clone -q --depth 1 {{REPO_URL}} glmv-jax
        !pip install -q -e ./glmv-jax
        sys.path.insert(0, os.path.abspath("glmv-jax"))  # importable now, without restarting the runtime
''')


def backend_cell():
    return code('''
    # Which accelerator is there? Everything below also runs on a plain CPU (tiny configs).
    import jax
    import jax.numpy as jnp

    BACKEND = jax.default_backend()  # "tpu", "gpu" or "cpu"
    print(f"JAX {jax.__version__} on {BACKEND}: {jax.devices()}")
    # bfloat16 compute on TPU/GPU; float32 on CPU, where bfloat16 matmuls are slower and save nothing that matters
    DTYPE = "bfloat16" if BACKEND in ("tpu", "gpu") else "float32"
    print("dtype:", DTYPE)
''')


def workdir_cell(name: str):
    return code(f'''
        import tempfile
        from pathlib import Path

        # Everything this notebook writes goes here (set GLMV_NOTEBOOK_DIR to choose the folder).
        WORK = Path(os.environ.get("GLMV_NOTEBOOK_DIR") or tempfile.mkdtemp(prefix="glmv_{name}_"))
        WORK.mkdir(parents=True, exist_ok=True)
        print("work folder:", WORK)
    ''')


# ------------------------------------------------------------------------------------------- quickstart
def quickstart():
    return [
        md('''
            # GLM-4.1V-Thinking in JAX: quickstart

            This notebook builds a tiny random GLM-4.1V (same architecture as the 9B model, toy sizes), turns an
            image into vision patches, generates a reply with a *thinking budget*, and looks at two things that
            make GLM-4.1V's inputs special: the **patch grid with its 2x2 merge windows** and the **3D rotary
            positions** (time, height, width) of the image tokens.

            It runs on a CPU in well under a minute. The same calls work on the published 9B weights (see
            *Loading the real model* below).
        '''),
        install_cell(),
        backend_cell(),
        workdir_cell("quickstart"),
        md('''
            ## A tiny model and its tokenizer

            The tiny model needs a tokenizer whose special tokens (`<|image|>`, `<think>`, `</answer>`, ...) have
            the ids the model config expects. `synthetic.build_tokenizer` trains a small sentencepiece model on the
            texts of the synthetic visual tasks; `model_for_tokenizer` copies its vocabulary size and special ids
            into the `tiny` preset. `init_params` draws random weights (jitted: one compiled program instead of
            hundreds of small eager ones).
        '''),
        code('''
            import functools

            import numpy as np

            import glmv_jax
            from glmv_jax.data import chat, synthetic
            from glmv_jax.data.processor import ImageProcessor
            from glmv_jax.train.setup import model_for_tokenizer

            tokenizer = synthetic.build_tokenizer(WORK / "tokenizer", n=500, vocab_size=1024)
            config = model_for_tokenizer(glmv_jax.load_config("tiny"), tokenizer)
            params = jax.jit(functools.partial(glmv_jax.init_params, config, 0, jnp.dtype(DTYPE)))()

            n_params = sum(x.size for x in jax.tree.leaves(params))
            print(tokenizer)
            print(f"vocabulary {config.text.vocab_size}, {config.text.num_layers} decoder layers, "
                  f"{config.vision.depth} vision blocks, {n_params:,} parameters")
        '''),
        md('''
            ### Loading the real model (not run here)

            The published checkpoint is a Hugging Face folder (safetensors shards, `config.json`, `tokenizer.json`,
            about 20 GB). Download it once, e.g. with `huggingface_hub`, then load weights and tokenizer; every
            cell below works unchanged with `config`, `params` and `tokenizer` from here (use the processor's
            default pixel budget for the real model).

            ```python
            from huggingface_hub import snapshot_download   # pip install huggingface_hub

            from glmv_jax import load_hf_checkpoint
            from glmv_jax.data.processor import ImageProcessor
            from glmv_jax.data.tokenizer import Tokenizer

            path = snapshot_download("zai-org/GLM-4.1V-9B-Thinking")
            config, params = load_hf_checkpoint(path, dtype="bfloat16")   # 2 bytes per parameter on the device
            tokenizer = Tokenizer.from_file(path)                         # the folder's tokenizer.json
            processor = ImageProcessor()                                  # the published preprocessor sizes
            ```

            On the command line: `glmv generate --model PATH --image photo.jpg --prompt "..." --thinking-budget 768`.
        '''),
        md('''
            ## An image

            A real photo when scikit-image is installed (Colab has it), else one of the synthetic task images.
            The processor resizes it so both sides are multiples of 28 (patch 14 x merge 2) within a pixel
            budget, and cuts it into 14x14 patches: one row of `pixel_values` per patch
            (3 channels x 2 frames x 14 x 14 = 1176 values; a still image is repeated to 2 frames) and one
            `image_grid_thw` row `(t, h, w)` in patches per image.
        '''),
        code('''
            from PIL import Image

            if importlib.util.find_spec("skimage") is not None:
                from skimage import data as skimage_data

                image = Image.fromarray(skimage_data.astronaut())
                question = "What is in this picture?"
                print("a photo: scikit-image's astronaut")
            else:
                example = synthetic.make_example("counting", 4)
                image, question = example["image"], example["question"]
                print(f"a synthetic task image (scikit-image is not installed); the answer is {example['answer']}")

            # a small budget for the tiny model: at most 224 x 224 pixels (16 x 16 patches, 64 image tokens)
            processor = ImageProcessor(min_pixels=2 * 56 * 56, max_pixels=2 * 224 * 224)
            visual = processor([image])
            t, gh, gw = (int(v) for v in visual["image_grid_thw"][0])
            print(f"image {image.size[0]}x{image.size[1]} -> resized {gw * 14}x{gh * 14}")
            print("pixel_values", visual["pixel_values"].shape, "image_grid_thw", visual["image_grid_thw"].tolist())
            print(f"{t * gh * gw} patches -> {t * gh * gw // 4} image tokens after the 2x2 merge")
        '''),
        md('''
            ## Generate with thinking

            `chat.encode` renders the GLM-4.1V chat template and expands the image placeholder into one
            `<|image|>` token per merged patch. `sample` prefills the prompt in one jitted program and then decodes
            on device. With a **thinking budget**, a reply that has produced that many tokens without closing its
            `<think>` block gets `</think>\\n<answer>` forced next, so it must answer. The weights here are random,
            so the words are noise, but the forced answer shows the mechanism.
        '''),
        code('''
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            encoded = chat.encode(messages, tokenizer, image_grids=visual["image_grid_thw"])
            input_ids = np.array([encoded["input_ids"]], np.int32)
            print(chat.render(messages).replace("<|image|>", f"<|image|>x{t * gh * gw // 4}"))
            print(f"{input_ids.shape[1]} prompt tokens")

            sampling = glmv_jax.SamplingConfig(
                max_new_tokens=64, temperature=0.8, top_p=0.95,
                eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_token_id,
                thinking_budget=32, think_end_id=tokenizer.token_id("</think>"),
                forced_answer_ids=tuple(tokenizer.encode("</think>\\n<answer>")))
            out = glmv_jax.sample(params, config, input_ids, sampling=sampling, pixel_values=visual["pixel_values"],
                                  image_grid_thw=visual["image_grid_thw"], seed=0)
            length = int(out.lengths[0])
            reply = tokenizer.decode(np.asarray(out.tokens[0, :length]).tolist())
            print(f"{length} new tokens; the thinking budget forced the answer: {bool(out.forced[0])}")
            print(reply)
        '''),
        md('''
            ## The attention grid: patches and 2x2 merge windows

            The vision tower attends over all patches of an image (with 2D rotary positions: patch row and column).
            Its patch rows are stored window by window: the 4 patches of a 2x2 window are consecutive rows
            (block row, block column, row in window, column in window), so the tower's final 2x2 downsample turns
            every 4 consecutive rows into one feature, which the projector maps to one `<|image|>` token of the
            language model. Below, the image is rebuilt from `pixel_values` by
            undoing exactly that order (it matches the resized image), and drawn with the patch grid (thin lines)
            and the merge windows (thick lines), each labelled with the index of its `<|image|>` token.
        '''),
        code('''
            from glmv_jax.data.processor import resize_bicubic

            def patches_to_image(pixel_values, grid, processor):
                """Undo the patch layout: rows (t, block row, block col, row in window, col in window), each row
                (channel, frame, 14, 14) -> the first frame as an (H, W, 3) float image in [0, 1]."""
                t, gh, gw = (int(v) for v in grid)
                p, m, tp = processor.patch_size, processor.merge_size, processor.temporal_patch_size
                x = np.asarray(pixel_values[: t * gh * gw]).reshape(t, gh // m, gw // m, m, m, 3, tp, p, p)
                x = x[0, ..., 0, :, :]                                   # (bh, bw, mh, mw, c, ph, pw), frame 0
                x = x.transpose(0, 2, 5, 1, 3, 6, 4).reshape(gh * p, gw * p, 3)
                return x * np.array(processor.image_std) + np.array(processor.image_mean)

            rebuilt = patches_to_image(visual["pixel_values"], visual["image_grid_thw"][0], processor)
            resized = resize_bicubic(np.asarray(image.convert("RGB")), gh * 14, gw * 14) / 255.0
            rebuild_error = float(np.abs(rebuilt - resized).max())
            print(f"rebuilt from pixel_values == the resized image (max difference {rebuild_error:.1e})")

            tokens = np.arange(gh * gw // 4).reshape(gh // 2, gw // 2)   # <|image|> token k covers window k
            if importlib.util.find_spec("matplotlib") is not None:
                import matplotlib.pyplot as plt

                fig, ax = plt.subplots(figsize=(6, 6 * gh / gw))
                ax.imshow(np.clip(rebuilt, 0, 1))
                for k in range(gh + 1):   # thin: patches; thick: the 2x2 merge windows
                    ax.axhline(k * 14 - 0.5, color="tab:red" if k % 2 == 0 else "0.35", lw=1.6 if k % 2 == 0 else 0.5)
                for k in range(gw + 1):
                    ax.axvline(k * 14 - 0.5, color="tab:red" if k % 2 == 0 else "0.35", lw=1.6 if k % 2 == 0 else 0.5)
                for (i, j), k in np.ndenumerate(tokens):
                    ax.text(j * 28 + 13.5, i * 28 + 13.5, str(k), fontsize=6, ha="center", va="center",
                            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.7, "lw": 0})
                ax.set_title(f"{gh}x{gw} patches of 14 px, {gh // 2}x{gw // 2} merge windows = image tokens")
                ax.set_axis_off()
                plt.show()
            else:
                print(f"{gh}x{gw} patches; <|image|> token index of each 2x2 merge window:")
                print(tokens)
        '''),
        md('''
            ## 3D rotary positions

            The decoder uses M-RoPE: every token has three position ids (t, h, w). Text tokens advance all three
            together. The image tokens share one `t` and take `h = start + window row`, `w = start + window
            column`; the text after the image continues from `start + max(rows, columns)`, so a long image does
            not use up one position per token. `get_rope_index` computes them (jittable, as transformers).
        '''),
        code('''
            positions, rope_deltas = glmv_jax.get_rope_index(config, input_ids, image_grid_thw=visual["image_grid_thw"])
            positions = np.asarray(positions)[:, 0]          # (3, T) for the one prompt
            is_image = input_ids[0] == config.image_token_id
            first, count = int(np.argmax(is_image)), int(is_image.sum())
            image_positions = positions[:, is_image].reshape(3, gh // 2, gw // 2)
            for name, grid in zip("thw", image_positions):
                print(f"{name} of the image tokens ({gh // 2}x{gw // 2} windows):")
                print(grid)

            print("\\naround the image (token, t, h, w):")
            for k in [first - 2, first - 1, first, first + 1, first + count - 1, first + count, first + count + 1]:
                piece = tokenizer.decode([int(input_ids[0, k])])
                print(f"  {k:4d} {piece!r:22} {positions[0, k]:4d} {positions[1, k]:4d} {positions[2, k]:4d}")
            print("rope_deltas:", np.asarray(rope_deltas).ravel().tolist(),
                  "(the decode position of the next token is its index + this)")
        '''),
        md('''
            ## Next

            * `finetune.ipynb`: supervised fine-tuning on your own images and conversations (JSONL), then generation.
            * `rl.ipynb`: pretraining -> SFT -> RLCS (reinforcement learning with curriculum sampling), with reward
              curves.
        '''),
    ]


# -------------------------------------------------------------------------------------------- finetune
def finetune():
    return [
        md('''
            # Fine-tune GLM-4.1V on your own data (SFT)

            This notebook writes a small local dataset (a few images and a JSONL file of LLaVA/ShareGPT-style
            conversations), fine-tunes a tiny GLM-4.1V on it with the trainer (`glmv_jax.train.loop.train`), plots
            the loss, and asks the trained model questions from its training set and held-out ones. Replies follow
            the GLM-4.1V-Thinking format `<think>…</think><answer>…</answer>`.

            On a CPU it takes under a minute. For a real run, point `data.path` at your own JSONL, `model` at a
            config (or `train.init_from` at the published weights) and raise the step count.
        '''),
        install_cell(),
        backend_cell(),
        workdir_cell("finetune"),
        md('''
            ## The dataset: images + JSONL

            One JSON object per line. `image` is a path (relative paths are resolved against `data.image_root`;
            `images` takes a list); `conversations` alternate `human` / `gpt` turns, and `<image>` marks where the
            image goes. The loss covers the final `gpt` turn. Here: 12 pictures of a coloured shape, two
            questions each (colour, shape), replies in the thinking format with the answer in a box.
        '''),
        code('''
            import json
            import random

            from PIL import Image, ImageDraw

            from glmv_jax.data.chat import format_answer

            COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
            SHAPES = ("circle", "square", "triangle")

            def draw(color: str, shape: str, size: int = 84) -> Image.Image:
                image = Image.new("RGB", (size, size), (250, 250, 250))
                pen = ImageDraw.Draw(image)
                lo, hi = size // 5, size - size // 5
                if shape == "circle":
                    pen.ellipse([lo, lo, hi, hi], fill=COLORS[color])
                elif shape == "square":
                    pen.rectangle([lo, lo, hi, hi], fill=COLORS[color])
                else:
                    pen.polygon([(size // 2, lo), (hi, hi), (lo, hi)], fill=COLORS[color])
                return image

            DATA = WORK / "data"
            (DATA / "images").mkdir(parents=True, exist_ok=True)
            records = []
            for color in COLORS:
                for shape in SHAPES:
                    name = f"{color}_{shape}.png"
                    draw(color, shape).save(DATA / "images" / name)
                    records.append({"image": name, "conversations": [
                        {"from": "human", "value": "<image>\\nWhat colour is the shape?"},
                        {"from": "gpt", "value": format_answer(f"The {shape} is filled with {color}.", color)}]})
                    records.append({"image": name, "conversations": [
                        {"from": "human", "value": "<image>\\nWhich shape is this?"},
                        {"from": "gpt", "value": format_answer(f"It has the outline of a {shape}.", shape)}]})
            random.Random(0).shuffle(records)
            (DATA / "train.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in records))
            print(f"{len(records)} conversations about {len(COLORS) * len(SHAPES)} images; the first line:")
            print(json.dumps(records[0], indent=1))
        '''),
        md('''
            ## The training config

            The same layout as the YAML files in `configs/` (see `glmv_jax/train/config.py` for every key).
            `data.source: jsonl` reads the file; the last `data.n_eval` lines are held out for the eval loss.
            `data.tokenizer: synthetic` trains a small sentencepiece tokenizer on the dataset's texts (written to
            `WORKDIR/tokenizer.model`), and the `tiny` model takes its vocabulary size and special-token ids from
            it. With a real checkpoint you would give its `tokenizer.json` instead. `data.pixel_rows` /
            `data.max_images` pad every batch's visual inputs to one shape, so the train step compiles once;
            `train.compile_cache` keeps compiled programs on disk for the next run.
        '''),
        code('''
            from glmv_jax.train.config import from_dict
            from glmv_jax.train.loop import train

            N_EVAL = 4
            cfg = from_dict({
                "model": "tiny",
                "data": {"source": "jsonl", "path": str(DATA / "train.jsonl"), "image_root": str(DATA / "images"),
                         "mode": "sft", "seq_len": 128, "batch_size": 4, "n_eval": N_EVAL,
                         "tokenizer": "synthetic", "vocab_size": 512,
                         "min_pixels": 2 * 28 * 28, "max_pixels": 2 * 56 * 56,   # images become 56x56 px: 4 tokens
                         "pixel_rows": 256, "max_images": 16},
                "train": {"steps": 100, "log_every": 10, "eval_every": 50, "compute_dtype": DTYPE,
                          "compile_cache": str(WORK / "xla_cache")},
                "optimizer": {"learning_rate": 1e-3, "warmup_steps": 5, "weight_decay": 0.0},
                "checkpoint": {"every": 100, "keep": 1},
            })
            print(cfg.to_yaml())
        '''),
        code('''
            RUN = WORK / "run"
            last = train(cfg, RUN)   # run it again with a larger train.steps and it resumes from the checkpoint
            print({k: last[k] for k in ("step", "loss", "eval_loss")})
        '''),
        md('''
            ## The loss

            `WORKDIR/metrics.jsonl` holds one JSON object per logged step (TensorBoard scalars are in `WORKDIR/tb`).
        '''),
        code('''
            from glmv_jax.train.metrics import read_jsonl

            metrics = read_jsonl(RUN / "metrics.jsonl")
            steps = [r["step"] for r in metrics]
            losses = [r["loss"] for r in metrics]
            evals = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
            print(f"loss {losses[0]:.3f} at step {steps[0]} -> {losses[-1]:.3f} at step {steps[-1]}; eval loss",
                  ", ".join(f"{v:.3f} (step {s})" for s, v in evals))
            if importlib.util.find_spec("matplotlib") is not None:
                import matplotlib.pyplot as plt

                fig, ax = plt.subplots(figsize=(6, 3.5))
                ax.plot(steps, losses, marker=".", label="train loss")
                ax.plot(*zip(*evals), marker="o", label="eval loss (held-out lines)")
                ax.set_xlabel("step")
                ax.set_ylabel("cross-entropy per reply token")
                ax.legend()
                ax.grid(alpha=0.3)
                plt.show()
        '''),
        md('''
            ## Ask the trained model

            The workdir holds everything needed to use the run: `config.json` (the model config, with the ids of the
            tokenizer trained here), `tokenizer.model` and the orbax checkpoints. The params are restored from the
            latest checkpoint; then a few of the training conversations and the held-out ones are asked with greedy
            decoding and a thinking budget. A tiny model on 20 conversations learns the reply format within a few
            dozen steps and then memorises its training set; the held-out questions (about pictures it saw only
            with the other question, or not at all) are a harder test that it mostly fails at this scale.
        '''),
        code('''
            import re

            import numpy as np

            from glmv_jax import SamplingConfig, load_config, sample
            from glmv_jax.checkpoint.convert import abstract_params
            from glmv_jax.checkpoint.state import TrainCheckpointer
            from glmv_jax.data import chat
            from glmv_jax.data.processor import ImageProcessor
            from glmv_jax.data.tokenizer import Tokenizer

            model = load_config(RUN)                                   # RUN/config.json
            tokenizer = Tokenizer.from_file(RUN / "tokenizer.model")
            params = TrainCheckpointer(RUN, read_only=True).restore_params(abstract_params(model))
            params = jax.tree.map(lambda x: x.astype(DTYPE), params)   # bf16 for inference on accelerators
            processor = ImageProcessor(min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
            sampling = SamplingConfig(max_new_tokens=48, temperature=0.0,   # greedy
                                      eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_token_id,
                                      thinking_budget=32, think_end_id=tokenizer.token_id("</think>"),
                                      forced_answer_ids=tuple(tokenizer.encode("</think>\\n<answer>")))

            def ask(image_path, question: str) -> str:
                visual = processor([str(image_path)])
                messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
                ids = chat.encode(messages, tokenizer, image_grids=visual["image_grid_thw"])["input_ids"]
                out = sample(params, model, np.array([ids], np.int32), sampling=sampling,
                             pixel_values=visual["pixel_values"], image_grid_thw=visual["image_grid_thw"])
                return tokenizer.decode(np.asarray(out.tokens[0, : int(out.lengths[0])]).tolist())

            def boxed(reply: str):
                found = re.findall(r"<\\|begin_of_box\\|>(.*?)<\\|end_of_box\\|>", reply, re.DOTALL)
                return found[0].strip() if len(found) == 1 else None

            answers = {"trained on": [], "held out": []}
            for part, chosen in (("trained on", records[:N_EVAL]), ("held out", records[-N_EVAL:])):
                print(f"--- conversations the model was {part}")
                for record in chosen:
                    question = record["conversations"][0]["value"].replace("<image>\\n", "")
                    reply = ask(DATA / "images" / record["image"], question)
                    expected = boxed(record["conversations"][1]["value"])
                    answers[part].append({"image": record["image"], "question": question, "expected": expected,
                                          "reply": reply, "answer": boxed(reply)})
                    print(f"{record['image']}: {question}\\n  {reply!r}")
                    print(f"  -> {boxed(reply)!r} (expected {expected!r})")
            for part, got in answers.items():
                print(f"{part}: {sum(a['answer'] == a['expected'] for a in got)} of {len(got)} right")
        '''),
    ]


# ------------------------------------------------------------------------------------------------- rl
def rl():
    return [
        md('''
            # RLCS: pretraining -> SFT -> reinforcement learning with curriculum sampling

            GLM-4.1V-Thinking is trained in three stages: multimodal pretraining, a supervised "cold start" that
            teaches the `<think>…</think><answer>…</answer>` format, and **RLCS**, reinforcement learning with
            curriculum sampling on tasks whose answers can be checked (here: the synthetic counting, arithmetic,
            OCR and grounding tasks of `glmv_jax.data.synthetic`, scored by `glmv_jax.rl.rewards`). Each RL
            iteration samples prompts from a difficulty curriculum, rolls out a group of replies per prompt on
            device, scores them, normalises the rewards within each group (GRPO), keeps the most informative
            groups and updates the policy with a clipped objective (clip-higher: 0.2 / 0.28).

            This notebook runs all three stages of the tiny recipe (`configs/tiny_*.yaml`) with very small step
            counts so it finishes in about two minutes on a CPU; rewards of a model trained for a minute stay
            close to zero, so read the curves as a demonstration of the loop. Without the overrides the same
            configs are the full tiny run: `glmv train --config configs/tiny_rl.yaml --workdir runs/tiny_rl`.
        '''),
        install_cell(),
        backend_cell(),
        workdir_cell("rl"),
        code('''
            import glmv_jax
            import glmv_jax.rl.config  # registers the `rl:` section of training configs
            from glmv_jax.train.config import load_train_config

            CONFIG_DIR = Path(glmv_jax.__file__).resolve().parent.parent / "configs"   # the repository's configs/
            from glmv_jax.train.loop import train
            from glmv_jax.train.metrics import read_jsonl

            assert (CONFIG_DIR / "tiny_rl.yaml").is_file(), f"no training configs in {CONFIG_DIR}"
            print(sorted(p.name for p in CONFIG_DIR.glob("tiny_*.yaml")))
        '''),
        md('''
            ## 1. Pretraining and 2. SFT

            Pretraining trains on captions of the synthetic images; SFT starts from its params (`train.init_from`;
            the tokenizer is copied from that workdir too) and trains on thinking-format replies, which is what the
            RL stage needs: a reply that is not `<think>…</think><answer><|begin_of_box|>…<|end_of_box|></answer>`
            gets no reward. Both stages use one optimizer schedule (100 updates; pretraining stops after 20 of
            them), so their train steps compile to the same program and SFT loads it from the persistent
            compilation cache (`train.compile_cache`) instead of compiling it again.
        '''),
        code('''
            PRETRAIN_STEPS, SFT_STEPS = 20, 100
            shared = ["optimizer.learning_rate=3e-3", "optimizer.warmup_steps=5", f"optimizer.total_steps={SFT_STEPS}",
                      "data.pixel_rows=768", "data.max_images=64", "data.n_eval=0", "train.eval_every=0",
                      "train.log_every=10", "checkpoint.keep=1", f"train.compute_dtype={DTYPE}",
                      f"train.compile_cache={WORK / 'xla_cache'}"]
            pretrain_cfg = load_train_config(CONFIG_DIR / "tiny_pretrain.yaml", [
                *shared, f"train.steps={PRETRAIN_STEPS}", f"checkpoint.every={PRETRAIN_STEPS}"])
            pretrained = train(pretrain_cfg, WORK / "pretrain")
            print("pretraining:", {k: pretrained[k] for k in ("step", "loss")})
        '''),
        code('''
            sft_cfg = load_train_config(CONFIG_DIR / "tiny_sft.yaml", [
                *shared, f"train.steps={SFT_STEPS}", f"checkpoint.every={SFT_STEPS}",
                f"train.init_from={WORK / 'pretrain'}"])
            sft = train(sft_cfg, WORK / "sft")
            print("SFT:", {k: sft[k] for k in ("step", "loss")})
        '''),
        md('''
            ## 3. RLCS

            Before the first iteration the SFT model answers every prompt of the pool a few times (offline pass@k);
            that seeds the curriculum's difficulty tiers. Then each iteration: prompts drawn from the curriculum,
            `group_size` sampled replies each (temperature 1, a thinking budget that forces the answer), rewards,
            group-normalised advantages, the most balanced groups, `minibatches` GRPO updates. After every
            `eval_every` iterations the held-out prompts are answered greedily (`eval_reward`).
        '''),
        code('''
            from glmv_jax.rl.loop import train_rl

            rl_cfg = load_train_config(CONFIG_DIR / "tiny_rl.yaml", [
                f"train.init_from={WORK / 'sft'}", f"train.compute_dtype={DTYPE}",
                "rl.iterations=4", "rl.eval_every=1",           # a held-out greedy evaluation after every iteration
                "rl.groups=2", "rl.group_size=4",               # 2 prompts x 4 rollouts per update
                "rl.minibatches=1",                             # one policy update per iteration (one compile)
                "rl.prompt_pool=8", "rl.offline_k=2",           # the curriculum's offline pass@2 over 8 prompts
                "rl.eval_prompts=8", "rl.max_new_tokens=48", "rl.thinking_budget=24",
                "checkpoint.every=4",
            ])
            final = train_rl(rl_cfg, WORK / "rl")
            print({k: v for k, v in final.items() if "reward" in k or k in ("step", "format_ok")})
        '''),
        md('''
            ## Reward curves

            `WORKDIR/metrics.jsonl` of the RL run: step 0 is the evaluation before RL; every iteration logs the mean
            reward of its rollouts (`reward`, and `reward/<domain>`), the share of well-formatted replies
            (`format_ok`), and here also the held-out greedy reward (`eval_reward`).
        '''),
        code('''
            records = read_jsonl(WORK / "rl" / "metrics.jsonl")
            rolled = [r for r in records if "reward" in r]   # step 0 is the evaluation before RL
            train_steps = [r["step"] for r in rolled]
            evaluated = [r for r in records if "eval_reward" in r]
            domains = sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith("reward/")})
            nan = float("nan")   # a domain no prompt of an iteration came from
            print("step  reward  format_ok  eval_reward  eval_format_ok  " + "  ".join(domains))
            for r in records:
                cells = [f"{r['step']:4d}", f"{r.get('reward', nan):6.3f}", f"{r.get('format_ok', nan):9.3f}",
                         f"{r.get('eval_reward', nan):11.3f}", f"{r.get('eval_format_ok', nan):14.3f}"]
                cells += [f"{r.get(f'reward/{d}', nan):{len(d)}.3f}" for d in domains]
                print("  ".join(cells))

            if importlib.util.find_spec("matplotlib") is not None:
                import matplotlib.pyplot as plt
                from matplotlib.ticker import MaxNLocator

                fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
                left.plot(train_steps, [r["reward"] for r in rolled], marker="o", label="reward (rollouts)")
                left.plot([r["step"] for r in evaluated], [r["eval_reward"] for r in evaluated], marker="s",
                          label="eval_reward (held-out, greedy)")
                for d in domains:
                    left.plot(train_steps, [r.get(f"reward/{d}", nan) for r in rolled], ls=":", marker=".", label=d)
                left.set_xlabel("RL iteration")
                left.set_ylabel("mean reward")
                left.legend(fontsize=8)
                right.plot(train_steps, [r["format_ok"] for r in rolled], marker="o", label="format_ok")
                right.plot([r["step"] for r in evaluated], [r["eval_format_ok"] for r in evaluated], marker="s",
                           label="eval_format_ok")
                right.set_xlabel("RL iteration")
                right.set_ylabel("share of well-formatted replies")
                right.set_ylim(-0.05, 1.05)
                right.legend(fontsize=8)
                for ax in (left, right):
                    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                    ax.grid(alpha=0.3)
                plt.show()
        '''),
        md('''
            ## Scaling up

            * The full tiny recipe: run the three YAMLs without overrides
              (`glmv train --config configs/tiny_pretrain.yaml --workdir runs/tiny_pretrain`, then `tiny_sft.yaml`,
              then `tiny_rl.yaml`); `metrics.jsonl` and TensorBoard (`WORKDIR/tb`) show the same curves.
            * On a TPU or GPU the cells above pick bfloat16 compute. `mesh` in the configs spreads pretraining and
              SFT over devices (`mesh.data=-1` uses them all); the RL stage runs on one device for now.
        '''),
    ]


NOTEBOOKS = {"quickstart": quickstart, "finetune": finetune, "rl": rl}


def build(name: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=NOTEBOOKS[name]())
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name}-{i}"
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    }
    nbformat.validate(nb)
    return nb


def text(name: str) -> str:
    """The notebook's file content, as written to notebooks/<name>.ipynb."""
    return nbformat.writes(build(name), version=4) + "\n"


def main(argv: list[str]) -> int:
    for name in argv or NOTEBOOKS:
        path = HERE / f"{name}.ipynb"
        path.write_text(text(name), encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
