"""PyTorch reference of subject-driven editing, written from LAVIS's algorithm, on diffusers' modules.

LAVIS (``lavis/models/blip_diffusion_models/blip_diffusion.py`` and ``ptp_utils.py``, after
Google's prompt-to-prompt) edits in this form, and so does this reference: attention processors
compute every attention's probabilities explicitly (``Attention.get_attention_scores``) and hand
them to a controller that counts layers and UNet calls, changes the target's probabilities in
place, stores the maps the local blend needs, and blends the latents after every scheduler step.
The runtime computes the same thing differently (fused attention, control tensors, numpy), which
is what the tests compare.

The ``lavis_*`` functions re-implement LAVIS's helpers with LAVIS's semantics (including where the
runtime deliberately differs) for the unit tests. The edit itself uses them with these fixes,
which the runtime makes too (see docs/deviations-from-lavis.md):

1. The target's token sequence for the alignment is the one the text encoder sees: the query
   embeddings at ``ctx_begin_pos`` (matching nothing), no literal "sks" placeholder tokens.
2. The control's resolution rule is the UNet level (the deepest down level with cross-attention,
   16x16 at SD 1.5's 512x512), found here from the attention layers' sequence lengths in a dry
   run, not the literal 16x16 / "at most 256 pixels".
3. The local blend's tokens are the original subject's words where the source prompt has them
   (several words allowed).
4. The inversion prompt is ``"a {original_subject} {prompt}"``; the posterior mean, not an
   unseeded sample; diffusers' ``DDIMInverseScheduler``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

PLACEHOLDER = -1


# ------------------------------------------------------------------------------------------------
# LAVIS's helpers (ptp_utils.py), re-implemented
# ------------------------------------------------------------------------------------------------

def lavis_global_align(x, y, gap=0, match=1, mismatch=-1):
    """``global_align``: score matrix and traceback (1 left, 2 up, 3 diagonal, 4 origin)."""
    score = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    score[0, 1:] = (np.arange(len(y)) + 1) * gap
    score[1:, 0] = (np.arange(len(x)) + 1) * gap
    trace = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    trace[0, 1:], trace[1:, 0], trace[0, 0] = 1, 2, 4
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left = score[i, j - 1] + gap
            up = score[i - 1, j] + gap
            diag = score[i - 1, j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            score[i, j] = max(left, up, diag)
            trace[i, j] = 1 if score[i, j] == left else 2 if score[i, j] == up else 3
    return score, trace


def lavis_mapper_y_to_x(x, y, trace):
    """``get_aligned_sequences``' mapper: one (y index, x index or -1) pair per y token."""
    pairs = []
    i, j = len(x), len(y)
    while i > 0 or j > 0:
        if trace[i, j] == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif trace[i, j] == 1:
            j -= 1
            pairs.append((j, -1))
        elif trace[i, j] == 2:
            i -= 1
        else:
            break
    pairs.reverse()
    return torch.tensor(pairs, dtype=torch.int64)


def lavis_get_mapper(x_ids, y_ids, max_len):
    """``get_mapper`` on token ids: (mapper with -1 for new tokens, alphas)."""
    _, trace = lavis_global_align(x_ids, y_ids)
    base = lavis_mapper_y_to_x(x_ids, y_ids, trace)
    alphas = torch.ones(max_len)
    alphas[: base.shape[0]] = base[:, 1].ne(-1).float()
    mapper = torch.zeros(max_len, dtype=torch.int64)
    mapper[: base.shape[0]] = base[:, 1]
    mapper[base.shape[0]:] = len(y_ids) + torch.arange(max_len - len(y_ids))
    return mapper, alphas


def lavis_time_words_alpha(num_steps, cross_replace_steps, max_words):
    """``get_time_words_attention_alpha`` for two prompts and one fraction: [N + 1, 1, 1, 1, T]."""
    alpha = torch.zeros(num_steps + 1, 1, max_words)
    start, end = int(0 * alpha.shape[0]), int(cross_replace_steps * alpha.shape[0])
    alpha[:start, 0] = 0
    alpha[start:end, 0] = 1
    alpha[end:, 0] = 0
    return alpha.reshape(num_steps + 1, 1, 1, 1, max_words)


def lavis_num_self_replace(num_steps, self_replace_steps):
    return int(num_steps * 0.0), int(num_steps * self_replace_steps)


def lavis_get_word_inds(text, word_place, tokenizer):
    """``get_word_inds``: token positions (after bos) of the space-separated word(s) ``word_place``."""
    split_text = text.split(" ")
    if isinstance(word_place, str):
        word_place = [i for i, word in enumerate(split_text) if word_place == word]
    elif isinstance(word_place, int):
        word_place = [word_place]
    out = []
    if len(word_place) > 0:
        words_encode = [tokenizer.decode([item]).strip("#") for item in tokenizer.encode(text)][1:-1]
        cur_len, ptr = 0, 0
        for i in range(len(words_encode)):
            cur_len += len(words_encode[i])
            if ptr in word_place:
                out.append(i + 1)
            if cur_len >= len(split_text[ptr]):
                ptr += 1
                cur_len = 0
    return np.array(out)


def lavis_local_blend_mask(maps, alpha_layers, size, threshold, map_hw):
    """``LocalBlend.__call__``'s mask from the stored maps [2 * heads, pixels, T] of the blend layers."""
    maps = [m.reshape(alpha_layers.shape[0], -1, 1, map_hw[0], map_hw[1], m.shape[-1]) for m in maps]
    maps = torch.cat(maps, dim=1)
    maps = (maps * alpha_layers).sum(-1).mean(1)
    mask = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
    mask = F.interpolate(mask, size=size)
    normalised = mask / mask.max(2, keepdims=True)[0].max(3, keepdims=True)[0]
    mask = normalised.gt(threshold)
    return (mask[:1] + mask[1:]).float(), normalised


# ------------------------------------------------------------------------------------------------
# Attention control through diffusers' attention processors
# ------------------------------------------------------------------------------------------------

class RecordingProcessor:
    """Plain attention that records (name, place, is_cross, sequence length): the dry run."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        self.log.append((self.name, encoder_hidden_states is not None, hidden_states.shape[1]))
        return _attention(attn, hidden_states, encoder_hidden_states, None)


def _place(name):
    return "down" if name.startswith("down_blocks") else "mid" if name.startswith("mid_block") else "up"


def _attention(attn, hidden_states, encoder_hidden_states, controller, name=None):
    """LAVIS's ``P2PCrossAttnProcessor``: explicit probabilities, the controller in between."""
    is_cross = encoder_hidden_states is not None
    context = encoder_hidden_states if is_cross else hidden_states
    query = attn.head_to_batch_dim(attn.to_q(hidden_states))
    key = attn.head_to_batch_dim(attn.to_k(context))
    value = attn.head_to_batch_dim(attn.to_v(context))
    probs = attn.get_attention_scores(query, key, None)
    if controller is not None:
        controller(probs, is_cross, name, attn.heads)
    out = attn.batch_to_head_dim(torch.bmm(probs, value))
    return attn.to_out[1](attn.to_out[0](out))


class ReferenceProcessor:
    def __init__(self, name, controller):
        self.name, self.controller = name, controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return _attention(attn, hidden_states, encoder_hidden_states, self.controller, self.name)


@dataclass
class Levels:
    """From a dry run: the sequence length of each layer, the blend level's, the blend layers."""

    seq: dict
    blend_seq: int
    blend_layers: list
    map_hw: tuple


def find_levels(unet, sample, timestep, embeddings, latent_hw) -> Levels:
    log = []
    original = unet.attn_processors
    unet.set_attn_processor({n: RecordingProcessor(n, log) for n in original})
    try:
        with torch.no_grad():
            unet(sample, timestep, encoder_hidden_states=embeddings)
    finally:
        unet.set_attn_processor(original)
    seq = {name: length for name, _, length in log}
    # LAVIS's 16x16 at 512x512 is the deepest down level with cross-attention
    blend_seq = min(length for name, cross, length in log if cross and _place(name) == "down")
    blend_layers = [name for name, cross, length in log if cross and _place(name) != "mid" and length == blend_seq]
    factor = int(round((latent_hw[0] * latent_hw[1] / blend_seq) ** 0.5))
    return Levels(seq, blend_seq, blend_layers, (latent_hw[0] // factor, latent_hw[1] // factor))


class ReferenceController:
    """LAVIS's ``AttentionRefine`` (+ ``AttentionStore``, ``LocalBlend``) with the fixes.

    ``cross_alpha`` [calls, 1, 1, 1, T], ``mapper`` [1, T], ``alphas`` [1, 1, 1, T] as LAVIS
    builds them; ``self_range`` the calls replacing self-attention; ``blend_alpha_layers``
    [2, 1, 1, 1, 1, T] or None (no local blend).
    """

    def __init__(self, levels: Levels, *, cross_alpha, mapper, alphas, self_range, blend_alpha_layers=None,
                 threshold=None, num_layers):
        self.levels = levels
        self.cross_alpha, self.mapper, self.alphas = cross_alpha, mapper, alphas
        self.self_range = self_range
        self.blend_alpha_layers, self.threshold = blend_alpha_layers, threshold
        self.num_layers = num_layers
        self.cur_step = 0
        self.cur_layer = 0
        self.step_store: dict = {}
        self.store: dict = {}
        self.last_normalised = None
        self.last_mask = None

    def __call__(self, probs, is_cross, name, heads):
        # the last two rows: source, target (LAVIS: the cond half); changed in place
        self.forward(probs[-2 * heads:], is_cross, name, heads)
        self.cur_layer += 1
        if self.cur_layer == self.num_layers:
            self.cur_layer = 0
            self.cur_step += 1
            self.between_steps()

    def forward(self, attn, is_cross, name, heads):
        if is_cross and name in self.levels.blend_layers:
            self.step_store[name] = attn  # aliased: holds the controlled maps, as LAVIS's store does
        in_self_range = self.self_range[0] <= self.cur_step < self.self_range[1]
        if is_cross or in_self_range:
            attn = attn.reshape(2, heads, *attn.shape[1:])
            base, replace = attn[0], attn[1:]
            if is_cross:
                alpha_words = self.cross_alpha[self.cur_step] if self.cur_step < len(self.cross_alpha) else 0.0
                refined = base[:, :, self.mapper].permute(2, 0, 1, 3) * self.alphas + replace * (1 - self.alphas)
                attn[1:] = refined * alpha_words + (1 - alpha_words) * replace
            elif attn.shape[2] <= self.levels.blend_seq:  # LAVIS: <= 16 ** 2
                attn[1:] = base.unsqueeze(0).expand(replace.shape[0], *base.shape)
            attn = attn.reshape(2 * heads, *attn.shape[2:])
        return attn

    def between_steps(self):
        for key, value in self.step_store.items():
            self.store[key] = value.clone() if key not in self.store else self.store[key] + value
        self.step_store = {}

    def blend(self, x_t):
        if self.blend_alpha_layers is None:
            return x_t
        maps = [self.store[name] for name in self.levels.blend_layers]
        mask, normalised = lavis_local_blend_mask(maps, self.blend_alpha_layers, x_t.shape[2:], self.threshold,
                                                  self.levels.map_hw)
        self.last_normalised, self.last_mask = normalised[0, 0], mask[0, 0].bool()
        return x_t[:1] + mask * (x_t - x_t[:1])

    def map_average(self, step_maps: dict):
        """Source row's maps of one call averaged over heads and blend layers: [T, h, w] (unet_p2p's output)."""
        maps = [step_maps[name] for name in self.levels.blend_layers]
        heads = maps[0].shape[0] // 2
        source = torch.cat([m[:heads] for m in maps]).mean(0)  # [pixels, T]
        return source.T.reshape(-1, *self.levels.map_hw)


def install(unet, controller):
    unet.set_attn_processor({name: ReferenceProcessor(name, controller) for name in unet.attn_processors})


# ------------------------------------------------------------------------------------------------
# The edit (``generate_then_edit`` / ``edit``) and the inversion (``_ddim_inverse``)
# ------------------------------------------------------------------------------------------------

@dataclass
class ReferenceRun:
    images: np.ndarray  # [2, H, W, 3] in [0, 1]
    latents: list = field(default_factory=list)  # [2, C, h, w] after every step (after the blend)
    masks: list = field(default_factory=list)
    normalised: list = field(default_factory=list)  # the blend's normalised map per step


def tokens(pipe, text, length, *, pad=True):
    kwargs = dict(padding="max_length") if pad else {}
    return pipe.tokenizer(text, truncation=True, max_length=length, return_tensors="pt", **kwargs).input_ids


def subject_word_inds(pipe, source_text, original_subject):
    """Fix 3: LAVIS's ``get_word_inds`` of the subject's words wherever the source prompt has them
    (LAVIS passes the subject as one word: every occurrence of it, none for several words)."""
    words = original_subject.split(" ")
    split = source_text.split(" ")
    places = [i + k for i in range(len(split) - len(words) + 1) if split[i:i + len(words)] == words
              for k in range(len(words))]
    return lavis_get_word_inds(source_text, places, pipe.tokenizer)


def reference_edit(pipe, *, prompt, reference, cond_subject, target_subject, original_subject, latents,
                   scheduler, steps, guidance, neg_prompt, cross_replace_steps, self_replace_steps,
                   threshold, real_image=False) -> ReferenceRun:
    """LAVIS's generate_then_edit (``use_inversion`` for a real image), with the fixes above."""
    cfg = pipe.text_encoder.config
    T = cfg.max_position_embeddings
    Q = pipe.qformer.config.num_query_tokens
    p = pipe.config.ctx_begin_pos
    source_text = f"a {original_subject} {prompt.strip()}"
    target_text = f"a {target_subject} {prompt.strip()}"
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(reference, image_mean=pipe.config.mean, image_std=pipe.config.std,
                                                 return_tensors="pt")["pixel_values"]
        query = pipe.get_query_embeddings(pixels, [cond_subject])
        source_emb = pipe.text_encoder(input_ids=tokens(pipe, [source_text], T), ctx_embeddings=None)[0]
        target_emb = pipe.text_encoder(input_ids=tokens(pipe, [target_text], T - Q), ctx_embeddings=query,
                                       ctx_begin_pos=[p])[0]
        uncond = pipe.text_encoder(input_ids=tokens(pipe, [neg_prompt], T), ctx_embeddings=None)[0]
    do_cfg = guidance > 1.0
    embeddings = torch.cat([uncond, uncond, source_emb, target_emb]) if do_cfg else torch.cat([source_emb, target_emb])

    # alignment on the sequences the text encoder sees (fix 1)
    x_ids = tokens(pipe, source_text, T, pad=False)[0].tolist()
    y_ids = tokens(pipe, target_text, T - Q, pad=False)[0].tolist()
    y_ids = y_ids[:p] + [PLACEHOLDER] * Q + y_ids[p:]
    mapper, alphas = lavis_get_mapper(x_ids, y_ids, T)
    mapper, alphas = mapper[None], alphas.reshape(1, 1, 1, T)

    sched = _scheduler(pipe, scheduler)
    sched.set_timesteps(steps)
    x = torch.from_numpy(latents).expand(2, *latents.shape[1:]).clone() * sched.init_noise_sigma
    model_rows = 4 if do_cfg else 2
    levels = find_levels(pipe.unet, x.repeat(model_rows // 2, 1, 1, 1), torch.tensor(int(sched.timesteps[0])),
                         embeddings, tuple(x.shape[2:]))
    blend_alpha = None
    if threshold is not None:
        blend_alpha = torch.zeros(2, 1, 1, 1, 1, T)
        blend_alpha[0, ..., subject_word_inds(pipe, source_text, original_subject)] = 1
    controller = ReferenceController(
        levels, cross_alpha=lavis_time_words_alpha(steps, cross_replace_steps, T),
        mapper=mapper, alphas=alphas, self_range=lavis_num_self_replace(steps, self_replace_steps),
        blend_alpha_layers=blend_alpha, threshold=threshold, num_layers=len(pipe.unet.attn_processors),
    )
    run = ReferenceRun(images=None)
    original = pipe.unet.attn_processors
    install(pipe.unet, controller)
    try:
        with torch.no_grad():
            for t in sched.timesteps:
                model_input = sched.scale_model_input(torch.cat([x] * (model_rows // 2)), t)
                noise = pipe.unet(model_input, t, encoder_hidden_states=embeddings).sample
                if do_cfg:
                    uncond_noise, text_noise = noise.chunk(2)
                    guided = uncond_noise + guidance * (text_noise - uncond_noise)
                    # a real image's source reconstructs: the unguided cond_src (LAVIS use_inversion)
                    noise = torch.cat([text_noise[:1], guided[1:]]) if real_image else guided
                x = sched.step(noise, t, x).prev_sample
                x = controller.blend(x)
                run.latents.append(x.numpy().copy())
                if controller.last_mask is not None:
                    run.masks.append(controller.last_mask.numpy().copy())
                    run.normalised.append(controller.last_normalised.numpy().copy())
            image = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    finally:
        pipe.unet.set_attn_processor(original)
    run.images = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return run


def reference_invert(pipe, pixels, source_text, steps):
    """diffusers' DDIMInverseScheduler loop from the posterior mean, guidance 1: (latent, per-step)."""
    from diffusers import DDIMInverseScheduler

    T = pipe.text_encoder.config.max_position_embeddings
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(steps)
    per_step = []
    with torch.no_grad():
        x = pipe.vae.encode(torch.from_numpy(pixels)).latent_dist.mean * pipe.vae.config.scaling_factor
        embeddings = pipe.text_encoder(input_ids=tokens(pipe, [source_text], T), ctx_embeddings=None)[0]
        for t in inverse.timesteps:
            noise = pipe.unet(x, t, encoder_hidden_states=embeddings).sample
            x = inverse.step(noise, t, x).prev_sample
            per_step.append(x.numpy().copy())
    return x.numpy(), per_step


def reference_unet_call(pipe, levels, *, sample, timestep, embeddings, mapper, alphas, alpha, self_on):
    """One controlled UNet call: (noise_pred, the source's blend maps averaged) as unet_p2p computes them."""
    T = embeddings.shape[1]
    controller = ReferenceController(
        levels, cross_alpha=torch.full((1, 1, 1, 1, T), float(alpha)), mapper=mapper[None],
        alphas=alphas.reshape(1, 1, 1, T), self_range=(0, 1 if self_on else 0),
        num_layers=len(pipe.unet.attn_processors),
    )
    captured = {}
    original_between = controller.between_steps

    def between_steps():
        captured.update({k: v.clone() for k, v in controller.step_store.items()})
        original_between()

    controller.between_steps = between_steps
    original = pipe.unet.attn_processors
    install(pipe.unet, controller)
    try:
        with torch.no_grad():
            noise = pipe.unet(torch.from_numpy(sample), torch.from_numpy(timestep),
                              encoder_hidden_states=torch.from_numpy(embeddings)).sample
    finally:
        pipe.unet.set_attn_processor(original)
    return noise.numpy(), controller.map_average(captured).numpy()


def _scheduler(pipe, name):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    cls = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[name]
    return cls.from_config(pipe.scheduler.config)
