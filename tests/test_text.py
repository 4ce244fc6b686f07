"""Runtime prompt building / tokenization vs. the diffusers + transformers reference.

The reference is what diffusers 0.32.2's BlipDiffusionPipeline runs: the *slow* CLIPTokenizer
(``padding="max_length", truncation=True``) and the Q-Former's slow BertTokenizer with ``[DEC]``
added (``padding=True``). Our runtime uses ``tokenizers`` on the exported ``tokenizer.json``.

Slow vs fast CLIP (ftfy not installed, so the slow tokenizer cleans text with BERT's
BasicTokenizer): identical on ASCII, punctuation, case, whitespace, accented Latin (precomposed
or combining), Greek/Cyrillic and emoji; different on CJK ideographs (slow puts a space around
each one), control characters, zero-width/format characters (U+200B) and U+FFFD (slow drops
them). ``test_clip_slow_vs_fast_known_differences`` pins that list; the comparisons use texts
where both agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from blipdiffusion_trt.errors import InputError
from blipdiffusion_trt.export.tokenizer_files import (
    CLIP_VOCAB_SIZE,
    export_tokenizer_json,
    load_qformer_bert_tokenizer,
    qformer_vocab_size,
    tokenizer_settings,
    write_clip_tokenizer,
    write_qformer_bert_tokenizer,
)
from blipdiffusion_trt.runtime.text import (
    ClipTextTokenizer,
    QFormerTokenizer,
    QFormerTokens,
    TokenizedText,
    build_prompts,
)

transformers = pytest.importorskip("transformers")

REPO_ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return write_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="module")
def clip_slow(clip_dir):
    return transformers.CLIPTokenizer.from_pretrained(str(clip_dir))


@pytest.fixture(scope="module")
def clip_rt(clip_dir, clip_slow) -> ClipTextTokenizer:
    return ClipTextTokenizer.from_file(clip_dir / "tokenizer.json", tokenizer_settings(clip_slow)["pad_token_id"])


@pytest.fixture(scope="module")
def qformer_dir(tmp_path_factory) -> Path:
    return write_qformer_bert_tokenizer(tmp_path_factory.mktemp("qformer_tokenizer"), extra_words=["sks", "Corgi"])


@pytest.fixture(scope="module")
def bert_slow(qformer_dir):
    return load_qformer_bert_tokenizer(qformer_dir)


@pytest.fixture(scope="module")
def qformer_json(qformer_dir, bert_slow, tmp_path_factory) -> Path:
    return export_tokenizer_json(bert_slow, tmp_path_factory.mktemp("qformer_export") / "tokenizer.json")


@pytest.fixture(scope="module")
def qformer_rt(qformer_json, bert_slow) -> QFormerTokenizer:
    return QFormerTokenizer.from_file(qformer_json, tokenizer_settings(bert_slow)["pad_token_id"])


def _build_prompt_ref(*args, **kwargs):
    from diffusers import BlipDiffusionPipeline

    return BlipDiffusionPipeline._build_prompt(None, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# CLIP tokenizer files


def test_clip_tokenizer_files_are_real_clip(clip_dir, clip_slow):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        assert (clip_dir / name).is_file(), name
    assert not list(clip_dir.glob("*.tmp"))
    assert len(clip_slow) == CLIP_VOCAB_SIZE == 49408
    vocab = json.loads((clip_dir / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256  # byte chars, then byte chars + </w>
    assert clip_slow.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    # ids openai/clip-vit-large-patch14 gives
    assert clip_slow("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert clip_slow("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    settings = tokenizer_settings(clip_slow)
    assert settings == {
        "pad_token": "<|endoftext|>",
        "pad_token_id": 49407,
        "model_max_length": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "vocab_size": 49408,
    }
    json.dumps(settings)
    config = json.loads((clip_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["do_lower_case"] is True and config["model_max_length"] == 77
    assert clip_slow.unk_token == clip_slow.pad_token == clip_slow.eos_token == "<|endoftext|>"
    assert clip_slow.bos_token == "<|startoftext|>"


def test_clip_fast_from_files_matches_runtime_json(clip_dir, clip_rt, tmp_path):
    fast = transformers.CLIPTokenizerFast.from_pretrained(str(clip_dir))
    out = export_tokenizer_json(fast, tmp_path / "fast.json")
    rt = ClipTextTokenizer.from_file(out, 49407)
    texts = ["a photo of a dog", "A RED Teapot, on a table!"]
    np.testing.assert_array_equal(
        rt.encode(texts, 77, field="prompt").input_ids, clip_rt.encode(texts, 77, field="prompt").input_ids
    )
    ref = fast(texts[1]).input_ids
    assert clip_rt.encode(texts[1], 77, field="prompt").input_ids[0, : len(ref)].tolist() == ref


# ---------------------------------------------------------------------------------------------
# CLIP runtime tokenizer vs slow CLIPTokenizer

LONG_PROMPT = build_prompts(["wearing a santa hat, on the beach at sunset"], ["dog"])[0]

CLIP_TEXTS = [
    "a photo of a dog",
    "dog",
    LONG_PROMPT,  # the built BLIP prompt x 20 reps: far over any limit
    "A Dog, Swimming!! In the pool?? (HDR; 4k) -- 'quoted' \"double\" #tag @user 50% $3.99",
    "MiXeD CaSe TeXt With UPPER and lower",
    "   extra    spaces\tand\ttabs \n newlines   ",
    "a café crème brûlée, naïve résumé, e\u0301cole",
    "a dog 🐶 with a party hat 🎉 and 👍🏽",
    "Ελληνικά και русский текст",
    "don't it's we'll they're I'm you've he'd",
    "",  # allowed for the negative prompt
]


def _at_limit_texts(max_length: int) -> list[str]:
    # "dog" is one token, so n words give n + 2 ids: exactly at the limit, one over, one under.
    return [" ".join(["dog"] * (max_length - 2)), " ".join(["dog"] * (max_length - 1)), " ".join(["dog"] * (max_length - 3))]


@pytest.mark.parametrize("max_length", [61, 77, 35])
def test_clip_encode_matches_slow(clip_rt, clip_slow, max_length):
    texts = CLIP_TEXTS + _at_limit_texts(max_length)
    ref = clip_slow(texts, padding="max_length", truncation=True, max_length=max_length).input_ids
    result = clip_rt.encode(texts, max_length, field="prompt", allow_empty=True)
    assert isinstance(result, TokenizedText)
    ids, truncated = result
    assert ids.dtype == np.int64 and ids.shape == (len(texts), max_length)
    for text, row, ref_row in zip(texts, ids.tolist(), ref):
        assert row == ref_row, text
    expected_trunc = [len(clip_slow(t).input_ids) > max_length for t in texts]
    assert truncated == expected_trunc
    assert truncated[2] is True  # the long BLIP prompt
    assert truncated[-3:] == [False, True, False]  # at limit, over by one, under
    assert ids[2, -1] == clip_slow.eos_token_id  # truncation keeps eos last
    # one at a time gives the same rows as a batch
    for i, text in enumerate(texts):
        single = clip_rt.encode([text], max_length, field="prompt", allow_empty=True)
        np.testing.assert_array_equal(single.input_ids[0], ids[i])
        assert single.truncated == [truncated[i]]


def test_clip_negative_prompt_like_diffusers(clip_rt, clip_slow):
    # diffusers: tokenizer([neg_prompt] * B, padding="max_length", max_length=77) -- no truncation.
    ref = clip_slow(["", ""], padding="max_length", max_length=77).input_ids
    ids, truncated = clip_rt.encode(["", ""], 77, field="neg_prompt", allow_empty=True)
    assert ids.tolist() == ref and truncated == [False, False]
    neg = "blurry, low quality, deformed"
    ref = clip_slow([neg], padding="max_length", max_length=77).input_ids
    assert clip_rt.encode(neg, 77, field="neg_prompt").input_ids.tolist() == ref
    # a long negative prompt would crash diffusers (79+ ids into a 77-position encoder); we truncate
    long_neg = ", ".join(["blurry"] * 100)
    ids, truncated = clip_rt.encode([long_neg], 77, field="neg_prompt")
    assert truncated == [True] and ids.shape == (1, 77)
    assert ids[0].tolist() == clip_slow([long_neg], padding="max_length", truncation=True, max_length=77).input_ids[0]


@pytest.mark.parametrize(
    "text",
    [
        "日本語のテキスト",  # CJK: slow inserts spaces around each ideograph
        "中文 dog",
        "ctrl\x07char",  # control characters: slow drops them
        "zero\u200bwidth",  # format characters (Cf): slow drops them
        "x\ufffdy",  # U+FFFD: slow drops it
    ],
)
def test_clip_slow_vs_fast_known_differences(clip_rt, clip_slow, text):
    """Documents where the slow CLIPTokenizer (without ftfy) and the fast one disagree."""
    if getattr(clip_slow, "fix_text", None) is not None:
        pytest.skip("ftfy is installed: the slow CLIPTokenizer cleans text differently")
    ref = clip_slow([text], padding="max_length", truncation=True, max_length=77).input_ids[0]
    ours = clip_rt.encode([text], 77, field="prompt").input_ids[0].tolist()
    assert ours != ref


# ---------------------------------------------------------------------------------------------
# Q-Former BERT tokenizer


def test_qformer_tokenizer_files(qformer_dir, bert_slow, qformer_json):
    vocab = (qformer_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for word in ["a", "z", "##a", "##z", "0", "##9", ",", "!", "dog", "cat", "person", "car", "toy", "robot",
                 "bag", "shoe", "teapot", "vase", "backpack", "can", "cup", "sks", "corgi"]:
        assert word in vocab, word
    assert len(vocab) == len(set(vocab))
    config = json.loads((qformer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["do_lower_case"] is True
    # exactly what diffusers' Blip2QFormerModel.__init__ does
    tok = transformers.BertTokenizer.from_pretrained(str(qformer_dir), truncation_side="right")
    assert len(tok) == len(vocab)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    assert len(tok) == len(vocab) + 1 == qformer_vocab_size(qformer_dir) == len(bert_slow)
    assert tok.convert_tokens_to_ids("[DEC]") == len(vocab)
    settings = tokenizer_settings(bert_slow)
    assert settings["pad_token"] == "[PAD]" and settings["pad_token_id"] == 0
    assert settings["bos_token_id"] == len(vocab) and settings["vocab_size"] == len(vocab) + 1
    assert not list(qformer_json.parent.glob("*.tmp"))
    import tokenizers

    backend = tokenizers.Tokenizer.from_file(str(qformer_json))
    assert backend.token_to_id("[DEC]") == len(vocab)
    assert backend.get_vocab_size(with_added_tokens=True) == len(vocab) + 1


QFORMER_TEXTS = [
    "dog",
    "Teapot",
    "a red backpack!",
    "  Extra   SPACES  ",
    "sks Corgi dog, on a beach; 4k (hdr)",
    "café crème brûlée",
    "🐶 dog",
    "日本語 dog",
    "[DEC] dog",
    "don't 123 456,7",
    " ".join(["robot"] * 40),
]


def test_qformer_encode_matches_slow(qformer_rt, bert_slow):
    ref = bert_slow(QFORMER_TEXTS, return_tensors="np", padding=True)
    result = qformer_rt.encode(QFORMER_TEXTS)
    assert isinstance(result, QFormerTokens)
    ids, mask = result
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    np.testing.assert_array_equal(ids, ref.input_ids)
    np.testing.assert_array_equal(mask, ref.attention_mask)
    assert bert_slow.convert_tokens_to_ids("[DEC]") in ids[QFORMER_TEXTS.index("[DEC] dog")]
    for text in QFORMER_TEXTS:
        ref1 = bert_slow([text], return_tensors="np", padding=True)
        ids1, mask1 = qformer_rt.encode(text)
        np.testing.assert_array_equal(ids1, ref1.input_ids)
        np.testing.assert_array_equal(mask1, ref1.attention_mask)


# ---------------------------------------------------------------------------------------------
# build_prompts vs diffusers' BlipDiffusionPipeline._build_prompt


@pytest.mark.parametrize(
    "prompts, subjects, kwargs",
    [
        (["swimming underwater"], ["dog"], {}),
        (["  on the beach  "], ["dog"], {}),
        (["swimming underwater", "in the snow"], ["dog", "cat"], {}),
        (["swimming underwater"], ["dog"], {"prompt_strength": 0.5, "prompt_reps": 3}),
        (["swimming underwater"], ["dog"], {"prompt_strength": 0.5}),
        (["swimming underwater"], ["dog"], {"prompt_strength": 1.0, "prompt_reps": 3}),
        (["swimming underwater"], ["dog"], {"prompt_strength": 2.0, "prompt_reps": 5}),
        (["swimming underwater"], ["dog"], {"prompt_strength": 0.04, "prompt_reps": 20}),
        (["A Painting, in Van Gogh style!"], ["teddy bear"], {"prompt_reps": 1}),
    ],
)
def test_build_prompts_matches_diffusers(prompts, subjects, kwargs):
    assert build_prompts(prompts, subjects, **kwargs) == _build_prompt_ref(prompts, subjects, **kwargs)


def test_build_prompts_single_string_and_tuple():
    assert build_prompts("on grass", "dog") == _build_prompt_ref(["on grass"], ["dog"])
    assert build_prompts(("on grass",), ("dog",), 0.5, 3) == ["a dog on grass"]


# ---------------------------------------------------------------------------------------------
# errors


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "prompts, subjects, kwargs, match",
    [
        ([""], ["dog"], {}, "prompt must be a non-empty string"),
        (["   "], ["dog"], {}, "prompt must be a non-empty string"),
        ("", "dog", {}, "prompt must be a non-empty string"),
        (["ok", ""], ["dog", "cat"], {}, r"prompt must be a non-empty string \(item 1\)"),
        (["ok"], [""], {}, "target_subject_category must be a non-empty string"),
        ([3], ["dog"], {}, "prompt must be a string, got int"),
        (["ok"], [None], {}, "target_subject_category must be a string, got NoneType"),
        (None, ["dog"], {}, "prompt must be a string or a list of strings, got NoneType"),
        ([], [], {}, "prompt must contain at least one string"),
        (["a", "b"], ["dog"], {}, "same length"),
        (["ok"], ["dog"], {"prompt_strength": -1.0}, "prompt_strength"),
        (["ok"], ["dog"], {"prompt_strength": float("nan")}, "prompt_strength"),
        (["ok"], ["dog"], {"prompt_reps": -2}, "prompt_reps"),
        (["ok"], ["dog"], {"prompt_reps": 2.5}, "prompt_reps"),
    ],
)
def test_build_prompts_errors(prompts, subjects, kwargs, match):
    with pytest.raises(InputError, match=match) as excinfo:
        build_prompts(prompts, subjects, **kwargs)
    _one_line(excinfo)


def test_tokenizer_encode_errors(clip_rt, qformer_rt):
    with pytest.raises(InputError, match="prompt must be a non-empty string") as e:
        clip_rt.encode([""], 61, field="prompt")
    _one_line(e)
    with pytest.raises(InputError, match="neg_prompt must be a string, got bytes"):
        clip_rt.encode([b"x"], 77, field="neg_prompt", allow_empty=True)
    with pytest.raises(InputError, match="max_length must be an integer >= 3"):
        clip_rt.encode(["dog"], 2, field="prompt")
    with pytest.raises(InputError, match="max_length"):
        clip_rt.encode(["dog"], 61.0, field="prompt")
    with pytest.raises(InputError, match="source_subject_category must be a non-empty string") as e:
        qformer_rt.encode([""])
    _one_line(e)
    with pytest.raises(InputError, match="source_subject_category must be a string, got int"):
        qformer_rt.encode([1])
    with pytest.raises(InputError, match="source_subject_category must be a string or a list of strings"):
        qformer_rt.encode(None)


@pytest.mark.parametrize("cls", [ClipTextTokenizer, QFormerTokenizer])
def test_tokenizer_file_errors(cls, tmp_path, clip_dir):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(InputError, match="tokenizer file not found") as e:
        cls.from_file(missing, 0)
    assert str(missing) in _one_line(e)
    for content in ("{not json", '{"version": "1.0"}', ""):
        corrupt = tmp_path / "corrupt.json"
        corrupt.write_text(content, encoding="utf-8")
        with pytest.raises(InputError, match="corrupt") as e:
            cls.from_file(corrupt, 0)
        assert str(corrupt) in _one_line(e)
    truncated = tmp_path / "truncated.json"
    truncated.write_bytes((clip_dir / "tokenizer.json").read_bytes()[:5000])
    with pytest.raises(InputError, match="corrupt") as e:
        cls.from_file(truncated, 0)
    _one_line(e)
    with pytest.raises(InputError, match="pad_token_id"):
        cls.from_file(clip_dir / "tokenizer.json", 49408)
    with pytest.raises(InputError, match="pad_token_id"):
        cls.from_file(clip_dir / "tokenizer.json", None)


def test_runtime_text_imports_without_torch_or_transformers(clip_dir):
    code = textwrap.dedent(
        f"""
        import sys
        for name in ("torch", "transformers", "diffusers", "open_clip"):
            sys.modules[name] = None  # any import of these now raises ImportError
        from blipdiffusion_trt.runtime import text
        tok = text.ClipTextTokenizer.from_file({str(clip_dir / "tokenizer.json")!r}, 49407)
        ids, truncated = tok.encode(text.build_prompts(["on the beach"], ["dog"], 1.0, 1), 61, field="prompt")
        assert ids[0, :6].tolist() == [49406, 320, 1929, 525, 518, 2117], ids[0, :6].tolist()
        bad = [m for m in ("torch", "transformers", "diffusers") if sys.modules.get(m) is not None]
        assert not bad, bad
        print("ok")
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
