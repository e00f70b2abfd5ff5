"""dp_rlhf.py: differentially private RLHF in one file.

A readable reference for Wu et al., "Privately Aligning Language Models with Reinforcement
Learning" (ICLR 2024, arXiv 2310.16960). Search for these banners:

    PART I: THE METHOD, in the paper's order; it runs, and reads, without the rest of the file
      PRIVACY ACCOUNTING        the moments (RDP) accountant, Opacus-compatible names; the PLD accountant
      DP-SGD (Algorithm 2)      Poisson sampling, per-sample gradients (torch.func), clip + noise, the loop
      MODELS                    LoRA on GPT-2's query/value, a vmap-safe forward, value and reward heads
      STAGE 1: DP SFT
      STAGE 2: DP REWARD MODEL (Eq. 1)
      STAGE 3: DPPPO (Algorithm 3, Eq. 2)
      PRIVACY LEDGER            each stage's spent epsilon; parallel or sequential composition
    PART II: RUNNING IT
      DATA                      built-in synthetic tasks and base model, loaders, the split by protected unit
      PIPELINES                 one pipeline for both tasks, run directories, checkpoints, sweeps
    PART III: THE AUDIT         an empirical lower bound on epsilon from one DP SFT run
    CLI

Everything runs offline by default (a tiny built-in GPT-2 and synthetic private data):

    python dp_rlhf.py privacy --noise-multiplier 1.0 --sample-rate 0.01 --steps 1000
    python dp_rlhf.py sentiment --epsilon 4        # IMDb-style, public reward, SFT -> DPPPO
    python dp_rlhf.py rlhf --epsilon 4             # TL;DR-style, SFT -> DP reward model -> DPPPO
    python dp_rlhf.py rlhf --dry-run               # the plan and every stage's inputs, nothing trained
    python dp_rlhf.py audit --epsilon 1            # one DP SFT run's empirical lower bound on epsilon

The tests, the exercises' handouts, the benchmarks and the probes are in test_dp_rlhf.py.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import hashlib
import inspect
import itertools
import json
import math
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal

import datasets
import huggingface_hub
import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model,
                          PreTrainedTokenizerFast)
from transformers.utils import logging as hf_logging


# #############################################################################################
# PART I: THE METHOD, in the paper's order, using nothing defined below it (its loops report to `Hooks`).
# #############################################################################################


# ===== PRIVACY ACCOUNTING: the moments (RDP) and the PLD accountant for the Poisson-subsampled Gaussian
# Mironov, Talwar, Zhang (2019), "Renyi Differential Privacy of the Sampled Gaussian Mechanism": one step's RDP
# at order a is log(A_a) / (a - 1); steps add. Opacus's names, and its orders plus large ones (for tiny epsilon).
DEFAULT_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256, 512]


def _log_binom(n: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """log |binom(n, k)| for real n (lgamma gives log |Gamma| at negative non-integers)."""
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def _log_a_int(q: float, sigma: float, order: int) -> float:
    """log A_a at integer order a >= 2 of the Poisson-subsampled Gaussian (rate q in (0, 1), noise multiplier
    sigma > 0): the exact binomial sum (Mironov et al. 2019, Sec. 3.3),
        A_a = sum_{i=0..a} binom(a, i) (1 - q)^(a - i) q^i exp((i^2 - i) / (2 sigma^2)).
    Returns a float; compute_rdp divides by a - 1 (the RDP at order a). At large orders (up to 512) A_a
    overflows a float64 while its log is finite: sum in log space (_log_binom, logsumexp)."""
    i = torch.arange(order + 1, dtype=torch.float64)
    a = torch.tensor(float(order), dtype=torch.float64)
    terms = _log_binom(a, i) + i * math.log(q) + (a - i) * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
    return torch.logsumexp(terms, 0).item()


def _log_a_frac(q: float, sigma: float, order: float, max_terms: int = 1 << 14) -> float:
    """log A_a at fractional a, bounded above by the series of |terms| (dp-accounting, 2024): the
    signed series (Opacus) can stop early and under-report at small orders and large epsilon."""
    z0, n = sigma**2 * math.log(1 / q - 1) + 0.5, 256
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
    if not (0 <= q <= 1 and noise_multiplier >= 0 and steps >= 0):
        raise ValueError(f"q={q} must be in [0, 1], noise_multiplier={noise_multiplier} and steps={steps} >= 0")
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
    """(epsilon, best order) by the improved conversion (Balle et al. 2020; Canonne, Kamath, Steinke
    2020): eps = rdp + log((a-1)/a) - (log(delta) + log(a)) / (a - 1)."""
    orders = np.atleast_1d(np.asarray(orders, dtype=np.float64))
    rdp = np.atleast_1d(np.asarray(rdp, dtype=np.float64))
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta} must be in (0, 1)")
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        eps = rdp + np.log1p(-1 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    eps = np.where(np.isnan(eps), np.inf, eps)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(orders[best])


class MomentsAccountant:
    """(sigma, q, steps) run-length encoded; epsilon from the summed RDP. The interface (all else uses only
    mechanism, step, get_epsilon, epsilon_floor, state_dict, load_state_dict): add one to ACCOUNTANTS."""

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
        return sum((compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for s, q, n in self.history),
                   np.zeros(len(orders)))

    def get_privacy_spent(self, *, delta: float, orders=None) -> tuple[float, float]:
        orders = DEFAULT_ORDERS if orders is None else orders
        return get_privacy_spent(orders=orders, rdp=self.get_rdp(orders), delta=delta)

    def get_epsilon(self, delta: float, orders=None) -> float:
        return self.get_privacy_spent(delta=delta, orders=orders)[0]

    @staticmethod
    def epsilon_floor(delta: float, orders=None) -> float:
        """What the RDP-to-(epsilon, delta) conversion charges even for zero RDP (infinite noise)."""
        orders = DEFAULT_ORDERS if orders is None else orders
        return get_privacy_spent(orders=orders, rdp=np.zeros(len(orders)), delta=delta)[0]

    def state_dict(self) -> dict:
        return {"mechanism": self.mechanism, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict):
        self.history = [list(h) for h in state["history"]]


# ----- the privacy-loss-distribution (PLD) accountant -------------------------------------------------------------
# Koskela, Jalko, Honkela (2020): compose the PLD by FFT; Doroshenko, Ghazi, Kamath, Kumar, Manurangsi (2022):
# discretise it pessimistically ("connect the dots"). A PLD here is (i0, p, inf): mass p[j] at the loss (i0 + j) h,
# mass inf at +infinity; delta(eps) = inf + sum_{l > eps} p_l (1 - e^(eps - l)) (the hockey-stick divergence).
PLD_MAX_LOSS = 64.0  # one step's loss beyond +-64 counts as infinite (or moves up): no guarantee lives out there
PLD_MAX_BINS = 1 << 23  # the composed window's most bins (64 MiB); the mass beyond it goes to +infinity
PLD_T = torch.logspace(-2, 5, 29, dtype=torch.float64)
PLD_T = torch.cat([-PLD_T, PLD_T])  # the Chernoff bounds' t: the lower tail's, the upper tail's


def _log_delta_gaussian(eps: torch.Tensor, sigma: float) -> torch.Tensor:
    """log delta(eps) of the Gaussian mechanism, sensitivity 1, at any real eps (Balle & Wang 2018, Thm. 8)."""
    a = torch.special.log_ndtr(0.5 / sigma - eps * sigma)
    b = torch.special.log_ndtr(-0.5 / sigma - eps * sigma)
    x = eps + b - a  # < 0 in exact arithmetic; at huge sigma round-off can lift it to 0: then a alone bounds it
    return torch.where(x < 0, a + torch.log(-torch.expm1(x.clamp(max=-1e-300))), a)


def _log_delta_step(eps: torch.Tensor, sigma: float, q: float, remove: bool) -> torch.Tensor:
    """log delta(eps) of one step: the Gaussian's at a shifted eps, scaled. Remove (P = (1-q) N(0, s^2) + q N(1, s^2)
    against Q = N(0, s^2)): q delta_G(log(1 + (e^eps - 1) / q)); add (Q against P): c delta_G(eps + log(q / c)),
    c = 1 - (1-q) e^eps. Remove's loss is never below log(1-q), add's never above -log(1-q): there delta is exact."""
    log1mq = math.log1p(-q) if q < 1 else -math.inf
    if remove:
        c = torch.log(-torch.expm1(log1mq - eps))  # log(1 - (1-q) e^-eps)
        inside = math.log(q) + _log_delta_gaussian(eps - math.log(q) + c, sigma)
        return torch.where(eps > log1mq, inside, torch.log(-torch.expm1(eps)))
    c = torch.log(-torch.expm1(eps + log1mq))  # log(1 - (1-q) e^eps)
    return torch.where(eps + log1mq < 0, c + _log_delta_gaussian(eps + math.log(q) - c, sigma), -math.inf)


def _loss_range(sigma: float, q: float, tail: float) -> tuple[float, float]:
    """The remove direction's losses where the noise is `tail` deep on either side (add's are their negatives)."""
    z = -torch.special.ndtri(torch.tensor(tail, dtype=torch.float64))
    unsampled = torch.stack([-0.5 - z * sigma, 0.5 + z * sigma]) / sigma**2  # at x = z sigma and -z sigma - 1
    lo, hi = torch.logaddexp(torch.tensor(math.log1p(-q) if q < 1 else -math.inf), math.log(q) + unsampled).tolist()
    return max(lo, -PLD_MAX_LOSS), min(hi, PLD_MAX_LOSS)


def _connect_dots(delta: torch.Tensor, h: float) -> torch.Tensor:
    """The atoms on the grid whose delta, as a function of e^eps, is the polyline through (0, 1) and the true deltas,
    flat past the top: each atom is the polyline's kink (DGKKM 2022, Alg. 1). The true delta is convex in e^eps, so
    the polyline lies above it: pessimistic, and tight (rounding every loss up overstates eps by about T h / 2).
    The chord from (0, 1) puts the mass below the grid on the lowest atom; the mass above, delta[-1], is at +inf.

    delta [n] float64: delta(eps_i) at eps_i = (i0 + i) h, decreasing. Returns p [n] float64, p[i] the
    mass at loss eps_i: p[i] = e^eps_i (s_i - s_(i-1)), s_i the polyline's slope (in x = e^eps) on [eps_i,
    eps_(i+1)], s_(n-1) = 0 (flat past the top), s_(-1) the chord's from (0, 1) to (e^eps_0, delta_0). It
    depends on h alone, not on i0. A negative kink (round-off; the true curve is convex) is 0. Vectorised."""
    k = delta.diff() / math.expm1(h)  # e^eps_i times the polyline's slope on [eps_i, eps_i+1]
    left = torch.cat([delta[:1] - 1, math.exp(h) * k])
    return (torch.cat([k, delta.new_zeros(1)]) - left).clamp(min=0)


def _step_pld(sigma: float, q: float, h: float, tail: float, remove: bool):
    """One step's PLD in one direction, on the grid h [i0, i1] (rounded outwards)."""
    lo, hi = _loss_range(sigma, q, tail)
    i0, i1 = (math.floor(lo / h), math.ceil(hi / h)) if remove else (math.floor(-hi / h), math.ceil(-lo / h))
    delta = torch.exp(_log_delta_step(torch.arange(i0, i1 + 1, dtype=torch.float64) * h, sigma, q, remove))
    return i0, _connect_dots(delta, h), delta[-1].item()


def _log_mgf(pld, h: float) -> torch.Tensor:
    """log E[e^(t L)] over the finite atoms at each t in PLD_T, bounded above cheaply: the atoms summed in at most
    4096 blocks, each at its highest loss for t > 0 and its lowest for t < 0 (so the Chernoff bounds still hold)."""
    i0, p, _ = pld
    block = -(-len(p) // 4096)
    mass = torch.nn.functional.pad(p, (0, -len(p) % block)).view(-1, block).sum(1).log()
    start = (i0 + block * torch.arange(len(mass), dtype=torch.float64)) * h
    loss = torch.where(PLD_T[:, None] > 0, start + (block - 1) * h, start)
    return torch.logsumexp(mass + PLD_T[:, None] * loss, 1)


def _upper_tail(log_mgf: torch.Tensor, n: int, loss: float) -> float:
    """Chernoff: n composed steps have at most min_{t > 0} M(t)^n e^(-t loss) of their mass above `loss`."""
    return min(1.0, math.exp((n * log_mgf - PLD_T * loss)[PLD_T > 0].min().item()))


def _window(log_mgf: torch.Tensor, n: int, h: float, tail: float, i0: int, i1: int) -> tuple[int, int]:
    """The bins [lo, hi] outside which n composed steps have at most `tail` mass on either side (Chernoff)."""
    b = ((n * log_mgf - math.log(tail)) / PLD_T / h).clamp(n * i0, n * i1)  # tail mass above b (t > 0), below (t < 0)
    lo = math.floor(b[PLD_T < 0].max().item())
    return lo, max(lo, min(math.ceil(b[PLD_T > 0].min().item()), lo + PLD_MAX_BINS - 1))


def _fft_len(n: int) -> int:
    p = 1 << (n - 1).bit_length()  # a power of 2, or 3/4 or 5/8 of one: sizes the FFT is fast at
    return min(c for c in (p, 3 * p // 4, 5 * p // 8) if c >= n)


def _self_compose(pld, n: int, h: float, tail: float):
    """n steps: the n-th power of the spectrum, on a circle of bins that covers the Chernoff window. Mass below the
    window wraps round to higher losses (pessimistic); mass above it wraps to lower ones, so its bound goes to +inf
    too. Nothing is lost (lost mass would under-state eps)."""
    i0, p, inf = pld
    log_mgf = _log_mgf(pld, h)
    lo, hi = _window(log_mgf, n, h, tail, i0, i0 + len(p) - 1)
    size = _fft_len(hi - lo + 1)
    above = 0.0 if lo + size > n * (i0 + len(p) - 1) else _upper_tail(log_mgf, n, (lo + size - 1) * h)
    x = torch.nn.functional.pad(p, (0, -len(p) % size)).view(-1, size).sum(0)  # one step, wrapped onto the circle
    y = torch.fft.irfft(torch.fft.rfft(x) ** n, size).clamp(min=0)
    inf = -math.expm1(n * math.log1p(-inf)) if inf < 1 else 1.0  # 1 - (1 - inf)^n
    return lo, torch.roll(y, -((lo - n * i0) % size)), min(1.0, inf + above)


def _compose(a, b):
    """Two PLDs composed: a linear convolution (zero-padded, so nothing wraps)."""
    size = len(a[1]) + len(b[1]) - 1
    fa, fb = torch.fft.rfft(a[1], _fft_len(size)), torch.fft.rfft(b[1], _fft_len(size))
    return a[0] + b[0], torch.fft.irfft(fa * fb, _fft_len(size))[:size].clamp(min=0), a[2] + b[2] - a[2] * b[2]


def _epsilon(pld, h: float, delta: float) -> float:
    """The smallest eps with delta(eps) <= delta: delta at every atom, then, on the gap where it crosses, the exact
    solution of delta(eps) = A - e^eps B, with A and B the P-mass (and inf) and the Q-mass of the atoms above eps.

    pld = (i0, p, inf): mass p[j] (float64 [n]) at the loss (i0 + j) h (i0 an int, maybe negative), inf at
    +infinity; delta(eps) = inf + sum over atoms l > eps of p_l (1 - e^(eps - l)). Returns a float >= 0:
    math.inf if inf > delta; 0.0 if delta(0) <= delta; else the exact crossing log((A - delta) / B) on its gap
    (A = inf + the mass of the atoms above eps, B = the sum of p_l e^-l over them), not a grid point.
    Vectorised (n reaches 2^23: suffix sums, no Python loop over atoms); B in log space (e^-l over/underflows)."""
    i0, p, inf = pld
    if inf > delta:
        return math.inf
    p, i0 = p[max(0, 1 - i0):], max(i0, 1)  # the atoms at losses <= 0 count for no eps >= 0
    loss = (i0 + torch.arange(len(p), dtype=torch.float64)) * h
    a = torch.cat([p.flip(0).cumsum(0).flip(0), p.new_zeros(1)]) + inf  # over the atoms at loss[i] and above
    log_b = torch.cat([torch.logcumsumexp((p.log() - loss).flip(0), 0).flip(0), p.new_full((1,), -math.inf)])
    at_atoms = a[1:] - torch.exp(loss + log_b[1:])  # delta(loss[i]): the atoms above loss[i] count
    i = int(torch.searchsorted(-at_atoms, -delta))  # the first atom where delta(loss[i]) <= delta
    return max(0.0, math.log(a[i].item() - delta) - log_b[i].item()) if a[i] > delta else 0.0


class PLDAccountant:
    """(sigma, q, steps) run-length encoded; epsilon from the privacy-loss distribution, the remove and the add
    direction each composed over the whole history and the larger epsilon reported (the worse direction taken step
    by step is a different, looser, pair). The grid step h and the tail mass travel in state_dict, so a restored
    ledger runs the very computation that calibrated sigma."""

    mechanism = "pld"

    def __init__(self, value_discretization_interval: float = 1e-4, tail_mass: float = 1e-20):
        self.history: list[list] = []  # [[noise_multiplier, sample_rate, num_steps], ...]
        self.h, self.tail = value_discretization_interval, tail_mass
        self._steps, self._prefixes, self._eps = {}, {}, {}  # caches: one step's PLDs, composed prefixes, the last eps

    step = MomentsAccountant.step  # the same run-length history

    def _run(self, sigma: float, q: float, n: int) -> list:
        """n steps at (sigma, q), [remove, add]; at q = 1 both are the Gaussian's one PLD, composed once."""
        if (sigma, q) not in self._steps:
            directions = (True, False) if q < 1 else (True,)
            self._steps[sigma, q] = [_step_pld(sigma, q, self.h, self.tail, remove) for remove in directions]
        runs = [_self_compose(pld, n, self.h, self.tail) for pld in self._steps[sigma, q]]
        return runs if len(runs) == 2 else runs * 2

    def _composed(self, hist: tuple) -> list:
        """[remove, add] composed over `hist`, from its longest prefix composed before: a training loop's growing
        last run costs one FFT power, however long it is."""
        done = max((len(k) for k in self._prefixes if hist[:len(k)] == k), default=0)
        for j in range(done, len(hist)):
            run = self._run(*hist[j])
            self._prefixes[hist[:j + 1]] = list(map(_compose, self._prefixes[hist[:j]], run)) if j else run
        self._prefixes = {k: v for k, v in self._prefixes.items() if hist[:len(k)] == k}  # only its prefixes
        return self._prefixes[hist]

    def get_epsilon(self, delta: float) -> float:
        if not 1e-10 <= delta < 1:  # below ~1e-10, the FFT's round-off (~1e-17 a bin) is no longer small
            raise ValueError(f"delta={delta} must be in [1e-10, 1) for the PLD accountant")
        hist = tuple((s, q, n) for s, q, n in self.history if q > 0 and n > 0)  # q = 0 spends nothing
        if any(s == 0 for s, _, _ in hist):
            return math.inf  # no noise: no guarantee
        if not hist:
            return 0.0
        if (hist, delta) not in self._eps:  # progress lines ask again and again
            self._eps = {(hist, delta): max(_epsilon(pld, self.h, delta) for pld in self._composed(hist))}
        return self._eps[hist, delta]

    @staticmethod
    def epsilon_floor(delta: float) -> float:
        return 0.0  # infinite noise spends nothing: there is no conversion to charge a floor

    def state_dict(self) -> dict:
        return {"mechanism": self.mechanism, "history": [list(h) for h in self.history],
                "value_discretization_interval": self.h, "tail_mass": self.tail}

    def load_state_dict(self, state: dict):
        self.h, self.tail = state["value_discretization_interval"], state["tail_mass"]
        self.history, self._steps, self._prefixes, self._eps = [list(h) for h in state["history"]], {}, {}, {}


ACCOUNTANTS = {"pld": PLDAccountant, "rdp": MomentsAccountant}  # --accountant: calibrates sigma, keeps the ledger


def get_noise_multiplier(*, target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                         accountant=None, rtol: float = 1e-3) -> float:
    """The sigma whose epsilon lies in [target (1 - rtol), target], never above it, each try a fresh `accountant()`
    (the very computation the ledger runs): bracketed by factors of sqrt 2 either way (a tight accountant needs less
    noise than the moments one), then a safeguarded secant aimed mid-band, so a few tries do."""
    accountant = accountant or PLDAccountant
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon {target_epsilon} must be > 0")
    if math.isinf(target_epsilon) or steps == 0 or sample_rate == 0:
        return 0.0
    floor = accountant.epsilon_floor(target_delta)
    if target_epsilon <= floor:  # infinite noise still pays the conversion's delta term
        raise ValueError(f"epsilon={target_epsilon:g} is not allowed at delta={target_delta:g}: infinite noise "
                         f"spends {floor:.4f} in the {accountant.mechanism.upper()}-to-(epsilon, delta) conversion")

    def eps(sigma):
        acc = accountant()
        acc.step(noise_multiplier=sigma, sample_rate=sample_rate, num_steps=steps)
        return acc.get_epsilon(target_delta)

    # (sigma, eps) with eps above the target, and at most it; the start is the CLT's scale (T steps at rate q act like
    # one Gaussian step with noise sigma / (q sqrt T)), where a first try is cheap
    lo, hi, aim = (0.0, math.inf), (math.inf, 0.0), target_epsilon * (1 - rtol / 2)
    sigma = max(1.0, sample_rate * math.sqrt(steps))
    while True:
        e = eps(sigma)
        lo, hi = (lo, (sigma, e)) if e <= target_epsilon else ((sigma, e), hi)
        if hi[1] >= target_epsilon * (1 - rtol) or hi[0] < lo[0] * (1 + 1e-9) or e == 0 or sigma < 1e-6:
            return hi[0]  # (epsilon 0 at this sigma, e.g. q T < delta: less noise cannot be needed)
        if sigma > 1e6:
            raise ValueError(f"epsilon={target_epsilon:g} is not allowed: no noise multiplier up to 1e6 reaches it in "
                             f"steps={steps} at sample_rate={sample_rate:g}; ask for a larger epsilon or fewer steps")
        if lo[0] == 0 or hi[0] == math.inf:  # not bracketed yet: small steps, as a small sigma costs the most
            sigma *= 2**-0.5 if lo[0] == 0 else 2**0.5
            continue
        w = 0.5  # the secant of log eps against log sigma where both ends are finite, kept inside the bracket
        if math.isfinite(lo[1]) and hi[1] > 0:
            w = min(0.9, max(0.1, math.log(lo[1] / aim) / math.log(lo[1] / hi[1])))
        sigma = lo[0] * (hi[0] / lo[0]) ** w


# ===== DP-SGD (Algorithm 2): Poisson sampling, per-sample gradients, clipping, noise, and the loop ==========
def poisson_sample(num_examples: int, sample_rate: float, generator=None) -> torch.Tensor:
    """A Poisson sample, each example (unit) with probability q, as the accountant assumes (empty is fine)."""
    return (torch.rand(num_examples, generator=generator) < sample_rate).nonzero().flatten()


@dataclass
class Units:
    """The protected units of a stage's data: DP-SGD samples and clips units, not records, so the epsilon
    is that of a unit (a post, a review, a user) whatever its number of records k (else: group privacy of k)."""
    records: list  # each unit's record indices, in the data's order
    offset: list   # where each unit's turn through its records starts: a hash of its own id

    @classmethod
    def of(cls, units: list | None, num_records: int) -> Units:
        """`units[i]` names record i's unit (None: every record is its own unit)."""
        if units is not None and len(units) != num_records:
            raise ValueError(f"units has {len(units)} entries for {num_records} records: one per record")
        groups: dict = {}
        for i, u in enumerate(range(num_records) if units is None else units):
            groups.setdefault(u, []).append(i)
        offset = [int.from_bytes(hashlib.blake2b(str(u).encode(), digest_size=8).digest(), "big") for u in groups]
        return cls(list(groups.values()), offset)

    def __len__(self) -> int:
        return len(self.records)

    def pick(self, idx: torch.Tensor, step: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, valid) [B, w]: up to m records of each sampled unit, in turn from its offset at step t, a
        function of the unit's own records and t alone (nothing drawn, no counter to checkpoint); padded with
        its first pick, valid False; w = min(m, the most records of a sampled unit), as padding is waste."""
        w = min(m, max((len(self.records[j]) for j in idx.tolist()), default=1))  # (the turn below uses m)
        rows, valid = torch.zeros(len(idx), w, dtype=torch.long), torch.zeros(len(idx), w, dtype=torch.bool)
        for b, j in enumerate(idx.tolist()):
            recs, start = self.records[j], (step * m + self.offset[j]) % len(self.records[j])
            take = [recs[(start + i) % len(recs)] for i in range(min(m, len(recs)))]
            rows[b], valid[b, :len(take)] = torch.tensor(take + take[:1] * (w - len(take))), True
        return rows, valid


def unit_mean(loss_fn, has_aux: bool = False):
    """A unit's loss over its records [m, ...]: the mean of the valid ones, so its gradient is the mean of
    theirs, clipped once (user-level DP-SGD, Charles et al. 2024). Padding (`Units.pick` repeats the unit's own
    first record, so it is finite when the unit is) goes by `where`: a NaN times 0 is NaN."""
    def unit_loss_fn(params, valid, *records):
        out = vmap(loss_fn, in_dims=(None,) + (0,) * len(records))(params, *records)
        loss, aux = out if has_aux else (out, None)
        mean = lambda x: torch.where(valid.view(-1, *[1] * (x.dim() - 1)), x, 0.0).sum(0) / valid.sum()
        return (mean(loss), mean(aux)) if has_aux else mean(loss)
    return unit_loss_fn


def per_sample_grads(loss_fn, params: dict, *batch, chunk_size: int | None = None, has_aux: bool = False):
    """{name: [B, *shape]}: each sample's gradient of `loss_fn(params, *sample)`, which sees one sample
    alone, so nothing can mix samples (vmap over grad over functional_call, `chunk_size` at a time)."""
    return vmap(grad(loss_fn, has_aux=has_aux), in_dims=(None,) + (0,) * len(batch),
                chunk_size=chunk_size or None)(params, *batch)


def _flat(g: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, n]: one row per sample (also for scalar parameters and empty batches)."""
    return g.flatten(1) if g.dim() > 1 else g[:, None]


def finite_rows(grads: dict) -> torch.Tensor:
    """[B] bool: the samples whose gradient is finite in every coordinate."""
    return torch.stack([_flat(g).isfinite().all(1) for g in grads.values()]).all(0)


def privatize(grads: dict, *, max_grad_norm: float, noise_multiplier: float,
              expected_batch_size: float, generator=None) -> dict:
    """Algorithm 2's noisy gradient (sum_i clip_C(g_i) + N(0, sigma^2 C^2 I)) / (q N).

    grads {name: [B, *shape]}: sample i's gradient at [i] (B may be 0). Returns {name: [*shape]}, same keys.
    - clip_C(g_i) = g_i * min(1, C / (||g_i|| + 1e-6)), C = max_grad_norm, ||g_i|| the flat norm over *all*
      the parameters together (not tensor by tensor); C = inf: no clipping.
    - a g_i with any non-finite coordinate counts as the zero vector, the whole sample (it is within C).
    - noise: N(0, (noise_multiplier * C)^2) per coordinate from `generator`, added once to the sum (not per
      sample); none at noise_multiplier 0. An empty batch gives the noise alone.
    - the divisor is expected_batch_size (q N), never the realised B (that leaks the batch size, Opacus #571).
    `generator` must be secret. ValueError for noise with an infinite C (the sensitivity is C)."""
    if noise_multiplier > 0 and not math.isfinite(max_grad_norm):
        raise ValueError("noise needs a finite max_grad_norm: the sensitivity is C")
    first, ok = next(iter(grads.values())), finite_rows(grads)
    grads = {k: torch.where(ok.view(-1, *[1] * (g.dim() - 1)), g, 0.0) for k, g in grads.items()}
    flat_norms = torch.stack([_flat(g).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
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


def private_generator(seed: int | None = None) -> torch.Generator:
    """The draws the guarantee rests on (samples, noise, minibatches, rollouts), seeded from the OS and never
    shown: who knows the seed can subtract the noise. `seed` (--reproducible-noise): classrooms only."""
    if seed is None:
        return torch.Generator().manual_seed(secrets.randbits(63))
    print(f"warning: --reproducible-noise: DP noise and sampling come from --seed {seed}; the privacy "
          "guarantee holds only if that seed is secret", file=sys.stderr)
    return torch.Generator().manual_seed(seed)


@dataclass
class StagePlan:
    """Algorithm 2's inputs for one stage, fixed before it starts (what --dry-run prints)."""
    epsilon: float               # the target
    delta: float
    num_private_examples: float  # N; q = B / N (the audit passes the expected N)
    sample_rate: float           # q
    steps: int                   # T
    noise_multiplier: float      # sigma: the smallest that spends at most epsilon in T steps at rate q
    max_grad_norm: float         # C; inf at epsilon = inf: the same loop, no clipping, no noise
    accountant: str = "pld"      # ACCOUNTANTS' key: what calibrated sigma is what the ledger runs

    private = property(lambda self: math.isfinite(self.epsilon))
    expected_batch_size = property(lambda self: self.sample_rate * self.num_private_examples)


def plan_stage(args, num_private_examples: float, epsilon: float, delta: float, accountant: str = "pld") -> StagePlan:
    """q = B / N, T = steps (or epochs / q), and sigma for (epsilon, delta) over T steps at q."""
    q = min(1.0, args.batch_size / num_private_examples)
    steps = args.steps if args.steps is not None else math.ceil(args.epochs / q)
    private = math.isfinite(epsilon)
    sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q, steps=steps,
                                 accountant=ACCOUNTANTS[accountant]) if private else 0.0
    return StagePlan(epsilon, delta, num_private_examples, q, steps, sigma, args.max_grad_norm if private else math.inf,
                     accountant)


def trainable(module: nn.Module) -> dict:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


@dataclass
class TrainState:
    """What a stage carries from step to step, and what a checkpoint saves."""
    params: dict
    optimizer: torch.optim.Optimizer
    accountant: object
    step: int = 0       # the next step
    nonfinite: int = 0  # per-sample gradients that were not finite, counted as zero

    @classmethod
    def new(cls, module: nn.Module, lr: float, plan: StagePlan) -> TrainState:
        params = trainable(module)
        return cls(params, torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.01), ACCOUNTANTS[plan.accountant]())

    def account(self, plan: StagePlan):
        """The step is done: one Poisson-subsampled Gaussian with (sigma, q) for the accountant."""
        if plan.private:
            self.accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
        self.step += 1


class Hooks:
    """How a run watches a stage (checkpoints, timing, logs, progress: Part II's `RunHooks`). This
    default does nothing, so the loops run, and read, without any of it."""

    def restore(self, stage: str, state: TrainState, plan: StagePlan) -> TrainState:
        return state

    def phase(self, name: str):
        return contextlib.nullcontext()

    def step(self, stage: str, state: TrainState, plan: StagePlan, **stats):
        """After each step (state.step is the next one), with what it saw."""

    def finish(self, stage: str, state: TrainState, entry: dict):
        """The stage is done: `entry` is its ledger line."""


NO_HOOKS = Hooks()


def dp_step(state: TrainState, loss_fn, batch: tuple, plan: StagePlan, *, expected_batch_size: float,
            chunk_size=None, generator=None, has_aux: bool = False):
    """One DP-SGD update, per-sample grads -> privatize -> AdamW: (the noisy update, loss_fn's aux)."""
    grads, aux = {k: p.new_zeros((0,) + p.shape) for k, p in state.params.items()}, None
    if batch[0].shape[0] > 0:
        grads = per_sample_grads(loss_fn, {k: p.detach() for k, p in state.params.items()}, *batch,
                                 chunk_size=chunk_size, has_aux=has_aux)
        grads, aux = grads if has_aux else (grads, None)
    noisy = privatize(grads, max_grad_norm=plan.max_grad_norm, noise_multiplier=plan.noise_multiplier,
                      expected_batch_size=expected_batch_size, generator=generator)
    state.nonfinite += int((~finite_rows(grads)).sum())
    for name, p in state.params.items():
        p.grad = noisy[name].to(p.dtype)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    return noisy, aux


def trim_left(*tensors, mask):
    """Drop the columns that are padding in every row (exact, padding is masked); [N, T] or [N, 2, T]."""
    if mask.shape[0] == 0:
        return tensors
    first = int(mask.flatten(0, -2).any(0).float().argmax())
    return tuple(t[..., first:] for t in tensors)


def ledger_entry(accountant, plan: StagePlan) -> dict:
    """One stage's line of the privacy ledger; epsilon is what was *spent* (<= the target)."""
    return {"epsilon": accountant.get_epsilon(plan.delta) if plan.private else math.inf, "delta": plan.delta,
            "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate, "steps": plan.steps,
            "num_private_examples": plan.num_private_examples, "accountant": plan.accountant}


def dp_train(stage: str, module: nn.Module, loss_fn, data: tuple, plan: StagePlan, args, *,
             units: Units | None = None, generator, hooks: Hooks = NO_HOOKS, has_aux: bool = False) -> dict:
    """Algorithm 2 as a loop (stages 1 and 2) over `units` of `data` (the records first, data[1] the mask):
    each sampled unit gives one clipped gradient, of its record in turn or the mean of m (`unit_records`)."""
    state = hooks.restore(stage, TrainState.new(module, args.lr, plan), plan)
    device, m = next(iter(state.params.values())).device, args.unit_records
    units = Units.of(None, len(data[0])) if units is None else units
    for _ in range(state.step, plan.steps):
        idx = poisson_sample(len(units), plan.sample_rate, generator)  # B: each unit with prob. q
        rows, valid = units.pick(idx, state.step, m)
        rows = rows[:, 0] if m == 1 else rows
        batch = trim_left(*(t[rows] for t in data), mask=data[1][rows])
        batch = batch if m == 1 else (valid, *batch)
        update, aux = dp_step(state, loss_fn if m == 1 else unit_mean(loss_fn, has_aux),
                              tuple(t.to(device) for t in batch), plan, generator=generator,
                              expected_batch_size=plan.expected_batch_size, chunk_size=args.chunk_size,
                              has_aux=has_aux)  # (sum of clipped g_u + N(0, sigma^2 C^2)) / qN, then AdamW
        state.account(plan)
        hooks.step(stage, state, plan, batch_size=len(idx), aux=aux, update=update)
    entry = ledger_entry(state.accountant, plan)
    hooks.finish(stage, state, entry)
    return entry


# ===== MODELS: LoRA on GPT-2's query and value, a vmap-safe forward, value and reward heads =================
class LoRAQueryValue(nn.Module):
    """GPT-2's fused `c_attn` (x -> [q | k | v]) with rank-r updates on q and v. B starts at 0: the base
    model at init (Hu et al. 2021); `enabled = False` is DPPPO's reference model, for free."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__()
        d_in, d_out3 = base.weight.shape  # HF Conv1D stores (in, out)
        self.base, self.d, self.scaling, self.enabled = base, d_out3 // 3, alpha / rank, True
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
    if blocks := [m for m in model.modules() if hasattr(m, "c_attn")]:
        return blocks
    raise ValueError(f"model {type(model).__name__} has no GPT-2 attention (c_attn); only GPT-2-architecture "
                     "checkpoints are supported")


def add_lora(model: nn.Module, *, rank: int = 4, alpha: float = 32, dropout: float = 0.0) -> nn.Module:
    """Freeze `model`, LoRA on every attention's query and value (the paper's): only LoRA trains."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in _attn_blocks(model) if rank > 0 else []:
        block.c_attn = LoRAQueryValue(block.c_attn, rank, alpha, dropout).to(device=block.c_attn.weight.device)
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


def encode_rows(tokenizer, prompts: list[str], completions: list[str] | None = None, *,
                max_prompt: int, max_completion: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Rows [bos] + the last `max_prompt` prompt tokens + the first `max_completion` + [eos], and their loss
    targets: each a function of its own example alone."""
    bos, eos = tokenizer.bos_token_id or tokenizer.eos_token_id, tokenizer.eos_token_id
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"] if completions else None
    rows, targets = [], []
    for i, p in enumerate(p_ids):
        prompt = [bos] + p[-max_prompt:] if max_prompt else [bos]
        completion = (c_ids[i][:max_completion] + [eos]) if c_ids is not None else []
        rows.append(prompt + completion)
        targets.append([0] * (len(prompt) - 1) + [1] * len(completion))
    return rows, targets


def encode(tokenizer, prompts: list[str], completions: list[str] | None = None, *, max_prompt: int,
           max_completion: int = 0):
    """`encode_rows` left-padded, so every prompt ends in one column: (ids, mask, loss_mask) [N, T];
    loss_mask marks the targets of ids[:, 1:] that are completion tokens or the final eos."""
    rows, targets = encode_rows(tokenizer, prompts, completions, max_prompt=max_prompt, max_completion=max_completion)
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), tokenizer.pad_token_id, dtype=torch.long)
    mask, loss_mask = torch.zeros((len(rows), t), dtype=torch.long), torch.zeros((len(rows), t - 1))
    for i, (r, tg) in enumerate(zip(rows, targets)):
        ids[i, t - len(r):], mask[i, t - len(r):] = torch.tensor(r), 1
        loss_mask[i, t - len(r):] = torch.tensor(tg, dtype=torch.float32)
    return ids, mask, loss_mask


def additive_mask(attention_mask: torch.Tensor, query_len: int, dtype) -> torch.Tensor:
    """[B, 1, query_len, T] additive mask, queries the last columns: a query sees earlier real keys and
    always itself (no row all -inf; a padding query's output never reaches a loss)."""
    t = attention_mask.shape[-1]
    k_pos = torch.arange(t, device=attention_mask.device)
    q_pos = k_pos[t - query_len:, None]
    allowed = ((k_pos <= q_pos) & attention_mask.bool()[:, None, None, :]) | (k_pos == q_pos)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def hidden_states(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """GPT-2's last hidden states, exact under padding and vmap-safe: transformers' own mask from a 2-D
    mask has data-dependent control flow, so we pass a finished 4-D mask and explicit positions."""
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
    """DPPPO's policy: the LM (with LoRA) and a scalar value head on its last hidden state."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm, self.value_head = lm, nn.Linear(lm.config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, start: int = 0):
        """(logits, values) at positions start.. only (the heads need not see the prompt)."""
        h = hidden_states(self.lm, input_ids, attention_mask)[:, start:]
        return self.lm.lm_head(h), self.value_head(h).squeeze(-1)


class RewardModel(nn.Module):
    """r(x, y) from the LM and a small head. `last` (the paper's): w . h at the rightmost non-pad token,
    as GPT2ForSequenceClassification reads it. `tokens` (ours): w . mean h + c * mean log p(y_t | x, y_<t)
    + b * |y| over y: a small LM keeps what it copied in its log-probabilities (NOTES.md)."""

    def __init__(self, lm: nn.Module, head: str = "tokens", pad_token_id: int | None = None):
        super().__init__()
        if head not in ("tokens", "last"):
            raise ValueError(f"head={head!r} is not allowed; use 'tokens' or 'last'")
        self.lm, self.head = lm, head
        ids = (pad_token_id, lm.config.pad_token_id, lm.config.eos_token_id)
        self.pad_token_id = next(i for i in ids if i is not None)
        self.score = nn.Linear(lm.config.n_embd, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1 / math.sqrt(lm.config.n_embd + 1))
        if head == "tokens":  # c starts at a public prior, 3 units a nat: a DP (Adam) step moves it by ~lr
            self.loglik_coef = nn.Parameter(torch.tensor(3.0))
            self.length_coef = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, response_mask):
        """`response_mask` [B, T-1] marks the targets of input_ids[:, 1:] that belong to y."""
        h = hidden_states(self.lm, input_ids, attention_mask)
        if self.head == "last":  # vmap-safe "rightmost non-pad", as HF computes it
            last = (torch.arange(input_ids.shape[-1], device=h.device) * (input_ids != self.pad_token_id)).argmax(-1)
            return self.score(h[torch.arange(h.shape[0], device=h.device), last]).squeeze(-1)
        n = response_mask.sum(-1)
        loglik = (token_logprobs(self.lm.lm_head(h), input_ids) * response_mask).sum(-1) / n.clamp(min=1)
        pooled = (h[:, 1:] * response_mask[..., None]).sum(1) / n.clamp(min=1)[:, None]
        return self.score(pooled).squeeze(-1) + self.loglik_coef * loglik + self.length_coef * n


# ===== STAGE 1: DP SFT: LoRA fine-tuning on D1 with DP-SGD ==================================================
def arg(default, help: str, *, choices: tuple | None = None, limit: str | None = None, required: bool = False):
    """A config field with its one-line doc (also its --help text) and the values it allows:
    `choices`, or a `limit` such as ">0" or "(0,1)" (LIMITS), checked in one place (`check_config`)."""
    return field(default=default, metadata={"help": help, "choices": choices, "limit": limit, "required": required})


@dataclass
class SFTArgs:
    """Stage 1 (DP SFT) hyper-parameters (stage 2's too, and two more)."""
    epochs: float = arg(3.0, "passes over the stage's data in expectation; steps = epochs / q", limit=">0")
    steps: int | None = arg(None, "the number of steps instead (epsilon is accounted for the steps run)", limit=">=0")
    batch_size: int = arg(64, "expected batch size q * N (the paper: 512 in SFT, 4096 for the RM)", limit=">0")
    lr: float = arg(3e-3, "AdamW learning rate (the paper: 3e-4 in SFT, 2e-4 for the reward model)", limit=">0")
    max_grad_norm: float = arg(1.0, "per-sample clipping norm C (a comparison is one sample)", limit=">0")
    max_prompt: int = arg(96, "prompt tokens kept (the end of the prompt)", limit=">=0")
    max_completion: int = arg(48, "completion (summary) tokens kept", limit=">=0")
    chunk_size: int = arg(16, "per-sample gradients of this many at once (0: all; 16: fast on CPU)", limit=">=0")
    unit_records: int = arg(1, "records of a sampled unit in its one clipped gradient (1: one, in turn; m: their "
                            "mean)", limit=">=1")
    epsilon: float | None = arg(None, "this stage's own target epsilon (default --epsilon), for ablations", limit=">0")


def sft_loss(causal_lm: nn.Module):
    """loss_fn(params, ids, mask, loss_mask) for one sample: mean NLL over its loss tokens."""
    def loss_fn(params, ids, mask, loss_mask):
        lp = token_logprobs(functional_call(causal_lm, params, (ids[None], mask[None])), ids[None])[0]
        return -(lp * loss_mask).sum() / loss_mask.sum().clamp(min=1)
    return loss_fn


def dp_sft(lm, tokenizer, prompts, completions, plan: StagePlan, args: SFTArgs, *, units=None, generator,
           hooks: Hooks = NO_HOOKS) -> dict:
    """Stage 1: LoRA on (prompt, completion) pairs with DP-SGD, the loss on the completion only;
    `units[i]` names pair i's protected unit (default: each pair its own)."""
    model = CausalLM(lm)
    data = encode(tokenizer, prompts, completions, max_prompt=args.max_prompt, max_completion=args.max_completion)
    return dp_train("sft", model, sft_loss(model), data, plan, args, units=Units.of(units, len(prompts)),
                    generator=generator, hooks=hooks)


# ===== STAGE 2: DP REWARD MODEL (Eq. 1): Bradley-Terry on D2's comparisons, with DP-SGD =====================
@dataclass
class RMArgs(SFTArgs):
    """Stage 2 (DP reward model) hyper-parameters: stage 1's, and the head."""
    epochs: float = arg(2.0, "passes over D2 in expectation; steps = epochs / q", limit=">0")
    head: str = arg("tokens", "'tokens' (y's states, likelihood, length), 'last' (paper)", choices=("tokens", "last"))
    lora_rank: int = arg(0, "LoRA rank on q, v (the paper: 4); 0, the head alone, is better under DP here", limit=">=0")
    epsilon: float | None = arg(None, "this stage's own target epsilon (default --epsilon), for ablations", limit=">0")


def encode_comparisons(tokenizer, prompts, chosen, rejected, *, max_prompt, max_completion):
    """(ids, mask, response_mask) [N, 2, T(-1)]: chosen and rejected side by side, one sample a pair."""
    enc = encode(tokenizer, list(prompts) * 2, list(chosen) + list(rejected), max_prompt=max_prompt,
                 max_completion=max_completion)
    return tuple(torch.stack([t[:len(prompts)], t[len(prompts):]], 1) for t in enc)


def reward_loss(rm: nn.Module):
    """Eq. 1 for one comparison, -log sigma(r(x, y_chosen) - r(x, y_rejected)): one per-sample gradient.

    Returns loss_fn(params, ids, mask, response_mask) -> (loss, correct) for per_sample_grads (vmap over grad):
    - ids, mask [2, T], response_mask [2, T-1]: one comparison, row 0 the chosen completion and row 1 the
      rejected (encode_comparisons' pairs); functional_call(rm, params, (ids, mask, response_mask)) scores
      both rows at once: r [2].
    - loss: -log sigma(r[0] - r[1]), a scalar, finite at any margin (logsigmoid, not log of sigmoid).
    - correct: 1.0 if r[0] > r[1] (strictly) else 0.0, a float tensor, detached (the step's accuracy).
    Under vmap: no .item(), float() or Python `if` on a tensor."""
    def loss_fn(params, ids, mask, response_mask):
        r = functional_call(rm, params, (ids, mask, response_mask))
        return -nn.functional.logsigmoid(r[0] - r[1]), (r[0] > r[1]).float().detach()
    return loss_fn


def dp_reward_model(rm: RewardModel, tokenizer, prompts, chosen, rejected, plan: StagePlan, args: RMArgs, *,
                    units=None, generator, hooks: Hooks = NO_HOOKS) -> dict:
    """Stage 2: the scalar head (and LoRA) on comparisons with DP-SGD; `units[i]` names comparison i's unit."""
    data = encode_comparisons(tokenizer, prompts, chosen, rejected, max_prompt=args.max_prompt,
                              max_completion=args.max_completion)
    return dp_train("rm", rm, reward_loss(rm), data, plan, args, units=Units.of(units, len(prompts)),
                    generator=generator, hooks=hooks, has_aux=True)


# ===== STAGE 3: DPPPO (Algorithm 3, Eq. 2) ==================================================================
def sample_categorical(probs: torch.Tensor, generator=None, u: torch.Tensor | None = None) -> torch.Tensor:
    """One index per row of `probs` [B, V], the CDF inverted at a uniform u [B]: multinomial's law
    from one number per row, not V exponentials (40 % of sampling time on CPU).

    probs >= 0; a row need not sum to 1 (it is scaled by its total). u [B] in [0, 1): given, or drawn with
    torch.rand(B, generator=generator) when None. Returns [B] long: the smallest i with cdf_i > u * cdf_(V-1),
    cdf the row's cumulative sum, at most V - 1 (round-off). So a zero-probability token is never drawn (at
    u = 0 neither), and the same u gives the same draws (sample draws every step's u at once: chunks agree)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], generator=generator) if u is None else u
    return torch.searchsorted(cdf, u.to(probs.device)[:, None] * cdf[:, -1:], right=True).squeeze(1).clamp(
        max=probs.shape[1] - 1)


# transformers 5.x renamed GPT-2's cache argument `past_key_values` -> `cache`
_CACHE_ARG = "cache" if "cache" in inspect.signature(GPT2Model.forward).parameters else "past_key_values"


def row_chunks(n: int, chunk_size: int) -> list[slice]:
    return [slice(s, s + (chunk_size or n)) for s in range(0, n, chunk_size or max(n, 1))] or [slice(0, 0)]


def _sample_rows(model, ids, mask, limit, uniforms, eos_id):
    lm, b, p = model.lm, ids.shape[0], ids.shape[1]
    alive, logprobs, hidden, new, cache = torch.ones(b, dtype=torch.bool, device=ids.device), [], [], ids, None
    for t in range(int(limit.max()) if b else 0):
        out = lm.transformer(input_ids=new, position_ids=positions_of(mask)[:, -new.shape[1]:], use_cache=True,
                             attention_mask=additive_mask(mask, new.shape[1], lm.lm_head.weight.dtype),
                             **{_CACHE_ARG: cache})
        cache, h = out.get("cache", out.get("past_key_values")), out.last_hidden_state[:, -1]
        logp = lm.lm_head(h).float().log_softmax(-1)
        nxt = logp.argmax(-1) if uniforms is None else sample_categorical(logp.exp(), u=uniforms[t])
        alive = alive & (t < limit)
        logprobs.append(logp.gather(1, nxt[:, None]).squeeze(1) * alive)
        hidden.append(h * alive[:, None])
        new = torch.where(alive, nxt, torch.zeros_like(nxt))[:, None]
        ids, mask = torch.cat([ids, new], 1), torch.cat([mask, alive.long()[:, None]], 1)
        alive = alive & (nxt != eos_id) if eos_id is not None else alive
        if not alive.any():  # every row has stopped: no all-padding columns after this one
            break

    def by_target(columns, *shape):  # the first response token is predicted at the last prompt position
        return torch.cat([torch.zeros(b, p - 1, *shape, device=ids.device)] + [c[:, None] for c in columns], 1)
    return (ids, mask, by_target([m.float() for m in mask[:, p:].T]), by_target(logprobs),
            by_target(hidden, lm.config.n_embd))


@torch.no_grad()
def sample(model: nn.Module, ids, mask, *, max_new_tokens, generator, eos_id=None, greedy: bool = False,
           chunk_size: int = 0):
    """Pure ancestral sampling, key/value cached (no top-k/p or minimum length: valid KL estimates; `greedy`: the
    argmax), a row to max_new_tokens or `eos_id`, `chunk_size` rows at a time: all uniforms drawn at once, rows
    draw the same in chunks or whole. Returns ids, mask [B, T], action_mask, logprobs, hidden [B, T-1(, d)]."""
    limit = torch.as_tensor(max_new_tokens, device=ids.device).expand(ids.shape[0])
    uniforms = torch.rand(int(limit.max()) if len(ids) else 0, len(ids), generator=generator) if not greedy else None
    parts = [_sample_rows(model, ids[r], mask[r], limit[r], None if greedy else uniforms[:, r], eos_id)
             for r in row_chunks(len(ids), chunk_size)]
    if len(parts) == 1:
        return parts[0]
    width = max(x[0].shape[1] for x in parts)  # chunks that stopped early: right-pad with zeros, as dead rows are
    return tuple(torch.cat([nn.functional.pad(x[i], (0, 0) * (i == 4) + (0, width - x[0].shape[1])) for x in parts])
                 for i in range(5))


def gae(rewards, values, action_mask, *, gamma: float, lam: float):
    """(advantages, returns) by GAE along each row's action positions; nothing mixes trajectories.

    rewards, values, action_mask [B, T-1], by target: action_mask 1 on each row's response columns (a
    contiguous run, starting and ending anywhere); rewards and values elsewhere are ignored, whatever they
    hold. gamma: discount; lam: GAE's lambda. Returns (advantages, returns), both [B, T-1] and 0 off the
    response. Over a row's response columns k = 1..n:
        delta_k = r_k + gamma * V_(k+1) - V_k, with V_(n+1) = 0 (nothing follows the last token);
        A_k = delta_k + gamma * lam * A_(k+1), with A_(n+1) = 0;  returns_k = A_k + V_k."""
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(next_adv)
    for t in reversed(range(rewards.shape[1])):
        m = action_mask[:, t]
        a = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_adv
        adv[:, t] = a * m
        next_adv, next_value = torch.where(m > 0, a, next_adv), torch.where(m > 0, values[:, t], next_value)
    return adv, (adv + values) * action_mask


def masked_mean(x, m):
    return (x * m).sum(-1) / m.sum(-1).clamp(min=1)


def ppo_loss(policy: nn.Module, *, cliprange: float, cliprange_value: float, vf_coef: float):
    """One trajectory's clipped surrogate + vf_coef * clipped value loss, means over *its own* tokens.

    Returns loss_fn(params, ids, mask, action_mask, old_logprobs, old_values, advantages, returns) -> (loss,
    aux) for per_sample_grads, which vmaps grad(loss_fn) over the batch: one trajectory, no batch dimension.
    - ids, mask [T]: the prompt (left-padded) then the response (right-padded).
    - the other five [L]: Rollout's per-target columns from prompt_len - 1 on; column j is about the token
      ids[start + 1 + j], start = T - 1 - L (a Python int, from the shapes alone). A column where action_mask
      is 0 (padding) is ignored, whatever the others hold there.
    - functional_call(policy, params, (ids[None], mask[None], start)) -> logits [1, T - start, V], values
      [1, T - start]; new log-probs token_logprobs(logits, ids[None, start:])[0], new values values[0, :-1]
      (V of the state each token is chosen in), both [L].
    - ratio = exp(new - old log-probs); policy term max(-A ratio, -A clip(ratio, 1 - cliprange, 1 + cliprange));
      value term 0.5 max((V - R)^2, (V_clip - R)^2), V_clip = old_values + clip(V - old_values, +-cliprange_value).
    - loss_pg, loss_vf: the terms' means over the action tokens (masked_mean); clipfrac: the share of the
      action tokens with |ratio - 1| > cliprange. Returns (loss_pg + vf_coef * loss_vf,
      torch.stack([loss_pg, loss_vf, clipfrac]).detach()).
    Under vmap: no .item(), float() or Python `if` on a tensor, no boolean-mask indexing: masks, torch.where."""
    def loss_fn(params, ids, mask, action_mask, old_logprobs, old_values, advantages, returns):
        start = ids.shape[-1] - 1 - action_mask.shape[-1]  # the response columns, static: no data-dependent slicing
        logits, values = functional_call(policy, params, (ids[None], mask[None], start))
        logprobs, values = token_logprobs(logits, ids[None, start:])[0], values[0, :-1]
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
    """Stage 3 (DPPPO) hyper-parameters; TRL's defaults where the paper says "TRL defaults"."""
    steps: int = arg(40, "PPO iterations, each one Poisson-sampled rollout batch and one accountant step", limit=">=0")
    batch_size: int = arg(128, "expected rollout batch q * |D3| (the paper: 4096)", limit=">0")
    minibatches: int = arg(1, "k updates an iteration (the paper: 16); under DP they cost sqrt(k)", limit=">=1")
    epochs: int = arg(1, "T_PPO; above 1 only without privacy (a trajectory must be in one noisy update)", limit=">=1")
    lr: float = arg(1e-2, "AdamW learning rate (the paper: 3e-3 for GPT-2 small, with 16 minibatches)", limit=">0")
    lr_schedule: str = arg("constant", "'linear': to 0 over the iterations (public)", choices=("constant", "linear"))
    kl_coef: float = arg(0.1, "beta of Eq. 2, fixed (an adaptive one reads private batches)", limit="finite>=0")
    gamma: float = arg(1.0, "discount", limit="[0,1]")
    lam: float = arg(0.95, "GAE lambda", limit="[0,1]")
    cliprange: float = arg(0.2, "policy ratio clip", limit="finite>=0")
    cliprange_value: float = arg(0.2, "value clip", limit="finite>=0")
    vf_coef: float = arg(0.1, "value loss weight", limit="finite>=0")
    max_grad_norm: float = arg(1.0, "per-trajectory clipping norm C (LoRA and value head together)", limit=">0")
    baseline: str = arg("empty", "b(x): r(x, ''), r(x, greedy y) or 0", choices=("empty", "greedy", "none"))
    whiten: str = arg("none", "advantages whitened within a trajectory, or not", choices=("none", "trajectory"))
    response_min: int = arg(4, "fewest new tokens (each trajectory's length is uniform in [min, max])", limit=">=1")
    response_max: int = arg(16, "most new tokens", limit=">=1")
    max_prompt: int = arg(96, "prompt tokens kept (the end of the prompt)", limit=">=0")
    chunk_size: int = arg(64, "per-sample gradients of this many at once (0: all; 64: fast on CPU)", limit=">=0")
    unit_records: int = arg(1, "prompts of a sampled unit in its one clipped gradient (1: one, in turn; m: the "
                            "mean over their trajectories)", limit=">=1")
    rollout_chunk_size: int = arg(256, "rows a pass to sample, the reference, the baseline (0: all)", limit=">=0")
    epsilon: float | None = arg(None, "this stage's own target epsilon (default --epsilon), for ablations", limit=">0")

    def validate(self, epsilon: float):
        """The rules between fields (each field's own limits are on the field)."""
        if math.isfinite(epsilon) and self.epochs != 1:
            raise ValueError(f"epochs={self.epochs} needs epsilon=inf: with privacy each trajectory must land in "
                             "exactly one noisy update (T_PPO = 1)")
        if self.response_min > self.response_max:
            raise ValueError(f"response_min={self.response_min} is not allowed above response_max={self.response_max}")


@dataclass
class Rollout:
    """ids/mask [B, T]: prompts (left-padded) + responses. The rest are [B, T-1], by *target*: column t is about
    ids[:, t + 1], predicted at t, so a token's log-prob and its state's value share a column."""
    ids: torch.Tensor
    mask: torch.Tensor
    action_mask: torch.Tensor   # 1 where ids[:, t + 1] is a response token (an action of the policy)
    logprobs: torch.Tensor      # log pi_old(a_t | s_t), from the sampler
    values: torch.Tensor        # V_old(s_t), the value head on the sampler's hidden state
    prompt_len: int             # responses are predicted from column prompt_len - 1 on


@torch.no_grad()
def rollout(policy: ActorCritic, prompt_ids, prompt_mask, *, lengths, generator, eos_id, chunk_size=0) -> Rollout:
    """Responses; the sampler's log-probs and states are pi_old and V_old, so only the reference needs a pass."""
    policy.eval()
    ids, mask, act, logprobs, hidden = sample(policy, prompt_ids, prompt_mask, max_new_tokens=lengths,
                                              generator=generator, eos_id=eos_id, chunk_size=chunk_size)
    return Rollout(ids, mask, act, logprobs, policy.value_head(hidden).squeeze(-1) * act, prompt_ids.shape[1])


@torch.no_grad()
def reference_logprobs(policy: ActorCritic, ro: Rollout, chunk_size=0) -> torch.Tensor:
    """log LM_sft of each response token [B, T-1]: the same network with LoRA off, `chunk_size` rows a pass."""
    if not len(ro.ids):  # an empty Poisson batch has nothing to score
        return ro.logprobs
    p = ro.prompt_len
    with lora_disabled(policy):
        ref = [token_logprobs(policy.lm.lm_head(hidden_states(policy.lm, ro.ids[r], ro.mask[r])[:, p - 1:]),
                              ro.ids[r, p - 1:]) for r in row_chunks(len(ro.ids), chunk_size)]
    return torch.cat([torch.zeros_like(ro.logprobs[:, :p - 1]), torch.cat(ref)], 1) * ro.action_mask


def decode_responses(tokenizer, ids, action_mask, eos_id) -> list[str]:
    """The text of each row's response tokens (action_mask marks targets of ids[:, 1:])."""
    return [tokenizer.decode([t for t, keep in zip(row, m) if keep and t != eos_id], skip_special_tokens=True)
            for row, m in zip(ids[:, 1:].tolist(), action_mask.tolist())]


class PromptBaseline:
    """b(x) from the trajectory's own prompt alone, once per prompt: unbiased, and no statistic crosses
    trajectories (unlike batch whitening). 'empty': r(x, ""); 'greedy': r(x, the reference's greedy y)."""

    def __init__(self, policy, tokenizer, reward_fn, prompts, args, eos_id):
        self.policy, self.tok, self.reward_fn, self.prompts, self.args, self.eos_id, self.cache = \
            policy, tokenizer, reward_fn, prompts, args, eos_id, {}

    @torch.no_grad()
    def __call__(self, idx, prompt_ids, prompt_mask) -> torch.Tensor:
        """b(x) of prompts `idx` (their ids and mask as batched); the new ones are scored now."""
        new = [j for j, i in enumerate(idx.tolist()) if i not in self.cache]
        prompts = [self.prompts[i] for i in idx[new].tolist()]
        if new and self.args.baseline == "empty":
            self.cache.update(zip(idx[new].tolist(), self.reward_fn(prompts, [""] * len(new)).tolist()))
        elif new and self.args.baseline == "greedy":
            rows = torch.tensor(new, dtype=torch.long, device=prompt_ids.device)
            with lora_disabled(self.policy):
                out, _, act, _, _ = sample(self.policy, *trim_left(prompt_ids[rows], prompt_mask[rows],
                                                                   mask=prompt_mask[rows]),
                                           max_new_tokens=self.args.response_max, generator=None, eos_id=self.eos_id,
                                           greedy=True, chunk_size=self.args.rollout_chunk_size)
            b = self.reward_fn(prompts, decode_responses(self.tok, out, act, self.eos_id))
            self.cache.update(zip(idx[new].tolist(), b.tolist()))
        return torch.tensor([self.cache.get(i, 0.0) for i in idx.tolist()], device=prompt_ids.device)


def kl_rewards(scores, logprobs, ref_logprobs, action_mask, kl_coef):
    """Eq. 2 per token: R = -beta * (log pi - log pi_sft) on every response token, + r(x, y) on the last.

    scores [B]: r(x, y) (less the baseline); logprobs, ref_logprobs, action_mask [B, T-1], by target
    (Rollout), action_mask 1 on each row's response columns; kl_coef: beta. Returns (rewards [B, T-1], kl [B]):
    - rewards: -beta * (logprobs - ref_logprobs) on the response columns, 0 on every other column (prompt,
      padding: whatever the log-probs hold there), plus scores[b] on row b's *last response column* (rows end
      at different columns: not the tensor's last); a row with no response column gets no score.
    - kl: each row's sum of (logprobs - ref_logprobs) over its response columns, the KL estimate that is logged.
    The inputs are left as they were."""
    kl = (logprobs - ref_logprobs) * action_mask
    rewards = -kl_coef * kl
    last = (torch.arange(action_mask.shape[1], device=action_mask.device) * action_mask).argmax(-1)
    rewards[torch.arange(len(scores)), last] += scores * (action_mask.sum(-1) > 0)
    return rewards, kl.sum(-1)


def ppo_update(state: TrainState, loss_fn, ro: Rollout, advantages, returns, plan: StagePlan, args, generator,
               unit_rows: tuple | None = None):
    """Each unit to one of k minibatches, drawn apart from the data and the other units: with T_PPO = 1 it is
    in one noisy update (divided by the expected qN / k) as one clipped vector, its trajectory's gradient or
    the mean of its trajectories' (`unit_rows`: (rows of `ro` [B, m], valid)). Returns (policy loss, value
    loss, clip fraction) per unit."""
    if args.whiten == "trajectory":  # within one trajectory, never across the batch
        mu = masked_mean(advantages, ro.action_mask)[:, None]
        sd = masked_mean((advantages - mu) ** 2, ro.action_mask)[:, None].sqrt()
        advantages = (advantages - mu) / (sd + 1e-8) * ro.action_mask
    traj, valid = unit_rows if unit_rows is not None else (None, None)
    num_units = len(ro.ids) if traj is None else len(traj)
    minibatch_of = torch.randint(args.minibatches, (num_units,), generator=generator)
    r = slice(ro.prompt_len - 1, None)  # the target columns that can hold response tokens
    batch = (ro.ids, ro.mask, ro.action_mask[:, r], ro.logprobs[:, r], ro.values[:, r], advantages[:, r], returns[:, r])
    stats = []
    for _, j in itertools.product(range(args.epochs), range(args.minibatches)):
        sel = (minibatch_of == j).nonzero().flatten().to(ro.ids.device)
        mb = tuple(x[sel] for x in batch) if traj is None else (valid[sel], *(x[traj[sel]] for x in batch))
        _, aux = dp_step(state, loss_fn if traj is None else unit_mean(loss_fn, True), mb, plan, generator=generator,
                         expected_batch_size=plan.expected_batch_size / args.minibatches, chunk_size=args.chunk_size,
                         has_aux=True)
        stats += [aux] if aux is not None else []
    return torch.cat(stats) if stats else torch.zeros(0, 3)


def dpppo(policy: ActorCritic, tokenizer, prompts: list[str], reward_fn, plan: StagePlan, args: PPOArgs, *,
          units=None, generator, eos_id=None, hooks: Hooks = NO_HOOKS) -> dict:
    """Stage 3, Algorithm 3: PPO with DP-SGD on D3's prompts, rewarded by `reward_fn(prompts, responses)`;
    `units[i]` names prompt i's protected unit (default: each prompt its own).

    reward_fn(prompt texts, response texts) -> [n]. Returns ledger_entry(state.accountant, plan). First
    args.validate(plan.epsilon); state = hooks.restore("ppo", TrainState.new(policy, args.lr, plan), plan);
    then each iteration `it` from state.step to plan.steps - 1, every draw from `generator` (secret):
    0. every param group's lr: args.lr * (1 - it / plan.steps) if args.lr_schedule == "linear", else args.lr.
    1. Units.of(units, N).pick(poisson_sample(#units, plan.sample_rate, generator), it, args.unit_records): a
       Poisson sample, never a fixed size; an empty one is normal and still takes its noisy update(s).
    2. their prompts (encoded once: encode(..., max_prompt=args.max_prompt), then trim_left); rollout() responses
       of lengths uniform in [response_min, response_max] (torch.randint, generator), rollout_chunk_size rows a pass,
       and their reference_logprobs().
    3. scores = reward_fn(prompts, decode_responses(...)); kl_rewards (Eq. 2, beta = args.kl_coef) of the scores
       less PromptBaseline(...)(idx, ...); gae (args.gamma, args.lam).
    4. ppo_update(): one epoch of DP-SGD over args.minibatches minibatches (unit_rows when unit_records > 1).
    5. state.account(plan): one accountant step per iteration, the empty ones too.
    6. hooks.step("ppo", state, plan, batch_size=<units sampled>, reward=scores (before the baseline), kl=kl,
       aux=<ppo_update's stats>, response_len=action_mask.sum(-1), lr=<the lr used>).
    At the end hooks.finish("ppo", state, entry). hooks.phase(name) times "sampling", "reference", "reward"
    and "update"."""
    args.validate(plan.epsilon)
    state = hooks.restore("ppo", TrainState.new(policy, args.lr, plan), plan)
    device = next(iter(state.params.values())).device
    p_ids, p_mask, _ = encode(tokenizer, prompts, max_prompt=args.max_prompt)
    loss_fn = ppo_loss(policy, cliprange=args.cliprange, cliprange_value=args.cliprange_value, vf_coef=args.vf_coef)
    baseline = PromptBaseline(policy, tokenizer, reward_fn, prompts, args, eos_id)
    units, m = Units.of(units, len(prompts)), args.unit_records
    for it in range(state.step, plan.steps):
        for group in state.optimizer.param_groups:  # a function of the iteration only: no private data
            group["lr"] = args.lr * (1 - it / plan.steps) if args.lr_schedule == "linear" else args.lr
        # 1. Poisson-sample units of D3 and take their prompts x (an empty batch still takes its noisy steps).
        rows, valid = units.pick(poisson_sample(len(units), plan.sample_rate, generator), it, m)
        idx = rows[valid]  # one prompt a unit (m = 1), or up to m
        x_ids, x_mask = (t.to(device) for t in trim_left(p_ids[idx], p_mask[idx], mask=p_mask[idx]))
        # 2. Roll out y ~ pi(. | x), keeping log pi_old, log LM_sft and V_old per response token.
        lengths = torch.randint(args.response_min, args.response_max + 1, (len(idx),), generator=generator)
        with hooks.phase("sampling"):
            ro = rollout(policy, x_ids, x_mask, lengths=lengths.to(device), generator=generator, eos_id=eos_id,
                         chunk_size=args.rollout_chunk_size)
        with hooks.phase("reference"):
            ref_logprobs = reference_logprobs(policy, ro, args.rollout_chunk_size)  # log LM_sft(a_t | s_t)
        # 3. Score r(x, y) - b(x), spread Eq. 2 over the tokens, and estimate advantages (GAE).
        with hooks.phase("reward"):
            responses = decode_responses(tokenizer, ro.ids, ro.action_mask, eos_id)
            scores = reward_fn([prompts[i] for i in idx.tolist()], responses).to(device).float()
            centred = scores - baseline(idx, x_ids, x_mask)
        rewards, kl = kl_rewards(centred, ro.logprobs, ref_logprobs, ro.action_mask, args.kl_coef)
        advantages, returns = gae(rewards, ro.values, ro.action_mask, gamma=args.gamma, lam=args.lam)
        # 4. T_PPO = 1 epoch of DP-SGD on the clipped PPO loss, over k minibatches of the trajectories.
        with hooks.phase("update"):
            unit_rows = None
            if m > 1:  # a unit's trajectories in `ro`, padded by its first
                pos = valid.flatten().cumsum(0).view_as(valid) - 1
                unit_rows = torch.where(valid, pos, pos[:, :1]).to(device), valid.to(device)
            stats = ppo_update(state, loss_fn, ro, advantages, returns, plan, args, generator, unit_rows)
        state.account(plan)  # k disjoint minibatches of one Poisson sample: one subsampled Gaussian
        hooks.step("ppo", state, plan, batch_size=len(rows), reward=scores, kl=kl, aux=stats,
                   response_len=ro.action_mask.sum(-1), lr=state.optimizer.param_groups[0]["lr"])
    entry = ledger_entry(state.accountant, plan)
    hooks.finish("ppo", state, entry)
    return entry


# ===== PRIVACY LEDGER: the total over stages, from each stage's `ledger_entry` ==============================
def compose_ledger(stages: dict, delta: float, composition: str) -> float:
    """Total epsilon: parallel over disjoint D1/D2/D3 (the paper's theorem), the max; sequential (a user
    in several stages), every stage's steps composed in the run's accountant, converted once."""
    if composition == "parallel":
        return max(s["epsilon"] for s in stages.values())
    if any(math.isinf(s["epsilon"]) for s in stages.values()):
        return math.inf
    accountant = ACCOUNTANTS[next(iter(stages.values())).get("accountant", "rdp")]()
    for s in stages.values():
        accountant.step(noise_multiplier=s["noise_multiplier"], sample_rate=s["sample_rate"], num_steps=s["steps"])
    return accountant.get_epsilon(delta)


# #############################################################################################
# PART II: RUNNING IT. Built-in tasks and base model, loaders, the split by protected unit, one
# pipeline for both tasks, run directories and checkpoints, sweeps. Nothing here changes Part I.
# #############################################################################################


class UserError(Exception):
    """A bad value from the user: the CLI prints it as one line and exits 2."""


def flag_words(error: ValueError, prefix: str = "", **flags) -> UserError:
    """Part I's ValueError in the CLI's words: `epochs=4` -> `--ppo-epochs 4` (`flags`: field -> flag;
    any other field -> `--<prefix><field>`)."""
    flag = lambda m: flags.get(m[1], "--" + (prefix + m[1]).replace("_", "-")) + " "
    return UserError(re.sub(r"\b([a-z_]+)=", flag, str(error)))


# ===== DATA: built-in synthetic tasks (offline), base model, loaders, the split by protected unit ============
# The built-in tasks stand in for IMDb and Reddit TL;DR, generated from a seed; the public pre-training
# corpus has its own seed, and the private generators skip every public text (`exclude`).

NOUNS = ("film movie story plot acting cast director script soundtrack ending dialogue cinematography characters "
         "pacing visuals performances music humor effects").split()
POSITIVE = ("great wonderful brilliant moving beautiful superb charming delightful fantastic gripping hilarious "
            "memorable stunning excellent touching clever good fun lovely").split()
NEGATIVE = ("boring awful terrible dull bad weak clumsy predictable tedious poor messy forgettable painful horrible "
            "bland silly lazy ugly cheap").split()
NEUTRAL = "long quiet slow strange simple old dark loud familiar short serious odd".split()
POS_VERBS, NEG_VERBS = "loved enjoyed liked adored".split(), "hated disliked regretted loathed".split()
INTENSIFIERS, NEGATIONS = "really very truly quite so pretty incredibly".split(), ("not", "never", "hardly", "n't")
GENRES = "drama comedy thriller western romance documentary musical mystery cartoon sequel remake".split()
TOPICS = ["a family", "a small town", "two brothers", "a lost dog", "a war", "a detective", "first love", "a heist",
          "a haunted house", "a long journey", "a robot", "an old sailor", "a band", "a school", "a wedding",
          "a storm", "a king", "a farmer", "a spy", "a chef"]
ACTORS = "smith jones garcia chen patel novak rossi kim silva murphy okafor tanaka berg dubois moreau lopez khan ward"
ACTORS = ACTORS.split()
REVIEW_KINDS = ("positive", "negative", "mixed", "neutral")
REVIEW_KIND_CDF = np.cumsum([0.4, 0.4, 0.1, 0.1]) / np.cumsum([0.4, 0.4, 0.1, 0.1])[-1]  # as rng.choice(p=) builds it


def pick(rng: np.random.Generator, options):
    """rng.choice(options)'s draw, without making an array of `options` each call (a third faster)."""
    return options[rng.integers(len(options))]


def _review(rng: np.random.Generator, sentiment: str) -> str:
    """One synthetic movie review; `sentiment` in positive / negative / mixed / neutral."""
    def adj(pol):
        return pick(rng, {1: POSITIVE, -1: NEGATIVE, 0: NEUTRAL}[pol])

    def polarity():
        if sentiment in ("mixed", "neutral"):
            return pick(rng, (1, -1) if sentiment == "mixed" else (0, 0, 1, -1))
        base = 1 if sentiment == "positive" else -1
        return base if rng.random() < 0.85 else -base

    def sentence():
        pol, noun, kind = polarity(), pick(rng, NOUNS), rng.integers(9)
        intens = (pick(rng, INTENSIFIERS) + " ") if rng.random() < 0.4 else ""
        if kind == 0:
            return f"the {noun} was {intens}{adj(pol)} ."
        if kind == 1 and pol != 0:  # negation: "not bad" is mildly positive, "not great" negative
            return f"the {noun} was {pick(rng, ('not', 'never'))} {adj(-pol)} ."
        if kind == 2 and pol != 0:
            return f"i {pick(rng, POS_VERBS if pol > 0 else NEG_VERBS)} the {noun} ."
        if kind == 3:
            return f"{pick(rng, ACTORS)} gives a {intens}{adj(pol)} performance ."
        if kind == 4:
            return f"it is a {adj(pol)} {pick(rng, GENRES)} about {pick(rng, TOPICS)} ."
        if kind == 5 and pol != 0:
            return f"i would {'' if pol > 0 else 'not '}recommend it to anyone ."
        if kind == 6:
            return f"but the {noun} felt {intens}{adj(pol)} ."
        if kind == 7:
            return f"watching it was a {adj(pol)} experience ."
        return f"the {noun} of this {pick(rng, GENRES)} is {intens}{adj(pol)} ."

    return " ".join(sentence() for _ in range(rng.integers(3, 7)))


def make_reviews(n: int, seed: int, exclude: set = frozenset()) -> list[dict]:
    """Synthetic reviews: 40 % positive, 40 % negative, 10 % mixed, 10 % neutral; none in `exclude`."""
    rng, out = np.random.default_rng(seed), []
    while len(out) < n:
        kind = REVIEW_KINDS[int(np.searchsorted(REVIEW_KIND_CDF, rng.random(), side="right"))]
        if (text := _review(rng, kind)) not in exclude:
            out.append({"text": text, "label": kind})
    return out


def sentiment_score(text: str) -> float:
    """The built-in *public* reward: a lexicon scorer with negation and intensifiers, 4 tanh(S / 4)."""
    words, total = text.lower().replace("n't", " n't").split(), 0.0
    for t, w in enumerate(words):
        pol = 1.0 if w in POSITIVE or w in POS_VERBS else -1.0 if w in NEGATIVE or w in NEG_VERBS else 0.0
        if pol:
            window = words[max(0, t - 3):t]
            pol *= -0.5 if any(x in NEGATIONS for x in window) else 1.0  # "not bad" is weakly positive
            total += pol * (1.5 if any(x in INTENSIFIERS for x in window) else 1.0)
    return 4.0 * math.tanh(total / 4.0)


PEOPLE = ("sister brother boyfriend girlfriend roommate boss mom dad friend coworker neighbor cousin husband wife "
          "teacher landlord").split()
EVENTS = ["forgot my birthday", "borrowed my car", "moved to another city", "quit their job", "lied to me",
          "read my diary", "broke my phone", "ignored my messages", "got a new dog", "cancelled our trip",
          "took my money", "started a band", "failed the exam", "won the lottery", "crashed my bike", "sold the house"]
FEELINGS = "angry sad anxious confused happy guilty lonely hurt nervous relieved jealous embarrassed".split()
TIMES = ["yesterday", "last week", "last night", "this morning", "last month", "on friday"]
FILLER = ["we have known each other for years .", "it was raining all day .", "i did not sleep much after that .",
          "i work long hours these days .", "this is my first post here .", "sorry for the long post .",
          "we live in a small town .", "my family thinks i am overreacting .", "things were fine until then .",
          "i tried to talk about it over dinner ."]
TLDR_PROMPT = "post : {post} tl;dr :"


def _post(rng: np.random.Generator) -> dict:
    """One synthetic Reddit-style post with its three key facts (who, what, how I feel)."""
    person, event, feeling = pick(rng, PEOPLE), pick(rng, EVENTS), pick(rng, FEELINGS)
    filler = list(rng.choice(FILLER, size=rng.integers(1, 4), replace=False))
    facts = [f"{pick(rng, TIMES)} my {person} {event} .", f"now i feel {feeling} and do not know what to do ."]
    body = [f"i ( {rng.integers(18, 60)} ) need some advice ."] + filler[:1] + facts[:1] + filler[1:] + facts[1:]
    if rng.random() < 0.5:
        body.append(pick(rng, ("should i talk to them ?", "what would you do ?", "am i wrong ?")))
    return {"post": " ".join(body), "person": str(person), "event": str(event), "feeling": str(feeling)}


def _summary(rng: np.random.Generator, post: dict, style: str) -> str:
    """A summary: `reference`, what a hurried human writes (chatty, often without the feeling);
    `candidate`, anything from terse to wrong, for comparisons."""
    person, event, feeling, ref = post["person"], post["event"], post["feeling"], style == "reference"
    if not ref and rng.random() < 0.25:
        person = pick(rng, PEOPLE)  # an invented fact
    if not ref and rng.random() < 0.25:
        feeling = pick(rng, FEELINGS)
    opener = rng.random() < (0.6 if ref else 0.4)
    parts = [pick(rng, ("so basically", "long story short ,", "ok so", "well"))] if opener else []
    parts.append(f"my {person} {event}" if rng.random() < 0.85 else f"my {person} did something")
    if rng.random() < (0.55 if ref else 0.6):
        parts.append(f"and i feel {feeling}")
    if rng.random() < (0.5 if ref else 0.4):
        parts.append(pick(rng, ("and we have known each other for years", "and it was raining",
                                "and my family thinks i am overreacting")))
    if rng.random() < 0.4:
        parts.append(pick(rng, ("what should i do ?", "am i wrong ?", "help .")))
    return " ".join(parts) + ("" if parts[-1].endswith(("?", ".")) else " .")


def true_preference(post: dict, summary: str) -> float:
    """The built-in RLHF task's hidden preference: +1 per key fact stated, -1 per invented person or
    feeling, -0.15 per word past ten. It labels D2 (Bradley-Terry) and scores evaluations, never trains."""
    words, post_words = summary.split(), set(post["post"].split())
    score = float(post["person"] in words) + float(post["event"] in summary) + float(post["feeling"] in words)
    score -= sum(1.0 for w in words if w in PEOPLE + FEELINGS and w not in post_words)
    return score - 0.15 * max(0, len(words) - 10)


def make_tldr(n_posts: int, n_comparisons: int, seed: int, exclude: set = frozenset()) -> tuple[list, list]:
    """The built-in TL;DR task as a user's two files: `n_posts` rows (prompt, label: a reference summary)
    and `n_comparisons` (prompt, chosen, rejected) of other posts; `meta`: the post's facts."""
    rng, rows, cmps = np.random.default_rng(seed), [], []
    while len(rows) + len(cmps) < n_posts + n_comparisons:
        if (p := _post(rng))["post"] in exclude:
            continue
        prompt = TLDR_PROMPT.format(post=p["post"])
        if len(rows) < n_posts:
            rows.append({"prompt": prompt, "label": _summary(rng, p, "reference"), "meta": p})
            continue
        y0, y1 = _summary(rng, p, "candidate"), _summary(rng, p, "candidate")
        p1 = 1 / (1 + math.exp(-2.0 * (true_preference(p, y1) - true_preference(p, y0))))  # Bradley-Terry
        chosen, rejected = (y1, y0) if rng.random() < p1 else (y0, y1)
        cmps.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": p})
    return rows, cmps


@dataclass
class BaseModelArgs:
    """The built-in "public pre-trained" GPT-2, trained here non-privately on public text. What made
    a model this small copy from its prompt (NOTES.md): no dropout, one document per row, and a copy
    curriculum of random repeated sequences."""
    n_layer: int = arg(2, "transformer blocks", limit=">=1")
    n_embd: int = arg(128, "hidden size", limit=">=1")
    n_head: int = arg(4, "attention heads", limit=">=1")
    vocab_size: int = arg(1024, "byte-level BPE vocabulary trained on the public corpus", limit=">=1")
    corpus_size: int = arg(12000, "public documents per domain (reviews, posts), generated from `seed`", limit=">=1")
    steps: int = arg(600, "pre-training steps", limit=">=1")
    batch_size: int = arg(32, "pre-training rows per step (one document per row)", limit=">=1")
    seq_len: int = arg(96, "tokens per row: [eos] + document + [eos], cut here", limit=">=1")
    lr: float = arg(3e-3, "AdamW learning rate (one-cycle schedule, 5 % warm-up)", limit=">0")
    copy_steps: int = arg(50, "first steps train only on copy rows ([eos] s s, loss on the second s)", limit=">=0")
    copy_rows: int = arg(8, "copy rows in every batch after that", limit=">=0")
    copy_len: int = arg(24, "tokens in the random sequence s of a copy row", limit=">=1")
    seed: int = arg(1234, "seed of the public corpus and the initial weights (never of private data)", limit=">=0")


_PUBLIC_CORPUS = {}


def public_corpus(args: BaseModelArgs) -> tuple[list[str], list[str]]:
    """(documents, texts), the public pre-training text from its own seed (the web's stand-in):
    reviews, and posts each with a web-quality "tl;dr" (as GPT-2 saw "TL;DR:"); and the reviews and
    posts alone, which the built-in private data must not repeat. Generated once per process."""
    key = (args.seed, args.corpus_size)
    if key not in _PUBLIC_CORPUS:
        rng = np.random.default_rng(args.seed)
        reviews = [r["text"] for r in make_reviews(args.corpus_size, seed=args.seed + 1)]
        posts = [_post(rng) for _ in range(args.corpus_size)]
        tldrs = [TLDR_PROMPT.format(post=p["post"]) + " " + _summary(rng, p, "candidate") for p in posts]
        _PUBLIC_CORPUS[key] = (reviews + tldrs, reviews + [p["post"] for p in posts])
    return tuple(list(x) for x in _PUBLIC_CORPUS[key])


def cache_dir() -> str:
    return os.environ.get("DP_RLHF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dp_rlhf")


@contextlib.contextmanager
def _atomic_dir(final: str):
    """A temporary sibling directory, renamed to `final` only if the block succeeds."""
    os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(final) or ".")
    try:
        yield tmp
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def public_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2's kind) trained on the public corpus; eos doubles as bos and pad."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                        show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=eos)


def builtin_base_model(args: BaseModelArgs = BaseModelArgs(), device: str = "cpu") -> str:
    """Path of the built-in base model, pre-trained on the public corpus once (cached), from its own
    seed: the global RNG is left as it was, so a run that builds it draws what a cached run draws."""
    path = os.path.join(cache_dir(), "builtin-v3-" + "-".join(f"{v}" for v in dataclasses.astuple(args)))
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    t0, corpus = time.time(), public_corpus(args)[0]
    tokenizer = public_tokenizer(corpus, args.vocab_size)
    eos, t = tokenizer.eos_token_id, args.seq_len
    docs, labels = torch.full((len(corpus), t), eos), torch.full((len(corpus), t), -100)  # one document per row
    for i, ids in enumerate(tokenizer(corpus)["input_ids"]):
        row = torch.tensor([eos] + ids + [eos])[:t]
        docs[i, :len(row)], labels[i, 1:len(row)] = row, row[1:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=args.n_embd, n_layer=args.n_layer,
                            n_head=args.n_head, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                            attn_implementation="eager", activation_function="gelu_pytorch_tanh",  # fused tanh GELU
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    bar = Progress(args.steps, "pre-training the built-in base model (public data, once, about a minute on 2 cores)")
    for step in range(args.steps):
        # The copy curriculum: rows [eos] s s of random tokens s, the loss on the second s; only such rows
        # at first, then a quarter of each batch. Without the first block a model this small never copies.
        n_copy = args.batch_size if step < args.copy_steps else min(args.copy_rows, args.batch_size)
        s = torch.randint(0, len(tokenizer) - 1, (n_copy, args.copy_len), generator=gen)
        s = s + (s >= eos).long()  # any token but eos
        copy_ids = torch.cat([torch.full((n_copy, 1), eos), s, s], 1)
        copy_labels = torch.cat([torch.full((n_copy, 1 + args.copy_len), -100), s], 1)
        rows, w = torch.randint(0, len(corpus), (args.batch_size - n_copy,), generator=gen), max(copy_ids.shape[1], t)
        pad = lambda x, v: torch.nn.functional.pad(x, (0, w - x.shape[1]), value=v)
        x = torch.cat([pad(docs[rows], eos), pad(copy_ids, eos)])
        y = torch.cat([pad(labels[rows], -100), pad(copy_labels, -100)])
        width = int((y != -100).any(0).nonzero().max()) + 1  # drop columns that are padding in every row
        loss = model(input_ids=x[:, :width].to(device), labels=y[:, :width].to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update(step + 1)
    bar.close()
    print(f"built-in base model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, final loss "
          f"{loss.item():.3f}, {time.time() - t0:.0f}s -> {path} (does it copy? python test_dp_rlhf.py --probe)",
          file=sys.stderr)
    with _atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return path


def _is_local(spec: str) -> bool:
    """A path, existing or not: it starts like one or names a data file (a Hub id is "name" or "org/name")."""
    return (os.path.exists(os.path.expanduser(spec)) or spec.startswith((".", "/", "~")) or spec.endswith("/")
            or spec.count("/") > 1 or spec.lower().endswith((".jsonl", ".json", ".csv", ".parquet")))


def _hub(spec: str, what: str, hint: str, load):
    """`load()`, a Hub or local load, with one line if it fails. A Hub id while the Hub is unreachable
    switches its clients offline at once (they would retry for a minute); the local cache still loads."""
    if not _is_local(spec) and os.environ.get("HF_HUB_OFFLINE") != "1":
        try:
            socket.create_connection(("huggingface.co", 443), timeout=2).close()
        except OSError:  # the clients read these when imported: tell the ones already imported too
            os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
            for module, name in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                                 ("datasets.config", "HF_DATASETS_OFFLINE")):
                if hasattr(sys.modules.get(module), name):
                    setattr(sys.modules[module], name, True)
    try:
        return load()
    except (OSError, ValueError, ConnectionError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" and not _is_local(spec)
        raise UserError(f"cannot load {what} '{spec}': " + (f"the Hugging Face Hub is unreachable and it is not in "
                        f"the local cache; use {hint}" if offline else str(e).splitlines()[0][:300])) from None


def load_lm(spec: str, device: str, base: BaseModelArgs = BaseModelArgs()):
    """(GPT-2 LM, tokenizer) from 'builtin', a Hub id (gpt2, gpt2-medium, ...) or a local directory."""
    path = builtin_base_model(base, device) if spec == "builtin" else os.path.expanduser(spec)

    def load():
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "activation_function", None) == "gelu_new":  # GPT-2's tanh GELU as one fused kernel
            config.activation_function = "gelu_pytorch_tanh"             # (5 memory passes -> 1)
        return (AutoModelForCausalLM.from_pretrained(path, config=config, attn_implementation="eager",
                                                     dtype=torch.float32), AutoTokenizer.from_pretrained(path))
    lm, tokenizer = _hub(path, "model", "--model builtin or a local directory saved with save_pretrained", load)
    try:
        _attn_blocks(lm)
    except ValueError as e:
        raise UserError(f"model '{spec}': {e}") from None
    if not tokenizer("hello world")["input_ids"]:
        raise UserError(f"model '{spec}' has no usable tokenizer (every text encodes to nothing); save one beside "
                        "it with tokenizer.save_pretrained (tokenizer.json, or vocab.json + merges.txt)")
    if len(tokenizer) > lm.config.vocab_size:
        raise UserError(f"model '{spec}' has {lm.config.vocab_size} token embeddings but its tokenizer "
                        f"{len(tokenizer)} tokens; use the tokenizer it was trained with")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return lm.to(device).eval(), tokenizer


def check_fits(lm: nn.Module, args):
    """Every sequence a stage builds fits the model's positions (else an IndexError mid-run)."""
    for name in (s for s in ("sft", "rm", "ppo") if hasattr(args, s)):
        stage = getattr(args, name)
        flag, tail = ("response-max", stage.response_max) if name == "ppo" else ("max-completion", stage.max_completion)
        if (longest := 1 + stage.max_prompt + tail + (name != "ppo")) > lm.config.n_positions:  # bos, eos
            raise UserError(f"--{name}-max-prompt {stage.max_prompt} with --{name}-{flag} {tail} is not allowed: "
                            f"{longest} tokens, the model has {lm.config.n_positions} positions")


def _read_local(spec: str, path: str, ext: str) -> list:
    """A local file's rows, each parsed on its own: JSON values keep their own types (a float its exact
    digits, as a Decimal) and CSV cells stay text ("007", "N/A"), so one record cannot change how another
    is read (a column-wide type inference would: one float id among ints turns every id into a float).
    UTF-8, with or without the byte-order mark spreadsheet programs write; JSON lines end at a line feed
    only (str.splitlines also splits at U+2028, legal inside a JSON string)."""
    if ext not in (".jsonl", ".json", ".csv", ".parquet"):
        raise UserError(f"dataset file '{spec}' has extension '{ext}'; allowed: .jsonl .json .csv .parquet")
    try:
        if ext == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                return list(csv.DictReader(f))
        if ext == ".parquet":  # a typed schema, fixed by the file itself
            return datasets.load_dataset("parquet", data_files=path, split="train").to_list()
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
        if ext == ".json" and text.lstrip().startswith("["):
            return json.loads(text, parse_float=Decimal)
        return [json.loads(line, parse_float=Decimal) for line in text.split("\n") if line.strip()]
    except Exception as e:  # a truncated or malformed file: the parser's own error types
        cause = (str(e.__cause__ or e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot read dataset file '{spec}' as {ext[1:].replace('jsonl', 'json')}: {cause}") from None


def _read_hub(spec: str, split: str) -> list:
    """A Hub dataset's `split`, its data files each read by `_read_local` (datasets' csv and json builders
    would type each column from all its rows); offline, from the Hub cache's copy of the repository."""
    offline = huggingface_hub.constants.HF_HUB_OFFLINE  # (datasets finds a Hub id's files online only)
    try:
        builder = datasets.load_dataset_builder(huggingface_hub.snapshot_download(
            spec, repo_type="dataset", local_files_only=True) if offline else spec)
    except RuntimeError as e:  # a loading script, which datasets no longer runs
        raise UserError(f"cannot load dataset '{spec}': {e}; give its data as a local .jsonl/.csv/.parquet file") \
            from None
    if split not in (files := builder.config.data_files or {}):
        raise UserError(f"dataset '{spec}' has no data files for split '{split}'; it has {sorted(map(str, files))}")
    return [r for f, path in zip(files[split], datasets.DownloadManager().download(list(files[split])))
            for r in _read_local(f, path, os.path.splitext(f)[1].lower())]


def load_records(spec: str, columns: tuple[str, ...], split: str = "train", user_columns: tuple = ()) -> list[dict]:
    """Rows with `columns` (non-empty text) and `user_columns` (any non-null id), from a Hub dataset id
    or a local .jsonl/.json/.csv/.parquet file, read record by record either way."""
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors reach us as exceptions
    ext, path = os.path.splitext(spec)[1].lower(), os.path.expanduser(spec)
    if _is_local(spec) and not os.path.exists(path):
        raise UserError(f"dataset file '{spec}' does not exist")
    if _is_local(spec) and os.path.isfile(path) and os.path.getsize(path) < 65536:
        with open(path, "rb") as f:
            if not f.read().strip():
                raise UserError(f"dataset file '{spec}' is empty")
    rows = _read_local(spec, path, ext) if _is_local(spec) else _hub(
        spec, "dataset", "--dataset builtin or a local .jsonl/.csv/.parquet file", lambda: _read_hub(spec, split))
    if not rows:
        raise UserError(f"dataset '{spec}' has no rows")
    columns, names = tuple(columns) + tuple(user_columns), sorted({k for r in rows if isinstance(r, dict) for k in r})
    if missing := [c for c in columns if c not in names]:
        raise UserError(f"dataset '{spec}' lacks column(s) {missing}; it has {names}")
    missing = lambda v: v is None or (isinstance(v, (float, Decimal)) and not math.isfinite(v)) or not normalise(v)
    for i, row in enumerate(r if isinstance(r, dict) else {} for r in rows):  # "None" or "5" is no text
        bad = [c for c in columns if c not in user_columns and not (isinstance(row.get(c), str) and row[c].strip())]
        if bad := bad + [c for c in user_columns if missing(row.get(c))]:  # blank ids would merge users into one
            why = "a user id must not be null, blank or NaN" if bad[0] in user_columns else "it must be non-empty text"
            raise UserError(f"dataset '{spec}' row {i}: column '{bad[0]}' is {row.get(bad[0])!r}; {why}")
    return [{c: row[c] for c in columns} for row in rows]


def prefix_prompts(tokenizer, texts: list[str], lo: int, hi: int, seed: int) -> list[str]:
    """The first lo..hi tokens of each review (TRL's gpt2-sentiment), the length drawn from a keyed hash
    of that review alone: the same whatever else is in the data."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(t[:lo + int(keyed_uniform(text, seed, "prompt") * (hi - lo + 1))])
            for text, t in zip(texts, ids)]


def normalise(text) -> str:
    """One spelling of a text: Unicode NFKC (an NFD "é" is the NFC one), lower case, single spaces."""
    return " ".join(unicodedata.normalize("NFKC", str(text)).lower().split())


def keyed_digest(text: str, seed: int, purpose: str) -> bytes:
    return hashlib.blake2b(text.encode(), key=f"dp-rlhf-{purpose}-{seed}".encode(), digest_size=8).digest()


def keyed_uniform(text: str, seed: int, purpose: str) -> float:
    """u in [0, 1) from a BLAKE2b hash of `text` alone, keyed with the public seed and `purpose`: a
    record's stage and prompt length come from it, not from a stream consumed record by record
    (which would move every later record when one is added)."""
    return int.from_bytes(keyed_digest(text, seed, purpose), "big") / 2.0**64


def unit_key(unit: str, seed: int) -> str:
    """The dry run's name for a protected unit: the keyed hash its stage is drawn from, in hex."""
    return keyed_digest(unit, seed, "split").hex()


def hash_split(records: list, key, fractions: list[float], seed: int) -> list[list]:
    """Disjoint parts in proportion to `fractions`, by the keyed hash of each record's normalised
    `key(record)` (its unit) alone: adding or removing a record moves no other record between
    stages, as parallel composition needs (a permutation of rows, or a cap on a part's size, would)."""
    bounds, parts = np.cumsum(fractions) / sum(fractions), [[] for _ in fractions]
    for r in records:
        u = keyed_uniform(normalise(key(r)), seed, "split")
        parts[min(int(np.searchsorted(bounds, u, side="right")), len(parts) - 1)].append(r)
    return parts


WHOLE_NUMBER = re.compile(r"([+-]?)(0|[1-9][0-9]*)(?:\.0+)?")  # "007" is a name, not 7


def unit_id(value) -> str:
    """A unit's one name however a file writes it: a whole number is its digits (7, 7.0, +7, "7.0" and a
    JSON 7.0 are "7"; read from the text, never through a float, which merges ids above 2**53), anything
    else (a boolean too) its `normalise`d text."""
    if isinstance(value, float) and value.is_integer():  # a typed (parquet) float column's 7.0
        value = int(value)
    text = normalise(format(value, "f") if isinstance(value, Decimal) else value)
    m = WHOLE_NUMBER.fullmatch(text)
    return text if m is None else ("-" if m[1] == "-" and m[2] != "0" else "") + m[2]


def with_units(records: list[dict], args, column: str) -> list[dict]:
    """Each record with `_unit`, the unit the guarantee protects (its --user-column, else `column`), as
    `unit_id` names it, and `_raw`, the value as the file wrote it."""
    col = getattr(args, "user_column", None) or column
    return [{**r, "_raw": (raw := r[col] if col in r else r[column]), "_unit": unit_id(raw)} for r in records]


def unit_warnings(files: list[tuple[str, list[dict]]], unit: str):
    """A line on stderr where ids may not name the units a user means: raw ids `unit_id` merged (a merged
    pair has only a replace-one guarantee); two files whose ids differ in kind or mostly differ (one unit
    named two ways sits in two stages, and parallel composition fails)."""
    raws = {}
    for r in (r for _, records in files for r in records):
        raws.setdefault(r["_unit"], set()).add(str(r["_raw"]))
    if merged := sum(len(v) > 1 for v in raws.values()):  # (counted, never shown: ids and texts are private)
        print(f"warning: {merged} {unit}(s) are written more than one way (7 and 7.0, case, spaces, Unicode forms) "
              f"and each counts as one {unit}; where they are different {unit}s, such a pair has only a replace-one "
              "guarantee", file=sys.stderr)
    if len(files) == 2 and unit == "user":  # the smaller file's ids first (posts of two files may well differ)
        (a, ids_a), (b, ids_b) = sorted(((k, {r["_unit"] for r in v}) for k, v in files), key=lambda f: len(f[1]))
        kinds = [{"numbers" if WHOLE_NUMBER.fullmatch(u) else "names" for u in ids} for ids in (ids_a, ids_b)]
        why = f"if they name one {unit} two ways, it sits in two stages and parallel composition does not hold"
        if kinds[0].isdisjoint(kinds[1]):
            print(f"warning: the {unit} ids of '{a}' are {min(kinds[0])} and those of '{b}' {min(kinds[1])}: {why}",
                  file=sys.stderr)
        elif len(ids_a & ids_b) < len(ids_a) / 2:
            print(f"warning: only {len(ids_a & ids_b)} of the {len(ids_a)} {unit}s of '{a}' appear in '{b}': {why}",
                  file=sys.stderr)


def public_test_split(spec: str, columns: tuple[str, ...]) -> list[dict] | None:
    """The Hub dataset's own "test" split (public: evaluating on it costs no privacy), if any."""
    try:
        return None if _is_local(spec) else load_records(spec, columns, split="test")
    except UserError:
        return None


def private_fractions(args, public) -> list[float]:
    """D1 : D3 (: held-out test). Built-in: the --num-* sizes (its test set is public, generated);
    real: halves, less --test-fraction held out when the dataset has no public test split."""
    if args.dataset == "builtin":
        return [args.num_sft, args.num_ppo]
    if public is None and "num_test" in args.given:
        raise UserError(f"--num-test is not allowed here: '{args.dataset}' has no public test split; its test set "
                        "is the --test-fraction held out")
    if public is not None and "test_fraction" in args.given:
        raise UserError(f"--test-fraction is not allowed here: '{args.dataset}' has a public test split, which is "
                        "the test set (--num-test caps it)")
    return [0.5, 0.5] if public else [(1 - args.test_fraction) / 2, (1 - args.test_fraction) / 2, args.test_fraction]


def split_report(data: dict, public, unit: str, what: str, dropped: int | None = None) -> dict:
    """The split's report (`summary.json`'s `data`), a line on stderr for each thing a user must know,
    and a refusal naming any part left with fewer than 2 records and why."""
    private = {k: v for k, v in data.items() if "test" not in k}
    report = {"split": f"keyed hash of {unit}", "unit": unit, "public_test": public is not None,
              "sizes": {k: len(v) for k, v in data.items()}, "units": {k: len({r["_unit"] for r in v})
                                                                     for k, v in private.items()},
              "max_records_per_unit": {k: max(Counter(r["_unit"] for r in v).values(), default=0)
                                       for k, v in private.items()}}  # DP-SGD samples units: a fact, not a caveat
    why = f"{dropped} TL;DR rows were dropped because their {unit} also has comparisons (one unit, one stage)"
    if empty := [f"{name} ({len(part)})" for name, part in data.items() if len(part) < 2]:
        raise UserError(f"too few records for {', '.join(empty)}: {what}" + (f"; {why}" if dropped else ""))
    if dropped is not None:
        report["dropped_tldr_rows_with_comparisons"] = dropped
    if dropped:
        print(f"data: {why}", file=sys.stderr)
    return report


def sentiment_records(args) -> tuple[list[dict], list[dict] | None]:
    """(private reviews, public test reviews or None): generated from the seed, or loaded."""
    if args.dataset == "builtin":  # generated; none is a document of the public corpus
        exclude = set(public_corpus(args.base)[1])
        return ([{"text": r["text"]} for r in make_reviews(args.num_sft + args.num_ppo, 10_000 + args.seed, exclude)],
                [{"text": r["text"]} for r in make_reviews(args.num_test, 15_000 + args.seed, exclude)])
    user = (args.user_column,) if args.user_column else ()
    return load_records(args.dataset, ("text",), user_columns=user), public_test_split(args.dataset, ("text",))


def split_sentiment(records, public, args) -> tuple[dict, dict]:
    """D1 (reviews for SFT), D3 (reviews whose first tokens are PPO prompts) and test, each review's
    part drawn from its unit's keyed hash alone (its text, or --user-column)."""
    records, unit = with_units(records, args, "text"), "user" if args.user_column else "review"
    unit_warnings([(args.dataset, records)], unit)
    d1, d3, *held = hash_split(records, lambda r: r["_unit"], private_fractions(args, public), args.seed)
    data = {"sft": d1, "ppo": d3, "test": with_units(public, args, "text")[:args.num_test] if public else held[0]}
    return data, split_report(data, public, unit, f"{len(records)} records in '{args.dataset}'")


def sentiment_data(args) -> tuple[dict, dict]:
    return split_sentiment(*sentiment_records(args), args)


def rlhf_records(args) -> tuple[list[dict], list[dict], list[dict] | None, list[dict] | None]:
    """(private TL;DR rows, private comparisons, public test rows, public test comparisons; None where
    there are none): generated from the seed, or loaded from --dataset and --comparisons."""
    if args.dataset == "builtin":
        exclude = set(public_corpus(args.base)[1])
        rows, cmps = make_tldr(args.num_sft + args.num_ppo, args.num_comparisons, 20_000 + args.seed, exclude)
        return (rows, cmps, *make_tldr(args.num_test, args.num_comparisons_test, 25_000 + args.seed, exclude))
    if args.comparisons is None:
        raise UserError("--comparisons is required with a real --dataset (a Hub id or a local file with "
                        "prompt/chosen/rejected columns)")
    user = (args.user_column,) if args.user_column else ()
    return (load_records(args.dataset, ("prompt", "label"), user_columns=user),
            load_records(args.comparisons, ("prompt", "chosen", "rejected"), user_columns=user),
            public_test_split(args.dataset, ("prompt", "label")), None)


def split_rlhf(rows, cmps, public, public_cmps, args) -> tuple[dict, dict]:
    """D1 (post, reference summary), D2 (post, chosen, rejected) and its held-out tenth, D3 (posts), test.
    One unit, one stage (the post, or the user with --user-column): a unit with any comparison goes to
    D2 or its held-out part by its keyed hash, its TL;DR rows dropped; any other unit to D1, D3 or test.
    Each decision reads the unit's own records only (a post two users share may sit in two stages)."""
    def summaries(rs):  # the unit first, from the row as loaded; the texts as the stages encode them
        return [{**r, "completion": " " + r["label"].strip()} for r in with_units(rs, args, "prompt")]

    def pairs(cs):
        return [{**c, "chosen": " " + c["chosen"].strip(), "rejected": " " + c["rejected"].strip()}
                for c in with_units(cs, args, "prompt")]
    units, cmps, unit = summaries(rows), pairs(cmps), "user" if args.user_column else "post"
    unit_warnings([(args.dataset, units), (args.comparisons, cmps)] if args.comparisons else
                  [(args.dataset, units + cmps)], unit)  # (the built-in task's two parts share no post by design)
    with_comparisons, by_unit = {c["_unit"] for c in cmps}, lambda r: r["_unit"]
    kept = [r for r in units if r["_unit"] not in with_comparisons]
    d1, d3, *held = hash_split(kept, by_unit, private_fractions(args, public), args.seed)
    d2, d2_test = (cmps, pairs(public_cmps)) if public_cmps is not None else \
        hash_split(cmps, by_unit, [0.9, 0.1], args.seed)  # (the built-in test comparisons are public)
    data = {"sft": d1, "comparisons": d2, "comparisons_test": d2_test, "ppo": d3,
            "test": summaries(public)[:args.num_test] if public else held[0]}
    what = f"{len(rows)} rows in '{args.dataset}', {len(cmps)} in '{args.comparisons}'"
    return data, split_report(data, public, unit, what, len(rows) - len(kept))


def rlhf_data(args) -> tuple[dict, dict]:
    return split_rlhf(*rlhf_records(args), args)


# ===== PIPELINES: one pipeline for both tasks, run directories, checkpoints, evaluation, sweeps ===============
@dataclass
class CommonArgs:
    """What every command that trains shares."""
    model: str = arg("builtin", "policy base: 'builtin', a Hub id (gpt2, gpt2-medium, gpt2-large) or a local dir")
    epsilon: float = arg(4.0, "target epsilon of every stage ('inf': the same loops, no clipping or noise)", limit=">0")
    accountant: str = arg("pld", "calibrates sigma and keeps the ledger: 'pld' (tight, the paper's kind) or 'rdp' "
                          "(the moments accountant)", choices=("pld", "rdp"))
    delta: float | None = arg(None, "target delta (default 1/N, the paper's; weak: prefer e.g. 1e-6)", limit="(0,1)")
    seed: int = arg(0, "public seed: split, initial weights, evaluation (DP noise uses secret entropy)", limit=">=0")
    reproducible_noise: bool = arg(False, "DP noise and sampling from --seed too (classrooms; not private)")
    out: str | None = arg(None, "output directory (default runs/<task>-eps<epsilon>-seed<seed>), via <out>.partial")
    overwrite: bool = arg(False, "replace an existing --out, whole, once the new run has finished")
    resume: str | None = arg(None, "continue the interrupted run in this <out>.partial, with its own settings")
    checkpoint_every: int = arg(10, "checkpoint every N iterations of a stage (and on Ctrl-C; 0: only then)",
                                limit=">=0")
    device: str | None = arg(None, "'cpu' or 'cuda' (default: cuda when available)")
    base: BaseModelArgs = field(default_factory=BaseModelArgs)
    given: tuple = field(default=(), metadata={"cli": False})  # the flags the command line gave


@dataclass
class RunArgs(CommonArgs):
    """What both pipelines share."""
    dataset: str = arg("builtin", "private data: 'builtin', a Hub id, or a local .jsonl/.csv/.parquet file")
    num_sft: int = arg(10000, "expected examples in D1 (built-in data; real data: a keyed hash)", limit=">=1")
    num_ppo: int = arg(10000, "expected prompts in D3 (built-in data; real data: a keyed hash)", limit=">=1")
    num_test: int = arg(256, "test prompts: the built-in public test set, or a Hub test split's first", limit=">=1")
    test_fraction: float = arg(0.1, "real data without a public test split: the share held out to evaluate",
                               limit="(0,1)")
    num_samples: int = arg(4, "generations shown side by side at the end", limit=">=0")
    dry_run: bool = arg(False, "split, calibrate sigma, train nothing: plan.json, inputs/<stage>.jsonl")
    user_column: str | None = arg(None, "real data: the column naming each record's user (the guarantee is then "
                                  "per user)")
    composition: str = arg("parallel", "'parallel' (disjoint stages, the paper) or 'sequential'",
                           choices=("parallel", "sequential"))


@dataclass
class SentimentArgs(RunArgs):
    """`sentiment`: the paper's no-human-in-the-loop scenario (IMDb positive reviews)."""
    reward_model: str | None = arg(None, "public reward: a sequence classifier (default: the built-in lexicon)")
    reward_label: str | None = arg(None, "its label to score (name or index; default: like 'positive', else 1)")
    prompt_min: int = arg(2, "fewest prompt tokens (the first tokens of a review)", limit=">=1")
    prompt_max: int = arg(8, "most prompt tokens", limit=">=1")
    num_sft: int = arg(5000, "expected examples in D1 (built-in data; real data: a keyed hash)", limit=">=1")
    num_ppo: int = arg(160000, "expected prompts in D3 (built-in data; real data: a keyed hash)", limit=">=1")
    num_test: int = arg(2000, "test prompts: the built-in public test set, or a Hub test split's first", limit=">=1")
    sft: SFTArgs = field(default_factory=lambda: SFTArgs(epochs=1.0))
    ppo: PPOArgs = field(default_factory=lambda: PPOArgs(steps=50, batch_size=1024, kl_coef=0.075))


@dataclass
class RLHFArgs(RunArgs):
    """`rlhf`: the paper's RLHF scenario (Reddit TL;DR): DP SFT -> DP reward model -> DPPPO."""
    num_sft: int = arg(16000, "expected examples in D1 (built-in data; real data: a keyed hash)", limit=">=1")
    num_ppo: int = arg(64000, "expected prompts in D3 (built-in data; real data: a keyed hash)", limit=">=1")
    num_comparisons: int = arg(16000, "comparisons in D2 (built-in data; real data: all but a tenth)", limit=">=1")
    num_comparisons_test: int = arg(1000, "the built-in public test comparisons (real data: the tenth)", limit=">=1")
    comparisons: str | None = arg(None, "D2 with a real --dataset: a Hub id or file of prompt/chosen/rejected")
    reward_base: str | None = arg(None, "the reward model's base: 'builtin', Hub id or dir (default: the SFT model)")
    eval_reward_model: str | None = arg(None, "a public sequence classifier that scores summaries in evaluation")
    # Half an epoch over 16,000: the steps of 2 epochs over 4,000, a quarter of the sample rate, less noise.
    sft: SFTArgs = field(default_factory=lambda: SFTArgs(epochs=0.5))
    rm: RMArgs = field(default_factory=lambda: RMArgs(epochs=0.5, lr=1e-2))
    ppo: PPOArgs = field(default_factory=lambda: PPOArgs(steps=40, batch_size=256, minibatches=4, lr=3e-3,
                                                         lr_schedule="linear", baseline="greedy", response_min=32,
                                                         response_max=32))


def stage_epsilon(args, name: str) -> float:
    """A stage's target epsilon: its own --<stage>-epsilon if given (ablations), else --epsilon."""
    own = getattr(args, name).epsilon
    return args.epsilon if own is None else own


def plan_stages(args, sizes: dict, delta: float) -> dict[str, StagePlan]:
    """Each stage's plan (q, steps, sigma: `plan_stage`), before anything trains."""
    plans = {}
    for name, n in sizes.items():
        try:
            plans[name] = plan_stage(getattr(args, name), n, stage_epsilon(args, name), delta, args.accountant)
        except ValueError as e:
            flag = f"--{name}-epsilon" if getattr(args, name).epsilon is not None else "--epsilon"
            raise flag_words(e, f"{name}_", epsilon=flag, delta="--delta") from None
    return plans


def write_text(path: str, text: str):
    """Write, then rename: a crash never leaves half a file."""
    with open(path + ".partial", "w") as f:
        f.write(text)
    os.replace(path + ".partial", path)


def write_json(path: str, obj):
    write_text(path, json.dumps(obj, indent=2))


def save_model(model: nn.Module, tokenizer, path: str, extra: dict | None = None):
    """save_pretrained (safetensors) into a temp dir, then renamed into place; `extra`: more tensors."""
    with _atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if extra:
            save_file(extra, os.path.join(tmp, "reward_head.safetensors"))


def save_reward_model(rm: RewardModel, tokenizer, path: str):
    """`last`: a one-label GPT2ForSequenceClassification (the same transformer and bias-free head), for
    AutoModelForSequenceClassification. `tokens`: the LM, LoRA merged, and reward_head.safetensors."""
    lm = merge_lora(copy.deepcopy(rm.lm))
    if rm.head == "tokens":
        head = {k: v.detach().cpu().contiguous() for k, v in rm.named_parameters() if not k.startswith("lm.")}
        return save_model(lm, tokenizer, path, head)
    config = copy.deepcopy(lm.config)
    config.num_labels, config.pad_token_id = 1, rm.pad_token_id
    clf = GPT2ForSequenceClassification(config)
    clf.transformer.load_state_dict(lm.transformer.state_dict())
    clf.score.weight.data.copy_(rm.score.weight.data)
    save_model(clf, tokenizer, path)


def load_reward_model(path: str, device: str = "cpu"):
    """(RewardModel with the `tokens` head, tokenizer) from a directory written by save_reward_model."""
    lm, tokenizer = load_lm(path, device)
    rm = RewardModel(add_lora(lm, rank=0), head="tokens")
    rm.load_state_dict(load_file(os.path.join(path, "reward_head.safetensors")), strict=False)
    return rm.to(device).eval(), tokenizer


@torch.no_grad()
def reward_model_scores(rm: RewardModel, tokenizer, prompts, completions, *, max_prompt, max_completion,
                        device, batch: int = 128) -> torch.Tensor:
    """r(x, y) for each pair, encoded exactly as in training."""
    out = [rm(*(t.to(device) for t in encode(tokenizer, prompts[s:s + batch], completions[s:s + batch],
                                              max_prompt=max_prompt, max_completion=max_completion))).float().cpu()
           for s in range(0, len(prompts), batch)]
    return torch.cat(out) if out else torch.zeros(0)


def builtin_sentiment_reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """The public reward of the built-in sentiment task, on prompt + response (as TRL scores)."""
    return torch.tensor([sentiment_score(p + r) for p, r in zip(prompts, responses)])


def hub_sentiment_reward(spec: str, label: str | None, device: str, batch: int = 128):
    """A sequence classifier as the public reward: the logit of the positive label (`label`: a name
    or an index; default: the label named like 'positive', else index 1)."""
    path = os.path.expanduser(spec)
    hint = "the built-in reward (leave --reward-model unset) or a local directory"
    tok, clf = _hub(path, "reward model", hint, lambda: (AutoTokenizer.from_pretrained(path),
                                                          AutoModelForSequenceClassification.from_pretrained(path)))
    clf, names = clf.to(device).eval(), {int(i): str(n).lower() for i, n in clf.config.id2label.items()}
    index = (next((i for i, n in names.items() if "pos" in n), 1) if label is None else int(label) if label.isdigit()
             else next((i for i, n in names.items() if n == label.lower()), None))
    if index is None:
        raise UserError(f"--reward-label '{label}' is not a label of {spec}; it has {sorted(names.values())}")
    if index >= clf.config.num_labels:
        raise UserError(f"--reward-label {index} is out of range: {spec} has {clf.config.num_labels} labels")
    tok.pad_token = tok.pad_token or tok.eos_token

    @torch.no_grad()
    def reward_fn(prompts, responses):
        texts = [p + r for p, r in zip(prompts, responses)]
        return torch.cat([clf(**tok(texts[s:s + batch], return_tensors="pt", padding=True, truncation=True,
                                    max_length=512).to(device)).logits[:, index].float().cpu()
                          for s in range(0, len(texts), batch)] or [torch.zeros(0)])
    return reward_fn


def rouge(prediction: str, reference: str) -> dict:
    """ROUGE-1/2/L F-measures as the rouge-score package computes them (lower-cased alphanumeric
    tokens, no stemming): n-gram overlap with counts, and the longest common subsequence."""
    p, r = (re.sub(r"[^a-z0-9]+", " ", x.lower()).split() for x in (prediction, reference))

    def f1(overlap, n_p, n_r):
        prec, rec = (overlap / n_p if n_p else 0.0), (overlap / n_r if n_r else 0.0)
        return 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    out = {}
    for n in (1, 2):
        cp, cr = (Counter(tuple(x[i:i + n]) for i in range(len(x) - n + 1)) for x in (p, r))
        out[f"rouge{n}"] = f1(sum((cp & cr).values()), sum(cp.values()), sum(cr.values()))
    lcs = [[0] * (len(r) + 1) for _ in range(len(p) + 1)]
    for i, a in enumerate(p):
        for j, b in enumerate(r):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if a == b else max(lcs[i][j + 1], lcs[i + 1][j])
    out["rougeL"] = f1(lcs[-1][-1], len(p), len(r))
    return out


class Progress:
    """A bar on a terminal; elsewhere (piped, logged, CI) a start line, a status line every `every`
    seconds and an end line: stage, step/total, the postfix (epsilon spent, reward...), elapsed, ETA."""

    def __init__(self, steps: int, desc: str, start: int = 0, every: float | None = None):
        self.steps, self.start, self.step, self.desc, self.postfix = steps, start, start, desc, {}
        self.every, self.t0 = float(os.environ.get("DP_RLHF_STATUS_EVERY", 30)) if every is None else every, time.time()
        self.last, self.bar = self.t0, tqdm(desc=desc, leave=False, initial=start, total=steps) if sys.stderr.isatty() \
            else print(f"{desc}: {steps} steps" + (f", from step {start}" if start else ""), file=sys.stderr)

    def set_postfix(self, **values):
        self.postfix = values
        if self.bar:
            self.bar.set_postfix(**values)

    def update(self, step: int):
        if self.bar:
            self.bar.update(step - self.step)
        elif time.time() - self.last >= self.every:
            self.last = time.time()
            self.line(step)
        self.step = step

    def line(self, step: int):
        elapsed = time.time() - self.t0
        eta = elapsed / (step - self.start) * (self.steps - step) if step > self.start else float("nan")
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {step}/{self.steps}{extra}, {elapsed:.0f}s elapsed, ETA {eta:.0f}s", file=sys.stderr)

    def close(self):
        if self.bar:
            return self.bar.close()
        self.line(self.steps)


class Checkpoint:
    """--resume's files in <work>/checkpoint/: meta.json (settings); per stage one <stage>.safetensors
    (parameters, AdamW; in its metadata the next step, accountant, counts) as of its last *finished*
    iteration, written then renamed: an interrupted one is redone with fresh noise (it never left the
    process, its accountant step was not taken). The generator, the secret, is never saved."""

    def __init__(self, work: str, every: int, config: dict | None = None):
        self.dir, self.every, self.pending = os.path.join(work, "checkpoint"), every, None
        if config is not None:
            os.makedirs(self.dir, exist_ok=True)
            write_json(os.path.join(self.dir, "meta.json"), {"config": config})

    def saved(self, stage: str) -> tuple[dict, dict] | None:  # (its state as JSON, its tensors)
        if os.path.exists(path := os.path.join(self.dir, f"{stage}.safetensors")):
            with safe_open(path, "pt") as f:
                return json.loads(f.metadata()["state"]), {k: f.get_tensor(k) for k in f.keys()}

    def restore(self, stage: str, state: TrainState, plan: StagePlan) -> TrainState:
        if (saved := self.saved(stage)) is not None:
            meta, tensors = saved
            with torch.no_grad():
                for k, p in state.params.items():
                    p.copy_(tensors[f"param/{k}"])
            opt = {int(i): {n: tensors[f"opt/{i}/{n}"] for n in names} for i, names in meta["optimizer"].items()}
            state.optimizer.load_state_dict({"state": opt, "param_groups": meta["param_groups"]})
            if (saved_by := meta["accountant"].get("mechanism", "rdp")) != state.accountant.mechanism:
                raise UserError(f"resume: the {stage} checkpoint's ledger was kept by the {saved_by} accountant and "
                                f"its settings name {state.accountant.mechanism}: it cannot go on with this ledger")
            state.accountant.load_state_dict(meta["accountant"])
            state.step, state.nonfinite = meta["step"], meta["nonfinite"]
            print(f"resume: {stage} " + ("finished before, its parameters restored" if state.step >= plan.steps
                                         else f"from step {state.step}"), file=sys.stderr)
        return state

    def mark(self, stage: str, state: TrainState, final: bool = False):
        """A finished iteration, in memory; on disk every `every` steps, at the stage's end, on `flush`."""
        opt = state.optimizer.state_dict()
        tensors = {f"param/{k}": p.detach().cpu().clone() for k, p in state.params.items()}
        tensors |= {f"opt/{i}/{n}": t.detach().cpu().clone() for i, s in opt["state"].items() for n, t in s.items()}
        self.pending = (stage, tensors, {"step": state.step, "nonfinite": state.nonfinite, "param_groups":
                                         opt["param_groups"], "accountant": state.accountant.state_dict(),
                                         "optimizer": {str(i): list(s) for i, s in opt["state"].items()}})
        if final or (self.every and state.step % self.every == 0):
            self.flush()

    def flush(self) -> bool:
        """Write the last finished iteration; whether there is a checkpoint to resume from."""
        if self.pending is not None:
            (stage, tensors, meta), self.pending = self.pending, None
            path = os.path.join(self.dir, f"{stage}.safetensors")
            save_file({k: v.contiguous() for k, v in tensors.items()}, path + ".partial", {"state": json.dumps(meta)})
            os.replace(path + ".partial", path)
        return os.path.isdir(self.dir) and any(f.endswith(".safetensors") for f in os.listdir(self.dir))


class RunHooks(Hooks):
    """A run in progress, with where it writes (`work`, renamed to `out` at its end), its device and its secret
    generator, and how it watches its stages. It shows progress on stderr, logs a row per logged step to `log`
    (by default appended to `work`/metrics.jsonl, so a resumed run goes on), checkpoints after each iteration and
    times each phase."""

    def __init__(self, ckpt: Checkpoint | None = None, log=None, device: str = "cpu", work: str = "", out: str = "",
                 generator: torch.Generator | None = None):
        self.ckpt, self.device, self.work, self.out, self.generator = ckpt, device, work, out, generator
        self.log = log if log is not None else self.write_metrics if work else None
        self.seconds, self.bar, self.file, self.t0 = {}, None, None, time.time()
        self.sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

    def write_metrics(self, row: dict):
        self.file = self.file or open(os.path.join(self.work, "metrics.jsonl"), "a")
        self.file.write(json.dumps({**row, "time/seconds": round(time.time() - self.t0, 2)}) + "\n")
        self.file.flush()

    def close(self):
        if self.file:
            self.file.close()

    def restore(self, stage, state, plan):
        state = self.ckpt.restore(stage, state, plan) if self.ckpt else state
        self.bar = Progress(plan.steps, f"{stage} (eps={plan.epsilon:g}, sigma={plan.noise_multiplier:.3f})",
                            start=state.step)
        return state

    @contextlib.contextmanager
    def phase(self, name):
        self.sync()
        t = time.perf_counter()
        yield
        self.sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def step(self, stage, state, plan, batch_size, aux=None, update=None, **stats):
        step, row = state.step - 1, {f"{stage}/step": state.step - 1, f"{stage}/batch_size": batch_size,
                                     f"{stage}/nonfinite_grads": state.nonfinite}
        if stage == "ppo":
            a = aux.mean(0).tolist() if len(aux) else [math.nan] * 3
            row.update({"ppo/lr": stats["lr"], "ppo/reward_mean": stats["reward"].mean().item(),
                        "ppo/kl": stats["kl"].mean().item(), "ppo/loss_policy": a[0], "ppo/loss_value": a[1],
                        "ppo/clip_frac": a[2], "ppo/response_len": stats["response_len"].float().mean().item()})
            postfix = dict(reward=f"{row['ppo/reward_mean']:.2f}", kl=f"{row['ppo/kl']:.2f}")
        elif stage == "rm":  # the share of the step's comparisons ranked right, before the update
            row["rm/accuracy"] = aux.mean().item() if aux is not None else math.nan
            postfix = {"accuracy": f"{row['rm/accuracy']:.3f}"}
        else:
            postfix = {}
        if stage == "ppo" or step % 20 == 0 or state.step == plan.steps:
            row["privacy/epsilon"] = state.accountant.get_epsilon(plan.delta) if plan.private else math.inf
            self.bar.set_postfix(**postfix, eps=f"{row['privacy/epsilon']:.2f}")
            if self.log is not None:
                self.log({**row, **{f"time/{k}": v for k, v in self.seconds.items()}})
        self.seconds = {}
        if self.ckpt is not None:
            self.ckpt.mark(stage, state)
        self.bar.update(state.step)

    def finish(self, stage, state, entry):
        if self.ckpt is not None:
            self.ckpt.mark(stage, state, final=True)
        self.bar.close()


@contextlib.contextmanager
def run_directory(args, task: str):
    """A run, whole or not at all: it writes into <out>.partial/, renamed to <out> when the block has
    finished; a non-empty --out is refused, or with --overwrite replaced whole at the end. On Ctrl-C
    or a crash the last finished iteration is checkpointed there (to --resume); else nothing stays."""
    validate(args)
    device, out = args.device or ("cuda" if torch.cuda.is_available() else "cpu"), args.out or os.path.join(
        "runs", f"{task}-eps{args.epsilon:g}-seed{args.seed}")
    work = args.resume or out.rstrip("/") + ".partial"
    if args.resume:  # args are the checkpoint's own (main); replaying the seed's stream would reuse noise
        out = args.resume.removesuffix(".partial")
        if args.reproducible_noise:
            print("warning: a resumed run draws secret noise; --reproducible-noise covers uninterrupted runs only",
                  file=sys.stderr)
    elif os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is an existing file; give a directory")
    elif os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        raise UserError(f"--out {out} already holds a run; add --overwrite to replace it, or give another --out")
    elif os.path.exists(os.path.join(work, "checkpoint", "meta.json")) and not args.overwrite:
        raise UserError(f"{work} holds an interrupted run: continue it with --resume {work}, or add --overwrite")
    else:
        shutil.rmtree(work, ignore_errors=True)  # what an earlier crash left
        try:
            os.makedirs(work)
        except OSError as e:  # e.g. under /proc, or a directory not ours
            raise UserError(f"--out {out} cannot be created: {e.strerror} ({work})") from None
    ckpt = Checkpoint(work, args.checkpoint_every, None if args.resume else {"task": task, **config_of(args)})
    torch.manual_seed(args.seed)  # public: initial weights
    generator = private_generator(args.seed if args.reproducible_noise and not args.resume else None)
    run = RunHooks(ckpt, device=device, work=work, out=out, generator=generator)
    try:
        yield run
    except BaseException as e:
        run.close()
        if isinstance(e, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
        if ckpt.flush():
            print(f"the unfinished run is in {work}: continue it with --resume {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            raise SystemExit(130) from None
        raise
    run.close()
    shutil.rmtree(old := out.rstrip("/") + ".old", ignore_errors=True)
    if os.path.exists(out):
        os.replace(out, old)
    shutil.rmtree(os.path.join(work, "checkpoint"), ignore_errors=True)
    os.replace(work, out)
    shutil.rmtree(old, ignore_errors=True)


def stage_inputs(task: str, data: dict, tok, args, rm_tok=None, tokens: bool = False) -> dict[str, list[dict]]:
    """What each stage is given, a line per example: its unit's keyed hash ("key") and its texts ("input"), with
    `tokens` also the exact token ids it encodes ("tokens"). The pipeline trains on these texts, --dry-run writes
    the lines with their tokens, and the neighbour tests compare them between datasets."""
    def lines(part, inputs, tokenizer, a, completion=None):
        out = [{"key": unit_key(r["_unit"], args.seed), "input": x} for r, x in zip(data[part], inputs)]
        if tokens:  # (the dry run's only: a run encodes its own batches)
            rows = [encode_rows(tokenizer, [x["prompt"] for x in inputs], [x[c] for x in inputs] if c else None,
                                max_prompt=a.max_prompt, max_completion=getattr(a, "max_completion", 0))[0]
                    for c in (completion if isinstance(completion, tuple) else (completion,))]
            for line, *t in zip(out, *rows):
                line["tokens"] = t[0] if len(t) == 1 else list(t)
        return out
    pick_ = lambda part, *fields: [{f: r[f] for f in fields} for r in data[part]]
    if task == "sentiment":
        prompts = {k: prefix_prompts(tok, [r["text"] for r in data[k]], args.prompt_min, args.prompt_max, args.seed)
                   for k in ("ppo", "test")}
        return {"sft": lines("sft", [{"prompt": "", "completion": r["text"]} for r in data["sft"]], tok, args.sft,
                             "completion"),
                **{k: lines(k, [{"prompt": p} for p in prompts[k]], tok, args.ppo) for k in ("ppo", "test")}}
    both = ("chosen", "rejected")
    return {"sft": lines("sft", pick_("sft", "prompt", "completion"), tok, args.sft, "completion"),
            "rm": lines("comparisons", pick_("comparisons", "prompt", *both), rm_tok or tok, args.rm, both),
            "ppo": lines("ppo", pick_("ppo", "prompt"), tok, args.ppo),
            "test": lines("test", pick_("test", "prompt", "completion"), tok, args.ppo),
            "rm_test": lines("comparisons_test", pick_("comparisons_test", "prompt", *both), rm_tok or tok, args.rm,
                             both)}


def texts_of(lines: list[dict], *fields) -> list[list[str]]:
    """The columns `fields` of a stage's input lines, e.g. its prompts and its completions."""
    return [[x["input"][f] for x in lines] for f in fields]


def units_of(lines: list[dict]) -> list[str]:
    """Each input line's protected unit (its keyed hash): what the stage samples and clips."""
    return [x["key"] for x in lines]


def planned_epsilon(plan: StagePlan) -> float:
    """The epsilon a plan spends if it runs all its steps at its sigma (<= its target)."""
    accountant = ACCOUNTANTS[plan.accountant]()
    accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, num_steps=plan.steps)
    return accountant.get_epsilon(plan.delta) if plan.private else math.inf


def write_plan(run: RunHooks, task: str, args, plans: dict, inputs: dict, report: dict) -> dict:
    """--dry-run: print the plan (per stage N, q, steps, sigma, the epsilon it spends, delta), write
    plan.json and inputs/<stage>.jsonl. Diff two dry runs to see what one unit changes."""
    print(f"plan ({task}, nothing trained):", file=sys.stderr)
    stages = {}
    for name, p in plans.items():
        stages[name] = {**dataclasses.asdict(p), "epsilon_spent": planned_epsilon(p)}
        print(f"  {name:4s} N={p.num_private_examples} q={p.sample_rate:.4f} steps={p.steps} sigma="
              f"{p.noise_multiplier:.3f} epsilon={stages[name]['epsilon_spent']:.3f} (target {p.epsilon:g}) "
              f"delta={p.delta:.2e}", file=sys.stderr)
    write_json(os.path.join(run.work, "plan.json"), plan := {"task": task, "config": config_of(args), "data": report,
                                                             "stages": stages})
    os.makedirs(os.path.join(run.work, "inputs"))
    for name, lines in inputs.items():
        write_text(os.path.join(run.work, "inputs", f"{name}.jsonl"), "".join(json.dumps(x) + "\n" for x in lines))
    print(f"wrote {run.out}/plan.json and inputs/")
    return plan


def sentiment_reward(args, device):
    """The public reward: the built-in lexicon scorer or --reward-model."""
    return hub_sentiment_reward(args.reward_model, args.reward_label, device) if args.reward_model \
        else builtin_sentiment_reward


def eval_reward(args, device):
    """--eval-reward-model: a public classifier that scores summaries in evaluation (none: None)."""
    return hub_sentiment_reward(args.eval_reward_model, "0", device) if args.eval_reward_model else None


def learned_reward(args, run: RunHooks, sft_lm, tok, rm_base, inputs: dict, plans: dict) -> tuple:
    """STAGE 2: the DP reward model on D2, from LM_sft (or --reward-base) with a fresh head (and LoRA).
    Its scores are DPPPO's reward, post-processing. Returns (reward_fn, its ledger entry, its held-out
    accuracy, a function that saves it)."""
    rm_lm, rm_tok = rm_base if rm_base else (copy.deepcopy(sft_lm), tok)
    rm = RewardModel(add_lora(rm_lm, rank=args.rm.lora_rank), head=args.rm.head,
                     pad_token_id=rm_tok.pad_token_id).to(run.device).eval()
    entry = dp_reward_model(rm, rm_tok, *texts_of(inputs["rm"], "prompt", "chosen", "rejected"), plans["rm"], args.rm,
                            units=units_of(inputs["rm"]), generator=run.generator, hooks=run)

    def rm_reward(prompts, responses):
        return reward_model_scores(rm, rm_tok, prompts, responses, max_prompt=args.rm.max_prompt,
                                   max_completion=args.rm.max_completion, device=run.device)
    prompts, chosen, rejected = texts_of(inputs["rm_test"], "prompt", "chosen", "rejected")
    accuracy = (rm_reward(prompts, chosen) > rm_reward(prompts, rejected)).float().mean().item()
    return rm_reward, entry, {"rm_accuracy": accuracy}, lambda path: save_reward_model(rm, rm_tok, path)


def sentiment_metrics(args, data, texts, scores) -> dict:
    """The public reward, and the share of responses that say one word three times in a row: the
    lexicon reward's easiest hack, which a too small beta lets DPPPO find (NOTES.md)."""
    repeats = [bool(re.search(r"\b(\w+)( \1\b){2}", y)) for y in texts]
    return {"reward": scores.mean().item(), "repeats": float(np.mean(repeats))}


def rlhf_metrics(args, data, texts, scores) -> dict:
    """The learned reward, ROUGE against the reference summaries, and (built-in task) the hidden
    preference the comparisons were drawn from."""
    by_row = [rouge(y, r["completion"]) for y, r in zip(texts, data["test"])]
    out = {"reward": scores.mean().item(), **{k: float(np.mean([s[k] for s in by_row])) for k in by_row[0]}}
    if args.dataset == "builtin":
        out["true_preference"] = float(np.mean([true_preference(r["meta"], y) for y, r in zip(texts, data["test"])]))
    return out


@dataclass
class Task:
    """What the one pipeline needs to know of a task: its data, its rewards, its evaluation."""
    name: str
    data: object            # args -> (data, report): the private parts by protected unit, and the test set
    stages: tuple           # (stage, the part of `data` it trains on), in order
    public_reward: object   # (args, device) -> reward_fn or None, loaded before anything trains
    learned_reward: object  # None, or stage 2: (args, run, sft_lm, tok, rm_base, inputs, plans) -> ...
    metrics: object         # (args, data, texts, scores) -> one model's evaluation
    eos: bool               # responses end at eos (summaries) or at their drawn length (continued reviews)


TASKS = {"sentiment": Task("sentiment", sentiment_data, (("sft", "sft"), ("ppo", "ppo")), sentiment_reward, None,
                           sentiment_metrics, eos=False),
         "rlhf": Task("rlhf", rlhf_data, (("sft", "sft"), ("rm", "comparisons"), ("ppo", "ppo")), eval_reward,
                      learned_reward, rlhf_metrics, eos=True)}


def run_pipeline(args: RunArgs, task: Task) -> dict:
    """Split -> DP SFT on D1 -> (rlhf: DP reward model on D2) -> DPPPO on D3 -> evaluate the pre-trained,
    SFT and aligned models on the test prompts. --dry-run stops before training."""
    t0 = time.time()
    with run_directory(args, task.name) as run:
        base_lm, tok = load_lm(args.model, run.device, args.base)
        check_fits(base_lm, args)
        rm_base = load_lm(args.reward_base, run.device, args.base) if getattr(args, "reward_base", None) else None
        data, report = task.data(args)
        sizes = {stage: len({r["_unit"] for r in data[part]}) for stage, part in task.stages}  # N: units
        delta = args.delta if args.delta is not None else 1 / sum(sizes.values())
        plans = plan_stages(args, sizes, delta)
        inputs = stage_inputs(task.name, data, tok, args, rm_base[1] if rm_base else None, tokens=args.dry_run)
        if args.dry_run:
            return write_plan(run, task.name, args, plans, inputs, report)
        public = task.public_reward(args, run.device)
        print(f"{task.name}: " + " ".join(f"|{s}|={n}" for s, n in sizes.items()) + f" |test|={len(inputs['test'])}  "
              f"epsilon={args.epsilon:g} delta={delta:.2e} accountant={args.accountant}  device={run.device}",
              file=sys.stderr)
        # STAGE 1: DP SFT on D1, then merge its LoRA: LM_sft.
        sft_lm = add_lora(copy.deepcopy(base_lm))
        ledger = {"sft": dp_sft(sft_lm, tok, *texts_of(inputs["sft"], "prompt", "completion"), plans["sft"], args.sft,
                                units=units_of(inputs["sft"]), generator=run.generator, hooks=run)}
        merge_lora(sft_lm)
        reward_fn, extra, save_rm = public, {}, None
        if task.learned_reward is not None:  # STAGE 2 (rlhf): the DP reward model on D2
            reward_fn, ledger["rm"], extra, save_rm = task.learned_reward(args, run, sft_lm, tok, rm_base, inputs,
                                                                          plans)
        # STAGE 3: DPPPO on D3 from LM_sft, with a fresh LoRA and value head.
        policy = ActorCritic(add_lora(copy.deepcopy(sft_lm))).to(run.device)
        eos_id = tok.eos_token_id if task.eos else None
        ledger["ppo"] = dpppo(policy, tok, *texts_of(inputs["ppo"], "prompt"), reward_fn, plans["ppo"], args.ppo,
                              units=units_of(inputs["ppo"]), generator=run.generator, eos_id=eos_id, hooks=run)
        models = {"pretrained": CausalLM(base_lm), "sft": CausalLM(sft_lm), "aligned": policy}
        evals, generations = evaluate_models(args, task, models, tok, data, inputs, reward_fn, public, run.device)
        save_model(merge_lora(policy.lm), tok, os.path.join(run.work, "policy"))
        if save_rm is not None:
            save_rm(os.path.join(run.work, "reward_model"))
        summary = {"config": config_of(args), "task": task.name, "model": args.model, "epsilon": args.epsilon,
                   "accountant": args.accountant, "delta": delta, "seed": args.seed,
                   "secret_noise": not args.reproducible_noise, "data": report,
                   "stages": ledger, "total_epsilon": compose_ledger(ledger, delta, args.composition),
                   "composition": args.composition, "eval": {**evals, **extra}, "seconds": time.time() - t0}
        write_json(os.path.join(run.work, "summary.json"), summary)
    print_report(summary, texts_of(inputs["test"], "prompt")[0], generations, args.num_samples, run.out)
    return summary


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, prompts: list[str], reward_fn, *, lengths, eos_id, max_prompt, seed,
             device, batch: int = 128):
    """One response per test prompt (the same draws for every model, from `seed`), and its score."""
    gen, responses, scores = torch.Generator().manual_seed(seed), [], []
    for s in range(0, len(prompts), batch):
        ids, mask, _ = encode(tokenizer, prompts[s:s + batch], max_prompt=max_prompt)
        out, _, act, _, _ = sample(model, ids.to(device), mask.to(device), generator=gen, eos_id=eos_id,
                                   max_new_tokens=lengths[s:s + batch].to(device))
        responses += (r := decode_responses(tokenizer, out, act, eos_id))
        scores.append(reward_fn(prompts[s:s + batch], r).float())
    return torch.cat(scores), responses


def evaluate_models(args, task: Task, models: dict, tok, data, inputs, reward_fn, public, device) -> tuple:
    """Each model's metrics on the test prompts, and the public --eval-reward-model's where the reward
    was learned. Reviews continue for a drawn length (public seed), summaries to eos."""
    prompts = texts_of(inputs["test"], "prompt")[0]
    lengths = (torch.full((len(prompts),), args.ppo.response_max) if task.eos else
               torch.randint(args.ppo.response_min, args.ppo.response_max + 1, (len(prompts),),
                             generator=torch.Generator().manual_seed(args.seed + 3)))
    evals, generations = {}, {}
    for name, model in models.items():
        scores, texts = evaluate(model, tok, prompts, reward_fn, lengths=lengths, device=device, seed=args.seed + 4,
                                 eos_id=tok.eos_token_id if task.eos else None, max_prompt=args.ppo.max_prompt,
                                 batch=min(128, args.ppo.rollout_chunk_size or 128))
        evals[name], generations[name] = task.metrics(args, data, texts, scores), (texts, scores)
        if public is not None and public is not reward_fn:
            evals[name]["eval_reward"] = public(prompts, texts).mean().item()
    return evals, generations


def print_report(summary, prompts, generations: dict, n: int, out: str):
    """The ledger, the evaluation, and a few generations side by side (like the paper's Table 2)."""
    print("\nprivacy ledger (each stage on its own private data):")
    for name, s in summary["stages"].items():
        print(f"  {name:4s} eps={s['epsilon']:.3f} delta={s['delta']:.2e} sigma={s['noise_multiplier']:.3f} "
              f"q={s['sample_rate']:.4f} steps={s['steps']} N={s['num_private_examples']}")
    print(f"  total eps={summary['total_epsilon']:.3f} ({summary['composition']} composition)\n"
          "evaluation on held-out prompts:")
    for name, e in ((k, v) for k, v in summary["eval"].items() if isinstance(v, dict)):
        print(f"  {name:10s} " + "  ".join(f"{k}={v:+.3f}" for k, v in e.items()))
    print("sample generations (prompt | model: response [score]):")
    for i in range(min(n, len(prompts))):
        print(f"  {prompts[i][-120:]!r}")
        for name, (texts, scores) in generations.items():
            print(f"    {name:10s}: {texts[i]!r} [{scores[i].item():+.2f}]")
    print(f"wrote {out}/summary.json, metrics.jsonl, policy/ ({summary['seconds']:.0f}s)")
    if "rm_accuracy" in summary["eval"]:
        print(f"reward model held-out accuracy: {summary['eval']['rm_accuracy']:.3f}")


T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262]  # Student t, two-sided 95 %, 1-9 dof


def mean_ci(values) -> tuple[float, float]:
    """The mean and the half-width of its 95 % confidence interval (Student t; nan for one value)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2 or not np.isfinite(v).all():  # one seed, or eps = inf: no interval
        return float(v.mean()), math.nan
    return float(v.mean()), float(T95[min(len(v), 10) - 2] * v.std(ddof=1) / math.sqrt(len(v)))


def _cell(values, percent=False) -> str:
    if not len(values):
        return "n/a"
    (m, ci), f = mean_ci(values), (lambda x: f"{x:.0%}") if percent else (lambda x: f"{x:+.3f}")
    return f(m) if math.isnan(ci) else f"{f(m)} ± {f(ci).lstrip('+')}"


def sweep_rows(results: dict, task: str) -> list[tuple]:
    """Every number of a sweep, one row each: (metric, model, epsilon, seed, value), in the order run. results.csv
    is these rows, and the tables and the plot read them. `results[eps]`: one summary per seed."""
    rows = []
    for e, runs in results.items():
        for s in runs:
            evals = s["eval"] if task != "audit" else {
                "sft": {"epsilon_spent": s["stages"]["sft"]["epsilon"], "epsilon_lower_bound": s["epsilon_lower_bound"],
                        "epsilon_claimed": s["epsilon_claimed"], "noise_scale": s["noise_scale"],
                        **{f"mechanism_tpr_at_fpr_{f:g}": t for f, t in zip(s["fpr"], s["mechanism_tpr_at_fpr"])}},
                **{o: {"epsilon_lower_bound": s[o]["epsilon_lower_bound"],
                       **{f"tpr_at_fpr_{f:g}": t for f, t in zip(s["fpr"], s[o]["tpr_at_fpr"])}}
                   for o in ("every_step", "final")}}
            rows += [(metric, model, e, s["seed"], v) for model, ev in evals.items()
                     for metric, v in (ev.items() if isinstance(ev, dict) else [("accuracy", ev)])]
    return rows


def _values(rows: list, metric: str, model: str, e: float) -> list:
    """One cell's values, a seed each, in the order run."""
    return [v for m, mo, ee, _, v in rows if (m, mo, ee) == (metric, model, e)]


def recovered(rows: list, e: float, metric: str) -> list[float]:
    """Per seed: (aligned at e - pre-trained) / (aligned at inf - pre-trained). A seed whose non-private
    run ends at or below the pre-trained model has no gain to recover, and is left out."""
    return [(got - pre) / (full - pre) for got, pre, full in zip(*(_values(rows, metric, model, eps) for model, eps in (
        ("aligned", e), ("pretrained", math.inf), ("aligned", math.inf)))) if full > pre]


def sweep_table(rows: list, task: str) -> str:
    """Markdown tables in the shape of the paper's Tables 1 and 3: a column per epsilon, each cell the
    mean over seeds with its 95 % confidence interval (the audit: the claim, each observer's bound per seed)."""
    eps, metrics = list(dict.fromkeys(r[2] for r in rows)), list(dict.fromkeys(r[0] for r in rows))
    head = "| | " + " | ".join(f"eps={e:g}" for e in eps) + " |\n|---|" + "---|" * len(eps) + "\n"
    row = lambda name, cells: f"| {name} | " + " | ".join(cells) + " |"
    cells = lambda metric, model, f=_cell: [f(_values(rows, metric, model, e)) for e in eps]
    if task == "audit":
        out = [row("claimed", cells("epsilon_claimed", "sft"))]
        if any(r[0] == "noise_scale" and r[4] != 1 for r in rows):  # a broken mechanism, on purpose
            really = [" / ".join(f"x{x:g}: {y:.2f}" for x, y in zip(_values(rows, "noise_scale", "sft", e),
                                                                     _values(rows, "epsilon_spent", "sft", e)))
                      for e in eps]
            out.append(row("run with noise x, really", really))
        for o in ("every_step", "final"):
            out.append(row(f"lower bound, {o.replace('_', '-')}", cells("epsilon_lower_bound", o, lambda v: " / ".join(
                f"{x:.2f}" for x in v))))
        tprs = [m for m in metrics if m.startswith("tpr_at_fpr_")]
        for name, model, prefix in (("claimed mechanism", "sft", "mechanism_"), ("every-step attack", "every_step", ""),
                                    ("final-iterate attack", "final", "")):
            out.append(row(f"TPR, {name}", (" / ".join(f"{np.mean(_values(rows, prefix + m, model, e)):.3f}"
                                                       for m in tprs) for e in eps)))
        return ("claimed epsilon and the proved lower bounds (per seed; each must stay below the claim), and TPR at "
                "FPR 0.1 % / 1 % / 10 % (mean over seeds)\n\n" + head + "\n".join(out) + "\n")
    out = []
    for metric in ["reward"] + (["true_preference", "rouge1", "rouge2", "rougeL"] if task == "rlhf" else ["repeats"]):
        if metric in metrics:
            lines = [row(m, cells(metric, m)) for m in ("pretrained", "sft", "aligned")]
            own_rm = task == "rlhf" and metric == "reward"  # each column has its own DP reward model
            if math.inf in eps and metric != "repeats" and not own_rm:
                lines.append(row("recovered", (_cell(recovered(rows, e, metric), percent=True) for e in eps)))
            out.append(f"{metric}\n\n" + head + "\n".join(lines))
    if task == "rlhf":
        out.append("reward-model held-out accuracy\n\n" + head + row("accuracy", cells("accuracy", "rm_accuracy")))
    return "\n\n".join(out) + "\n"


def plot_sweep(rows: list, task: str, path: str) -> bool:
    """The paper's Fig. 3 shape: the aligned model's score against epsilon, the non-private run and the
    pre-trained model as lines. Only if matplotlib is installed (an optional extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib); wrote the table and CSV only",
              file=sys.stderr)
        return False
    eps = list(dict.fromkeys(r[2] for r in rows))
    metric = "true_preference" if any(r[0] == "true_preference" for r in rows) else "reward"
    finite = [e for e in eps if math.isfinite(e)]
    stats = [mean_ci(_values(rows, metric, "aligned", e)) for e in finite]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(finite, [m for m, _ in stats], yerr=[0 if math.isnan(c) else c for _, c in stats], marker="o",
                capsize=3, label="DP aligned (mean, 95 % CI)")
    for values, style, label in ((_values(rows, metric, "aligned", math.inf), "--", "non-private aligned"),
                                 (_values(rows, metric, "pretrained", eps[0]), ":", "pre-trained")):
        if values:
            ax.axhline(np.mean(values), ls=style, color="gray", label=label)
    ax.set(xlabel="epsilon", ylabel=metric)
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".partial.png", dpi=120)
    os.replace(path + ".partial.png", path)
    return True


def run_sweep(args: RunArgs, run, task: str, epsilons: list[float], seeds: list[int], plot: bool = False) -> str:
    """The pipeline once per (epsilon, seed); table.md, results.csv (and plot.png) in --out. A cell
    already run with the same settings (say, by a parallel job) is reused."""
    base = args.out or os.path.join("runs", f"{task}-sweep")

    def cell(e, s):
        cell_args = dataclasses.replace(args, epsilon=e, seed=s, out=os.path.join(base, f"eps{e:g}-seed{s}"))
        if os.path.exists(done := os.path.join(cell_args.out, "summary.json")):
            with open(done) as f:
                summary = json.load(f)
            if summary.get("config") == config_of(cell_args):
                print(f"{task}: reusing {done}", file=sys.stderr)
                return summary
        return run(cell_args)
    rows = sweep_rows({e: [cell(e, s) for s in seeds] for e in epsilons}, task)
    table = sweep_table(rows, task)
    write_text(os.path.join(base, "table.md"), table)
    write_text(os.path.join(base, "results.csv"), "metric,model,epsilon,seed,value\n" + "".join(
        f"{m},{model},{e:g},{seed},{v}\n" for m, model, e, seed, v in rows))
    if plot and task != "audit" and plot_sweep(rows, task, os.path.join(base, "plot.png")):
        print(f"wrote {base}/plot.png", file=sys.stderr)
    print(f"\n{task}: {args.model}, seeds {','.join(map(str, seeds))}; mean ± 95 % CI over seeds "
          f"({base}/table.md, results.csv)\n\n{table}")
    return table


# #############################################################################################
# PART III: THE AUDIT. It measures the method's runs, and nothing above needs it.
# #############################################################################################


# ===== AUDIT: a one-run privacy audit of DP SFT (Steinke, Nasr, Jagielski 2023) =============================
# m canaries, each put into D1 with probability 1/2 by a coin the auditor keeps; train once; guess the k
# canaries most likely in D1: if (epsilon, delta)-DP held, the right guesses could not beat randomized response
# by much, which turns their count into a lower bound on epsilon. The canaries are white-box "Dirac" records:
# canary i's gradient is 2C on its own coordinate of an extra vector no real record touches, clipped to C like
# every sample. Two observers: `every-step` reads each privatised update on those coordinates (what DP-SGD's
# guarantee covers), where a member's coordinate is b_t + sigma z_t, b_t ~ Bernoulli(q), and scores each canary
# by the exact log-likelihood ratio (the optimal test); `final` reads the last iterate, after AdamW.


def audit_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[>= v of r guesses right] under (epsilon, delta)-DP, m canaries (Steinke et al., Thm. 3.3 as in their
    code): P[Bin(r, p) >= v] + 2 m delta max_i P[v > Bin(r, p) >= v - i] / i, p = e^eps / (1 + e^eps), the
    accuracy of epsilon-DP randomized response."""
    p = 1 / (1 + math.exp(-epsilon))
    k = torch.arange(r + 1, dtype=torch.float64)
    log_pmf = (torch.lgamma(torch.tensor(r + 1.0, dtype=torch.float64)) - torch.lgamma(k + 1) - torch.lgamma(r - k + 1)
               + k * math.log(p) + (r - k) * math.log1p(-p)) if p < 1 else torch.where(k == r, 0.0, -math.inf)
    pmf = log_pmf.exp()
    below = torch.stack([pmf[v - i:v].sum() / i for i in range(1, v + 1)]) if v else torch.zeros(1)
    return min(1.0, pmf[v:].sum().item() + 2 * m * delta * below.max().item())


def audit_epsilon_lower_bound(m: int, r: int, v: int, delta: float, alpha: float = 0.05) -> float:
    """The largest epsilon that v right guesses out of r reject at level alpha: with probability >= 1 - alpha
    the mechanism is not (epsilon', delta)-DP for any epsilon' below it."""
    if audit_p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while audit_p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, 2 * hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if audit_p_value(m, r, v, mid, delta) < alpha else (lo, mid)
    return lo


def canary_llr(x: torch.Tensor, q: float, sigma: float) -> torch.Tensor:
    """[m]: each canary's log-likelihood ratio of "in D1" (every step's coordinate b + sigma z, b ~ Bernoulli(q))
    against "not" (sigma z), from its observations x [m, T] in units of C / (qN): the optimal score."""
    if sigma == 0:  # no noise: any increasing score is optimal
        return x.sum(-1)
    return torch.logaddexp(torch.log1p(torch.tensor(-q, dtype=x.dtype)), math.log(q) + (x - 0.5) / sigma**2).sum(-1)


def tpr_at_fpr(members: torch.Tensor, others: torch.Tensor, fprs) -> list[float]:
    """The share of members scored above the threshold that lets through a share `fpr` of the others."""
    high = others.sort(descending=True).values
    return [float((members > high[min(len(high) - 1, int(f * len(high)))]).double().mean()) for f in fprs]


def mechanism_tradeoff(q: float, sigma: float, steps: int, fprs, n: int = 400_000, seed: int = 0) -> list[float]:
    """The optimal test's TPR at each FPR for the mechanism itself (T steps of the Poisson-subsampled Gaussian
    at (q, sigma) on one coordinate), by simulating it n times a side: the curve an every-step audit can reach."""
    gen = torch.Generator().manual_seed(seed)
    noise = lambda: sigma * torch.randn(n, steps, generator=gen, dtype=torch.float64)
    member = (torch.rand(n, steps, generator=gen, dtype=torch.float64) < q).double() + noise()
    return tpr_at_fpr(canary_llr(member, q, sigma), canary_llr(noise(), q, sigma), fprs)


class CanaryLM(CausalLM):
    """The SFT model plus one extra coordinate per canary; no real record's loss touches them."""

    def __init__(self, lm: nn.Module, num_canaries: int):
        super().__init__(lm)
        self.canary = nn.Parameter(torch.zeros(num_canaries))


def canary_sft_loss(model: CanaryLM, max_grad_norm: float):
    """sft_loss, plus 2C times its own coordinate for a canary row (no real token; `canary`, a row of its index,
    -1 for a real record). A real row's canary term is zero, a canary row's SFT term is zero."""
    base, m = sft_loss(model), model.canary.shape[0]

    def loss_fn(params, ids, mask, loss_mask, canary):
        onehot = (torch.arange(m, device=ids.device) == canary[-1]).float()
        return base(params, ids, mask, loss_mask) + 2 * max_grad_norm * (params["canary"] * onehot).sum()
    return loss_fn


class EveryStepObserver(Hooks):
    """The every-step auditor: each privatised update on the canary coordinates, in units of C / (qN)."""

    def __init__(self, max_grad_norm: float):
        self.c, self.x = max_grad_norm, []

    def step(self, stage, state, plan, update=None, **stats):
        self.x.append(update["canary"].detach().cpu().double() * plan.expected_batch_size / self.c)


@dataclass
class AuditArgs(CommonArgs):
    """`audit`: a one-run audit of DP SFT: is the claimed epsilon at least what an attack proves?"""
    delta: float | None = arg(1e-5, "target delta (small beside 1/canaries, or the delta term swamps the bound)",
                              limit="(0,1)")
    num_sft: int = arg(2000, "real D1 examples (built-in reviews) beside the canaries", limit=">=1")
    canaries: int = arg(10000, "m: canaries, each in D1 with probability 1/2 (each costs one row of D1)",
                        limit=">=1")
    sample_rate: float = arg(0.5, "q of the audited stage (its batch: q times the expected |D1|)", limit="(0,1]")
    observe: str = arg("every-step", "whose bound leads: 'every-step' (each noisy update, what the guarantee covers) "
                       "or 'final' (the last iterate)", choices=("every-step", "final"))
    guesses: str = arg("10,20,50,100,200,500", "numbers k of membership guesses tried (the k top-scored canaries); "
                       "the confidence is split over them (Bonferroni)")
    confidence: float = arg(0.95, "confidence of the lower bound", limit="(0,1)")
    noise_scale: float = arg(1.0, "audit a broken mechanism: noise at this fraction of the sigma the claim is "
                             "computed from (1: honest; try 0.25 with --epsilon 1 to see it caught)",
                             limit="finite>=0")
    sft: SFTArgs = field(default_factory=lambda: SFTArgs(epochs=2.0, max_completion=32))


AUDIT_FPRS = (0.001, 0.01, 0.1)


def audit_report(s: dict, plan: StagePlan) -> str:
    """The audit's two lines: the claim (and, broken on purpose, the truth), the bounds, the TPRs."""
    tprs = lambda ts: ", ".join(f"{t:.3f}" for t in ts)
    truth = (f", run with noise x{s['noise_scale']:g}: really {s['stages']['sft']['epsilon']:.3f}"
             if s["noise_scale"] != 1 else "")
    most = f"{s['epsilon_provable']:.3f}" + (" (below the claim: no run can be caught here)"
                                             if s["epsilon_provable"] < s["epsilon_claimed"] else "")
    return (f"claimed epsilon {s['epsilon_claimed']:.3f} (target {s['epsilon']:g}, q={plan.sample_rate:g}, "
            f"T={plan.steps}, sigma={plan.noise_multiplier:.3f}{truth}); lower bounds at "
            f"{s['confidence']:.0%}: every-step {s['every_step']['epsilon_lower_bound']:.3f}, final iterate "
            f"{s['final']['epsilon_lower_bound']:.3f}; every guess right would prove {most}\n"
            f"TPR at FPR {tprs(s['fpr'])}: the claimed mechanism {tprs(s['mechanism_tpr_at_fpr'])}, the every-step "
            f"attack {tprs(s['every_step']['tpr_at_fpr'])}, the final-iterate attack {tprs(s['final']['tpr_at_fpr'])}")


def run_audit(args: AuditArgs) -> dict:
    """Train DP SFT once with canaries at the target epsilon; what each observer's guesses prove, and its
    TPR at a few FPRs beside the mechanism's own trade-off curve."""
    t0 = time.time()
    with run_directory(args, "audit") as run:
        lm, tok = load_lm(args.model, run.device, args.base)
        texts = [r["text"] for r in make_reviews(args.num_sft, seed=30_000 + args.seed,
                                                 exclude=set(public_corpus(args.base)[1]))]
        coins = torch.rand(args.canaries, generator=torch.Generator().manual_seed(40_000 + args.seed)) < 0.5
        members = coins.nonzero().flatten()
        ids, mask, loss_mask = encode(tok, [""] * len(texts), texts, max_prompt=args.sft.max_prompt,
                                      max_completion=args.sft.max_completion)
        canary = torch.cat([torch.full((len(texts),), -1), members])[:, None].expand(-1, ids.shape[1])
        data = (torch.cat([ids, torch.full((len(members), ids.shape[1]), tok.pad_token_id)]),  # a canary: all padding
                torch.cat([mask, torch.zeros(len(members), ids.shape[1], dtype=mask.dtype)]),
                torch.cat([loss_mask, torch.zeros(len(members), loss_mask.shape[1])]), canary)
        model = CanaryLM(add_lora(lm), args.canaries).to(run.device)
        print(f"audit: {len(texts)} reviews + {len(members)} of {args.canaries} canaries in D1, "
              f"epsilon={args.epsilon:g} delta={args.delta:g}", file=sys.stderr)
        expected_n = args.num_sft + args.canaries / 2  # q and T from E[|D1|], never from the coins under audit
        sft = dataclasses.replace(args.sft, batch_size=args.sample_rate * expected_n)
        plan = plan_stages(dataclasses.replace(args, sft=sft), {"sft": expected_n}, args.delta)["sft"]
        claimed = planned_epsilon(plan)  # the plan's sigma: --noise-scale breaks the mechanism, not the claim
        observer, run_plan = EveryStepObserver(args.sft.max_grad_norm), dataclasses.replace(
            plan, noise_multiplier=plan.noise_multiplier * args.noise_scale)
        entry = dp_train("sft", model, canary_sft_loss(model, args.sft.max_grad_norm), data, run_plan, sft,
                         generator=run.generator, hooks=observer)
        scores = {"every-step": canary_llr(torch.stack(observer.x, 1), plan.sample_rate, plan.noise_multiplier),
                  "final": -model.canary.detach().cpu().double()}  # a member's coordinate went down when sampled
        ks, alpha = [int(k) for k in args.guesses.split(",")], (1 - args.confidence) / len(args.guesses.split(","))
        audits, most = {}, max(audit_epsilon_lower_bound(args.canaries, k, k, args.delta, alpha) for k in ks)
        for name, s in scores.items():
            order = torch.argsort(s, descending=True, stable=True)
            rows = [{"guesses": k, "right": (v := int(coins[order[:k]].sum())),
                     "epsilon_lower_bound": audit_epsilon_lower_bound(args.canaries, k, v, args.delta, alpha)}
                    for k in ks]
            audits[name] = {"guesses": rows, "epsilon_lower_bound": max(r["epsilon_lower_bound"] for r in rows),
                            "tpr_at_fpr": tpr_at_fpr(s[coins], s[~coins], AUDIT_FPRS)}
        theory = mechanism_tradeoff(plan.sample_rate, plan.noise_multiplier, plan.steps, AUDIT_FPRS) \
            if plan.private else [1.0] * len(AUDIT_FPRS)
        summary = {"config": config_of(args), "task": "audit", "model": args.model, "epsilon": args.epsilon,
                   "delta": args.delta, "seed": args.seed, "secret_noise": not args.reproducible_noise,
                   "epsilon_claimed": claimed, "noise_scale": args.noise_scale, "epsilon_provable": most,
                   "canaries": args.canaries, "members": len(members), "confidence": args.confidence,
                   "observe": args.observe, "epsilon_lower_bound": audits[args.observe]["epsilon_lower_bound"],
                   "fpr": list(AUDIT_FPRS), "every_step": audits["every-step"], "final": audits["final"],
                   "mechanism_tpr_at_fpr": theory, "stages": {"sft": entry}, "seconds": time.time() - t0}
        write_json(os.path.join(run.work, "summary.json"), summary)
    print(audit_report(summary, plan) + f"  -> {run.out}/summary.json")
    return summary


# ===== CLI: one --flag per config field; every value checked in one place (`validate`) ======================
@dataclass
class PrivacyArgs:
    """`privacy`: epsilon of DP-SGD for (sigma, q, steps, delta), or sigma for a target epsilon."""
    sample_rate: float = arg(None, "Poisson sampling rate q", limit="(0,1]", required=True)
    steps: int = arg(None, "number of noisy steps", limit=">=1", required=True)
    noise_multiplier: float | None = arg(None, "sigma (noise std / clipping norm)", limit=">=0")
    epsilon: float | None = arg(None, "target epsilon: print the sigma that reaches it instead", limit=">0")
    delta: float = arg(1e-5, "target delta", limit="(0,1)")


LIMITS = {  # a field's `limit` -> (the test, what the one-line refusal says); nan fails every test
    ">0": (lambda v: v > 0, "it must be > 0"), ">=0": (lambda v: v >= 0, "it must be >= 0"),
    ">=1": (lambda v: v >= 1, "it must be >= 1"), "(0,1)": (lambda v: 0 < v < 1, "it must be in (0, 1)"),
    "(0,1]": (lambda v: 0 < v <= 1, "it must be in (0, 1]"), "[0,1]": (lambda v: 0 <= v <= 1, "it must be in [0, 1]"),
    "finite>=0": (lambda v: 0 <= v < math.inf, "it must be a finite number >= 0"),
}


def check_config(config, prefix: str = ""):
    """Every field's own limit or choices (declared with `arg`), nested configs too."""
    for f in dataclasses.fields(config):
        value, flag, choices, limit = (getattr(config, f.name), "--" + (prefix + f.name).replace("_", "-"),
                                       f.metadata.get("choices"), f.metadata.get("limit"))
        if dataclasses.is_dataclass(value):
            check_config(value, prefix + f.name + "_")
        elif value is not None and choices and value not in choices:
            raise UserError(f"{flag} '{value}' is not allowed; use {' or '.join(map(repr, choices))}")
        elif value is not None and limit and not LIMITS[limit][0](value):
            raise UserError(f"{flag} {value} is not allowed; {LIMITS[limit][1]}")


def validate(args, epsilons: list[float] | None = None):
    """A run's settings, all in one place: each field's limit (`check_config`), then the rules between
    fields, for the run's epsilon or each of a sweep's `epsilons`."""
    check_config(args)
    device, columns = args.device or "cpu", ("text",) if isinstance(args, SentimentArgs) else \
        ("prompt", "label", "chosen", "rejected")
    rules = [  # (the refusal, when it applies)
        (f"--base-n-embd {args.base.n_embd} is not allowed with --base-n-head {args.base.n_head}: the width must be "
         "a multiple of the heads", args.base.n_embd % args.base.n_head),
        (f"--device {device} is not allowed; use cpu, cuda or cuda:<index>",
         not re.fullmatch(r"cpu|cuda(:\d+)?", device)),
        (f"--device {device} is not available here; use --device cpu", device.startswith("cuda") and
         not torch.cuda.is_available()),
        (f"--user-column {getattr(args, 'user_column', None)} is not allowed: it is a data column, not a user id "
         "(the unit is then the text itself: leave --user-column out)",
         getattr(args, "user_column", None) in (*columns, "completion", "meta", "_unit")),
        (f"--prompt-min {getattr(args, 'prompt_min', 0)} is not allowed above --prompt-max "
         f"{getattr(args, 'prompt_max', 0)}", getattr(args, "prompt_min", 0) > getattr(args, "prompt_max", 0)),
    ]
    if isinstance(args, AuditArgs):
        ks = _parse_list("guesses", args.guesses, int, "numbers of guesses like 50,100,200")
        rules.append((f"--guesses {args.guesses} is not allowed with --canaries {args.canaries}: each k must be in "
                      "[1, canaries]", not all(0 < k <= args.canaries for k in ks)))
        rules.append(("--sft-steps 0 is not allowed in audit: there would be no update to audit", args.sft.steps == 0))
    for message, applies in rules:
        if applies:
            raise UserError(message)
    for e, name in itertools.product(epsilons or [args.epsilon], [s for s in ("sft", "rm", "ppo") if hasattr(args, s)]):
        stage = getattr(args, name)
        eps, flag = (e, "--epsilon") if stage.epsilon is None else (stage.epsilon, f"--{name}-epsilon")
        if math.isfinite(eps) and not math.isfinite(stage.max_grad_norm):
            raise UserError(f"--{name}-max-grad-norm {stage.max_grad_norm} is not allowed with epsilon {eps:g}: the "
                            "noise is sigma * C, so C must be finite (or use --epsilon inf)")
        try:
            stage.validate(eps) if name == "ppo" else None
        except ValueError as err:
            raise flag_words(err, "ppo_", epsilon=flag) from None


def refuse_ignored_flags(args, given: set, command: str, epsilons: list[float] | None):
    """A flag that would have no effect here is refused, in one line saying why: whoever gave it must
    not believe it was used. `given`: the flags on the command line; `epsilons`: a sweep's."""
    builtin = getattr(args, "dataset", "builtin") == "builtin"
    stages = [s for s in ("sft", "rm", "ppo") if hasattr(args, s)]
    finite = {s: any(math.isfinite(e) for e in ([getattr(args, s).epsilon] if getattr(args, s).epsilon is not None
                                                else epsilons or [args.epsilon])) for s in stages}
    uses_base = "builtin" in (args.model, getattr(args, "dataset", "builtin"), getattr(args, "reward_base", None))
    rules = [  # (flag, it has no effect when, why)
        ("comparisons", builtin, "the built-in task generates its comparisons; give a real --dataset too"),
        ("user_column", builtin, "the built-in data has no users"),
        ("test_fraction", builtin, "the built-in task's test set is public and generated (--num-test)"),
        *[(f, not builtin, "real data is split by fractions of a keyed hash, not by counts")
          for f in ("num_sft", "num_ppo", "num_comparisons", "num_comparisons_test")],
        ("num_test", not builtin and _is_local(getattr(args, "dataset", "")),
         "a local file has no public test split: its test set is the --test-fraction held out"),
        ("reward_label", getattr(args, "reward_model", "") is None, "it picks a label of --reward-model, not given"),
        ("delta", not any(finite.values()), "no noise is calibrated when every stage runs at epsilon inf"),
        ("composition", not any(finite.values()), "at epsilon inf every composition gives inf"),
        *[(f"{s}_max_grad_norm", not finite[s], "the epsilon = inf loop does not clip") for s in stages],
        *[(f"{s}_epochs", f"{s}_steps" in given, f"--{s}-steps sets the number of steps") for s in ("sft", "rm")],
        ("batch_size", all(f"{s}_batch_size" in given for s in stages), "every stage's batch size is given"),
        ("epsilon", epsilons is not None, "--sweep sets each run's epsilon"),
        ("seed", "seeds" in given, "--seeds sets each run's seed"),
        ("plot", not {"sweep", "seeds"} & given, "it draws a sweep's table; add --sweep or --seeds"),
        ("dry_run", bool({"sweep", "seeds"} & given), "a dry run plans one run; drop --sweep and --seeds"),
        ("checkpoint_every", command == "audit" or getattr(args, "dry_run", False), "this run is not checkpointed"),
        ("sft_batch_size", command == "audit", "--sample-rate sets the audited stage's batch"),
        ("sft_epsilon", command == "audit", "--epsilon is the audited stage's target"),
        ("noise_scale", not any(finite.values()), "at epsilon inf there is no noise to scale"),
        *[(f"base_{f.name}", not uses_base, "the built-in base model is not used by this run")
          for f in dataclasses.fields(BaseModelArgs)],
    ]
    for name, ignored, why in rules:
        if name in given and ignored:
            raise UserError(f"--{name.replace('_', '-')} is not allowed here: {why}")


def _parse_list(name: str, text: str, kind, example: str) -> list:
    try:
        return [kind(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--{name} '{text}' is not allowed; give {example}") from None


def _nested(f: dataclasses.Field):
    """The default instance of a nested config field (e.g. `sft: SFTArgs`), else None."""
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
    return value if dataclasses.is_dataclass(value) else None


def _add_dataclass_args(parser, config, prefix: str = ""):
    """One --flag per config field (nested configs get a prefix: --sft-lr, --ppo-steps)."""
    for f in dataclasses.fields(config):
        if _nested(f) is not None:
            _add_dataclass_args(parser, _nested(f), prefix + f.name + "_")
        elif f.metadata.get("cli") is not False:
            kind, default, choices = str(f.type), getattr(config, f.name), f.metadata.get("choices")
            how = {"action": "store_true"} if "bool" in kind else {
                "type": float if "float" in kind else int if "int" in kind else str,
                "metavar": "{" + ",".join(choices) + "}" if choices else None}
            parser.add_argument("--" + (prefix + f.name).replace("_", "-"), dest=prefix + f.name, default=None,
                                required=f.metadata.get("required", False), **how,
                                help=(f.metadata["help"] + ("" if default is None else f" (default: {default})"))
                                .replace("%", "%%"))


def _build_dataclass(config, ns, prefix: str = ""):
    """`config` (a default instance) with the fields the command line set."""
    return dataclasses.replace(config, **{
        f.name: _build_dataclass(getattr(config, f.name), ns, prefix + f.name + "_") if _nested(f) is not None
        else getattr(ns, prefix + f.name) for f in dataclasses.fields(config)
        if _nested(f) is not None or getattr(ns, prefix + f.name, None) is not None})


def config_of(args) -> dict:
    """The run's settings as JSON stores them (inf survives as Infinity); not how a run is kept."""
    return {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(args))).items()
            if k not in ("overwrite", "resume", "checkpoint_every", "dry_run", "given")}


def args_from_config(cls, config: dict):
    """The dataclass `cls` (nested ones too) from `config_of`'s dict: a checkpoint's settings."""
    return cls(**{f.name: args_from_config(type(_nested(f)), config[f.name]) if _nested(f) is not None
                  else config[f.name] for f in dataclasses.fields(cls) if f.name in config})


def resume_args(cls, task: str, work: str):
    """The settings of the interrupted run in `work` (its checkpoint's), to continue it."""
    path = os.path.join(work := work.rstrip("/"), "checkpoint", "meta.json")
    if not os.path.exists(path):
        raise UserError(f"--resume {work} has no checkpoint ({path}); give the <out>.partial directory an "
                        "interrupted run named")
    with open(path) as f:
        config = {"accountant": "rdp", **json.load(f)["config"]}  # a checkpoint that names none had the moments one
    if config.get("task") != task:
        raise UserError(f"--resume {work} is a '{config.get('task')}' run; resume it with that command")
    return dataclasses.replace(args_from_config(cls, config), resume=work)


SMOKE_PRESET = {  # every stage for a step or three on a tiny base model: does it run? (about 40 s, tiny model built)
    "num_sft": 200, "num_ppo": 200, "num_test": 16, "num_comparisons": 120, "num_comparisons_test": 40,
    "sft_steps": 3, "sft_batch_size": 20, "rm_steps": 2, "rm_batch_size": 16, "ppo_steps": 2,
    "ppo_batch_size": 16, "ppo_response_min": 8, "ppo_response_max": 8,
    "base_n_layer": 2, "base_n_embd": 64, "base_n_head": 2, "base_vocab_size": 400, "base_corpus_size": 600,
    "base_steps": 150, "base_batch_size": 16, "base_seq_len": 64, "base_copy_steps": 0, "base_copy_rows": 0,
}
PAPER_PRESET = {  # App. B, GPT-2 small on a GPU
    "sft_batch_size": 512, "sft_epochs": 40, "sft_lr": 3e-4,
    "ppo_batch_size": 4096, "ppo_minibatches": 16, "ppo_steps": 100, "ppo_lr": 3e-3, "ppo_lr_schedule": "constant",
    "rm_batch_size": 4096, "rm_epochs": 50, "rm_lr": 2e-4, "rm_head": "last", "rm_lora_rank": 4,
}


def cmd_privacy(args: PrivacyArgs):
    """Both accountants side by side: epsilon for (sigma, q, steps, delta), or the sigma for a target epsilon."""
    if args.epsilon is None and args.noise_multiplier is None:
        raise UserError("give --noise-multiplier (to get epsilon) or --epsilon (to get sigma)")
    lines, errors = [], []
    for name, cls in ACCOUNTANTS.items():
        try:
            if args.epsilon is not None:
                sigma = get_noise_multiplier(target_epsilon=args.epsilon, target_delta=args.delta, accountant=cls,
                                             sample_rate=args.sample_rate, steps=args.steps)
                lines.append(f"{name}: noise_multiplier={sigma:.4f} for epsilon<={args.epsilon:g}")
            else:
                acc = cls()
                acc.step(noise_multiplier=args.noise_multiplier, sample_rate=args.sample_rate, num_steps=args.steps)
                lines.append(f"{name}: epsilon={acc.get_epsilon(args.delta):.4f}")
        except ValueError as e:
            errors.append(flag_words(e))
            lines.append(f"{name}: {errors[-1]}")
    if len(errors) == len(ACCOUNTANTS):
        raise errors[0]
    given = f"sigma={args.noise_multiplier:g}, " if args.epsilon is None else ""
    print(f"{given}q={args.sample_rate:g}, steps={args.steps}, delta={args.delta:g}\n  " + "\n  ".join(lines))


def cmd_run(command: str, ns):
    """sentiment, rlhf, audit: one run, a sweep over epsilons and seeds, or --resume."""
    cls = {"sentiment": SentimentArgs, "rlhf": RLHFArgs, "audit": AuditArgs}[command]
    run = (lambda a: run_pipeline(a, TASKS[command])) if command != "audit" else run_audit
    given = {k for k, v in vars(ns).items() if v is not None and v is not False and k != "command"}
    if ns.resume:
        if others := sorted(given - {"resume", "checkpoint_every"}):
            raise UserError(f"--{others[0].replace('_', '-')} is not allowed with --resume: the run continues with "
                            "the settings it was started with")
        return run(resume_args(cls, command, ns.resume))
    for k, v in {"paper": PAPER_PRESET, "smoke": SMOKE_PRESET}.get(getattr(ns, "preset", None), {}).items():
        if hasattr(ns, k) and getattr(ns, k) is None:  # flags you give win
            setattr(ns, k, v)
    for k in ("sft_batch_size", "rm_batch_size", "ppo_batch_size"):
        if getattr(ns, "batch_size", None) is not None and hasattr(ns, k) and getattr(ns, k) is None:
            setattr(ns, k, ns.batch_size)
    args = dataclasses.replace(_build_dataclass(cls(), ns), given=tuple(sorted(given)))
    epsilons = _parse_list("sweep", ns.sweep, float, "epsilons like 1,2,4,8,inf") if ns.sweep else None
    seeds = _parse_list("seeds", ns.seeds, int, "seeds like 0,1,2") if ns.seeds else [args.seed]
    for name, values, ok in (("sweep", epsilons or [], lambda v: v > 0), ("seeds", seeds, lambda v: v >= 0)):
        if len(set(values)) < len(values) or not all(map(ok, values)):
            raise UserError(f"--{name} {getattr(ns, name)} is not allowed: each value once (a run twice would count "
                            f"twice in the confidence interval), and {'> 0 or inf' if name == 'sweep' else '>= 0'}")
    validate(args, epsilons)
    refuse_ignored_flags(args, given, command, epsilons)
    if ns.sweep is None and ns.seeds is None:
        return run(args)
    return run_sweep(args, run, command, epsilons or [args.epsilon], seeds, plot=getattr(ns, "plot", False))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_dataclass_args(sub.add_parser("privacy", help=PrivacyArgs.__doc__.split(": ", 1)[1]), PrivacyArgs())
    for name, cls in (("sentiment", SentimentArgs), ("rlhf", RLHFArgs), ("audit", AuditArgs)):
        _add_dataclass_args(p := sub.add_parser(name, help=cls.__doc__.split(": ", 1)[1]), cls())
        if name != "audit":
            p.add_argument("--batch-size", type=int, help="expected batch size of every stage (a stage's own wins)")
            p.add_argument("--preset", choices=["paper", "smoke"], help="'paper': App. B hyper-parameters for "
                           "GPT-2 on a GPU; 'smoke': tiny everything, a 40-second check that it runs (given flags win)")
            p.add_argument("--plot", action="store_true", help="with --sweep: also draw plot.png (needs matplotlib)")
        p.add_argument("--sweep", help="comma-separated epsilons (e.g. 1,2,4,8,inf): a run per epsilon (and seed) "
                       "and a table like the paper's; --out is the sweep's directory")
        p.add_argument("--seeds", help="comma-separated seeds (e.g. 0,1,2): the sweep per seed; cells are means "
                       "with 95 %% confidence intervals")
    ns = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        if ns.command != "privacy":
            return cmd_run(ns.command, ns)
        check_config(args := _build_dataclass(PrivacyArgs(), ns))
        return cmd_privacy(args)
    except UserError as e:  # only these: any other exception is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # (inside a run, `run_directory` has already said so and kept what it could)
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*(loss_type|attention_mask|pad_token_id).*")
    main()
