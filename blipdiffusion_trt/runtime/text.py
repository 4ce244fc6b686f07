"""Prompt building and tokenization for the torch-free runtime.

Imports only numpy, ``tokenizers`` and the standard library (never torch, transformers or
diffusers). The tokenizers load the single-file ``tokenizer.json`` written at export time by
:func:`blipdiffusion_trt.export.tokenizer_files.export_tokenizer_json`; the pad token id (not
stored in ``tokenizer.json``) comes from the package's settings
(:func:`~blipdiffusion_trt.export.tokenizer_files.tokenizer_settings`).

What each piece reproduces (diffusers 0.32.2 ``BlipDiffusionPipeline``):

* :func:`build_prompts` -- ``BlipDiffusionPipeline._build_prompt``.
* :class:`ClipTextTokenizer` -- ``CLIPTokenizer(texts, padding="max_length", truncation=True,
  max_length=n)`` for the subject prompt (``n = text_max_positions - num_query_tokens``) and the
  negative prompt (``n = text_max_positions``; diffusers does not truncate the negative prompt
  and crashes on long ones, we truncate and report it).
* :class:`QFormerTokenizer` -- ``Blip2QFormerModel.tokenizer(texts, padding=True)``, the
  ``BertTokenizer`` with the ``[DEC]`` bos token diffusers adds.

Known difference to the reference: diffusers uses the *slow* ``CLIPTokenizer``. Without ``ftfy``
installed it cleans text with BERT's ``BasicTokenizer`` (drops control characters, puts spaces
around CJK ideographs); the fast tokenizer used here does not. Both give the same ids on ASCII
and accented Latin text and on emoji; they differ on CJK ideographs and control characters.
With ``ftfy`` installed the slow tokenizer additionally runs ``ftfy.fix_text`` and
``html.unescape`` (e.g. ``&amp;`` -> ``&``), which the fast one does not.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import tokenizers

from blipdiffusion_trt.errors import InputError, PackageError, first_line

__all__ = [
    "build_prompts",
    "max_useful_reps",
    "text_problem",
    "TokenizedText",
    "QFormerTokens",
    "ClipTextTokenizer",
    "QFormerTokenizer",
]


def text_problem(text: str) -> str | None:
    """None when ``text`` is valid Unicode text, else what is wrong (one line). Python holds the
    bytes of a command line that are not UTF-8 as lone surrogates ("surrogateescape"); the
    tokenizers cannot take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        char = text[error.start]
        byte = ord(char) - 0xDC00 if 0xDC80 <= ord(char) <= 0xDCFF else None
        what = f"the byte 0x{byte:02x}" if byte is not None else f"the lone surrogate U+{ord(char):04X}"
        return f"is not valid UTF-8 text ({what} at character {error.start})"
    return None


def _as_text_list(texts: object, field: str, *, allow_empty: bool) -> list[str]:
    """Validate ``texts`` (one string or a list/tuple of strings) and return it as a list."""
    if isinstance(texts, str):
        items: list[object] = [texts]
    elif isinstance(texts, (list, tuple)):
        items = list(texts)
    else:
        raise InputError(f"{field} must be a string or a list of strings, got {type(texts).__name__}", field=field)
    if not items:
        raise InputError(f"{field} must contain at least one string", field=field)
    for i, item in enumerate(items):
        where = f" (item {i})" if len(items) > 1 else ""
        if not isinstance(item, str):
            raise InputError(f"{field} must be a string{where}, got {type(item).__name__}", field=field)
        problem = text_problem(item)
        if problem:
            raise InputError(f"{field}{where} {problem}", field=field)
        if not allow_empty and not item.strip():
            raise InputError(f"{field} must be a non-empty string{where}", field=field)
    return items  # type: ignore[return-value]


def build_prompts(
    prompts: str | Sequence[str],
    target_subjects: str | Sequence[str],
    prompt_strength: float = 1.0,
    prompt_reps: int = 20,
    *,
    max_reps: int | None = None,
) -> list[str]:
    """The prompts the CLIP text encoder sees, exactly as diffusers'
    ``BlipDiffusionPipeline._build_prompt``: ``f"a {tgt} {prompt.strip()}"`` repeated
    ``int(prompt_strength * prompt_reps)`` times, joined with ``", "``.

    ``max_reps`` caps the repetitions: :func:`max_useful_reps` of the text encoder's length gives
    the same tokens after truncation as any larger count, so no work (or memory) is spent on text
    the encoder cuts off.

    A single string is taken as a batch of one (as ``BlipDiffusionPipeline.__call__`` does).
    Unlike diffusers (which ``zip``s silently), ``prompts`` and ``target_subjects`` must have the
    same length, and neither may hold empty or non-string items; ``prompt_strength`` must be a
    finite number >= 0 and ``prompt_reps`` an integer >= 0. As in diffusers, a product below 1
    gives an empty prompt. Raises :class:`~blipdiffusion_trt.errors.InputError`.
    """
    prompt_list = _as_text_list(prompts, "prompt", allow_empty=False)
    subject_list = _as_text_list(target_subjects, "target_subject_category", allow_empty=False)
    if len(prompt_list) != len(subject_list):
        raise InputError(
            f"prompt and target_subject_category must have the same length, "
            f"got {len(prompt_list)} and {len(subject_list)}"
        , field="prompt")
    if (
        isinstance(prompt_strength, bool)
        or not isinstance(prompt_strength, (int, float, np.integer, np.floating))
        or not math.isfinite(float(prompt_strength))
        or prompt_strength < 0
    ):
        raise InputError(f"prompt_strength must be a finite number >= 0, got {prompt_strength!r}", field="prompt_strength")
    if isinstance(prompt_reps, bool) or not isinstance(prompt_reps, (int, np.integer)) or prompt_reps < 0:
        raise InputError(f"prompt_reps must be an integer >= 0, got {prompt_reps!r}", field="prompt_reps")
    count = float(prompt_strength) * min(int(prompt_reps), 2**53)
    if max_reps is not None and count >= max_reps:
        reps = int(max_reps)
    elif not math.isfinite(count) or count >= 2**31:
        raise InputError(f"prompt_strength x prompt_reps = {count:g} repetitions: too many to build (pass max_reps)",
                         field="prompt_reps")
    else:
        reps = int(count)
    out = []
    for prompt, tgt_subject in zip(prompt_list, subject_list):
        prompt = f"a {tgt_subject} {prompt.strip()}"
        out.append(", ".join([prompt] * reps))
    return out


def max_useful_reps(token_budget: int) -> int:
    """The repetitions of ``"a {tgt} {prompt}"`` (joined with ``", "``) past which the first
    ``token_budget`` tokens never change, whatever the words.

    Each repetition begins with at least two tokens that its neighbours cannot merge with: ``a``
    (its own word, between spaces) and at least one of ``{tgt}`` (a non-blank word after a space).
    Only a repetition's last piece can differ when another follows (a trailing ``.`` becomes
    ``.,``). So with ``k`` repetitions the first ``2k`` tokens are those of any longer string, and
    ``k = budget // 2 + 1`` fills the budget; ``tests/test_text.py`` checks it against the
    tokenizers on hostile prompts.
    """
    return max(1, int(token_budget) // 2 + 1)


def _load_tokenizer(tokenizer_json: str | os.PathLike[str]) -> tokenizers.Tokenizer:
    path = Path(tokenizer_json)
    if not path.is_file():
        raise InputError(f"tokenizer file not found: {path}")
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a plain Exception on malformed JSON
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"tokenizer file {path} is corrupt or not a tokenizers JSON file: {reason}") from None
    tok.no_truncation()
    tok.no_padding()
    return tok


@contextlib.contextmanager
def _tokenizer_failures(source: str, field: str):
    """A failure inside the tokenizer (an ``Exception``, or the Rust ``PanicException``, a
    ``BaseException``, e.g. a pre-tokenizer regex past Oniguruma's retry limit) as one
    :class:`PackageError` line naming the tokenizer file: its rules are the package's, not the text's."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit, InputError):
        raise
    except BaseException as error:  # noqa: BLE001 - pyo3's PanicException derives from BaseException
        raise PackageError(f"{source}: the tokenizer failed on {field} ({first_line(error)}); "
                           "the package's tokenizer is broken: re-export it") from None


def largest_token_id(tok: tokenizers.Tokenizer) -> int:
    """The largest id the tokenizer can produce (its vocabulary with the added tokens)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    return max(vocab.values(), default=-1)


def _check_pad_id(tok: tokenizers.Tokenizer, pad_token_id: object, source: str) -> int:
    size = tok.get_vocab_size(with_added_tokens=True)
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, (int, np.integer)):
        raise InputError(f"pad_token_id for {source} must be an integer, got {pad_token_id!r}")
    if not 0 <= int(pad_token_id) < size:
        raise InputError(f"pad_token_id for {source} must be in [0, {size}), got {pad_token_id}")
    return int(pad_token_id)


class TokenizedText(NamedTuple):
    """Result of :meth:`ClipTextTokenizer.encode`; unpacks as ``ids, truncated = ...``."""

    input_ids: np.ndarray
    """int64 ``[B, max_length]``: bos, tokens, eos, then pad ids."""
    truncated: list[bool]
    """Per text: whether tokens were cut off to fit ``max_length`` (worth a warning)."""


class QFormerTokens(NamedTuple):
    """Result of :meth:`QFormerTokenizer.encode`; unpacks as ``ids, mask = ...``."""

    input_ids: np.ndarray
    """int64 ``[B, L]``, ``L`` = longest tokenized text (with ``[CLS]``/``[SEP]``)."""
    attention_mask: np.ndarray
    """int64 ``[B, L]``: 1 for tokens, 0 for padding."""


class ClipTextTokenizer:
    """CLIP BPE tokenizer with HF ``padding="max_length", truncation=True`` semantics.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` whose post-processor adds bos/eos (as the
    conversion of ``CLIPTokenizer`` does); its truncation/padding settings are switched off and
    done here instead.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, pad_token_id: int, *, source: str = "CLIP tokenizer"):
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        self._source = source
        self.pad_token_id = _check_pad_id(tokenizer, pad_token_id, source)
        self.num_special_tokens = int(tokenizer.num_special_tokens_to_add(False))

    @classmethod
    def from_file(cls, tokenizer_json: str | os.PathLike[str], pad_token_id: int) -> "ClipTextTokenizer":
        """Load a ``tokenizer.json``; :class:`InputError` naming the file if missing or corrupt."""
        return cls(_load_tokenizer(tokenizer_json), pad_token_id, source=str(tokenizer_json))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def largest_id(self) -> int:
        """The largest token id this tokenizer can produce."""
        return largest_token_id(self._tok)

    def encode(
        self,
        texts: str | Sequence[str],
        max_length: int,
        *,
        field: str,
        allow_empty: bool = False,
    ) -> TokenizedText:
        """Token ids equal to ``CLIPTokenizer(texts, padding="max_length", truncation=True,
        max_length=max_length).input_ids``, as a :class:`TokenizedText` ``(input_ids, truncated)``.

        Texts longer than ``max_length`` tokens are cut on the right and end with eos, like HF.
        ``field`` names the input in error messages (e.g. ``"prompt"``, ``"neg_prompt"``);
        empty/blank strings are refused unless ``allow_empty`` (the negative prompt defaults to "").
        ``max_length`` must leave room for at least one token besides bos/eos.
        """
        items = _as_text_list(texts, field, allow_empty=allow_empty)
        min_len = self.num_special_tokens + 1
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < min_len:
            raise InputError(f"max_length must be an integer >= {min_len}, got {max_length!r}", field="max_length")
        max_length = int(max_length)
        budget = max_length - self.num_special_tokens
        ids = np.full((len(items), max_length), self.pad_token_id, dtype=np.int64)
        truncated: list[bool] = []
        with _tokenizer_failures(self._source, field):
            for row, enc in enumerate(self._tok.encode_batch(items, add_special_tokens=False)):
                cut = len(enc.ids) > budget
                if cut:
                    enc.truncate(budget)
                full = self._tok.post_process(enc, None, add_special_tokens=True).ids
                ids[row, : len(full)] = full
                truncated.append(cut)
        return TokenizedText(ids, truncated)

    def token_ids(self, text: str, max_length: int, *, field: str) -> list[int]:
        """The ids :meth:`encode` gives one text, without the padding: bos, tokens (cut to fit
        ``max_length`` as :meth:`encode` cuts them), eos. Prompt-to-prompt aligns these."""
        row = self.encode([text], max_length, field=field).input_ids[0]
        with _tokenizer_failures(self._source, field):
            count = len(self._tok.encode(text, add_special_tokens=False).ids)
        return [int(i) for i in row[: min(count + self.num_special_tokens, int(max_length))]]

    def word_ids(self, text: str, *, field: str) -> list[int]:
        """The tokens of ``text`` alone (no bos/eos, not cut); empty when the tokenizer keeps nothing."""
        (item,) = _as_text_list(text, field, allow_empty=False)
        with _tokenizer_failures(self._source, field):
            return list(self._tok.encode(item, add_special_tokens=False).ids)


class QFormerTokenizer:
    """BERT WordPiece tokenizer of the Q-Former (``[DEC]`` included), pad-to-longest."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, pad_token_id: int, *, source: str = "Q-Former tokenizer"):
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        self._source = source
        self.pad_token_id = _check_pad_id(tokenizer, pad_token_id, source)

    @classmethod
    def from_file(cls, tokenizer_json: str | os.PathLike[str], pad_token_id: int) -> "QFormerTokenizer":
        """Load a ``tokenizer.json``; :class:`InputError` naming the file if missing or corrupt."""
        return cls(_load_tokenizer(tokenizer_json), pad_token_id, source=str(tokenizer_json))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def largest_id(self) -> int:
        """The largest token id this tokenizer can produce."""
        return largest_token_id(self._tok)

    def encode(self, texts: str | Sequence[str], *, field: str = "source_subject_category") -> QFormerTokens:
        """``(input_ids, attention_mask)``, both int64 ``[B, L]``, equal to diffusers'
        ``Blip2QFormerModel.tokenizer(texts, return_tensors="np", padding=True)`` (``[CLS]`` ...
        ``[SEP]``, right-padded to the longest text, no truncation). Empty strings are refused."""
        items = _as_text_list(texts, field, allow_empty=False)
        with _tokenizer_failures(self._source, field):
            encs = self._tok.encode_batch(items, add_special_tokens=True)
        width = max(len(e.ids) for e in encs)
        ids = np.full((len(items), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(items), width), dtype=np.int64)
        for row, enc in enumerate(encs):
            n = len(enc.ids)
            ids[row, :n] = enc.ids
            mask[row, :n] = 1
        return QFormerTokens(ids, mask)
