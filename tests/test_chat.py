"""Multi-turn chat with the KV cache kept across turns; the sandboxed chat template; streaming detokenization."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gaze_edge.errors import CheckpointError, InputError
from gaze_edge.model import scenes
from gaze_edge.model.processing import CHAT_TEMPLATE, GazeProcessor, ImageConfig, build_tokenizer
from gaze_edge.runtime import GazeRuntime, Prompt, SamplingConfig
from gaze_edge.runtime.chat import ChatSession
from gaze_edge.runtime.detok import StreamDetokenizer


def scene_images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [scenes.render(scenes.sample_scene(rng, held_out=True), 48, rng)[0] for _ in range(n)]


class Counting:
    """Wraps a backend's decode and vision calls, recording how many tokens / images each one was given."""

    def __init__(self, rt: GazeRuntime) -> None:
        self.decode_tokens: list[int] = []
        self.last_logits: list[np.ndarray] = []  # each call's logits of its last column
        self.vision_images: list[int] = []
        backend = rt.backend
        decode, vision = backend.decode, backend.vision

        def counted_decode(embeds, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.decode_tokens.append(int(embeds.shape[1]))
            logits = decode(embeds, *args, **kwargs)
            self.last_logits.append(np.array(logits[:, -1], dtype=np.float32))
            return logits

        def counted_vision(pixels):  # type: ignore[no-untyped-def]
            self.vision_images.append(int(pixels.shape[0]))
            return vision(pixels)

        backend.decode, backend.vision = counted_decode, counted_vision  # type: ignore[method-assign]

    def clear(self) -> None:
        self.decode_tokens.clear()
        self.last_logits.clear()
        self.vision_images.clear()


@pytest.fixture(scope="module")
def rt(runtime_export) -> GazeRuntime:
    return GazeRuntime.load(runtime_export[1], threads=1)


@pytest.fixture(scope="module")
def reference(runtime_export) -> GazeRuntime:
    """A second runtime (its own backend and cache) for the single-shot answers."""
    return GazeRuntime.load(runtime_export[1], threads=1)


def single_shot(reference: GazeRuntime, history: list[dict], images: list, sampling: SamplingConfig) -> list[int]:
    """Tokens of one fresh generation over the whole conversation (the one prefill + decode loop)."""
    out = reference.generate(Prompt(messages=history, images=images), sampling)
    return [int(t) for t in out.tokens[0] if t != reference.folder.tokens.pad]


def test_three_turns_prefill_only_new_tokens_and_equal_fresh_runs(rt, reference):
    imgs = scene_images(2, seed=31)
    sampling = SamplingConfig(max_new_tokens=24)
    chat = ChatSession(rt, sampling)
    count = Counting(rt)
    turns = [("describe the image .", [imgs[0]]), ("what is in this image ?", [imgs[1]]),
             ("describe the images .", [])]
    for number, (text, images) in enumerate(turns):
        count.clear()
        before = 0 if chat.last is None else chat.last.cache_slots_used
        turn = chat.send(text, images=images)
        pieces = list(turn)
        stats = turn.stats
        # Exactly the tokens of a fresh generation over the same conversation, and the same text.
        assert turn.tokens == single_shot(reference, chat.messages[:-1], chat.images, sampling), number
        assert "".join(pieces) == turn.text == reference.processor.decode(turn.tokens)
        assert chat.messages[-1] == {"role": "assistant", "content": turn.text}
        prefill = count.decode_tokens[0]
        # The logits the turn starts from equal a fresh prefill's of the whole conversation (gaze flags included).
        fresh, _ = reference.prompt_logits([Prompt(messages=chat.messages[:-1], images=chat.images)],
                                           np.array([turn.tokens[0]]))
        np.testing.assert_allclose(count.last_logits[0], fresh[:, -1], atol=2e-4, rtol=0)
        assert count.decode_tokens[1:] == [1] * (len(turn.tokens) - 1)  # then one token per decode step
        if number == 0:
            assert not stats.reused_cache and prefill == stats.prompt_tokens
        else:
            # The cache held the previous prompt and every generated token fed back: only the rest is run.
            assert stats.reused_cache and stats.reused_tokens == before
            assert prefill == stats.prefilled_tokens == stats.prompt_tokens - before
        expected_new = len(images) * (rt.shape.tokens_per_image + rt.shape.num_context_tokens)
        assert prefill >= expected_new and count.vision_images == ([len(images)] if images else [])
        assert stats.cache_slots_used == stats.prompt_tokens + len(turn.tokens) - 1
        assert stats.kv_bytes_allocated == rt.backend.spec.kv_bytes and stats.cache_capacity == rt.shape.max_seq_len
        assert 0 < stats.kv_bytes_used < stats.kv_bytes_allocated
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 3


def torch_reply(torch_model, messages: list[dict], images: list, new: int) -> list[int]:
    """PyTorch's greedy reply to a conversation whose earlier replies are gaze queries (the training rule)."""
    import torch

    from gaze_edge.runtime.conversation import assistant_gaze_mask

    model, processor = torch_model
    ids = np.array([processor.encode(processor.apply_chat_template(messages))])
    assistant = processor.tokenizer.token_to_id("<assistant>")
    gaze = assistant_gaze_mask(ids, np.ones_like(ids), assistant, processor.eos_token_id)
    pixels = torch.from_numpy(processor.preprocess(images)) if images else None
    tokens: list[int] = []
    with torch.no_grad():
        cache = model.new_cache(1)
        out = model(torch.from_numpy(ids), pixel_values=pixels, gaze_mask=torch.from_numpy(gaze),
                    past_key_values=cache)
        for _ in range(new):
            logits = out.logits[:, -1].float()
            logits[:, model.config.never_generated_ids] = float("-inf")
            token = int(logits.argmax(-1))
            tokens.append(token)
            if token == processor.eos_token_id:
                break
            step = torch.tensor([[token]])
            out = model(step, gaze_mask=torch.ones_like(step, dtype=torch.bool), past_key_values=cache)
    return tokens


def test_a_turn_that_reuses_the_cache_equals_pytorch_on_the_conversation(rt, torch_model):
    imgs = scene_images(2, seed=37)
    chat = ChatSession(rt, SamplingConfig(max_new_tokens=20))
    chat.send("describe the image .", images=[imgs[0]]).result()
    second = chat.send("what is in this image ?", images=[imgs[1]])
    second.result()
    assert second.stats.reused_cache
    assert second.tokens == torch_reply(torch_model, chat.messages[:-1], imgs, 20)


def test_an_interrupted_turn_keeps_its_text_and_the_next_turn_still_reuses_the_cache(rt, reference):
    img = scene_images(1, seed=32)[0]
    sampling = SamplingConfig(max_new_tokens=16)
    chat = ChatSession(rt, sampling)
    turn = chat.send("describe the image .", images=[img])
    first = [next(turn), next(turn)]
    turn.close()
    assert turn.finish_reason == "interrupted" and chat.messages[-1]["content"] == "".join(first).strip()
    second = chat.send("what is in this image ?")
    assert second.result() and second.stats.reused_cache
    assert second.tokens == single_shot(reference, chat.messages[:-1], [img], sampling)


def test_another_generation_in_between_makes_the_next_turn_prefill_again(rt, reference):
    imgs = scene_images(2, seed=33)
    sampling = SamplingConfig(max_new_tokens=12)
    chat = ChatSession(rt, sampling)
    chat.send("describe the image .", images=[imgs[0]]).result()
    rt.generate(Prompt(None, [imgs[1]]), sampling)  # reallocates the backend's cache
    turn = chat.send("what is in this image ?")
    turn.result()
    assert not turn.stats.reused_cache and turn.stats.prefilled_tokens == turn.stats.prompt_tokens
    assert turn.tokens == single_shot(reference, chat.messages[:-1], [imgs[0]], sampling)


def test_a_full_cache_is_refused_before_anything_runs_and_reset_starts_over(rt):
    img = scene_images(1, seed=34)[0]
    chat = ChatSession(rt, SamplingConfig(max_new_tokens=16), capacity=100)
    chat.send("describe the image .", images=[img]).result()
    count = Counting(rt)
    messages = list(chat.messages)
    with pytest.raises(InputError, match=r"needs \d+ cache slots .*holds 100.*/reset"):
        chat.send("what is in this image ?", images=[img])
    assert count.decode_tokens == [] and chat.messages == messages  # refused: nothing ran, nothing changed
    with pytest.raises(InputError, match="at most 4 per conversation"):
        ChatSession(rt, SamplingConfig(max_new_tokens=4)).send("describe the images .", images=[img] * 5)
    with pytest.raises(InputError, match="special token '<image>'"):
        chat.send("what is <image> ?")
    chat.reset()
    assert chat.messages == [] and chat.send("describe the image .", images=[img]).result()
    assert not chat.last.reused_cache


def test_gaze_chat_cli_streams_turns_attaches_images_and_resets(runtime_export, tmp_path: Path):
    imgs = scene_images(2, seed=35)
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(tmp_path / f"s{i}.png")
    reference = GazeRuntime.load(runtime_export[1], threads=1)
    sampling = SamplingConfig(max_new_tokens=20)
    want = [reference.caption(imgs[0], sampling=sampling), reference.caption(imgs[1], sampling=sampling)]
    script = "\n".join(["/help", "describe the image .", f"/image {tmp_path / 's1.png'}", "what is in this image ?",
                        "/stats", "say <eos>", "/reset", f"/image {tmp_path / 's1.png'}", "describe the image .",
                        "/quit", "never read"]) + "\n"
    code = ("import sys, argparse\nfrom gaze_edge.runtime.commands import add_chat_serve_parsers\n"
            "p = argparse.ArgumentParser(prog='gaze'); s = p.add_subparsers(dest='command', required=True)\n"
            "add_chat_serve_parsers(s); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n")
    result = subprocess.run([sys.executable, "-c", code, "chat", str(runtime_export[1]), "--image",
                             str(tmp_path / "s0.png"), "--max-new-tokens", "20", "--threads", "1", "--json",
                             str(tmp_path / "chat.json")], input=script, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == want[0] and lines[2] == want[1], result.stdout  # after a reset: a fresh conversation
    assert len(lines) == 3
    assert "/reset" in result.stderr and "special token '<eos>'" in result.stderr
    assert "[turn 2] prefilled" in result.stderr and "reused" in result.stderr
    report = json.loads((tmp_path / "chat.json").read_text())
    assert [t["stats"]["reused_cache"] for t in report["turns"]] == [False, True, False]
    assert report["turns"][1]["stats"]["prefilled_tokens"] < report["turns"][1]["stats"]["prompt_tokens"]


# ---------------------------------------------------------------- template, special tokens, detokenization


def tiny_processor(template: str) -> GazeProcessor:
    return GazeProcessor(build_tokenizer(), ImageConfig(image_size=48), template, 36, ["<ctx_0>", "<ctx_1>"])


def test_chat_template_is_sandboxed_like_transformers():
    p = tiny_processor(CHAT_TEMPLATE)
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image ."}]}]
    assert p.apply_chat_template(user) == "<bos><image> describe the image .<assistant>"
    # trim_blocks / lstrip_blocks: a block tag's line leaves no whitespace behind
    blocks = tiny_processor("{% for m in messages %}\n  {% if m['role'] == 'user' %}\nU\n  {% endif %}\n{% endfor %}")
    assert blocks.apply_chat_template(user) == "U\n"
    tojson = tiny_processor("{{ messages[0]['content'][1] | tojson }}")
    assert json.loads(tojson.apply_chat_template(user)) == {"type": "text", "text": "describe the image ."}
    refusing = tiny_processor("{% if messages | length > 1 %}{{ raise_exception('one message only') }}{% endif %}")
    with pytest.raises(InputError, match="one message only"):
        refusing.apply_chat_template(user * 2)
    escaping = tiny_processor("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(InputError, match="chat template refused"):
        escaping.apply_chat_template(user)
    mutating = tiny_processor("{% set x = messages.append(1) %}ok")  # immutable: no in-place changes
    with pytest.raises(InputError, match="chat template refused"):
        mutating.apply_chat_template(user)
    with pytest.raises(CheckpointError, match="not valid jinja"):
        tiny_processor("{% for %}")


def test_special_token_strings_in_user_text_are_refused():
    p = tiny_processor(CHAT_TEMPLATE)
    for text in ("describe <image> the image .", "stop <eos> now", "<assistant> a red circle"):
        with pytest.raises(InputError, match="special token"):
            p.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": text}]}])
    with pytest.raises(InputError, match=r"message 1 \(assistant\)"):
        p.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                               {"role": "assistant", "content": "x <pad>"}])
    assert p.encode(p.prompt("what is in this image ?")).count(p.image_token_id) == 36  # the real image part only


def byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["héllo wörld", "naïve café", "日本語のテキスト", "emoji 🙂🚀 ok", "plain ascii words here"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def test_stream_detokenizer_pieces_concatenate_to_the_decode_even_inside_multibyte_characters():
    tok = byte_level_bpe()
    text = "naïve café 日本語 🙂🚀 héllo"
    ids = tok.encode(text).ids + [tok.token_to_id("<eos>")]
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids)))  # some prefix ends mid-character
    detok = StreamDetokenizer(tok, 2)
    pieces = [detok.push(np.array([i, i]), np.array([False, True])) for i in ids]
    assert "".join(p[0] for p in pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in p[0] for p in pieces) and all(p[1] == "" for p in pieces)


def test_streaming_never_redecodes_the_sequence(rt, monkeypatch):
    """The loop's text comes from DecodeStream: the processor's whole-sequence decode is never called."""
    img = scene_images(1, seed=36)[0]
    calls = []
    monkeypatch.setattr(rt.processor, "decode", lambda *a, **k: calls.append(a) or "")
    pieces = [s.texts[0] for s in rt.stream(Prompt(None, [img]), SamplingConfig(max_new_tokens=20))]
    monkeypatch.undo()
    assert calls == [] and "".join(pieces).startswith("a ")


def test_chat_server_and_media_import_neither_torch_nor_transformers(runtime_export):
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import gaze_edge.runtime.commands, gaze_edge.runtime.server, gaze_edge.runtime.media\n"
        "from gaze_edge.runtime import GazeRuntime, SamplingConfig\n"
        "from gaze_edge.runtime.chat import ChatSession\n"
        "import numpy as np\n"
        f"rt = GazeRuntime.load({str(runtime_export[1])!r}, threads=1)\n"
        "chat = ChatSession(rt, SamplingConfig(max_new_tokens=3))\n"
        "chat.send('describe the image .', images=[np.zeros((48, 48, 3), np.uint8)]).result()\n"
        "assert chat.send('what is in this image ?').result() is not None and chat.last.reused_cache\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') and sys.modules[m]]\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
