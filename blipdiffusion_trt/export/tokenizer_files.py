"""Build-time tokenizer files: the CLIP BPE tokenizer, a small Q-Former BERT vocabulary, and the
single-file ``tokenizer.json`` exports the torch-free runtime loads (:mod:`blipdiffusion_trt.runtime.text`).

This module may import ``transformers`` (build time only). The runtime never does: it reads the
``tokenizer.json`` written by :func:`export_tokenizer_json` with ``tokenizers.Tokenizer.from_file``
and the few numbers returned by :func:`tokenizer_settings` (pad id, max length, bos/eos ids).

Nothing here needs the network:

* :func:`write_clip_tokenizer` rebuilds the real CLIP BPE tokenizer from the
  ``bpe_simple_vocab_16e6.txt.gz`` merges file shipped inside the ``open_clip_torch`` package
  (located with :func:`importlib.util.find_spec`; ``open_clip`` itself is never imported, since
  it needs torch/ftfy). The result equals openai/clip-vit-large-patch14's tokenizer (the one
  Stable Diffusion 1.x and Salesforce/blipdiffusion ship).
* :func:`write_qformer_bert_tokenizer` writes a small hand-made WordPiece vocabulary for the
  Q-Former (the real one is bert-base-uncased's 30522-token vocabulary, which is not available
  offline). It tokenizes any lower-case ASCII text, so models with random weights can be
  exported and tested end to end.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import string
import tempfile
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "CLIP_VOCAB_SIZE",
    "bytes_to_unicode",
    "find_open_clip_bpe",
    "write_clip_tokenizer",
    "write_qformer_bert_tokenizer",
    "load_qformer_bert_tokenizer",
    "qformer_vocab_size",
    "export_tokenizer_json",
    "tokenizer_settings",
]

CLIP_VOCAB_SIZE = 49408
_CLIP_NUM_MERGES = 49152 - 256 - 2  # as in open_clip's SimpleTokenizer and HF's CLIPTokenizer
_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"
_BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"

# Above this, transformers' ``model_max_length`` means "no limit" (VERY_LARGE_INTEGER = 1e30).
_NO_LIMIT = 10**20


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable unicode character table of GPT-2/CLIP byte-level BPE."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def find_open_clip_bpe() -> Path:
    """Path of open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the open_clip_torch package is not installed; it provides {_BPE_FILE_NAME}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _BPE_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the open_clip_torch package")
    return path


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary package files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_json(path: Path, obj: Any) -> None:
    _write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _added_token_json(content: str) -> dict[str, Any]:
    # As serialized in openai/clip-vit-large-patch14's tokenizer_config.json / special_tokens_map.json.
    return {
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": True,
    }


def write_clip_tokenizer(out_dir: str | os.PathLike[str], bpe_path: str | os.PathLike[str] | None = None) -> Path:
    """Write the CLIP BPE tokenizer (openai/clip-vit-large-patch14's) to ``out_dir``; return ``out_dir``.

    Files: ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``
    (loadable with ``transformers.CLIPTokenizer.from_pretrained(out_dir)``) and ``tokenizer.json``
    (the fast conversion, loadable with ``tokenizers.Tokenizer.from_file``).

    The vocabulary is built exactly the way open_clip's ``SimpleTokenizer`` (a copy of OpenAI's
    CLIP tokenizer) builds it from ``bpe_simple_vocab_16e6.txt.gz``: the 256 byte characters of
    :func:`bytes_to_unicode`, the same characters + ``</w>``, the 48894 merges
    (``lines[1:49152-256-2+1]``) joined, then ``<|startoftext|>`` (49406) and ``<|endoftext|>``
    (49407) -- 49408 tokens. That is token for token the ``vocab.json``/``merges.txt`` of
    openai/clip-vit-large-patch14 on the Hugging Face Hub (also used by Stable Diffusion 1.x and
    Salesforce/blipdiffusion), and the special tokens / ``model_max_length`` (77) /
    ``do_lower_case`` settings are copied from that repository's ``tokenizer_config.json``:
    bos ``<|startoftext|>``, eos/pad/unk ``<|endoftext|>``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Path(bpe_path) if bpe_path is not None else find_open_clip_bpe()
    with gzip.open(bpe, "rb") as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _CLIP_NUM_MERGES + 1]]
    if len(merges) != _CLIP_NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe} is not the CLIP BPE merges file (expected {_CLIP_NUM_MERGES} merge pairs)")

    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(m) for m in merges)
    vocab.extend([_CLIP_BOS, _CLIP_EOS])
    encoder = {tok: i for i, tok in enumerate(vocab)}
    if len(encoder) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{bpe}: built {len(encoder)} distinct tokens, expected {CLIP_VOCAB_SIZE}")

    _write_json(out / "vocab.json", encoder)
    # HF's CLIPTokenizer skips the first line (a version header) like open_clip skips lines[0].
    _write_text_atomic(out / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special_tokens_map = {
        "bos_token": _added_token_json(_CLIP_BOS),
        "eos_token": _added_token_json(_CLIP_EOS),
        "unk_token": _added_token_json(_CLIP_EOS),
        "pad_token": _CLIP_EOS,
    }
    _write_json(out / "special_tokens_map.json", special_tokens_map)
    tokenizer_config = {
        "unk_token": {**_added_token_json(_CLIP_EOS), "__type": "AddedToken"},
        "bos_token": {**_added_token_json(_CLIP_BOS), "__type": "AddedToken"},
        "eos_token": {**_added_token_json(_CLIP_EOS), "__type": "AddedToken"},
        "pad_token": _CLIP_EOS,
        "add_prefix_space": False,
        "errors": "replace",
        "do_lower_case": True,
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)

    from transformers import CLIPTokenizer  # build time only

    slow = CLIPTokenizer.from_pretrained(str(out))
    if len(slow) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{out}: CLIPTokenizer has {len(slow)} tokens, expected {CLIP_VOCAB_SIZE}")
    export_tokenizer_json(slow, out / "tokenizer.json")
    return out


# Whole words of the Q-Former vocabulary (besides letters, digits and punctuation).
_QFORMER_WORDS = (
    "a", "an", "the", "of", "in", "on", "at", "with", "and", "photo", "picture", "image",
    "dog", "cat", "person", "man", "woman", "car", "toy", "robot", "bag", "shoe", "teapot",
    "vase", "backpack", "can", "cup", "bowl", "clock", "sunglasses", "candle", "boot",
    "glasses", "sneaker", "bear", "plushie", "building", "chair", "table", "flower",
)


def write_qformer_bert_tokenizer(out_dir: str | os.PathLike[str], extra_words: Iterable[str] = ()) -> Path:
    """Write a small BERT WordPiece tokenizer for the Q-Former to ``out_dir``; return ``out_dir``.

    ``vocab.txt`` holds ``[PAD]`` (0), ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``, the letters
    a-z and ``##a``-``##z``, digits 0-9 and ``##0``-``##9`` (so any lower-case ASCII word
    tokenizes without ``[UNK]``), ASCII punctuation (BERT splits every punctuation character
    into its own token), a few whole words (dog, cat, person, car, toy, robot, bag, shoe, teapot,
    vase, backpack, can, cup, ...) and ``extra_words`` (lower-cased, de-duplicated). Also
    ``tokenizer_config.json`` (``do_lower_case`` true) and ``special_tokens_map.json``.

    Loadable with ``transformers.BertTokenizer.from_pretrained(out_dir, truncation_side="right")``
    as diffusers' ``Blip2QFormerModel`` does; that then adds the ``[DEC]`` bos token, so the
    Q-Former's ``vocab_size`` must be at least :func:`qformer_vocab_size` (``len(vocab) + 1``).
    This is *not* bert-base-uncased's vocabulary: token ids differ from the real checkpoint's.
    """
    out = Path(out_dir)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = list(string.ascii_lowercase)
    digits = list(string.digits)
    tokens: list[str] = []
    seen: set[str] = set()

    def add(tok: str) -> None:
        if tok not in seen:
            seen.add(tok)
            tokens.append(tok)

    for tok in specials + letters + ["##" + c for c in letters] + digits + ["##" + d for d in digits]:
        add(tok)
    for tok in string.punctuation:
        add(tok)
    for word in list(_QFORMER_WORDS) + list(extra_words):
        if not isinstance(word, str):
            raise TypeError(f"extra_words must be strings, got {type(word).__name__}")
        word = word.strip().lower()
        if not word or any(ch.isspace() for ch in word):
            raise ValueError(f"extra_words entries must be single non-empty words, got {word!r}")
        add(word)

    _write_text_atomic(out / "vocab.txt", "".join(t + "\n" for t in tokens))
    _write_json(
        out / "special_tokens_map.json",
        {
            "unk_token": "[UNK]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
        },
    )
    _write_json(
        out / "tokenizer_config.json",
        {
            "do_lower_case": True,
            "do_basic_tokenize": True,
            "tokenize_chinese_chars": True,
            "strip_accents": None,
            "unk_token": "[UNK]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
            "model_max_length": 512,
            "tokenizer_class": "BertTokenizer",
        },
    )
    return out


def load_qformer_bert_tokenizer(tokenizer_dir: str | os.PathLike[str]):
    """The slow ``BertTokenizer`` exactly as diffusers' ``Blip2QFormerModel.__init__`` builds it
    (``truncation_side="right"``, then ``[DEC]`` added as bos token)."""
    from transformers import BertTokenizer  # build time only

    tok = BertTokenizer.from_pretrained(str(tokenizer_dir), truncation_side="right")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def qformer_vocab_size(out_dir: str | os.PathLike[str]) -> int:
    """``len(tokenizer)`` of the Q-Former tokenizer in ``out_dir`` after diffusers adds ``[DEC]``:
    the minimum ``qformer_config.vocab_size`` for the model's word embeddings."""
    return len(load_qformer_bert_tokenizer(out_dir))


def export_tokenizer_json(hf_tokenizer: Any, out_path: str | os.PathLike[str]) -> Path:
    """Write ``hf_tokenizer`` (a transformers slow or fast tokenizer) as one ``tokenizer.json``.

    A slow tokenizer is converted with ``transformers.convert_slow_tokenizer.convert_slow_tokenizer``
    and its added tokens (e.g. the Q-Former's ``[DEC]``) are re-added with the ids, special flag
    and strip/normalize options they have in the slow tokenizer; a fast tokenizer's backend is
    saved as is. The conversion is checked (every added token keeps its id, the vocabulary size
    equals ``len(hf_tokenizer)``), written to a temporary file and renamed into place. Settings
    that are not in ``tokenizer.json`` (pad id, max length) come from :func:`tokenizer_settings`.
    Returns ``out_path``.
    """
    from tokenizers import AddedToken as TkAddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import convert_slow_tokenizer

    out = Path(out_path)
    if isinstance(hf_tokenizer, PreTrainedTokenizerFast):
        backend = hf_tokenizer.backend_tokenizer
    else:
        backend = convert_slow_tokenizer(hf_tokenizer)
        for idx, tok in sorted(hf_tokenizer.added_tokens_decoder.items()):
            added = TkAddedToken(
                str(tok),
                single_word=bool(getattr(tok, "single_word", False)),
                lstrip=bool(getattr(tok, "lstrip", False)),
                rstrip=bool(getattr(tok, "rstrip", False)),
                normalized=bool(getattr(tok, "normalized", True)),
                special=bool(getattr(tok, "special", True)),
            )
            if added.special:
                backend.add_special_tokens([added])
            else:
                backend.add_tokens([added])
            got = backend.token_to_id(str(tok))
            if got != idx:
                raise ValueError(f"converted tokenizer gives added token {str(tok)!r} id {got}, expected {idx}")
    backend.no_truncation()
    backend.no_padding()
    size = backend.get_vocab_size(with_added_tokens=True)
    if size != len(hf_tokenizer):
        raise ValueError(f"converted tokenizer has {size} tokens, the original {len(hf_tokenizer)}")
    _write_text_atomic(out, backend.to_str(pretty=True))
    return out


def tokenizer_settings(hf_tokenizer: Any) -> dict[str, Any]:
    """What the runtime needs besides ``tokenizer.json``: ``pad_token``, ``pad_token_id``,
    ``model_max_length`` (``None`` when the tokenizer sets no limit), ``bos_token_id`` and
    ``eos_token_id`` (``None`` when the tokenizer has no such token), plus ``vocab_size``
    (``len(hf_tokenizer)``, including added tokens). JSON-serializable."""
    max_len = getattr(hf_tokenizer, "model_max_length", None)
    if max_len is not None and int(max_len) >= _NO_LIMIT:
        max_len = None
    return {
        "pad_token": None if hf_tokenizer.pad_token is None else str(hf_tokenizer.pad_token),
        "pad_token_id": hf_tokenizer.pad_token_id,
        "model_max_length": None if max_len is None else int(max_len),
        "bos_token_id": hf_tokenizer.bos_token_id,
        "eos_token_id": hf_tokenizer.eos_token_id,
        "vocab_size": len(hf_tokenizer),
    }
