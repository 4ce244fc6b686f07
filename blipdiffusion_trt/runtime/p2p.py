"""Prompt-to-prompt "refine" control for editing, in numpy: token alignment, schedules, local blend.

What LAVIS (``lavis/models/blip_diffusion_models/ptp_utils.py``, after Google's prompt-to-prompt)
computes on the host, rewritten for the ``unet_p2p`` graph's control inputs (export/p2p.py):

- :func:`align_tokens` / :func:`refinement_mapping`: Needleman-Wunsch alignment of the target
  prompt's tokens to the source prompt's (``get_refinement_mapper``: match +1, mismatch -1, gap 0,
  the same tie-breaking), giving the token map and the 0/1 weights beta.
- :func:`cross_replace_alphas` and :func:`self_replace_calls`: which UNet calls are controlled
  (``get_time_words_attention_alpha``, ``num_self_replace``).
- :class:`LocalBlend`: the mask of the original subject from the accumulated cross-attention
  maps; outside it the target latent is reset to the source latent after every step.

Deliberate differences from LAVIS (the intended algorithm, not its bugs):

- The target's tokens are aligned as the text encoder really sees them: the subject's query
  embeddings take ``num_query_tokens`` positions after ``ctx_begin_pos`` and match no source
  token (:data:`QUERY_PLACEHOLDER`). LAVIS aligns a prompt with literal "sks" placeholders but
  feeds the encoder the query embeddings *and* the "sks" tokens, so its alignment is shifted by
  ``num_query_tokens`` positions against the attention it controls.
- The local blend's tokens are the original subject's token sequence wherever it occurs in the
  source prompt, several words included (:func:`subject_token_positions`); LAVIS looks the subject
  up as one space-separated word and gets an empty mask for "red car" (and misses "cat," with a
  comma).
- The blend maps have the size of the UNet's blend level at the actual image size, not 16x16.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import InputError
from .inputs import real_number, shown

# Target positions holding the subject's query embeddings: an id no tokenizer produces.
QUERY_PLACEHOLDER = -1
# Needleman-Wunsch scores of prompt-to-prompt's aligner
MATCH, MISMATCH, GAP = 1, -1, 0
# Local blend: max-pool window radius (3x3) of the attention map before upsampling
BLEND_POOL_RADIUS = 1


def target_layout(token_ids: Sequence[int], ctx_begin_pos: int, num_query_tokens: int, length: int) -> list[int]:
    """The target's token ids at the text encoder's positions: the query embeddings spliced in."""
    ids = list(token_ids)
    return (ids[:ctx_begin_pos] + [QUERY_PLACEHOLDER] * num_query_tokens + ids[ctx_begin_pos:])[:length]


def align_tokens(source: Sequence[int], target: Sequence[int]) -> list[int]:
    """For each target token, the index of the source token aligned with it, or -1 (a gap).

    Global alignment (Needleman-Wunsch) with match +1, mismatch -1, gap 0. Ties prefer, in this
    order, a gap in the source (target token unmatched), a gap in the target, then the diagonal,
    as prompt-to-prompt's ``global_align`` does; the result equals its ``get_aligned_sequences``.
    """
    n, m = len(source), len(target)
    score = np.zeros((n + 1, m + 1), dtype=np.int64)
    score[0, 1:] = np.arange(1, m + 1) * GAP
    score[1:, 0] = np.arange(1, n + 1) * GAP
    # traceback: 1 target token unmatched (left), 2 source token skipped (up), 3 aligned (diagonal)
    move = np.zeros((n + 1, m + 1), dtype=np.int8)
    move[0, 1:] = 1
    move[1:, 0] = 2
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left = score[i, j - 1] + GAP
            up = score[i - 1, j] + GAP
            diagonal = score[i - 1, j - 1] + (MATCH if source[i - 1] == target[j - 1] else MISMATCH)
            best = max(left, up, diagonal)
            score[i, j] = best
            move[i, j] = 1 if best == left else 2 if best == up else 3
    aligned = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        if move[i, j] == 3:
            i, j = i - 1, j - 1
            aligned[j] = i
        elif move[i, j] == 1:
            j -= 1
        else:
            i -= 1
    return aligned


def refinement_mapping(source: Sequence[int], target: Sequence[int], length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(token_map, weights)`` over ``length`` text positions (LAVIS ``get_mapper``).

    ``token_map[j]`` is the source position whose cross-attention the target position j takes,
    ``weights[j]`` (beta) is 1 where position j has one, 0 where the target token is new. Positions
    after the target's tokens (padding) map to themselves with weight 1.
    """
    if len(source) > length or len(target) > length:
        raise ValueError(f"token sequences longer than the {length} text positions")
    aligned = align_tokens(source, target)
    token_map = np.arange(length, dtype=np.int64)
    weights = np.ones(length, dtype=np.float32)
    for j, i in enumerate(aligned):
        if i >= 0:
            token_map[j] = i
        else:
            weights[j] = 0.0
    return token_map, weights


def token_map_matrix(token_map: np.ndarray) -> np.ndarray:
    """``unet_p2p``'s ``token_map`` input: M[j, i] = 1 where target position j takes source position i."""
    length = len(token_map)
    matrix = np.zeros((length, length), dtype=np.float32)
    matrix[np.arange(length), token_map] = 1.0
    return matrix


def check_fraction(name: str, value: object, *, below_one: bool = False) -> float:
    """A number in [0, 1] (replace-step fractions), or in [0, 1) with ``below_one`` (the blend
    threshold: the normalised map's largest value is 1, and the mask keeps what is above the
    threshold, so 1 selects no pixel), else a one-line InputError."""
    number = real_number(value)
    if number is None or not 0.0 <= number <= 1.0 or (below_one and number == 1.0):
        allowed = "[0, 1)" if below_one else "[0, 1]"
        why = " (1 selects no pixel: the normalised attention map's largest value is 1)" if below_one else ""
        raise InputError(f"{name} must be a number in {allowed}{why}, got {shown(value)}", field=name)
    return number


def cross_replace_alphas(num_inference_steps: int, cross_replace_steps: float) -> np.ndarray:
    """alpha per UNet call: 1 for the first ``int(cross_replace_steps * (N + 1))`` calls, else 0.

    LAVIS's ``get_time_words_attention_alpha`` with one fraction for every word: N + 1 rows (PNDM
    makes N + 1 UNet calls for N steps), row k is the k-th call's.
    """
    rows = num_inference_steps + 1
    alphas = np.zeros(rows, dtype=np.float32)
    alphas[: int(cross_replace_steps * rows)] = 1.0
    return alphas


def self_replace_calls(num_inference_steps: int, self_replace_steps: float) -> int:
    """How many first UNet calls replace the small layers' self-attention (LAVIS ``num_self_replace``)."""
    return int(num_inference_steps * self_replace_steps)


def subject_token_positions(source: Sequence[int], subject: Sequence[int], start: int = 1) -> list[int]:
    """Positions of every occurrence of the subject's token sequence in the source prompt's ids
    (from ``start``, after bos), as LAVIS's ``get_word_inds`` finds every occurrence of the word."""
    subject = list(subject)
    if not subject:
        raise ValueError("no subject tokens")
    positions: list[int] = []
    for begin in range(start, len(source) - len(subject) + 1):
        if list(source[begin:begin + len(subject)]) == subject:
            positions += [p for p in range(begin, begin + len(subject)) if p not in positions]
    return positions


def max_pool_same(image: np.ndarray, radius: int) -> np.ndarray:
    """Max over the (2r+1)^2 window around each pixel, the window cut at the borders
    (``torch.nn.functional.max_pool2d`` with stride 1 and padding r)."""
    padded = np.pad(image, radius, mode="constant", constant_values=-np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (2 * radius + 1, 2 * radius + 1))
    return windows.max(axis=(-2, -1))


def upsample_nearest(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``torch.nn.functional.interpolate(mode="nearest")`` of a 2-D map to ``size``."""
    rows = np.minimum((np.arange(size[0]) * (image.shape[0] / size[0])).astype(np.int64), image.shape[0] - 1)
    cols = np.minimum((np.arange(size[1]) * (image.shape[1] / size[1])).astype(np.int64), image.shape[1] - 1)
    return image[rows][:, cols]


class LocalBlend:
    """Keep the target latent's changes to where the source prompt attends to the original subject.

    ``add`` the source's cross-attention maps [T, h, w] of every UNet call (averaged over heads and
    the blend-level layers); ``__call__`` then blends the latents [source, target] of this step:
    the sum of the maps over calls so far, summed over the subject's tokens, max-pooled 3x3,
    upsampled (nearest) to the latent size, divided by its maximum and thresholded (> threshold)
    is the mask; outside it the target latent becomes the source latent.
    """

    def __init__(self, token_positions: Sequence[int], threshold: float):
        if not token_positions:
            raise ValueError("local blend needs at least one token position")
        self.token_positions = list(token_positions)
        self.threshold = threshold
        self.total: np.ndarray | None = None
        self.last_mask: np.ndarray | None = None

    def add(self, maps: np.ndarray) -> None:
        maps = maps.astype(np.float64)
        self.total = maps if self.total is None else self.total + maps

    def mask(self, size: tuple[int, int]) -> np.ndarray:
        """bool [h, w] at the latent size: True where the target keeps its own latent."""
        if self.total is None:
            raise ValueError("no attention maps added yet")
        subject = self.total[self.token_positions].sum(axis=0)
        pooled = max_pool_same(subject, BLEND_POOL_RADIUS)
        upsampled = upsample_nearest(pooled, size)
        with np.errstate(divide="ignore", invalid="ignore"):
            normalised = upsampled / upsampled.max()
        return normalised > self.threshold

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        """latents [2, C, h, w] (source, target) -> the same with the target blended."""
        mask = self.mask(latents.shape[-2:])
        self.last_mask = mask
        blended = latents.copy()
        blended[1] = np.where(mask[None], latents[1], latents[0])
        return blended
