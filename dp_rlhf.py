"""dp_rlhf.py: differentially private RLHF in one file.

A readable reference for Wu et al., "Privately Aligning Language Models with Reinforcement
Learning" (ICLR 2024, arXiv 2310.16960). Read it top to bottom beside the paper:

    PRIVACY ACCOUNTING        the moments (RDP) accountant, Opacus-compatible names
    DP-SGD (Algorithm 2)      Poisson sampling, per-sample gradients (torch.func), clip + noise
    MODELS                    LoRA on GPT-2's query/value, value head, reward head, loading
    DATA                      built-in synthetic tasks, Hub/local loaders, disjoint D1/D2/D3
    STAGE 1: DP SFT
    STAGE 2: DP REWARD MODEL (Eq. 1)
    STAGE 3: DPPPO (Algorithm 3, Eq. 2)
    PIPELINES                 sentiment, rlhf, the privacy ledger, evaluation
    CLI

Everything runs offline by default (a tiny built-in GPT-2 and synthetic private data):

    python dp_rlhf.py privacy --noise-multiplier 1.0 --sample-rate 0.01 --steps 1000
    python dp_rlhf.py sentiment --epsilon 4        # IMDb-style, public reward, SFT -> DPPPO
    python dp_rlhf.py rlhf --epsilon 4             # TL;DR-style, SFT -> DP reward model -> DPPPO
    python dp_rlhf.py bench                        # cost of DP-SGD against a non-private step
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap


def arg(default, help: str):
    """A config field with its one-line doc, which also becomes its --help text."""
    return field(default=default, metadata={"help": help})


class UserError(Exception):
    """A bad value from the user: the CLI prints it as one line and exits 2."""


# =============================================================================================
# PRIVACY ACCOUNTING: the moments / RDP accountant for the Poisson-subsampled Gaussian
# =============================================================================================
# Mironov, Talwar, Zhang (2019), "Renyi Differential Privacy of the Sampled Gaussian Mechanism".
# RDP of one step at order a is log(A_a) / (a - 1); steps compose by adding RDP. Names follow
# Opacus (compute_rdp, get_privacy_spent, get_noise_multiplier) so the two are interchangeable.

# Opacus's orders plus a few large ones, which only matter (and only help) at very small epsilon.
DEFAULT_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256, 512]


def _log_binom(n: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """log |binom(n, k)| for real n (lgamma gives log |Gamma| at negative non-integers)."""
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def _log_a_int(q: float, sigma: float, order: int) -> float:
    """log A_a at integer a: the exact binomial sum (Mironov et al. 2019, Sec. 3.3)."""
    i = torch.arange(order + 1, dtype=torch.float64)
    a = torch.tensor(float(order), dtype=torch.float64)
    terms = (_log_binom(a, i) + i * math.log(q) + (a - i) * math.log1p(-q)
             + (i * i - i) / (2 * sigma**2))
    return torch.logsumexp(terms, 0).item()


def _log_a_frac(q: float, sigma: float, order: float, max_terms: int = 1 << 14) -> float:
    """log A_a at fractional a: an upper bound by the series of |terms| (dp-accounting, 2024).

    The older series (still in Opacus) adds the signed terms and stops at the first small one; for
    small orders at large epsilon that can stop early and under-report. Summing absolute values
    bounds A_a from above, and we stop only when both tails are decreasing and negligible.
    """
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    n = 256
    while n <= max_terms:
        i = torch.arange(n, dtype=torch.float64)
        j = order - i
        log_coef = _log_binom(torch.tensor(order, dtype=torch.float64), i)
        s0 = (log_coef + i * math.log(q) + j * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
              + torch.special.log_ndtr((z0 - i) / sigma))
        s1 = (log_coef + j * math.log(q) + i * math.log1p(-q) + (j * j - j) / (2 * sigma**2)
              + torch.special.log_ndtr((j - z0) / sigma))
        total = torch.logaddexp(torch.logcumsumexp(s0, 0), torch.logcumsumexp(s1, 0))
        done = torch.zeros(n, dtype=torch.bool)
        done[1:] = (s0[1:] < s0[:-1]) & (s1[1:] < s1[:-1]) & (torch.maximum(s0, s1)[1:] < total[1:] - 30)
        if done.any():
            return total[int(done.nonzero()[0])].item()
        n *= 2
    return math.inf  # did not converge: report no guarantee at this order rather than a wrong one


def compute_rdp(*, q: float, noise_multiplier: float, steps: int, orders) -> np.ndarray:
    """RDP of `steps` compositions of the Poisson-subsampled Gaussian, at each order."""
    orders = np.atleast_1d(np.asarray(orders, dtype=np.float64))
    if not 0 <= q <= 1:
        raise ValueError(f"sample rate q={q} must be in [0, 1]")
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier {noise_multiplier} must be >= 0")
    if steps < 0:
        raise ValueError(f"steps={steps} must be >= 0")
    if steps == 0 or q == 0:
        return np.zeros_like(orders)
    if noise_multiplier == 0:
        return np.full_like(orders, np.inf)
    if q == 1:
        return steps * orders / (2 * noise_multiplier**2)
    rdp = [(_log_a_int(q, noise_multiplier, int(a)) if float(a).is_integer()
            else _log_a_frac(q, noise_multiplier, float(a))) / (a - 1) for a in orders]
    return steps * np.array(rdp)


def get_privacy_spent(*, orders, rdp, delta: float) -> tuple[float, float]:
    """(epsilon, best order) from RDP: the improved conversion of Balle et al. 2020, Canonne,
    Kamath, Steinke 2020: eps = rdp + log((a-1)/a) - (log(delta) + log(a)) / (a - 1)."""
    orders = np.atleast_1d(np.asarray(orders, dtype=np.float64))
    rdp = np.atleast_1d(np.asarray(rdp, dtype=np.float64))
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta} must be in (0, 1)")
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        eps = rdp + np.log1p(-1 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    eps = np.where(np.isnan(eps), np.inf, eps)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(orders[best])


def get_noise_multiplier(*, target_epsilon: float, target_delta: float, sample_rate: float,
                         steps: int, epsilon_tolerance: float = 0.01, orders=None) -> float:
    """Smallest sigma (to `epsilon_tolerance` in epsilon) whose epsilon never exceeds the target.

    Bisection keeps the invariant eps(sigma_high) <= target, and sigma_high is what we return.
    """
    orders = DEFAULT_ORDERS if orders is None else orders
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon {target_epsilon} must be > 0")
    if math.isinf(target_epsilon) or steps == 0 or sample_rate == 0:
        return 0.0

    def eps(sigma):
        rdp = compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=steps, orders=orders)
        return get_privacy_spent(orders=orders, rdp=rdp, delta=target_delta)[0]

    lo, hi = 0.0, 10.0
    eps_hi = eps(hi)
    while eps_hi > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon={target_epsilon}")
        eps_hi = eps(hi)
    while target_epsilon - eps_hi > epsilon_tolerance and hi - lo > 1e-6:
        mid = (lo + hi) / 2
        eps_mid = eps(mid)
        if eps_mid <= target_epsilon:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return hi


class MomentsAccountant:
    """Tracks (noise_multiplier, sample_rate, num_steps) runs; epsilon from their summed RDP.

    The history is run-length encoded, so `get_epsilon` costs one `compute_rdp` per distinct
    (sigma, q) pair, whatever the number of steps.
    """

    mechanism = "rdp"

    def __init__(self):
        self.history: list[list] = []  # [[noise_multiplier, sample_rate, num_steps], ...]

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1):
        if self.history and self.history[-1][:2] == [noise_multiplier, sample_rate]:
            self.history[-1][2] += num_steps
        else:
            self.history.append([noise_multiplier, sample_rate, num_steps])

    def get_rdp(self, orders=None) -> np.ndarray:
        orders = DEFAULT_ORDERS if orders is None else orders
        total = np.zeros(len(orders))
        for sigma, q, steps in self.history:
            total = total + compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
        return total

    def get_privacy_spent(self, *, delta: float, orders=None) -> tuple[float, float]:
        orders = DEFAULT_ORDERS if orders is None else orders
        return get_privacy_spent(orders=orders, rdp=self.get_rdp(orders), delta=delta)

    def get_epsilon(self, delta: float, orders=None) -> float:
        return self.get_privacy_spent(delta=delta, orders=orders)[0]

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict):
        self.history = [list(h) for h in state["history"]]


# =============================================================================================
# DP-SGD (Algorithm 2): Poisson sampling, per-sample gradients, clipping, noise
# =============================================================================================


def poisson_sample(num_examples: int, sample_rate: float, generator=None) -> torch.Tensor:
    """Indices of a Poisson sample: each example independently with probability q.

    The accountant assumes exactly this; an empty batch is a normal outcome, not an error.
    """
    keep = torch.rand(num_examples, generator=generator) < sample_rate
    return keep.nonzero().flatten()


def per_sample_grads(loss_fn, params: dict, *batch, chunk_size: int | None = None,
                     has_aux: bool = False):
    """{name: Tensor[B, *param.shape]}: the gradient of `loss_fn(params, *sample)` for each sample.

    `loss_fn` sees one sample (tensors without their batch dimension), so nothing it computes can
    mix samples: vmap over grad over functional_call gives every sample its own backward pass,
    batched. `chunk_size` bounds memory by vectorising that many samples at a time. With
    `has_aux`, loss_fn returns (loss, aux) and we return (grads, per-sample aux).
    """
    return vmap(grad(loss_fn, has_aux=has_aux), in_dims=(None,) + (0,) * len(batch),
                chunk_size=chunk_size)(params, *batch)


def privatize(grads: dict, *, max_grad_norm: float, noise_multiplier: float,
              expected_batch_size: float, generator=None) -> dict:
    """Algorithm 2's noisy gradient: (sum_i clip(g_i) + N(0, sigma^2 C^2 I)) / (q N).

    g_i is clipped on its flat norm over *all* parameters, by min(1, C / (||g_i|| + 1e-6)).
    Dividing by the realised batch size would leak it (Opacus #571): we divide by the expected one.
    `max_grad_norm=inf, noise_multiplier=0` is the non-private step (plain sum, same divisor).
    """
    first = next(iter(grads.values()))
    flat_norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
    clip = (max_grad_norm / (flat_norms + 1e-6)).clamp(max=1.0) if math.isfinite(max_grad_norm) \
        else torch.ones_like(flat_norms)
    out = {}
    for name, g in grads.items():
        summed = torch.einsum("b,b...->...", clip.to(g.dtype), g) if g.shape[0] else g.new_zeros(g.shape[1:])
        if noise_multiplier > 0:
            noise = torch.randn(g.shape[1:], generator=generator, dtype=g.dtype,
                                device=generator.device if generator is not None else first.device)
            summed = summed + noise.to(g.device) * (noise_multiplier * max_grad_norm)
        out[name] = summed / expected_batch_size
    return out


def dp_step(loss_fn, params: dict, batch: tuple, optimizer, *, max_grad_norm: float,
            noise_multiplier: float, expected_batch_size: float, chunk_size=None, generator=None,
            has_aux: bool = False):
    """One DP-SGD update: per-sample grads -> privatize -> .grad -> AdamW. Returns the
    per-sample aux outputs of `loss_fn` (with has_aux), for logging."""
    aux = None
    if batch[0].shape[0] > 0:
        grads = per_sample_grads(loss_fn, {k: p.detach() for k, p in params.items()}, *batch,
                                 chunk_size=chunk_size, has_aux=has_aux)
        if has_aux:
            grads, aux = grads
    else:
        grads = {k: p.new_zeros((0,) + p.shape) for k, p in params.items()}
    noisy = privatize(grads, max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                      expected_batch_size=expected_batch_size, generator=generator)
    for name, p in params.items():
        p.grad = noisy[name].to(p.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return aux


# =============================================================================================
# MODELS: LoRA on GPT-2's query and value, a vmap-safe forward, value and reward heads
# =============================================================================================


class LoRAQueryValue(nn.Module):
    """GPT-2's fused `c_attn` (x -> [q | k | v]) plus rank-r updates on q and v; k untouched.

    B starts at zero, so the model is exactly the base model at init (Hu et al. 2021).
    `enabled = False` switches LoRA off: that is DPPPO's reference model for free.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__()
        d_in, d_out3 = base.weight.shape  # HF Conv1D stores (in, out)
        self.base, self.d = base, d_out3 // 3
        self.scaling, self.enabled = alpha / rank, True
        self.dropout = nn.Dropout(dropout)
        self.lora_A_q = nn.Parameter(torch.empty(d_in, rank))
        self.lora_B_q = nn.Parameter(torch.zeros(rank, self.d))
        self.lora_A_v = nn.Parameter(torch.empty(d_in, rank))
        self.lora_B_v = nn.Parameter(torch.zeros(rank, self.d))
        for a in (self.lora_A_q, self.lora_A_v):
            nn.init.kaiming_uniform_(a.T, a=math.sqrt(5))

    def forward(self, x):
        out = self.base(x)
        if not self.enabled:
            return out
        q, k, v = out.split(self.d, dim=-1)
        x = self.dropout(x)
        q = q + (x @ self.lora_A_q) @ self.lora_B_q * self.scaling
        v = v + (x @ self.lora_A_v) @ self.lora_B_v * self.scaling
        return torch.cat([q, k, v], dim=-1)

    def merged_base(self) -> nn.Module:
        """The base Conv1D with the low-rank updates folded into its weight."""
        with torch.no_grad():
            w = self.base.weight
            w[:, :self.d] += (self.lora_A_q @ self.lora_B_q * self.scaling).to(w.dtype)
            w[:, 2 * self.d:] += (self.lora_A_v @ self.lora_B_v * self.scaling).to(w.dtype)
        return self.base


def _attn_blocks(model: nn.Module):
    blocks = [m for m in model.modules() if hasattr(m, "c_attn")]
    if not blocks:
        raise UserError(f"model {type(model).__name__} has no GPT-2 attention (c_attn); "
                        "only GPT-2-architecture checkpoints are supported")
    return blocks


def add_lora(model: nn.Module, *, rank: int = 4, alpha: float = 32, dropout: float = 0.0) -> nn.Module:
    """Freeze `model` and add LoRA to every GPT-2 attention's query and value (the paper's choice).
    Afterwards exactly the LoRA parameters require grad."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in _attn_blocks(model):
        lora = LoRAQueryValue(block.c_attn, rank, alpha, dropout)
        block.c_attn = lora.to(device=block.c_attn.weight.device)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA into its base weight and remove it: a plain GPT-2 again."""
    for block in _attn_blocks(model):
        if isinstance(block.c_attn, LoRAQueryValue):
            block.c_attn = block.c_attn.merged_base()
    return model


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model: inside DPPPO this is the frozen SFT reference."""
    loras = [m for m in model.modules() if isinstance(m, LoRAQueryValue)]
    for m in loras:
        m.enabled = False
    try:
        yield model
    finally:
        for m in loras:
            m.enabled = True


def lora_parameters(model: nn.Module) -> dict:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def additive_mask(attention_mask: torch.Tensor, query_len: int, dtype) -> torch.Tensor:
    """[B, 1, query_len, T] additive attention mask for the last `query_len` columns as queries:
    a query sees earlier-or-same keys that are real tokens (causal AND key not padding), and
    always itself, so that no row is all -inf (a padding query's output never reaches a loss)."""
    t = attention_mask.shape[-1]
    k_pos = torch.arange(t, device=attention_mask.device)
    q_pos = k_pos[t - query_len:, None]
    allowed = ((k_pos <= q_pos) & attention_mask.bool()[:, None, None, :]) | (k_pos == q_pos)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def hidden_states(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states of a GPT-2 LM, exact under any padding and safe under vmap.

    transformers builds its attention mask from a 2-D padding mask with data-dependent control
    flow, which vmap cannot trace; we pass the finished 4-D additive mask instead (transformers
    uses a 4-D mask as it is) and explicit positions.
    """
    out = lm.transformer(input_ids=input_ids, position_ids=positions_of(attention_mask),
                         attention_mask=additive_mask(attention_mask, input_ids.shape[-1], lm.lm_head.weight.dtype))
    return out.last_hidden_state


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t = 1..T-1; shape [B, T-1]."""
    logits = logits[:, :-1].float()
    return logits.gather(-1, input_ids[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)


class CausalLM(nn.Module):
    """logits = LM(ids, mask) through the vmap-safe forward: what functional_call runs in SFT."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask):
        return self.lm.lm_head(hidden_states(self.lm, input_ids, attention_mask))


class ActorCritic(nn.Module):
    """DPPPO's policy: the LM (with LoRA) plus a scalar value head on its last hidden state."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask):
        h = hidden_states(self.lm, input_ids, attention_mask)
        return self.lm.lm_head(h), self.value_head(h).squeeze(-1)


class RewardModel(nn.Module):
    """r(x, y): the LM's transformer plus a bias-free scalar head on the last real token, i.e.
    exactly GPT2ForSequenceClassification with one label (so it saves and loads as one)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.score = nn.Linear(lm.config.n_embd, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1 / math.sqrt(lm.config.n_embd + 1))

    def forward(self, input_ids, attention_mask):
        h = hidden_states(self.lm, input_ids, attention_mask)
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        last = (positions * attention_mask.long()).argmax(-1)  # vmap-safe "last real token"
        return self.score(h[torch.arange(h.shape[0], device=h.device), last]).squeeze(-1)


# =============================================================================================
# DATA: built-in synthetic tasks (offline), Hub/local loaders, disjoint D1/D2/D3 splits
# =============================================================================================
# The built-in tasks stand in for IMDb and Reddit TL;DR. Everything is generated from a seed, so
# a run is reproducible; the public pre-training corpus uses its own seed and is filtered against
# the private texts, so "public" really is disjoint from "private".

NOUNS = ("film movie story plot acting cast director script soundtrack ending dialogue "
         "cinematography characters pacing visuals performances music humor effects").split()
POSITIVE = ("great wonderful brilliant moving beautiful superb charming delightful fantastic "
            "gripping hilarious memorable stunning excellent touching clever good fun lovely").split()
NEGATIVE = ("boring awful terrible dull bad weak clumsy predictable tedious poor messy "
            "forgettable painful horrible bland silly lazy ugly cheap").split()
NEUTRAL = "long quiet slow strange simple old dark loud familiar short serious odd".split()
POS_VERBS, NEG_VERBS = "loved enjoyed liked adored".split(), "hated disliked regretted loathed".split()
INTENSIFIERS = "really very truly quite so pretty incredibly".split()
NEGATIONS = ("not", "never", "hardly", "n't")
GENRES = ("drama comedy thriller western romance documentary musical mystery cartoon sequel "
          "remake").split()
TOPICS = ["a family", "a small town", "two brothers", "a lost dog", "a war", "a detective",
          "first love", "a heist", "a haunted house", "a long journey", "a robot", "an old sailor",
          "a band", "a school", "a wedding", "a storm", "a king", "a farmer", "a spy", "a chef"]
ACTORS = ("smith jones garcia chen patel novak rossi kim silva murphy okafor tanaka berg "
          "dubois moreau lopez khan ward").split()


def _review(rng: np.random.Generator, sentiment: str) -> str:
    """One synthetic movie review; `sentiment` in positive / negative / mixed / neutral."""
    def adj(pol):
        return rng.choice({1: POSITIVE, -1: NEGATIVE, 0: NEUTRAL}[pol])

    def polarity():
        if sentiment == "mixed":
            return int(rng.choice([1, -1]))
        if sentiment == "neutral":
            return int(rng.choice([0, 0, 1, -1]))
        base = 1 if sentiment == "positive" else -1
        return base if rng.random() < 0.85 else -base

    def sentence():
        pol, noun, kind = polarity(), rng.choice(NOUNS), rng.integers(9)
        intens = (rng.choice(INTENSIFIERS) + " ") if rng.random() < 0.4 else ""
        if kind == 0:
            return f"the {noun} was {intens}{adj(pol)} ."
        if kind == 1 and pol != 0:  # negation: "not bad" is mildly positive, "not great" negative
            return f"the {noun} was {rng.choice(['not', 'never'])} {adj(-pol)} ."
        if kind == 2 and pol != 0:
            return f"i {rng.choice(POS_VERBS if pol > 0 else NEG_VERBS)} the {noun} ."
        if kind == 3:
            return f"{rng.choice(ACTORS)} gives a {intens}{adj(pol)} performance ."
        if kind == 4:
            return f"it is a {adj(pol)} {rng.choice(GENRES)} about {rng.choice(TOPICS)} ."
        if kind == 5 and pol != 0:
            return f"i would {'' if pol > 0 else 'not '}recommend it to anyone ."
        if kind == 6:
            return f"but the {noun} felt {intens}{adj(pol)} ."
        if kind == 7:
            return f"watching it was a {adj(pol)} experience ."
        return f"the {noun} of this {rng.choice(GENRES)} is {intens}{adj(pol)} ."

    return " ".join(sentence() for _ in range(rng.integers(3, 7)))


def make_reviews(n: int, seed: int) -> list[dict]:
    """Balanced synthetic reviews: 40 % positive, 40 % negative, 10 % mixed, 10 % neutral."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(["positive", "negative", "mixed", "neutral"], size=n, p=[0.4, 0.4, 0.1, 0.1])
    return [{"text": _review(rng, k), "label": str(k)} for k in kinds]


def sentiment_score(text: str) -> float:
    """The built-in *public* reward: a transparent lexicon sentiment scorer that handles negation
    and intensifiers, returning a logit-like score in (-4, 4). It knows no private data."""
    words = text.lower().replace("n't", " n't").split()
    total = 0.0
    for t, w in enumerate(words):
        pol = 1.0 if w in POSITIVE or w in POS_VERBS else -1.0 if w in NEGATIVE or w in NEG_VERBS else 0.0
        if pol == 0:
            continue
        window = words[max(0, t - 3):t]
        if any(x in NEGATIONS for x in window):
            pol *= -0.5  # "not bad" is weakly positive, "not great" weakly negative
        if any(x in INTENSIFIERS for x in window):
            pol *= 1.5
        total += pol
    return 4.0 * math.tanh(total / 4.0)


PEOPLE = ("sister brother boyfriend girlfriend roommate boss mom dad friend coworker neighbor "
          "cousin husband wife teacher landlord").split()
EVENTS = ["forgot my birthday", "borrowed my car", "moved to another city", "quit their job",
          "lied to me", "read my diary", "broke my phone", "ignored my messages", "got a new dog",
          "cancelled our trip", "took my money", "started a band", "failed the exam",
          "won the lottery", "crashed my bike", "sold the house"]
FEELINGS = ("angry sad anxious confused happy guilty lonely hurt nervous relieved jealous "
            "embarrassed").split()
TIMES = ["yesterday", "last week", "last night", "this morning", "last month", "on friday"]
FILLER = ["we have known each other for years .", "it was raining all day .",
          "i did not sleep much after that .", "i work long hours these days .",
          "this is my first post here .", "sorry for the long post .", "we live in a small town .",
          "my family thinks i am overreacting .", "things were fine until then .",
          "i tried to talk about it over dinner ."]


def _post(rng: np.random.Generator) -> dict:
    """One synthetic Reddit-style post with its three key facts (who, what, how I feel)."""
    person, event, feeling = rng.choice(PEOPLE), rng.choice(EVENTS), rng.choice(FEELINGS)
    filler = list(rng.choice(FILLER, size=rng.integers(1, 4), replace=False))
    facts = [f"{rng.choice(TIMES)} my {person} {event} .",
             f"now i feel {feeling} and do not know what to do ."]
    body = [f"i ( {rng.integers(18, 60)} ) need some advice ."] + filler[:1] + facts[:1] + filler[1:] + facts[1:]
    if rng.random() < 0.5:
        body.append(rng.choice(["should i talk to them ?", "what would you do ?", "am i wrong ?"]))
    return {"post": " ".join(body), "person": str(person), "event": str(event), "feeling": str(feeling)}


def _summary(rng: np.random.Generator, post: dict, style: str) -> str:
    """A candidate summary. `reference`: what a hurried human writes (often chatty, sometimes
    missing the feeling); `candidate`: anything from terse to wrong, for comparisons."""
    person, event, feeling = post["person"], post["event"], post["feeling"]
    if style == "candidate":
        if rng.random() < 0.25:
            person = rng.choice(PEOPLE)  # an invented fact
        if rng.random() < 0.25:
            feeling = rng.choice(FEELINGS)
    parts = []
    if rng.random() < (0.6 if style == "reference" else 0.4):
        parts.append(str(rng.choice(["so basically", "long story short ,", "ok so", "well"])))
    parts.append(f"my {person} {event}" if rng.random() < 0.85 else f"my {person} did something")
    if rng.random() < (0.55 if style == "reference" else 0.6):
        parts.append(f"and i feel {feeling}")
    if rng.random() < (0.5 if style == "reference" else 0.4):
        parts.append(str(rng.choice(["and we have known each other for years", "and it was raining",
                                     "and my family thinks i am overreacting"])))
    if rng.random() < 0.4:
        parts.append(str(rng.choice(["what should i do ?", "am i wrong ?", "help ."])))
    return " ".join(parts) + ("" if parts[-1].endswith(("?", ".")) else " .")


def true_preference(post: dict, summary: str) -> float:
    """The hidden preference of the built-in RLHF task: +1 for each key fact stated (who, what,
    how they feel), -1 for each invented person or feeling, -0.15 per word past ten. It labels
    D2 (with Bradley-Terry noise) and scores evaluations; it never trains anything."""
    words = summary.split()
    post_words = set(post["post"].split())
    score = float(post["person"] in words) + float(post["event"] in summary) + float(post["feeling"] in words)
    score -= sum(1.0 for w in words if w in PEOPLE + FEELINGS and w not in post_words)
    return score - 0.15 * max(0, len(words) - 10)


TLDR_PROMPT = "post : {post} tl;dr :"


def make_tldr(n_sft: int, n_comparisons: int, n_ppo: int, n_test: int, seed: int) -> dict:
    """Disjoint D1 (post + reference summary), D2 (post, chosen, rejected), D3 (posts), test."""
    rng = np.random.default_rng(seed)
    posts = [_post(rng) for _ in range(n_sft + n_comparisons + n_ppo + n_test)]
    d1, d2, d3, test = np.split(np.arange(len(posts)), np.cumsum([n_sft, n_comparisons, n_ppo]))
    out = {"sft": [], "comparisons": [], "ppo": [], "test": []}
    for i in d1:
        p = posts[i]
        out["sft"].append({"prompt": TLDR_PROMPT.format(post=p["post"]), "completion": " " + _summary(rng, p, "reference"), "meta": p})
    for i in d2:
        p = posts[i]
        y0, y1 = _summary(rng, p, "candidate"), _summary(rng, p, "candidate")
        p1 = 1 / (1 + math.exp(-2.0 * (true_preference(p, y1) - true_preference(p, y0))))  # Bradley-Terry
        chosen, rejected = (y1, y0) if rng.random() < p1 else (y0, y1)
        out["comparisons"].append({"prompt": TLDR_PROMPT.format(post=p["post"]), "chosen": " " + chosen, "rejected": " " + rejected, "meta": p})
    for split, idx in (("ppo", d3), ("test", test)):
        for i in idx:
            p = posts[i]
            out[split].append({"prompt": TLDR_PROMPT.format(post=p["post"]), "completion": " " + _summary(rng, p, "reference"), "meta": p})
    return out


@dataclass
class BaseModelArgs:
    """The built-in "public pre-trained" GPT-2: trained here, non-privately, on public text."""
    n_layer: int = arg(3, "transformer blocks")
    n_embd: int = arg(96, "hidden size")
    n_head: int = arg(4, "attention heads")
    vocab_size: int = arg(1024, "byte-level BPE vocabulary trained on the public corpus")
    corpus_size: int = arg(12000, "public documents per domain (reviews, posts), generated from `seed`")
    steps: int = arg(400, "pre-training steps")
    batch_size: int = arg(32, "pre-training sequences per step")
    seq_len: int = arg(128, "pre-training window")
    lr: float = arg(3e-3, "AdamW learning rate (cosine decay)")
    seed: int = arg(1234, "seed of the public corpus and of the initial weights; private data never uses it")


def public_corpus(args: BaseModelArgs) -> list[str]:
    """Public text from its own seed (the stand-in for web pre-training): reviews, and posts of
    which half carry a "tl;dr" of web quality (terse or chatty, sometimes wrong), as GPT-2 saw
    "TL;DR:" on the web. SFT then learns the private reference style; RLHF, what people prefer."""
    rng = np.random.default_rng(args.seed)
    reviews = [r["text"] for r in make_reviews(args.corpus_size, seed=args.seed + 1)]
    posts = []
    for _ in range(args.corpus_size):
        p = _post(rng)
        with_tldr = rng.random() < 0.5
        posts.append(TLDR_PROMPT.format(post=p["post"]) + " " + _summary(rng, p, "candidate") if with_tldr else p["post"])
    return reviews + posts


def cache_dir() -> str:
    return os.environ.get("DP_RLHF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dp_rlhf")


def _atomic_dir(final: str):
    """A temporary sibling directory, renamed to `final` only if the block succeeds."""
    import shutil
    import tempfile

    @contextlib.contextmanager
    def ctx():
        os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(final) or ".")
        try:
            yield tmp
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return ctx()


def builtin_base_model(args: BaseModelArgs = BaseModelArgs(), device: str = "cpu") -> str:
    """Path of the built-in base model, pre-training it on the public corpus once (cached)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tqdm.auto import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    key = "-".join(f"{v}" for v in dataclasses.astuple(args))
    path = os.path.join(cache_dir(), f"builtin-v2-{key}")
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    t0 = time.time()
    corpus = public_corpus(args)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=args.vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    eos = tokenizer.eos_token_id
    stream = torch.tensor([t for ids in tokenizer(corpus)["input_ids"] for t in [eos] + ids])
    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=args.n_embd,
                        n_layer=args.n_layer, n_head=args.n_head, bos_token_id=eos,
                        eos_token_id=eos, pad_token_id=eos, attn_implementation="eager")
    model = GPT2LMHeadModel(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    bar = tqdm(range(args.steps), desc="pre-training the built-in base model (public data, once)",
               disable=None, leave=False)
    for step in bar:
        starts = torch.randint(0, len(stream) - args.seq_len - 1, (args.batch_size,), generator=gen)
        x = torch.stack([stream[s:s + args.seq_len] for s in starts.tolist()]).to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    print(f"built-in base model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"final loss {loss.item():.3f}, {time.time() - t0:.0f}s -> {path}", file=sys.stderr)
    with _atomic_dir(path) as tmp:
        model.eval().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return path


def _is_local(spec: str) -> bool:
    return os.path.exists(spec) or spec.startswith((".", "/", "~"))


def _hub_guard(spec: str):
    """Fail in one line, at once, when `spec` needs the Hugging Face Hub and it is unreachable
    (transformers would otherwise retry for half a minute and print a wall of tracebacks)."""
    import socket
    if _is_local(spec) or os.environ.get("HF_HUB_OFFLINE") == "1":
        return
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        # Still allow what is already in the local Hugging Face cache.
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"


def _hub_error(spec: str, what: str, offline_hint: str, err: Exception) -> UserError:
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not _is_local(spec):
        return UserError(f"cannot load {what} '{spec}': the Hugging Face Hub is unreachable and it is "
                         f"not in the local cache; use {offline_hint}")
    return UserError(f"cannot load {what} '{spec}': {str(err).splitlines()[0][:300]}")


def load_lm(spec: str, device: str, base: BaseModelArgs = BaseModelArgs()):
    """(GPT-2 LM, tokenizer) from 'builtin', a Hub id (gpt2, gpt2-medium, ...) or a local dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = builtin_base_model(base, device) if spec == "builtin" else os.path.expanduser(spec)
    hint = "--model builtin or a local directory saved with save_pretrained"
    _hub_guard(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        lm = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise _hub_error(path, "model", hint, e) from None
    _attn_blocks(lm)  # GPT-2 architecture check, one line if not
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm.to(device).eval(), tokenizer


def load_records(spec: str, columns: tuple[str, ...], split: str = "train") -> list[dict]:
    """Rows with `columns` from a Hub dataset id or a local .jsonl/.json/.csv/.parquet file."""
    import datasets
    datasets.disable_progress_bars()
    hint = "--dataset builtin or a local .jsonl/.csv/.parquet file"
    ext = os.path.splitext(spec)[1].lower()
    if _is_local(spec) and not os.path.exists(os.path.expanduser(spec)):
        raise UserError(f"dataset file '{spec}' does not exist")
    _hub_guard(spec)
    try:
        if _is_local(spec):
            kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(ext)
            if kind is None:
                raise UserError(f"dataset file '{spec}' has extension '{ext}'; allowed: .jsonl .json .csv .parquet")
            ds = datasets.load_dataset(kind, data_files=os.path.expanduser(spec), split="train")
        else:
            ds = datasets.load_dataset(spec, split=split)
    except (OSError, ValueError, ConnectionError, FileNotFoundError) as e:
        raise _hub_error(spec, "dataset", hint, e) from None
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise UserError(f"dataset '{spec}' lacks column(s) {missing}; it has {ds.column_names}")
    return [{c: row[c] for c in columns} for row in ds]


def encode(tokenizer, prompts: list[str], completions: list[str] | None = None, *,
           max_prompt: int, max_completion: int = 0):
    """Left-padded (input_ids, attention_mask, loss_mask), each [N, T].

    A row is [bos] + prompt (its last `max_prompt` tokens) + completion + [eos]; `loss_mask`
    marks the targets of ids[:, 1:] that are completion tokens or that final eos. Left padding
    puts every prompt's end at the same column, which generation and reward reading rely on.
    """
    bos, eos = tokenizer.bos_token_id or tokenizer.eos_token_id, tokenizer.eos_token_id
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"] if completions else None
    rows, targets = [], []
    for i, p in enumerate(p_ids):
        prompt = [bos] + p[-max_prompt:] if max_prompt else [bos]
        completion = (c_ids[i][:max_completion] + [eos]) if c_ids is not None else []
        rows.append(prompt + completion)
        targets.append([0] * (len(prompt) - 1) + [1] * len(completion))
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), t - 1), dtype=torch.float32)
    for i, (r, tg) in enumerate(zip(rows, targets)):
        ids[i, t - len(r):], mask[i, t - len(r):] = torch.tensor(r), 1
        loss_mask[i, t - len(r):] = torch.tensor(tg, dtype=torch.float32)
    return ids, mask, loss_mask


def trim_left(*tensors, mask):
    """Drop the columns that are padding in every sequence of this batch (exact: padding is
    masked). Works for [N, T] and [N, 2, T] (comparison pairs) alike."""
    if mask.shape[0] == 0:
        return tensors
    first = int(mask.flatten(0, -2).any(0).float().argmax())
    return tuple(t[..., first:] for t in tensors)  # loss_mask[..., j] targets ids[..., j + 1]: same shift


# =============================================================================================
# STAGE 1: DP SFT: LoRA fine-tuning on D1 with DP-SGD
# =============================================================================================


@dataclass
class SFTArgs:
    """Stage 1 (DP SFT) hyper-parameters."""
    epochs: float = arg(3.0, "passes over D1 in expectation; steps = epochs / q")
    steps: int | None = arg(None, "override the number of steps (epsilon is accounted for the steps run)")
    batch_size: int = arg(64, "expected batch size q * |D1| (the paper: 512)")
    lr: float = arg(3e-3, "AdamW learning rate (the paper: 3e-4 at batch 512, 40 epochs)")
    max_grad_norm: float = arg(1.0, "per-sample clipping norm C")
    max_prompt: int = arg(96, "prompt tokens kept (the end of the prompt)")
    max_completion: int = arg(48, "completion tokens kept")
    chunk_size: int | None = arg(None, "vectorise this many samples at a time in per-sample gradients (bounds memory)")


def sft_loss(causal_lm: nn.Module):
    """loss_fn(params, ids, mask, loss_mask) for one sample: mean NLL over its loss tokens."""
    def loss_fn(params, ids, mask, loss_mask):
        logits = functional_call(causal_lm, params, (ids[None], mask[None]))
        lp = token_logprobs(logits, ids[None])[0]
        return -(lp * loss_mask).sum() / loss_mask.sum().clamp(min=1)
    return loss_fn


def trainable(module: nn.Module) -> dict:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def dp_train(module: nn.Module, loss_fn, data: tuple, *, epsilon, delta, args, device, generator,
             log=None, stage: str, aux_name: str | None = None) -> dict:
    """Algorithm 2 as a training loop, shared by stages 1 and 2. `data` holds tensors whose first
    dimension is the private example and data[1] is the attention mask. sigma is calibrated for
    (epsilon, delta) over the planned steps; each step Poisson-samples, clips, noises and takes an
    AdamW step, and advances the accountant. epsilon=inf: the same loop, no clipping, no noise."""
    from tqdm.auto import tqdm
    n = data[0].shape[0]
    q = min(1.0, args.batch_size / n)
    steps = args.steps if args.steps is not None else math.ceil(args.epochs / q)
    private = math.isfinite(epsilon)
    sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q,
                                 steps=steps) if private else 0.0
    params = trainable(module)
    opt = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=0.01)
    accountant = MomentsAccountant()
    bar = tqdm(range(steps), desc=f"{stage} (eps={epsilon:g}, sigma={sigma:.3f})", disable=None, leave=False)
    for step in bar:
        idx = poisson_sample(n, q, generator)
        batch = trim_left(*(t[idx] for t in data), mask=data[1][idx])
        aux = dp_step(loss_fn, params, tuple(t.to(device) for t in batch), opt,
                      max_grad_norm=args.max_grad_norm if private else math.inf, noise_multiplier=sigma,
                      expected_batch_size=q * n, chunk_size=args.chunk_size, generator=generator,
                      has_aux=aux_name is not None)
        if private:
            accountant.step(noise_multiplier=sigma, sample_rate=q)
        if log is not None and (step % 20 == 0 or step == steps - 1):
            row = {f"{stage}/step": step, f"{stage}/batch_size": len(idx),
                   "privacy/epsilon": accountant.get_epsilon(delta) if private else math.inf}
            if aux_name is not None:
                row[f"{stage}/{aux_name}"] = aux.mean().item() if aux is not None else float("nan")
            log(row)
    return ledger_entry(accountant, epsilon, delta, sigma, q, steps, n)


def dp_sft(lm, tokenizer, prompts, completions, *, epsilon, delta, args: SFTArgs, device,
           generator, log=None) -> dict:
    """Stage 1. Fine-tune LoRA on (prompt, completion) pairs with DP-SGD (Algorithm 2), the loss
    on the completion only. Returns the ledger entry."""
    model = CausalLM(lm)
    data = encode(tokenizer, prompts, completions, max_prompt=args.max_prompt,
                  max_completion=args.max_completion)
    return dp_train(model, sft_loss(model), data, epsilon=epsilon, delta=delta, args=args, device=device,
                    generator=generator, log=log, stage="sft")


def ledger_entry(accountant, epsilon, delta, sigma, q, steps, n) -> dict:
    """One stage's line of the privacy ledger; epsilon is what was *spent* (<= the target)."""
    spent = accountant.get_epsilon(delta) if math.isfinite(epsilon) else math.inf
    return {"epsilon": spent, "delta": delta, "noise_multiplier": sigma, "sample_rate": q,
            "steps": steps, "num_private_examples": n}


# =============================================================================================
# STAGE 2: DP REWARD MODEL (Eq. 1): Bradley-Terry on D2's comparisons, with DP-SGD
# =============================================================================================


@dataclass
class RMArgs:
    """Stage 2 (DP reward model) hyper-parameters."""
    epochs: float = arg(2.0, "passes over D2 in expectation; steps = epochs / q")
    steps: int | None = arg(None, "override the number of steps (epsilon is accounted for the steps run)")
    batch_size: int = arg(64, "expected batch size q * |D2| in comparisons (the paper: 4096)")
    lr: float = arg(3e-3, "AdamW learning rate (the paper: 2e-4 at batch 4096, 50 epochs)")
    max_grad_norm: float = arg(1.0, "per-comparison clipping norm C (LoRA and head together)")
    max_prompt: int = arg(96, "prompt tokens kept (the end of the prompt)")
    max_completion: int = arg(48, "summary tokens kept")
    chunk_size: int | None = arg(None, "vectorise this many comparisons at a time in per-sample gradients")


def encode_comparisons(tokenizer, prompts, chosen, rejected, *, max_prompt, max_completion):
    """(ids, mask) of shape [N, 2, T]: chosen and rejected of one comparison side by side,
    padded to one length so that the pair is one sample."""
    ids, mask, _ = encode(tokenizer, list(prompts) * 2, list(chosen) + list(rejected),
                          max_prompt=max_prompt, max_completion=max_completion)
    n = len(prompts)
    return torch.stack([ids[:n], ids[n:]], 1), torch.stack([mask[:n], mask[n:]], 1)


def reward_loss(rm: nn.Module):
    """loss_fn for one comparison, Eq. 1: -log sigma(r(x, y_chosen) - r(x, y_rejected)). Both
    forward passes are inside one sample, so one comparison is one per-sample gradient."""
    def loss_fn(params, ids, mask):
        r = functional_call(rm, params, (ids, mask))
        return -nn.functional.logsigmoid(r[0] - r[1]), (r[0] > r[1]).float().detach()
    return loss_fn


def dp_reward_model(rm: RewardModel, tokenizer, prompts, chosen, rejected, *, epsilon, delta,
                    args: RMArgs, device, generator, log=None) -> dict:
    """Stage 2. Train LoRA + the scalar head on comparisons with DP-SGD. Returns the ledger entry."""
    data = encode_comparisons(tokenizer, prompts, chosen, rejected, max_prompt=args.max_prompt,
                              max_completion=args.max_completion)
    return dp_train(rm, reward_loss(rm), data, epsilon=epsilon, delta=delta, args=args, device=device,
                    generator=generator, log=log, stage="rm", aux_name="accuracy")


@torch.no_grad()
def reward_model_scores(rm: RewardModel, tokenizer, prompts, completions, *, max_prompt, max_completion,
                        device, batch: int = 128) -> torch.Tensor:
    """r(x, y) for each pair, encoded exactly as in training."""
    out = []
    for s in range(0, len(prompts), batch):
        ids, mask, _ = encode(tokenizer, prompts[s:s + batch], completions[s:s + batch],
                              max_prompt=max_prompt, max_completion=max_completion)
        out.append(rm(ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def save_reward_model(rm: RewardModel, tokenizer, path: str):
    """Save as GPT2ForSequenceClassification (one label): the same transformer and bias-free head,
    reading the last non-padding token; loads with AutoModelForSequenceClassification."""
    import copy
    from transformers import GPT2ForSequenceClassification
    lm = merge_lora(copy.deepcopy(rm.lm))
    config = copy.deepcopy(lm.config)
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    clf = GPT2ForSequenceClassification(config)
    clf.transformer.load_state_dict(lm.transformer.state_dict())
    clf.score.weight.data.copy_(rm.score.weight.data)
    save_model(clf, tokenizer, path)


# =============================================================================================
# STAGE 3: DPPPO (Algorithm 3, Eq. 2)
# =============================================================================================


@torch.no_grad()
def sample(model: nn.Module, ids, mask, *, max_new_tokens, generator, eos_id=None):
    """Pure ancestral sampling (no top-k/top-p/min-length, so KL estimates are valid) from
    `model.lm` with a key/value cache. `max_new_tokens` is an int or a per-row LongTensor; a row
    also stops after `eos_id`. Returns (ids, mask, response_mask, sampled_logprobs) with the
    responses right-padded after the (left-padded) prompts."""
    import inspect
    lm, b = model.lm, ids.shape[0]
    limit = torch.as_tensor(max_new_tokens, device=ids.device).expand(b)
    steps = int(limit.max()) if b else 0
    alive = torch.ones(b, dtype=torch.bool, device=ids.device)
    resp, logprobs = torch.zeros_like(ids), torch.zeros(b, steps, device=ids.device)
    # transformers 5.x renamed the cache argument `past_key_values` -> `cache`
    cache_arg = ("cache" if "cache" in inspect.signature(inspect.unwrap(type(lm.transformer).forward)).parameters
                 else "past_key_values")
    new, cache = ids, None
    for t in range(steps):
        out = lm.transformer(input_ids=new, position_ids=positions_of(mask)[:, -new.shape[1]:], use_cache=True,
                             attention_mask=additive_mask(mask, new.shape[1], lm.lm_head.weight.dtype),
                             **{cache_arg: cache})
        cache = out.get("cache", out.get("past_key_values"))
        logp = lm.lm_head(out.last_hidden_state[:, -1]).float().log_softmax(-1)
        nxt = torch.multinomial(logp.exp().cpu(), 1, generator=generator).squeeze(1).to(ids.device)
        alive = alive & (t < limit)
        logprobs[:, t] = logp.gather(1, nxt[:, None]).squeeze(1) * alive
        new = torch.where(alive, nxt, torch.zeros_like(nxt))[:, None]
        ids, mask, resp = torch.cat([ids, new], 1), torch.cat([mask, alive.long()[:, None]], 1), \
            torch.cat([resp, alive.long()[:, None]], 1)
        if eos_id is not None:
            alive = alive & (nxt != eos_id)
    return ids, mask, resp, logprobs


def gae(rewards, values, action_mask, *, gamma: float, lam: float):
    """Generalised advantage estimation along each row, over the action positions only.

    Rows are independent: nothing here mixes trajectories. Returns (advantages, returns)."""
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(next_adv)
    for t in reversed(range(rewards.shape[1])):
        m = action_mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        next_adv = torch.where(m > 0, a, next_adv)
        next_value = torch.where(m > 0, values[:, t], next_value)
    return adv, (adv + values) * action_mask


def masked_mean(x, m):
    return (x * m).sum(-1) / m.sum(-1).clamp(min=1)


def ppo_loss(policy: nn.Module, *, cliprange: float, cliprange_value: float, vf_coef: float):
    """loss_fn for one trajectory: clipped surrogate + vf_coef * clipped value loss, each the
    mean over *its own* response tokens (TRL's per-token losses, without batch statistics)."""
    def loss_fn(params, ids, mask, action_mask, old_logprobs, old_values, advantages, returns):
        logits, values = functional_call(policy, params, (ids[None], mask[None]))
        logprobs, values = token_logprobs(logits, ids[None])[0], values[0, :-1]
        ratio = torch.exp(logprobs - old_logprobs)
        pg = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
        v_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
        vf = 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
        loss_pg, loss_vf = masked_mean(pg, action_mask), masked_mean(vf, action_mask)
        clipfrac = masked_mean(((ratio - 1).abs() > cliprange).float(), action_mask)
        return loss_pg + vf_coef * loss_vf, torch.stack([loss_pg, loss_vf, clipfrac]).detach()
    return loss_fn


@dataclass
class PPOArgs:
    """Stage 3 (DPPPO) hyper-parameters; defaults are TRL's where the paper says "TRL defaults"."""
    steps: int = arg(40, "PPO iterations; each Poisson-samples one rollout batch and is one accountant step")
    batch_size: int = arg(128, "expected rollout batch q * |D3| (the paper: 4096)")
    minibatches: int = arg(1, "k: each trajectory goes to one of k minibatches, uniformly (the paper: 4096 / 256 = 16); "
                           "under DP, k updates per iteration cost sqrt(k) in signal-to-noise (NOTES.md)")
    epochs: int = arg(1, "T_PPO; more than 1 only without privacy (a trajectory must be in one noisy update)")
    lr: float = arg(1e-2, "AdamW learning rate (the paper: 3e-3 for GPT-2 small, with 16 minibatches)")
    kl_coef: float = arg(0.1, "beta of Eq. 2, fixed: TRL's adaptive controller would read private batch statistics")
    gamma: float = arg(1.0, "discount")
    lam: float = arg(0.95, "GAE lambda")
    cliprange: float = arg(0.2, "policy ratio clip")
    cliprange_value: float = arg(0.2, "value clip")
    vf_coef: float = arg(0.1, "value loss weight")
    max_grad_norm: float = arg(1.0, "per-trajectory clipping norm C (LoRA and value head together)")
    prompt_baseline: bool = arg(True, "subtract r(x, empty response) from r(x, y): a baseline from the trajectory's own prompt (less variance, no bias, no mixing)")
    whiten: str = arg("none", "advantage whitening: 'none' or 'trajectory' (within one trajectory; never across the batch)")
    response_min: int = arg(4, "fewest new tokens (a per-trajectory length is drawn uniformly in [min, max])")
    response_max: int = arg(16, "most new tokens")
    max_prompt: int = arg(96, "prompt tokens kept (the end of the prompt)")
    chunk_size: int | None = arg(None, "vectorise this many trajectories at a time in per-sample gradients")

    def validate(self, epsilon: float):
        if math.isfinite(epsilon) and self.epochs != 1:
            raise UserError(f"--ppo-epochs {self.epochs} needs --epsilon inf: with privacy each "
                            "trajectory must land in exactly one noisy update (T_PPO = 1)")
        if self.whiten not in ("none", "trajectory"):
            raise UserError(f"--ppo-whiten '{self.whiten}' is not allowed; use 'none' or 'trajectory'")
        if not 1 <= self.response_min <= self.response_max:
            raise UserError(f"--ppo-response-min {self.response_min} / --ppo-response-max {self.response_max} "
                            "are not allowed; need 1 <= min <= max")


@torch.no_grad()
def rollout(policy: ActorCritic, prompt_ids, prompt_mask, *, lengths, generator, eos_id):
    """Sample responses, then score them token by token with the policy and the reference."""
    policy.eval()
    ids, mask, resp, _ = sample(policy, prompt_ids, prompt_mask, max_new_tokens=lengths,
                             generator=generator, eos_id=eos_id)
    logits, values = policy(ids, mask)
    logprobs = token_logprobs(logits, ids)
    with lora_disabled(policy):  # the frozen SFT model: same network, LoRA off
        ref_logprobs = token_logprobs(policy(ids, mask)[0], ids)
    return ids, mask, resp[:, 1:].float(), logprobs, ref_logprobs, values[:, :-1]


def kl_rewards(scores, logprobs, ref_logprobs, action_mask, kl_coef):
    """Eq. 2 per token: R = -beta * (log pi - log pi_sft) on every response token, plus the
    reward model's score r(x, y) on the last one."""
    kl = (logprobs - ref_logprobs) * action_mask
    rewards = -kl_coef * kl
    last = (torch.arange(action_mask.shape[1], device=action_mask.device) * action_mask).argmax(-1)
    rewards[torch.arange(len(scores)), last] += scores * (action_mask.sum(-1) > 0)
    return rewards, kl.sum(-1)


def dpppo(policy: ActorCritic, tokenizer, prompts: list[str], reward_fn, *, epsilon, delta,
          args: PPOArgs, device, generator, eos_id=None, log=None) -> dict:
    """Stage 3, Algorithm 3. Per iteration: Poisson-sample prompts from D3, roll out, score
    (Eq. 2), GAE, then one epoch of DP-SGD over k minibatches. Returns the ledger entry."""
    from tqdm.auto import tqdm
    private = math.isfinite(epsilon)
    args.validate(epsilon)
    p_ids, p_mask, _ = encode(tokenizer, prompts, max_prompt=args.max_prompt)
    n, k = len(prompts), args.minibatches
    q = min(1.0, args.batch_size / n)
    sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q,
                                 steps=args.steps) if private else 0.0
    params = trainable(policy)
    opt = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=0.01)
    loss_fn = ppo_loss(policy, cliprange=args.cliprange, cliprange_value=args.cliprange_value,
                       vf_coef=args.vf_coef)
    accountant = MomentsAccountant()
    bar = tqdm(range(args.steps), desc=f"DPPPO (eps={epsilon:g}, sigma={sigma:.3f})", disable=None, leave=False)
    for it in bar:
        idx = poisson_sample(n, q, generator)
        ids, mask = (t.to(device) for t in trim_left(p_ids[idx], p_mask[idx], mask=p_mask[idx]))
        lengths = torch.randint(args.response_min, args.response_max + 1, (len(idx),), generator=generator)
        ids, mask, act, old_lp, ref_lp, old_v = rollout(policy, ids, mask, lengths=lengths.to(device),
                                                         generator=generator, eos_id=eos_id)
        responses = decode_responses(tokenizer, ids, act, eos_id)
        batch_prompts = [prompts[i] for i in idx.tolist()]
        scores = reward_fn(batch_prompts, responses).to(device).float()
        # A baseline b(x) that depends on nothing but this trajectory's prompt leaves the policy
        # gradient unbiased and removes the prompt's share of the reward's variance.
        baseline = (reward_fn(batch_prompts, [""] * len(batch_prompts)).to(device).float()
                    if args.prompt_baseline else torch.zeros_like(scores))
        rewards, kl = kl_rewards(scores - baseline, old_lp, ref_lp, act, args.kl_coef)
        adv, ret = gae(rewards, old_v * act, act, gamma=args.gamma, lam=args.lam)
        if args.whiten == "trajectory":
            mu = masked_mean(adv, act)[:, None]
            sd = masked_mean((adv - mu) ** 2, act)[:, None].sqrt()
            adv = (adv - mu) / (sd + 1e-8) * act
        assign = torch.randint(k, (len(idx),), generator=generator)  # independent of the data
        stats = []
        for _ in range(args.epochs):
            for j in range(k):
                sel = (assign == j).nonzero().flatten().to(device)
                aux = dp_step(loss_fn, params, (ids[sel], mask[sel], act[sel], old_lp[sel], old_v[sel],
                                                adv[sel], ret[sel]), opt,
                              max_grad_norm=args.max_grad_norm if private else math.inf,
                              noise_multiplier=sigma, expected_batch_size=q * n / k,
                              chunk_size=args.chunk_size, generator=generator, has_aux=True)
                if aux is not None:
                    stats.append(aux)
        if private:
            accountant.step(noise_multiplier=sigma, sample_rate=q)
        eps_now = accountant.get_epsilon(delta) if private else math.inf
        aux = torch.cat(stats).mean(0).tolist() if stats else [float("nan")] * 3
        row = {"ppo/step": it, "ppo/batch_size": len(idx), "ppo/reward_mean": scores.mean().item(),
               "ppo/kl": kl.mean().item(), "ppo/loss_policy": aux[0], "ppo/loss_value": aux[1],
               "ppo/clip_frac": aux[2], "ppo/response_len": act.sum(-1).mean().item(),
               "privacy/epsilon": eps_now}
        bar.set_postfix(reward=f"{row['ppo/reward_mean']:.2f}", kl=f"{row['ppo/kl']:.2f}")
        if log is not None:
            log(row)
    return ledger_entry(accountant, epsilon, delta, sigma, q, args.steps, n)


def decode_responses(tokenizer, ids, action_mask, eos_id) -> list[str]:
    """The text of each row's response tokens (action_mask marks targets of ids[:, 1:])."""
    out = []
    for row, m in zip(ids[:, 1:].tolist(), action_mask.tolist()):
        toks = [t for t, keep in zip(row, m) if keep and t != eos_id]
        out.append(tokenizer.decode(toks, skip_special_tokens=True))
    return out


# =============================================================================================
# PIPELINES: sentiment (SFT -> DPPPO) and rlhf (SFT -> reward model -> DPPPO), ledger, evaluation
# =============================================================================================


def builtin_sentiment_reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """The public reward of the built-in sentiment task, on prompt + response (as TRL scores)."""
    return torch.tensor([sentiment_score(p + r) for p, r in zip(prompts, responses)])


def hub_sentiment_reward(spec: str, label: str | None, device: str):
    """A Hugging Face sequence classifier as the public reward: the logit of the positive label
    (`label`: a name or an index; default: the label named like 'positive', else index 1)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    hint = "the built-in reward (leave --reward-model unset) or a local directory"
    path = os.path.expanduser(spec)
    _hub_guard(path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        clf = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
    except (OSError, ValueError) as e:
        raise _hub_error(path, "reward model", hint, e) from None
    names = {int(i): str(n).lower() for i, n in clf.config.id2label.items()}
    if label is None:
        pos = [i for i, n in names.items() if "pos" in n]
        index = pos[0] if pos else 1
    elif label.isdigit():
        index = int(label)
    else:
        matches = [i for i, n in names.items() if n == label.lower()]
        if not matches:
            raise UserError(f"--reward-label '{label}' is not a label of {spec}; it has {sorted(names.values())}")
        index = matches[0]
    if index >= clf.config.num_labels:
        raise UserError(f"--reward-label {index} is out of range: {spec} has {clf.config.num_labels} labels")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    @torch.no_grad()
    def reward_fn(prompts, responses):
        if not prompts:
            return torch.zeros(0)
        enc = tok([p + r for p, r in zip(prompts, responses)], return_tensors="pt", padding=True,
                  truncation=True, max_length=512).to(device)
        return clf(**enc).logits[:, index].float().cpu()
    return reward_fn


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, prompts: list[str], reward_fn, *, lengths, eos_id,
             max_prompt, seed, device, batch: int = 128):
    """Sample one response per held-out prompt (the same seed for every model) and score it."""
    gen = torch.Generator().manual_seed(seed)
    responses, scores = [], []
    for s in range(0, len(prompts), batch):
        ids, mask, _ = encode(tokenizer, prompts[s:s + batch], max_prompt=max_prompt)
        out, _, resp, _ = sample(model, ids.to(device), mask.to(device), generator=gen, eos_id=eos_id,
                              max_new_tokens=lengths[s:s + batch].to(device))
        r = decode_responses(tokenizer, out, resp[:, 1:], eos_id)
        responses += r
        scores.append(reward_fn(prompts[s:s + batch], r).float())
    return torch.cat(scores), responses


def prefix_prompts(tokenizer, texts: list[str], lo: int, hi: int, seed: int) -> list[str]:
    """The first 2-8 tokens of each review, as in TRL's gpt2-sentiment (seeded per run)."""
    rng = np.random.default_rng(seed)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(t[:int(rng.integers(lo, hi + 1))]) for t in ids]


class RunLog:
    """metrics.jsonl writer plus a one-line status for each logging interval."""

    def __init__(self, out_dir: str, every: int = 10):
        self.path, self.every, self.t0 = os.path.join(out_dir, "metrics.jsonl"), every, time.time()
        os.makedirs(out_dir, exist_ok=True)
        self.file = open(self.path + ".partial", "w")

    def __call__(self, row: dict):
        row = {**row, "time/seconds": round(time.time() - self.t0, 2)}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if "ppo/step" in row and row["ppo/step"] % self.every == 0:
            print(f"ppo iter {row['ppo/step']:4d}: reward {row['ppo/reward_mean']:+.3f}  "
                  f"kl {row['ppo/kl']:.3f}  clip {row['ppo/clip_frac']:.3f}  "
                  f"eps {row['privacy/epsilon']:.3f}", file=sys.stderr)

    def close(self):
        self.file.close()
        os.replace(self.path + ".partial", self.path)


def write_json(path: str, obj):
    """Write-then-rename, so a crash never leaves half a file."""
    with open(path + ".partial", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".partial", path)


def save_model(model: nn.Module, tokenizer, path: str):
    """save_pretrained (safetensors) into a temp dir, then rename into place."""
    with _atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def compose_ledger(stages: dict, delta: float, composition: str) -> float:
    """Total epsilon. Parallel composition over disjoint D1/D2/D3 (the paper's theorem): the
    max over stages. Sequential (a user may be in several stages): add the stages' RDP curves,
    each rebuilt from its ledger entry (sigma, q, steps), and convert once."""
    if composition == "parallel":
        return max(s["epsilon"] for s in stages.values())
    if any(math.isinf(s["epsilon"]) for s in stages.values()):
        return math.inf
    rdp = sum(compute_rdp(q=s["sample_rate"], noise_multiplier=s["noise_multiplier"],
                          steps=s["steps"], orders=DEFAULT_ORDERS) for s in stages.values())
    return get_privacy_spent(orders=DEFAULT_ORDERS, rdp=rdp, delta=delta)[0]


@dataclass
class RunArgs:
    """What every pipeline shares."""
    model: str = arg("builtin", "policy base: 'builtin', a Hub id (gpt2, gpt2-medium, gpt2-large) or a local dir")
    dataset: str = arg("builtin", "private data: 'builtin', a Hub id, or a local .jsonl/.csv/.parquet file")
    epsilon: float = arg(4.0, "target epsilon of every stage ('inf': the same loops without clipping or noise)")
    delta: float | None = arg(None, "target delta (default 1/|D|, D = all private examples of the run)")
    seed: int = arg(0, "seed of the data split, sampling, noise and initial weights")
    out: str | None = arg(None, "output directory (default runs/<task>-eps<epsilon>-seed<seed>)")
    device: str | None = arg(None, "'cpu' or 'cuda' (default: cuda when available)")
    num_sft: int = arg(10000, "examples in D1 (built-in data; a cap for real data)")
    num_ppo: int = arg(10000, "prompts in D3 (built-in data; a cap for real data)")
    num_test: int = arg(256, "held-out evaluation prompts")
    num_samples: int = arg(4, "generations shown side by side at the end")
    composition: str = arg("parallel", "'parallel' (disjoint D1/D2/D3, the paper) or 'sequential' (a user may be in several stages)")
    base: BaseModelArgs = field(default_factory=BaseModelArgs)


@dataclass
class SentimentArgs(RunArgs):
    """`sentiment`: the paper's no-human-in-the-loop scenario (IMDb positive reviews)."""
    reward_model: str | None = arg(None, "public reward: a Hub id or local dir of a sequence classifier (default: the built-in lexicon scorer)")
    reward_label: str | None = arg(None, "its label to score (name or index; default: one named like 'positive', else 1)")
    prompt_min: int = arg(2, "fewest prompt tokens (the first tokens of a review)")
    prompt_max: int = arg(8, "most prompt tokens")
    num_ppo: int = arg(40000, "prompts in D3 (built-in data; a cap for real data)")
    num_test: int = arg(2000, "held-out evaluation prompts")
    sft: SFTArgs = field(default_factory=lambda: SFTArgs(epochs=1.0))
    ppo: PPOArgs = field(default_factory=lambda: PPOArgs(steps=75, batch_size=1024))


def _setup(args: RunArgs, task: str):
    if not args.epsilon > 0:
        raise UserError(f"--epsilon {args.epsilon} is not allowed; use a number > 0 or 'inf'")
    if args.delta is not None and not 0 < args.delta < 1:
        raise UserError(f"--delta {args.delta} is not allowed; it must be in (0, 1)")
    if args.composition not in ("parallel", "sequential"):
        raise UserError(f"--composition '{args.composition}' is not allowed; use parallel or sequential")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} is not available here; use --device cpu")
    out = args.out or os.path.join("runs", f"{task}-eps{args.epsilon:g}-seed{args.seed}")
    torch.manual_seed(args.seed)
    return device, out, torch.Generator().manual_seed(args.seed)


def _split(records: list, sizes: list[int], seed: int) -> list[list]:
    """Shuffle once and cut into disjoint consecutive parts: no record lands in two parts."""
    order = np.random.default_rng(seed).permutation(len(records))
    bounds = np.cumsum([0] + sizes)
    return [[records[i] for i in order[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]


def sentiment_data(args: SentimentArgs) -> tuple[list[str], list[str], list[str]]:
    """Disjoint D1 (reviews for SFT), D3 (reviews whose first tokens are PPO prompts), test."""
    if args.dataset == "builtin":
        texts = [r["text"] for r in make_reviews(args.num_sft + args.num_ppo + args.num_test, seed=10_000 + args.seed)]
    else:
        texts = [str(r["text"]) for r in load_records(args.dataset, ("text",))]
    n_test = min(args.num_test, max(1, len(texts) // 10))
    n_sft = min(args.num_sft, (len(texts) - n_test) // 2)
    n_ppo = min(args.num_ppo, len(texts) - n_test - n_sft)
    if min(n_sft, n_ppo) < 2:
        raise UserError(f"dataset '{args.dataset}' has {len(texts)} rows; at least 6 are needed")
    return tuple(_split(texts, [n_sft, n_ppo, n_test], args.seed))


def run_sentiment(args: SentimentArgs) -> dict:
    """Split -> DP SFT on D1 -> DPPPO on D3 -> evaluate pre-trained / SFT / aligned."""
    import copy
    t0 = time.time()
    device, out, gen = _setup(args, "sentiment")
    d1, d3, test = sentiment_data(args)
    delta = args.delta if args.delta is not None else 1 / (len(d1) + len(d3))
    base_lm, tok = load_lm(args.model, device, args.base)
    reward_fn = (hub_sentiment_reward(args.reward_model, args.reward_label, device)
                 if args.reward_model else builtin_sentiment_reward)
    ppo_prompts = prefix_prompts(tok, d3, args.prompt_min, args.prompt_max, args.seed + 1)
    test_prompts = prefix_prompts(tok, test, args.prompt_min, args.prompt_max, args.seed + 2)
    lengths = torch.randint(args.ppo.response_min, args.ppo.response_max + 1, (len(test_prompts),),
                            generator=torch.Generator().manual_seed(args.seed + 3))
    log = RunLog(out)

    def evaluate_model(model):
        return evaluate(model, tok, test_prompts, reward_fn, lengths=lengths, eos_id=None,
                        max_prompt=args.ppo.max_prompt, seed=args.seed + 4, device=device)

    print(f"sentiment: |D1|={len(d1)} |D3|={len(d3)} |test|={len(test)}  "
          f"epsilon={args.epsilon:g} delta={delta:.2e}  device={device}", file=sys.stderr)
    pre_scores, pre_text = evaluate_model(CausalLM(base_lm))
    # STAGE 1: DP SFT on D1 (whole reviews), then merge its LoRA: LM_sft.
    sft_lm = add_lora(copy.deepcopy(base_lm))
    ledger = {"sft": dp_sft(sft_lm, tok, [""] * len(d1), d1, epsilon=args.epsilon, delta=delta,
                            args=args.sft, device=device, generator=gen, log=log)}
    merge_lora(sft_lm)
    sft_scores, sft_text = evaluate_model(CausalLM(sft_lm))
    # STAGE 3: DPPPO on D3 from LM_sft, with a fresh LoRA and value head.
    policy = ActorCritic(add_lora(copy.deepcopy(sft_lm))).to(device)
    ledger["ppo"] = dpppo(policy, tok, ppo_prompts, reward_fn, epsilon=args.epsilon, delta=delta,
                          args=args.ppo, device=device, generator=gen, log=log)
    al_scores, al_text = evaluate_model(policy)
    log.close()
    save_model(merge_lora(policy.lm), tok, os.path.join(out, "policy"))
    summary = {"task": "sentiment", "model": args.model, "epsilon": args.epsilon, "delta": delta,
               "seed": args.seed, "stages": ledger,
               "total_epsilon": compose_ledger(ledger, delta, args.composition),
               "composition": args.composition,
               "eval": {"pretrained": {"reward": pre_scores.mean().item()},
                        "sft": {"reward": sft_scores.mean().item()},
                        "aligned": {"reward": al_scores.mean().item()}},
               "seconds": time.time() - t0}
    write_json(os.path.join(out, "summary.json"), summary)
    print_report(summary, test_prompts, {"pretrained": (pre_text, pre_scores), "sft": (sft_text, sft_scores),
                                         "aligned": (al_text, al_scores)}, args.num_samples, out)
    return summary


def rouge(prediction: str, reference: str) -> dict:
    """ROUGE-1/2/L F-measures as the rouge-score package computes them (lower-cased alphanumeric
    tokens, no stemming): n-gram overlap with counts, and the longest common subsequence."""
    from collections import Counter
    p = re.sub(r"[^a-z0-9]+", " ", prediction.lower()).split()
    r = re.sub(r"[^a-z0-9]+", " ", reference.lower()).split()

    def f1(overlap, n_p, n_r):
        prec, rec = (overlap / n_p if n_p else 0.0), (overlap / n_r if n_r else 0.0)
        return 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    out = {}
    for n in (1, 2):
        cp = Counter(tuple(p[i:i + n]) for i in range(len(p) - n + 1))
        cr = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
        out[f"rouge{n}"] = f1(sum((cp & cr).values()), sum(cp.values()), sum(cr.values()))
    lcs = [[0] * (len(r) + 1) for _ in range(len(p) + 1)]
    for i, a in enumerate(p):
        for j, b in enumerate(r):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if a == b else max(lcs[i][j + 1], lcs[i + 1][j])
    out["rougeL"] = f1(lcs[-1][-1], len(p), len(r))
    return out


@dataclass
class RLHFArgs(RunArgs):
    """`rlhf`: the paper's RLHF scenario (Reddit TL;DR): DP SFT -> DP reward model -> DPPPO."""
    num_sft: int = arg(4000, "examples in D1 (built-in data; a cap for real data)")
    num_ppo: int = arg(4000, "prompts in D3 (built-in data; a cap for real data)")
    num_comparisons: int = arg(4000, "comparisons in D2 (built-in data; a cap for real data)")
    comparisons: str | None = arg(None, "D2 when --dataset is not builtin: Hub id or local file with prompt/chosen/rejected")
    reward_base: str | None = arg(None, "base of the reward model: 'builtin', Hub id or dir (default: the SFT model)")
    eval_reward_model: str | None = arg(None, "a non-private sequence classifier to score summaries in evaluation")
    sft: SFTArgs = field(default_factory=lambda: SFTArgs(epochs=2.0))
    rm: RMArgs = field(default_factory=RMArgs)
    ppo: PPOArgs = field(default_factory=lambda: PPOArgs(steps=40, batch_size=256, minibatches=4, lr=3e-3,
                                                                 response_min=32, response_max=32))


def rlhf_data(args: RLHFArgs) -> dict:
    """Disjoint D1 (prompt, completion), D2 comparisons (+ held out), D3 prompts, and test."""
    n_cmp_test = min(256, max(1, args.num_comparisons // 10))
    if args.dataset == "builtin":
        t = make_tldr(args.num_sft, args.num_comparisons + n_cmp_test, args.num_ppo, args.num_test, 20_000 + args.seed)
        return {"sft": t["sft"], "comparisons": t["comparisons"][:args.num_comparisons],
                "comparisons_test": t["comparisons"][args.num_comparisons:], "ppo": t["ppo"], "test": t["test"]}
    if args.comparisons is None:
        raise UserError("--comparisons is required with a real --dataset (a Hub id or a local file with "
                        "prompt/chosen/rejected columns)")
    rows = [{"prompt": str(r["prompt"]), "completion": " " + str(r["label"]).strip()}
            for r in load_records(args.dataset, ("prompt", "label"))]
    cmps = [{"prompt": str(r["prompt"]), "chosen": " " + str(r["chosen"]).strip(),
             "rejected": " " + str(r["rejected"]).strip()} for r in load_records(args.comparisons, ("prompt", "chosen", "rejected"))]
    n_test = min(args.num_test, max(1, len(rows) // 10))
    n_sft = min(args.num_sft, (len(rows) - n_test) // 2)
    n_ppo = min(args.num_ppo, len(rows) - n_test - n_sft)
    n_cmp_test = min(n_cmp_test, max(1, len(cmps) // 10))
    n_cmp = min(args.num_comparisons, len(cmps) - n_cmp_test)
    if min(n_sft, n_ppo, n_cmp) < 2:
        raise UserError(f"too few rows: {len(rows)} in '{args.dataset}', {len(cmps)} in '{args.comparisons}'")
    d1, d3, test = _split(rows, [n_sft, n_ppo, n_test], args.seed)
    d2, d2_test = _split(cmps, [n_cmp, n_cmp_test], args.seed + 1)
    return {"sft": d1, "comparisons": d2, "comparisons_test": d2_test, "ppo": d3, "test": test}


def run_rlhf(args: RLHFArgs) -> dict:
    """Split -> DP SFT on D1 -> DP reward model on D2 -> DPPPO on D3 -> evaluate."""
    import copy
    t0 = time.time()
    device, out, gen = _setup(args, "rlhf")
    data = rlhf_data(args)
    n_private = len(data["sft"]) + len(data["comparisons"]) + len(data["ppo"])
    delta = args.delta if args.delta is not None else 1 / n_private
    base_lm, tok = load_lm(args.model, device, args.base)
    rm_base = load_lm(args.reward_base, device, args.base) if args.reward_base else None
    eval_rm = hub_sentiment_reward(args.eval_reward_model, "0", device) if args.eval_reward_model else None
    log = RunLog(out)
    print(f"rlhf: |D1|={len(data['sft'])} |D2|={len(data['comparisons'])} |D3|={len(data['ppo'])} "
          f"|test|={len(data['test'])}  epsilon={args.epsilon:g} delta={delta:.2e}  device={device}", file=sys.stderr)
    test_prompts = [r["prompt"] for r in data["test"]]
    lengths = torch.full((len(test_prompts),), args.ppo.response_max)
    # STAGE 1: DP SFT on D1 (loss on the summary only), then merge: LM_sft.
    sft_lm = add_lora(copy.deepcopy(base_lm))
    ledger = {"sft": dp_sft(sft_lm, tok, [r["prompt"] for r in data["sft"]], [r["completion"] for r in data["sft"]],
                            epsilon=args.epsilon, delta=delta, args=args.sft, device=device, generator=gen, log=log)}
    merge_lora(sft_lm)
    # STAGE 2: DP reward model on D2, from LM_sft (or --reward-base) with a fresh LoRA and head.
    rm_lm, rm_tok = rm_base if rm_base else (copy.deepcopy(sft_lm), tok)
    rm = RewardModel(add_lora(rm_lm)).to(device).eval()
    cmp = data["comparisons"]
    ledger["rm"] = dp_reward_model(rm, rm_tok, [c["prompt"] for c in cmp], [c["chosen"] for c in cmp],
                                   [c["rejected"] for c in cmp], epsilon=args.epsilon, delta=delta, args=args.rm,
                                   device=device, generator=gen, log=log)

    def rm_reward(prompts, responses):  # the DP reward model: using it is post-processing
        return reward_model_scores(rm, rm_tok, prompts, responses, max_prompt=args.rm.max_prompt,
                                   max_completion=args.rm.max_completion, device=device)
    held = data["comparisons_test"]
    prompts_h = [c["prompt"] for c in held]
    rm_accuracy = (rm_reward(prompts_h, [c["chosen"] for c in held]) >
                   rm_reward(prompts_h, [c["rejected"] for c in held])).float().mean().item()
    # STAGE 3: DPPPO on D3 from LM_sft, rewarded by the DP reward model.
    policy = ActorCritic(add_lora(copy.deepcopy(sft_lm))).to(device)
    ledger["ppo"] = dpppo(policy, tok, [r["prompt"] for r in data["ppo"]], rm_reward, epsilon=args.epsilon,
                          delta=delta, args=args.ppo, device=device, generator=gen, eos_id=tok.eos_token_id, log=log)
    log.close()
    evals, generations = {}, {}
    for name, model in (("pretrained", CausalLM(base_lm)), ("sft", CausalLM(sft_lm)), ("aligned", policy)):
        scores, texts = evaluate(model, tok, test_prompts, rm_reward, lengths=lengths, eos_id=tok.eos_token_id,
                                 max_prompt=args.ppo.max_prompt, seed=args.seed + 4, device=device)
        scores_r = [rouge(y, r["completion"]) for y, r in zip(texts, data["test"])]
        e = {"reward": scores.mean().item(), **{k: float(np.mean([s[k] for s in scores_r])) for k in ("rouge1", "rouge2", "rougeL")}}
        if args.dataset == "builtin":
            e["true_preference"] = float(np.mean([true_preference(r["meta"], y) for y, r in zip(texts, data["test"])]))
        if eval_rm is not None:
            e["eval_reward"] = eval_rm(test_prompts, texts).mean().item()
        evals[name], generations[name] = e, (texts, scores)
    save_model(merge_lora(policy.lm), tok, os.path.join(out, "policy"))
    save_reward_model(rm, rm_tok, os.path.join(out, "reward_model"))
    summary = {"task": "rlhf", "model": args.model, "epsilon": args.epsilon, "delta": delta, "seed": args.seed,
               "stages": ledger, "total_epsilon": compose_ledger(ledger, delta, args.composition),
               "composition": args.composition, "eval": {**evals, "rm_accuracy": rm_accuracy},
               "seconds": time.time() - t0}
    write_json(os.path.join(out, "summary.json"), summary)
    print_report(summary, test_prompts, generations, args.num_samples, out)
    print(f"reward model held-out accuracy: {rm_accuracy:.3f}")
    return summary


def sweep_table(results: dict, task: str) -> str:
    """Markdown tables in the shape of the paper's Tables 1 and 3: one column per epsilon."""
    eps = list(results)
    head = "| model | " + " | ".join(f"eps={e:g}" for e in eps) + " |\n|---|" + "---|" * len(eps) + "\n"
    metrics = ["reward"] + (["true_preference", "rouge1", "rouge2", "rougeL"] if task == "rlhf" else [])
    out = []
    for metric in metrics:
        if metric not in results[eps[0]]["eval"]["aligned"]:
            continue
        rows = [f"| {m} | " + " | ".join(f"{results[e]['eval'][m][metric]:+.3f}" for e in eps) + " |"
                for m in ("pretrained", "sft", "aligned")]
        # The share of the non-private gain (aligned - pre-trained) each eps keeps; not for rlhf's
        # learned reward, which is a different (DP) reward model in every column.
        if math.inf in results and not (task == "rlhf" and metric == "reward"):
            pre, full = (results[math.inf]["eval"][m][metric] for m in ("pretrained", "aligned"))
            rows.append("| recovered | " + " | ".join(
                f"{(results[e]['eval']['aligned'][metric] - pre) / (full - pre):.0%}" if full != pre else "n/a"
                for e in eps) + " |")
        out.append(f"{metric}\n\n" + head + "\n".join(rows))
    if task == "rlhf":
        out.append("reward-model held-out accuracy\n\n" + head + "| accuracy | " +
                   " | ".join(f"{results[e]['eval']['rm_accuracy']:.3f}" for e in eps) + " |")
    return "\n\n".join(out) + "\n"


def run_sweep(args: RunArgs, run, task: str, epsilons: list[float]) -> str:
    """The pipeline once per epsilon, same seed; writes and prints the table."""
    base = args.out or os.path.join("runs", f"{task}-sweep-seed{args.seed}")
    results = {e: run(dataclasses.replace(args, epsilon=e, out=os.path.join(base, f"eps{e:g}"))) for e in epsilons}
    table = sweep_table(results, task)
    with open(os.path.join(base, "table.md.partial"), "w") as f:
        f.write(table)
    os.replace(os.path.join(base, "table.md.partial"), os.path.join(base, "table.md"))
    print(f"\n{task}: {args.model}, seed {args.seed} ({base}/table.md)\n\n{table}")
    return table


def print_report(summary, prompts, generations: dict, n: int, out: str):
    """The ledger, the evaluation, and a few generations side by side (like the paper's Table 2)."""
    print("\nprivacy ledger (each stage on its own private data):")
    for name, s in summary["stages"].items():
        print(f"  {name:4s} eps={s['epsilon']:.3f} delta={s['delta']:.2e} sigma={s['noise_multiplier']:.3f} "
              f"q={s['sample_rate']:.4f} steps={s['steps']} N={s['num_private_examples']}")
    print(f"  total eps={summary['total_epsilon']:.3f} ({summary['composition']} composition)")
    print("evaluation on held-out prompts:")
    for name, e in summary["eval"].items():
        if isinstance(e, dict):
            print(f"  {name:10s} " + "  ".join(f"{k}={v:+.3f}" for k, v in e.items()))
    print(f"sample generations (prompt | model: response [score]):")
    for i in range(min(n, len(prompts))):
        print(f"  {prompts[i][-120:]!r}")
        for name, (texts, scores) in generations.items():
            print(f"    {name:10s}: {texts[i]!r} [{scores[i].item():+.2f}]")
    print(f"wrote {out}/summary.json, metrics.jsonl, policy/ ({summary['seconds']:.0f}s)")


# =============================================================================================
# BENCHMARK: what DP-SGD costs over a non-private step
# =============================================================================================


def _bench_child(variant: str, ns) -> dict:
    """One variant in a fresh process: median step time and peak memory above the loaded model."""
    import resource
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    device = ns.device
    cfg = dict(small=(12, 768, 12), medium=(24, 1024, 16), large=(36, 1280, 20), tiny=(2, 64, 2))[ns.model]
    lm = GPT2LMHeadModel(GPT2Config(n_layer=cfg[0], n_embd=cfg[1], n_head=cfg[2], attn_implementation="eager"))
    model = CausalLM(add_lora(lm.to(device).eval(), rank=4))
    params = trainable(model)
    opt = torch.optim.AdamW(params.values(), lr=1e-4, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.config.vocab_size, (ns.batch, ns.seq_len), generator=gen).to(device)
    mask = torch.ones_like(ids)
    mask[0, : ns.seq_len // 4] = 0  # one left-padded row, as in real batches
    loss_mask = mask[:, 1:].float()
    loss_fn = sft_loss(model)

    def nonprivate():
        logits = model(ids, mask)
        lp = token_logprobs(logits, ids)
        (-(lp * loss_mask).sum(1) / loss_mask.sum(1)).sum().div(ns.batch).backward()
        opt.step(), opt.zero_grad(set_to_none=True)

    def dp():
        dp_step(loss_fn, params, (ids, mask, loss_mask), opt, max_grad_norm=1.0, noise_multiplier=1.0,
                expected_batch_size=ns.batch, generator=gen, chunk_size=ns.chunk_size)

    def loop():  # the textbook way: one backward per example
        total = {k: torch.zeros_like(p) for k, p in params.items()}
        for i in range(ns.batch):
            loss = loss_fn(params, ids[i], mask[i], loss_mask[i])
            g = torch.autograd.grad(loss, list(params.values()))
            norm = torch.sqrt(sum(x.pow(2).sum() for x in g))
            for (k, t), x in zip(total.items(), g):
                t += x * (1.0 / (norm + 1e-6)).clamp(max=1.0)
        for k, p in params.items():
            p.grad = (total[k] + torch.randn(p.shape, generator=gen).to(device)) / ns.batch
        opt.step(), opt.zero_grad(set_to_none=True)

    step = dict(nonprivate=nonprivate, dp=dp, loop=loop)[variant]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    base_mem = torch.cuda.memory_allocated() if device.startswith("cuda") else rss()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for r in range(ns.warmup + ns.repeats):
        sync()
        t = time.perf_counter()
        step()
        sync()
        if r >= ns.warmup:
            times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": variant, "seconds": float(np.median(times)), "peak_bytes": peak - base_mem}


def cmd_bench(ns):
    """Run each variant in its own process (clean peak memory), then print one table of ratios."""
    import subprocess
    if ns.variant:
        print(json.dumps(_bench_child(ns.variant, ns)))
        return
    chunk = ns.chunk_size or max(1, ns.batch // 2)
    runs = {"nonprivate": ("nonprivate", None, "non-private (batched backward)"),
            "dp": ("dp", None, "DP: vmap per-sample grads + privatize"),
            "dp_chunked": ("dp", chunk, f"DP, vmap chunk_size={chunk}"),
            "loop": ("loop", None, "DP, per-example loop")}
    rows = {}
    for key, (variant, chunk_size, _) in runs.items():
        cmd = [sys.executable, os.path.abspath(__file__), "bench", "--variant", variant, "--model", ns.model,
               "--batch", str(ns.batch), "--seq-len", str(ns.seq_len), "--device", ns.device,
               "--repeats", str(ns.repeats), "--warmup", str(ns.warmup)]
        cmd += ["--chunk-size", str(chunk_size)] if chunk_size else []
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise UserError(f"bench variant {key} failed: {r.stderr.strip().splitlines()[-1:]}")
        rows[key] = json.loads(r.stdout.strip().splitlines()[-1])
    acc = MomentsAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.001, num_steps=100_000)
    t = time.perf_counter()
    eps = acc.get_epsilon(1e-5)
    eps_ms = (time.perf_counter() - t) * 1000
    base = rows["nonprivate"]
    print(f"GPT-2 {ns.model} (random init) + LoRA r=4 on q,v; batch {ns.batch} x {ns.seq_len} tokens; "
          f"{ns.device}; median of {ns.repeats} steps")
    print(f"| step | time (s) | x non-private | peak memory (MiB) | x non-private |")
    print(f"|---|---|---|---|---|")
    for key, (_, _, label) in runs.items():
        r = rows[key]
        print(f"| {label} | {r['seconds']:.3f} | {r['seconds'] / base['seconds']:.2f} | "
              f"{r['peak_bytes'] / 2**20:.0f} | {r['peak_bytes'] / max(base['peak_bytes'], 1):.2f} |")
    print(f"epsilon after 1e5 steps (q=0.001, sigma=1.0, delta=1e-5): {eps:.3f} in {eps_ms:.1f} ms")


# =============================================================================================
# CLI
# =============================================================================================


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"'{text}' is not true/false")
    return text.lower() in ("true", "1", "yes")


def _nested(f: dataclasses.Field):
    """The default instance of a nested config field (e.g. `sft: SFTArgs`), else None."""
    if f.default_factory is dataclasses.MISSING:
        return None
    value = f.default_factory()
    return value if dataclasses.is_dataclass(value) else None


def _add_dataclass_args(parser, config, prefix: str = ""):
    """One --flag per config field (nested configs get a prefix: --sft-lr, --ppo-steps)."""
    for f in dataclasses.fields(config):
        if _nested(f) is not None:
            _add_dataclass_args(parser, _nested(f), prefix + f.name + "_")
            continue
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        conv = (_parse_bool if "bool" in kind else _parse_float if "float" in kind else int if "int" in kind
                else str)
        parser.add_argument("--" + (prefix + f.name).replace("_", "-"), dest=prefix + f.name, type=conv,
                            default=None, help=f"{f.metadata.get('help', '')} (default: {getattr(config, f.name)})")


def _build_dataclass(config, ns, prefix: str = ""):
    """`config` (a default instance) with the fields the command line set."""
    changes = {}
    for f in dataclasses.fields(config):
        if _nested(f) is not None:
            changes[f.name] = _build_dataclass(getattr(config, f.name), ns, prefix + f.name + "_")
        elif getattr(ns, prefix + f.name, None) is not None:
            changes[f.name] = getattr(ns, prefix + f.name)
    return dataclasses.replace(config, **changes)


PAPER_PRESET = {  # App. B, GPT-2 small on a GPU
    "sft_batch_size": 512, "sft_epochs": 40, "sft_lr": 3e-4,
    "ppo_batch_size": 4096, "ppo_minibatches": 16, "ppo_steps": 100, "ppo_lr": 3e-3,
    "rm_batch_size": 4096, "rm_epochs": 50, "rm_lr": 2e-4,
}


def _positive(name, value, allow_zero=False):
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise UserError(f"--{name} {value} is not allowed; it must be {'>= 0' if allow_zero else '> 0'}")


def cmd_privacy(ns):
    _positive("steps", ns.steps, allow_zero=True)
    if not 0 < ns.sample_rate <= 1:
        raise UserError(f"--sample-rate {ns.sample_rate} is not allowed; it must be in (0, 1]")
    if not 0 < ns.delta < 1:
        raise UserError(f"--delta {ns.delta} is not allowed; it must be in (0, 1)")
    if ns.epsilon is not None:
        if not ns.epsilon > 0:
            raise UserError(f"--epsilon {ns.epsilon} is not allowed; it must be > 0")
        sigma = get_noise_multiplier(target_epsilon=ns.epsilon, target_delta=ns.delta,
                                     sample_rate=ns.sample_rate, steps=ns.steps)
        print(f"noise_multiplier={sigma:.4f} for epsilon<={ns.epsilon:g} at delta={ns.delta:g}, "
              f"q={ns.sample_rate:g}, steps={ns.steps}")
        return
    if ns.noise_multiplier is None:
        raise UserError("give --noise-multiplier (to get epsilon) or --epsilon (to get sigma)")
    _positive("noise-multiplier", ns.noise_multiplier, allow_zero=True)
    rdp = compute_rdp(q=ns.sample_rate, noise_multiplier=ns.noise_multiplier, steps=ns.steps, orders=DEFAULT_ORDERS)
    eps, order = get_privacy_spent(orders=DEFAULT_ORDERS, rdp=rdp, delta=ns.delta)
    print(f"epsilon={eps:.4f} (order {order:g}) for sigma={ns.noise_multiplier:g}, q={ns.sample_rate:g}, "
          f"steps={ns.steps}, delta={ns.delta:g}")


def _pipeline_args(cls, ns):
    if getattr(ns, "preset", None) == "paper":
        for k, v in PAPER_PRESET.items():
            if hasattr(ns, k) and getattr(ns, k) is None:
                setattr(ns, k, v)
    if getattr(ns, "batch_size", None) is not None:
        for k in ("sft_batch_size", "rm_batch_size", "ppo_batch_size"):
            if hasattr(ns, k) and getattr(ns, k) is None:
                setattr(ns, k, ns.batch_size)
    args = _build_dataclass(cls(), ns)
    for name in ("sft", "rm", "ppo"):
        stage = getattr(args, name, None)
        if stage is None:
            continue
        for f in ("steps", "batch_size", "lr", "max_grad_norm"):
            _positive(f"{name}-{f.replace('_', '-')}", getattr(stage, f, None), allow_zero=(f == "steps"))
    if getattr(args, "ppo", None) is not None:
        args.ppo.validate(args.epsilon)
    return args


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("privacy", help="epsilon of DP-SGD for (sigma, q, steps, delta), or sigma for a target epsilon")
    p.add_argument("--noise-multiplier", type=_parse_float, help="sigma (noise std / clipping norm)")
    p.add_argument("--epsilon", type=_parse_float, help="target epsilon: print the sigma that reaches it instead")
    p.add_argument("--sample-rate", type=_parse_float, required=True, help="Poisson sampling rate q in (0, 1]")
    p.add_argument("--steps", type=int, required=True, help="number of noisy steps")
    p.add_argument("--delta", type=_parse_float, default=1e-5, help="target delta in (0, 1) (default 1e-5)")
    p = sub.add_parser("bench", help="time and memory of a DP step against a non-private one")
    p.add_argument("--model", choices=["tiny", "small", "medium", "large"], default="small", help="GPT-2 size (default small, 124M)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=7, help="timed steps (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--chunk-size", type=int, help="chunk size of the chunked DP row (default: half the batch)")
    p.add_argument("--variant", choices=["nonprivate", "dp", "loop"], help=argparse.SUPPRESS)
    for name, cls in (("sentiment", SentimentArgs), ("rlhf", RLHFArgs)):
        p = sub.add_parser(name, help=cls.__doc__.splitlines()[0])
        _add_dataclass_args(p, cls())
        p.add_argument("--batch-size", type=int, help="expected batch size of every stage (overrides the stage defaults)")
        p.add_argument("--preset", choices=["paper"], help="App. B hyper-parameters for GPT-2 runs on a GPU")
        p.add_argument("--sweep", help="comma-separated epsilons (e.g. 1,2,4,8,inf): run once per epsilon with the "
                       "same seed and print a table like the paper's; --out is the sweep's directory")
    ns = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        if ns.command == "privacy":
            return cmd_privacy(ns)
        if ns.command == "bench":
            return cmd_bench(ns)
        if ns.command in ("sentiment", "rlhf"):
            cls, run = {"sentiment": (SentimentArgs, run_sentiment), "rlhf": (RLHFArgs, run_rlhf)}[ns.command]
            args = _pipeline_args(cls, ns)
            if ns.sweep is None:
                return run(args)
            try:
                epsilons = [float(e) for e in ns.sweep.split(",")]
            except ValueError:
                raise UserError(f"--sweep '{ns.sweep}' is not allowed; give epsilons like 1,2,4,8,inf") from None
            for e in epsilons:
                _positive("sweep epsilon", e)
            return run_sweep(args, run, ns.command, epsilons)
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*(loss_type|attention_mask|pad_token_id).*")
    main()
