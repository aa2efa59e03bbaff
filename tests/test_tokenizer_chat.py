"""Tokenizer (tokenizer.json and sentencepiece backends) and the GLM-4.1V chat format.

Both tokenizers are real and built here: a small byte-level BPE trained with the `tokenizers` library (GLM
control tokens as special added tokens, the reasoning markers as non-special added tokens, like the real
GLM-4.1V tokenizer) and a sentencepiece model from our own `train_sentencepiece`.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import types

import numpy as np
import pytest

from glmv_jax.data import chat
from glmv_jax.data.tokenizer import (CONTENT_TOKENS, CONTROL_TOKENS, EOS_TOKENS, SPECIAL_TOKENS, Tokenizer,
                                     check_ids, train_sentencepiece)

# The chat_template of zai-org/GLM-4.1V-9B-Thinking (hub revision 3c1471e51dc811b589d4d12b1c1c7c1c941267c2),
# checked below against the sha256 recorded with it (taken over its JSON-encoded form).
OFFICIAL_TEMPLATE = (
    "[gMASK]<sop>\n{%- for msg in messages %}\n    {%- if msg.role == 'system' %}\n<|system|>\n{{ msg.content }}"
    "\n    {%- elif msg.role == 'user' %}\n<|user|>{{ '\\n' }}\n\n        {%- if msg.content is string %}\n"
    "{{ msg.content }}\n        {%- else %}\n            {%- for item in msg.content %}\n"
    "                {%- if item.type == 'video' or 'video' in item %}\n<|begin_of_video|><|video|><|end_of_video|>"
    "\n                {%- elif item.type == 'image' or 'image' in item %}\n"
    "<|begin_of_image|><|image|><|end_of_image|>\n                {%- elif item.type == 'text' %}\n"
    "{{ item.text }}\n                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n"
    "    {%- elif msg.role == 'assistant' %}\n        {%- if msg.metadata %}\n<|assistant|>{{ msg.metadata }}\n"
    "{{ msg.content }}\n        {%- else %}\n<|assistant|>\n{{ msg.content }}\n        {%- endif %}\n"
    "    {%- endif %}\n{%- endfor %}\n{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
OFFICIAL_TEMPLATE_SHA256 = "5232dbe7ee947df4d2009f2b262b70a22d4f2d2f0590e2af4ef2a78096171e90"

WORDS = ("the a one two three red blue green square circle triangle cat dog how many are there in image video "
         "frame left right top bottom answer is count shapes of color which larger smaller than first second "
         "look at picture describe what happens").split()


def corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
        s = s[0].upper() + s[1:] + rng.choice([".", "?", "!", ",", "\n"]) + " " + str(rng.randint(0, 999))
        if rng.random() < 0.2:
            s += " (x=" + str(rng.randint(0, 1000)) + ", y=" + str(rng.randint(0, 1000)) + ")"
        out.append(s)
    return out


@pytest.fixture(scope="module")
def json_path(tmp_path_factory):
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=list(CONTROL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t in SPECIAL_TOKENS if t in CONTENT_TOKENS])
    path = tmp_path_factory.mktemp("tok_json") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tok_sp") / "synthetic"
    train_sentencepiece(corpus(), prefix, vocab_size=600)
    return prefix.with_name("synthetic.model")


@pytest.fixture(scope="module", params=["tokenizer.json", "sentencepiece"])
def tok(request, json_path, sp_path):
    t = Tokenizer.from_file(json_path if request.param == "tokenizer.json" else sp_path)
    assert t.kind == request.param
    return t


# ----------------------------------------------------------------------------------------------- tokenizer
ROUND_TRIP = [
    "How many red squares are there?",
    "  two  spaces,\ttab and\nnewlines\n\n",
    "Unicode: é ü 漢字 🙂 — done.",
    "digits 0123456789 and (x=12, y=999)",
    "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|image|><|end_of_image|>Count them.<|assistant|>\n"
    "<think>\nThree.</think>\n<answer><|begin_of_box|>3<|end_of_box|></answer><|endoftext|>",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids_resolved_by_name(tok):
    ids = {name: tok.token_id(name) for name in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    for name, i in ids.items():
        assert tok.encode(name) == [i]
        assert tok.id_to_token(i) == name
        around = tok.encode(f"left {name}right")
        assert around.count(i) == 1 and tok.decode(around) == f"left {name}right"
    assert tok.image_token_id == ids["<|image|>"] and tok.video_token_id == ids["<|video|>"]
    assert tok.image_start_token_id == ids["<|begin_of_image|>"]
    assert tok.video_end_token_id == ids["<|end_of_video|>"]
    assert tok.pad_token_id == ids["<|endoftext|>"] and tok.gmask_id == ids["[gMASK]"]
    assert tok.answer_end_id == ids["</answer>"] and tok.box_start_id == ids["<|begin_of_box|>"]
    assert tok.eos_ids == tuple(ids[t] for t in EOS_TOKENS)
    assert tok.special_ids == ids


def test_skip_special_tokens_keeps_the_reasoning_markers(tok):
    text = "[gMASK]<sop><|user|>\nhi<|begin_of_image|><|image|><|end_of_image|><|assistant|>\n" \
           "<think>x</think><answer><|begin_of_box|>2<|end_of_box|></answer><|endoftext|>"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == \
        "\nhi\n<think>x</think><answer><|begin_of_box|>2<|end_of_box|></answer>"


def test_missing_token_names_the_token_and_the_file(tok):
    with pytest.raises(KeyError) as e:
        tok.token_id("<|not_a_token|>")
    assert "<|not_a_token|>" in str(e.value) and tok.path in str(e.value)
    assert not tok.has_token("<|not_a_token|>")
    with pytest.raises(KeyError):
        tok.id_to_token(tok.vocab_size + 5)


def test_missing_special_token_in_a_plain_tokenizer(tmp_path):
    """A tokenizer without the reasoning markers: eos_ids leaves out </answer>, the property raises."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(corpus(50), trainers.BpeTrainer(vocab_size=300, special_tokens=list(CONTROL_TOKENS),
                                                           show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    t = Tokenizer.from_file(tmp_path)  # a folder holding tokenizer.json
    assert t.eos_ids == (t.token_id("<|endoftext|>"), t.token_id("<|user|>"), t.token_id("<|observation|>"))
    with pytest.raises(KeyError, match="</answer>"):
        t.answer_end_id


def test_from_file_folders_and_bad_paths(json_path, sp_path, tmp_path):
    assert Tokenizer.from_file(json_path.parent).kind == "tokenizer.json"
    shutil.copy(sp_path, tmp_path / "tokenizer.model")
    sp = Tokenizer.from_file(tmp_path)
    assert sp.kind == "sentencepiece" and sp.encode("<|image|>a") == Tokenizer.from_file(sp_path).encode("<|image|>a")
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(tmp_path / "empty")


def test_check_ids(tok):
    good = {"image_token_id": tok.image_token_id, "video_token_id": tok.video_token_id,
            "image_start_token_id": tok.image_start_token_id, "image_end_token_id": tok.image_end_token_id,
            "video_start_token_id": tok.video_start_token_id, "video_end_token_id": tok.video_end_token_id,
            "pad_token_id": tok.pad_token_id, "eos_token_id": list(tok.eos_ids), "<|assistant|>": tok.assistant_id,
            "bos_token_id": None}
    check_ids(tok, good)
    with pytest.raises(ValueError, match=r"image_token_id=\d+ but the tokenizer has <\|image\|>=") as e:
        check_ids(tok, {**good, "image_token_id": tok.image_token_id + 1, "video_token_id": tok.image_token_id})
    assert "video_token_id" in str(e.value) and tok.path in str(e.value)  # every disagreement is listed
    with pytest.raises(ValueError, match="not stop tokens"):
        check_ids(tok, {"eos_token_id": [tok.eos_ids[0], tok.image_token_id]})
    with pytest.raises(ValueError, match="<\\|nope\\|>"):
        check_ids(tok, {"<|nope|>": 3})


def test_train_sentencepiece_is_deterministic_with_symbols_first(tmp_path, sp_path):
    t = train_sentencepiece(corpus(), tmp_path / "again", vocab_size=600)
    assert (tmp_path / "again.model").read_bytes() == sp_path.read_bytes()
    assert (tmp_path / "again.vocab").is_file()
    assert [t.token_id(s) for s in SPECIAL_TOKENS] == list(range(1, len(SPECIAL_TOKENS) + 1))
    assert 300 < t.vocab_size <= 600
    u = train_sentencepiece(corpus(), tmp_path / "uni", vocab_size=500, model_type="unigram",
                            extra_symbols=["<|extra|>"])
    assert u.encode("<|extra|>") == [u.token_id("<|extra|>")]
    assert u.decode(u.encode(ROUND_TRIP[4])) == ROUND_TRIP[4]
    with pytest.raises(ValueError, match="vocab_size"):
        train_sentencepiece(corpus(), tmp_path / "small", vocab_size=100)


# ------------------------------------------------------------------------------------------------- chat
IMG, VID = chat.IMAGE_PLACEHOLDER, chat.VIDEO_PLACEHOLDER
THOUGHT_1 = "<think>\nTwo round shapes, one red.</think>\n<answer>There are <|begin_of_box|>2<|end_of_box|>.</answer>"
REPLY_2 = chat.format_answer("The ball moves right, then stops.", "it rolls right", box=False)


def conversation(final_reply: bool):
    msgs = [
        {"role": "system", "content": "You are a careful visual assistant."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]},
        {"role": "assistant", "content": THOUGHT_1},
        {"role": "user", "content": [{"type": "text", "text": "And here? "}, {"type": "video"},
                                     {"type": "text", "text": "What happens?"}, {"type": "image"}]},
    ]
    if final_reply:
        msgs.append({"role": "assistant", "content": REPLY_2})
    return msgs


PROMPT_TEXT = ("[gMASK]<sop><|system|>\nYou are a careful visual assistant.<|user|>\n" + IMG + "How many circles?"
               "<|assistant|>\n<answer>There are <|begin_of_box|>2<|end_of_box|>.</answer>"
               "<|user|>\nAnd here? " + VID + "What happens?" + IMG)


def test_render_multi_turn_drops_history_thinking():
    assert chat.render(conversation(False)) == PROMPT_TEXT + "<|assistant|>\n"
    assert chat.render(conversation(False), add_generation_prompt=False) == PROMPT_TEXT
    # the final reply being trained keeps its thinking
    assert REPLY_2 == "<think>\nThe ball moves right, then stops.</think>\n<answer>it rolls right</answer>"
    assert chat.render(conversation(True), add_generation_prompt=False) == PROMPT_TEXT + "<|assistant|>\n" + REPLY_2
    # ... but is history once a new generation prompt follows it
    assert chat.render(conversation(True)) == (PROMPT_TEXT + "<|assistant|>\n<answer>it rolls right</answer>"
                                               "<|assistant|>\n")
    assert chat.render(conversation(False), keep_history_thinking=True) == PROMPT_TEXT.replace(
        "<answer>There are <|begin_of_box|>2<|end_of_box|>.</answer>", THOUGHT_1) + "<|assistant|>\n"
    assert chat.render([{"role": "user", "content": "Hi"}]) == "[gMASK]<sop><|user|>\nHi<|assistant|>\n"
    assert chat.render([{"role": "assistant", "content": "x", "metadata": "tool"}], False) == \
        "[gMASK]<sop><|assistant|>tool\nx"


def test_render_errors():
    with pytest.raises(ValueError, match="role"):
        chat.render([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="part type"):
        chat.render([{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(ValueError, match="text parts"):
        chat.render([{"role": "assistant", "content": [{"type": "image"}]}])


def test_render_equals_the_official_jinja_template(json_path):
    assert hashlib.sha256(json.dumps(OFFICIAL_TEMPLATE).encode()).hexdigest() == OFFICIAL_TEMPLATE_SHA256
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(json_path))

    def jinja(msgs, gen):
        return hf.apply_chat_template(msgs, chat_template=OFFICIAL_TEMPLATE, tokenize=False,
                                      add_generation_prompt=gen)

    convs = [
        conversation(False),
        conversation(True),
        [{"role": "user", "content": "Plain text question?"}],
        [{"role": "user", "content": [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "a\nb "}]},
         {"role": "assistant", "content": "<answer>ok</answer>"},
         {"role": "user", "content": "next"},
         {"role": "assistant", "content": "call", "metadata": "lookup"}],
    ]
    for msgs in convs:
        for gen in (True, False):
            assert chat.render(msgs, gen, keep_history_thinking=True) == jinja(msgs, gen)
            # history thinking dropped == the template on the history as the fine-tuning recipe stores it
            last = len(msgs) - 1
            stored = [dict(m, content=chat.strip_thinking(m["content"]))
                      if m["role"] == "assistant" and (gen or i < last) else m for i, m in enumerate(msgs)]
            assert chat.render(msgs, gen) == jinja(stored, gen)


GRIDS = [(1, 4, 6), (1, 6, 4)]          # 6 image tokens each
VIDEO_GRID = (3, 4, 8)                  # 3 frame pairs of 8 tokens
STAMPS = [3.0, 3.5, 7.9, 8.2]           # sampled frames; pairs at 3.0 and 7.9, padded with 7.9 -> "3", "7", "7"


def hf_expanded_ids(tok, text, image_grids, video_grids, metadata):
    """transformers' Glm4vProcessor expansion: its replace_*_token on the rendered text, then tokenize."""
    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor

    proc = Glm4vProcessor.__new__(Glm4vProcessor)  # no image/video processors needed for the text side
    proc.image_token, proc.video_token = "<|image|>", "<|video|>"
    proc.image_processor = proc.video_processor = types.SimpleNamespace(merge_size=2)
    images = {"image_grid_thw": np.array(image_grids)}
    videos = {"video_grid_thw": np.array(video_grids), "video_metadata": metadata}
    out, k_img, k_vid = "", 0, 0
    for piece in text.replace("<|image|>", "\0i\0").replace("<|video|>", "\0v\0").split("\0"):
        if piece == "i":
            out += proc.replace_image_token(images, k_img)
            k_img += 1
        elif piece == "v":
            out += proc.replace_video_token(videos, k_vid)
            k_vid += 1
        else:
            out += piece
    proc.image_token_id, proc.video_start_id, proc.video_end_id = (
        tok.image_token_id, tok.video_start_token_id, tok.video_end_token_id)
    ids = tok.encode(out)
    return ids, proc.create_mm_token_type_ids([ids])[0]


def test_encode_expands_images_and_videos_like_transformers(tok):
    from transformers.video_utils import VideoMetadata

    msgs = conversation(False)
    enc = chat.encode(msgs, tok, image_grids=GRIDS, video_grids=[VIDEO_GRID], video_timestamps=[STAMPS])
    ids, types_, mask = enc["input_ids"], np.array(enc["mm_token_type_ids"]), enc["loss_mask"]
    assert len(ids) == len(types_) == len(mask)
    ids_arr = np.array(ids)
    assert (ids_arr == tok.image_token_id).sum() == 6 + 6 + 3 * 8
    assert (types_ == 1).sum() == 12 and (types_ == 2).sum() == 24 and set(types_.tolist()) <= {0, 1, 2}
    assert (ids_arr[types_ > 0] == tok.image_token_id).all()
    start = ids.index(tok.video_start_token_id)
    end = ids.index(tok.video_end_token_id)
    assert (types_[start:end + 1] != 1).all() and (types_[:start] != 2).all() and (types_[end:] != 2).all()
    frames = tok.decode(ids[start:end + 1])
    assert frames == ("<|begin_of_video|>" + "".join(
        "<|begin_of_image|>" + "<|image|>" * 8 + "<|end_of_image|>" + s for s in "377") + "<|end_of_video|>")
    assert tok.decode(ids).replace("<|image|>" * 6, "<|image|>", 2).startswith(PROMPT_TEXT.split(VID)[0])
    assert sum(mask) == 0  # a prompt trains nothing

    metadata = [VideoMetadata(total_num_frames=20, fps=10.0, frames_indices=[30, 35, 79, 82])]
    ref_ids, ref_types = hf_expanded_ids(tok, chat.render(msgs), GRIDS, [VIDEO_GRID], metadata)
    assert ids == ref_ids and enc["mm_token_type_ids"] == list(ref_types)

    # default timestamps: frames sampled at 2 fps, pairs stamped 0, 1, 2
    enc = chat.encode(msgs, tok, image_grids=GRIDS, video_grids=[VIDEO_GRID])
    s = tok.decode(enc["input_ids"])
    assert "<|end_of_image|>0<|begin_of_image|>" in s and "<|end_of_image|>2<|end_of_video|>" in s
    # with merge_size=1 every patch is a token
    enc = chat.encode(msgs, tok, image_grids=GRIDS, video_grids=[VIDEO_GRID], merge_size=1)
    assert enc["input_ids"].count(tok.image_token_id) == 24 + 24 + 3 * 32


def test_loss_mask_covers_exactly_the_last_reply(tok):
    msgs = conversation(True)
    enc = chat.encode(msgs, tok, image_grids=GRIDS, video_grids=[VIDEO_GRID], video_timestamps=[STAMPS])
    ids, mask = np.array(enc["input_ids"]), np.array(enc["loss_mask"])
    first = int(np.argmax(mask))
    assert mask[first:].all() and not mask[:first].any()  # one contiguous span at the very end
    assert ids[first:].tolist() == tok.encode(REPLY_2) + [tok.endoftext_id]
    assert tok.decode(ids[first:]) == REPLY_2 + "<|endoftext|>"
    assert tok.decode(ids[:first]).endswith("What happens?<|begin_of_image|>" + "<|image|>" * 6
                                            + "<|end_of_image|><|assistant|>\n")
    # the history reply (thinking dropped) and every visual token carry no loss
    assert not mask[np.array(enc["mm_token_type_ids"]) > 0].any()
    assert "<think>" not in tok.decode(ids[:first])
    # without the end token the span is just the reply
    enc = chat.encode(msgs, tok, image_grids=GRIDS, video_grids=[VIDEO_GRID], add_end_token=False)
    ids, mask = np.array(enc["input_ids"]), np.array(enc["loss_mask"])
    assert ids[mask == 1].tolist() == tok.encode(REPLY_2)
    # a generation prompt after the reply turns it into history: nothing trained
    enc = chat.encode(msgs, tok, image_grids=GRIDS, video_grids=[VIDEO_GRID], add_generation_prompt=True)
    assert sum(enc["loss_mask"]) == 0
    assert tok.decode(enc["input_ids"]).endswith("<|assistant|>\n<answer>it rolls right</answer><|assistant|>\n")


def test_text_only_training_example_matches_plain_tokenization(tok):
    msgs = [{"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": chat.format_answer("2+3=5.", "5")}]
    enc = chat.encode(msgs, tok)
    prompt = tok.encode("[gMASK]<sop><|user|>\nWhat is 2+3?<|assistant|>\n")
    reply = tok.encode("<think>\n2+3=5.</think>\n<answer><|begin_of_box|>5<|end_of_box|></answer>")
    assert enc["input_ids"] == prompt + reply + [tok.endoftext_id]
    assert enc["loss_mask"] == [0] * len(prompt) + [1] * (len(reply) + 1)
    assert enc["mm_token_type_ids"] == [0] * len(enc["input_ids"])


def test_mismatched_media_counts_raise(tok):
    msgs = conversation(False)
    with pytest.raises(ValueError, match="2 image placeholder.*1 image grid"):
        chat.encode(msgs, tok, image_grids=GRIDS[:1], video_grids=[VIDEO_GRID])
    with pytest.raises(ValueError, match="2 image placeholder.*3 image grid"):
        chat.encode(msgs, tok, image_grids=GRIDS + GRIDS[:1], video_grids=[VIDEO_GRID])
    with pytest.raises(ValueError, match="1 video placeholder.*0 video grid"):
        chat.encode(msgs, tok, image_grids=GRIDS)
    with pytest.raises(ValueError, match="multiples of merge_size"):
        chat.encode(msgs, tok, image_grids=[(1, 3, 4), GRIDS[1]], video_grids=[VIDEO_GRID])
    with pytest.raises(ValueError, match="timestamp lists"):
        chat.encode(msgs, tok, image_grids=GRIDS, video_grids=[VIDEO_GRID], video_timestamps=[STAMPS, STAMPS])


def test_format_answer_and_strip_thinking():
    assert chat.format_answer("think", "42") == \
        "<think>\nthink</think>\n<answer><|begin_of_box|>42<|end_of_box|></answer>"
    assert chat.format_answer("t", "42", before="So ", after=".", newlines=False) == \
        "<think>t</think><answer>So <|begin_of_box|>42<|end_of_box|>.</answer>"
    assert chat.format_answer("t", "free text", box=False) == "<think>\nt</think>\n<answer>free text</answer>"
    with pytest.raises(ValueError, match="answer"):
        chat.format_answer("t", "<|begin_of_box|>1<|end_of_box|>")
    with pytest.raises(ValueError, match="thinking"):
        chat.format_answer("a </think> b", "1")
    assert chat.strip_thinking(THOUGHT_1) == "<answer>There are <|begin_of_box|>2<|end_of_box|>.</answer>"
    assert chat.strip_thinking("no thinking here") == "no thinking here"
    assert chat.strip_thinking("forced</think><answer>x</answer>") == "<answer>x</answer>"
    assert chat.strip_thinking("<think>never closed") == ""
    assert chat.strip_thinking("<think>a</think>\n\nB<think>c</think>D") == "BD"
