"""Tests for dp_rlhf.py. Each privacy property is checked against something independent of the
code under test: published values, brute force, a per-example loop, hand computation."""

import argparse
import ast
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import random
import re
import resource
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

import dp_rlhf as d

HERE = os.path.dirname(os.path.abspath(__file__))
ORDERS = d.DEFAULT_ORDERS
TINY_BASE = ["--base-n-layer", "2", "--base-n-embd", "64", "--base-n-head", "2", "--base-vocab-size", "400",
             "--base-corpus-size", "600", "--base-steps", "150", "--base-batch-size", "16", "--base-seq-len", "64"]
TINY_BASE_ARGS = d.BaseModelArgs(n_layer=2, n_embd=64, n_head=2, vocab_size=400, corpus_size=600, steps=150,
                                 batch_size=16, seq_len=64, copy_steps=0, copy_rows=0)  # language only: fast


# ------------------------------------------------------------------------------------ docs
def test_docs_name_only_what_the_code_has():
    """Every identifier in backticks in README.md and NOTES.md (`name`, `name()`, `a.b`) occurs in dp_rlhf.py or
    test_dp_rlhf.py (a JSON field counts where the code writes it as a string), and every flag of a span that starts
    with one (`--flag`, `--flag VALUE`) is a flag `--help` lists or the code spells out (this file's own, such as
    --handout). Commands (`python ...`), paths, numbers and formulas are not checked; fenced blocks neither."""
    import contextlib
    import io
    code = "".join(open(os.path.join(HERE, f), encoding="utf-8").read() for f in ("dp_rlhf.py", "test_dp_rlhf.py"))
    words, spelled = set(re.findall(r"\w+", code)), set(re.findall(r"--[a-z][a-z0-9-]*", code))

    def usage(*argv) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            d.main([*argv, "--help"])
        return out.getvalue()
    commands = re.search(r"\{([a-z,]+)\}", usage()).group(1).split(",")
    flags = spelled | set(re.findall(r"--[a-z][a-z0-9-]*", "".join(usage(c) for c in commands)))
    files = ("json", "jsonl", "md", "py", "csv", "png", "txt", "toml", "ini", "parquet", "safetensors")
    missing = []
    for doc in ("README.md", "NOTES.md"):
        text = re.sub(r"^```.*?^```", "", open(os.path.join(HERE, doc), encoding="utf-8").read(), flags=re.S | re.M)
        for span in (s.strip() for s in re.findall(r"`([^`]+)`", text)):
            if span.startswith("--"):  # a flag, maybe with values: each --word must be one the code knows
                missing += [(doc, f) for f in span.split() if re.fullmatch(r"--[a-z][a-z0-9-]*", f) and f not in flags]
            elif re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(\(\))?", span):
                parts = span.removesuffix("()").split(".")
                if not (len(parts) > 1 and parts[-1] in files) and not all(p in words for p in parts):
                    missing.append((doc, span))
    assert not missing, f"names in backticks that neither dp_rlhf.py nor test_dp_rlhf.py has: {missing}"


# ------------------------------------------------------------------------------------ exercises
# README, "Exercises": each exercise blanks functions of dp_rlhf (7 breaks one instead) and names the tests that
# grade it. `python test_dp_rlhf.py --handout N --out DIR` writes a student's folder (bottom of this file);
# `--check-exercises` runs every grader as is (it must pass), blanked and with each named wrong body (both must
# fail). DP_RLHF_MUTATE=<blank names or a WRONG key> applies one of them to a plain pytest run.
@dataclasses.dataclass(frozen=True)
class Exercise:
    number: str
    title: str
    blank: tuple    # the functions of dp_rlhf.py the handout blanks (empty: the student breaks working code)
    grader: str     # pytest -k selection
    wrong: tuple    # keys of WRONG: plausible wrong answers the grader must fail
    student: str    # a student's time, roughly
    text: str       # what the handout's EXERCISE.md asks


EXERCISES = [
    Exercise("1", "DP-SGD's noisy gradient (Algorithm 2)", ("privatize",),
             "privatize_without or clipped_norms or noise_std or empty_batch_gives or nonfinite_per_sample",
             ("privatize:per-parameter-clip", "privatize:realised-batch", "privatize:noise-without-c",
              "privatize:nan-to-zero", "privatize:normalise"), "20-30 min",
             "Clip each sample's gradient to flat norm C (all parameters together), sum, add N(0, sigma^2 C^2) once "
             "and divide by the *expected* batch size qN (Wu et al. 2024, Algorithm 2; Abadi et al. 2016). One "
             "step's sum then moves by at most C when one sample is added or removed: the sensitivity the "
             "accountant's sigma is calibrated to."),
    Exercise("2", "the integer-order RDP of the subsampled Gaussian", ("_log_a_int",),
             "golden_values or rdp_known_values",
             ("_log_a_int:no-binomial", "_log_a_int:q-swapped", "_log_a_int:last-term-dropped",
              "_log_a_int:linear-space"), "15-20 min",
             "Write log A_a at integer orders (Mironov, Talwar, Zhang 2019, Sec. 3.3) in log space; compute_rdp "
             "and the moments accountant build on it. The grader checks epsilon against the values Opacus and "
             "TF-Privacy publish, and the RDP at orders where A_a overflows a float64."),
    Exercise("3a", "Eq. 2: the per-token rewards of a trajectory", ("kl_rewards",), "kl_rewards_eq2",
             ("kl_rewards:unmasked", "kl_rewards:score-on-the-last-column", "kl_rewards:length-as-index",
              "kl_rewards:plus-kl", "kl_rewards:kl-mean"), "about 15 min",
             "Spread Eq. 2 over a trajectory's tokens: a KL penalty -beta (log pi - log pi_sft) on every response "
             "token and the score r(x, y) on its last one. Rows are left-padded prompts and right-padded "
             "responses of different lengths, so where the response ends is per row."),
    Exercise("3b", "GAE along a trajectory", ("gae",), "gae_on_hand",
             ("gae:off-by-one", "gae:bootstraps-from-padding", "gae:no-lambda", "gae:monte-carlo-returns",
              "gae:unmasked"), "20-30 min",
             "Generalised advantage estimation (Schulman et al. 2016) along each row's response tokens only: "
             "nothing follows the last token, and padding is no state."),
    Exercise("3c", "the clipped PPO loss of one trajectory", ("ppo_loss",), "ppo_loss_on_hand or ppo_loss_under_vmap",
             ("ppo_loss:no-value-clip", "ppo_loss:min-for-max", "ppo_loss:unmasked-mean", "ppo_loss:item",
              "ppo_loss:values-shifted"), "30-45 min",
             "PPO's clipped surrogate plus the clipped value loss of ONE trajectory (Schulman et al. 2017), as the "
             "closure DP-SGD differentiates per sample under torch.func.vmap: one trajectory's gradient sees no "
             "other, so it can be clipped alone."),
    Exercise("4", "the Bradley-Terry reward loss (Eq. 1)", ("reward_loss",),
             "reward_loss_by_hand or reward_loss_under_vmap",
             ("reward_loss:wrong-order", "reward_loss:log-of-sigmoid", "reward_loss:python-if",
              "reward_loss:ties-count"), "10-15 min",
             "Eq. 1 for one comparison (chosen, rejected): one comparison is one per-sample gradient, clipped as "
             "one, under torch.func.vmap."),
    Exercise("5", "sampling a token", ("sample_categorical",), "categorical",
             ("sample_categorical:left-searchsorted", "sample_categorical:multinomial",
              "sample_categorical:unscaled-u"), "10-15 min",
             "Draw a token from the policy's distribution by inverting its CDF at one given uniform per row (the "
             "sampler draws every step's uniforms at once, so a batch sampled in chunks draws what it draws whole)."),
    Exercise("6", "DPPPO's loop (Algorithm 3)", ("dpppo",),
             "dpppo_keeps or raises_the_reward or lr_schedule_anneals",
             ("dpppo:no-accountant-step", "dpppo:fixed-batch", "dpppo:skips-empty-batches", "dpppo:constant-lr"),
             "60-90 min",
             "Algorithm 3: Poisson-sample prompts, roll out, score, spread Eq. 2, GAE, one noisy update, one "
             "accountant step, every iteration, the empty ones too. The helpers (rollout, reference_logprobs, "
             "kl_rewards, gae, ppo_update, PromptBaseline) are there; the docstring is the loop's contract. The "
             "grader builds a tiny model once (about a minute; set DP_RLHF_TEST_CACHE to a directory to keep it)."),
    Exercise("7", "break DP: divide by the realised batch", (), "clipped_norms", ("privatize:realised-batch",),
             "20-40 min",
             "Break privacy on purpose. In privatize, divide by the realised batch size instead of the expected "
             "one (Opacus #571) and run the grader: test_clipped_norms_at_most_c_and_divisor_is_expected_batch "
             "catches it. Say what leaks. Then, in dpppo, whiten the advantages over the whole batch, or adapt "
             "beta from the batch's KL, and write the test that catches it: one trajectory's clipped gradient "
             "must not change when another trajectory of the batch does."),
    Exercise("8", "the PLD accountant: connect the dots, read epsilon", ("_connect_dots", "_epsilon"),
             "pld_by_hand or pld_named_settings or pld_gaussian_closed_form or pld_opacus",
             ("_connect_dots:no-chord", "_connect_dots:slopes-in-eps", "_connect_dots:no-flat-top",
              "_epsilon:grid-only", "_epsilon:ignores-infinity", "_epsilon:negative"), "60-90 min",
             "The privacy-loss-distribution accountant's two pieces: one step's PLD discretised pessimistically "
             "(\"connect the dots\", Doroshenko et al. 2022), and epsilon read from delta by the hockey-stick "
             "divergence, exactly between grid points. It must land between Google's dp-accounting's optimistic "
             "and pessimistic epsilon (the grader installs it: pip install dp-accounting)."),
]
SWEEP = "9"  # the privacy-utility curve: a command (README), no handout

WRONG = {  # name: (function, (reference text, wrong text), ...): a plausible wrong answer, one edit away (teacher-only)
    "privatize:per-parameter-clip": ("privatize", (  # each tensor clipped to C alone: up to C sqrt(#tensors)
        "clip.to(g.dtype), g)", "(max_grad_norm / (_flat(g).norm(dim=1) + 1e-6)).clamp(max=1.0), g)")),
    "privatize:realised-batch": ("privatize", (  # the Opacus #571 mistake: the divisor leaks the batch size
        "summed / expected_batch_size", "summed / max(1, g.shape[0])")),
    "privatize:noise-without-c": ("privatize", ("(noise_multiplier * max_grad_norm)", "noise_multiplier")),
    "privatize:nan-to-zero": ("privatize", (  # coordinate by coordinate: the sample's finite part still counts
        "torch.where(ok.view(-1, *[1] * (g.dim() - 1)), g, 0.0)", "torch.nan_to_num(g, nan=0.0, posinf=0.0, "
        "neginf=0.0)")),
    "privatize:normalise": ("privatize", (".clamp(max=1.0) if", " if")),  # every gradient scaled to norm C
    "_log_a_int:no-binomial": ("_log_a_int", ("_log_binom(a, i) + ", "")),
    "_log_a_int:q-swapped": ("_log_a_int", ("i * math.log(q) + (a - i) * math.log1p(-q)",
                                            "i * math.log1p(-q) + (a - i) * math.log(q)")),
    "_log_a_int:last-term-dropped": ("_log_a_int", ("torch.arange(order + 1,", "torch.arange(order,")),
    "_log_a_int:linear-space": ("_log_a_int", ("torch.logsumexp(terms, 0).item()", "math.log(terms.exp().sum())")),
    "kl_rewards:unmasked": ("kl_rewards", ("(logprobs - ref_logprobs) * action_mask", "logprobs - ref_logprobs")),
    "kl_rewards:score-on-the-last-column": ("kl_rewards", (
        "(torch.arange(action_mask.shape[1], device=action_mask.device) * action_mask).argmax(-1)",
        "torch.full((len(scores),), action_mask.shape[1] - 1)")),
    "kl_rewards:length-as-index": ("kl_rewards", (  # as if every response started at column 0
        "(torch.arange(action_mask.shape[1], device=action_mask.device) * action_mask).argmax(-1)",
        "action_mask.sum(-1).long() - 1")),
    "kl_rewards:plus-kl": ("kl_rewards", ("rewards = -kl_coef * kl", "rewards = kl_coef * kl")),
    "kl_rewards:kl-mean": ("kl_rewards", ("kl.sum(-1)", "kl.sum(-1) / action_mask.sum(-1).clamp(min=1)")),
    "gae:off-by-one": ("gae", ("reversed(range(rewards.shape[1]))", "reversed(range(rewards.shape[1] - 1))")),
    "gae:bootstraps-from-padding": ("gae", (  # V after the last token read from the next column, not 0
        "torch.where(m > 0, values[:, t], next_value)", "values[:, t]")),
    "gae:no-lambda": ("gae", ("gamma * lam * next_adv", "gamma * next_adv")),
    "gae:monte-carlo-returns": ("gae", ("    return adv, (adv + values) * action_mask", (
        "    ret, g = torch.zeros_like(rewards), torch.zeros_like(next_adv)\n"
        "    for t in reversed(range(rewards.shape[1])):\n"
        "        g = torch.where(action_mask[:, t] > 0, rewards[:, t] + gamma * g, g)\n"
        "        ret[:, t] = g * action_mask[:, t]\n"
        "    return adv, ret"))),
    "gae:unmasked": ("gae", ("m = action_mask[:, t]", "m = torch.ones_like(action_mask[:, t])")),
    "ppo_loss:no-value-clip": ("ppo_loss", (
        "0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)", "0.5 * (values - returns) ** 2")),
    "ppo_loss:min-for-max": ("ppo_loss", ("pg = torch.maximum(", "pg = torch.minimum(")),
    "ppo_loss:unmasked-mean": ("ppo_loss", (
        "masked_mean(pg, action_mask), masked_mean(vf, action_mask)", "pg.mean(), vf.mean()")),
    "ppo_loss:item": ("ppo_loss", (  # right on one trajectory, a crash under vmap
        "loss_pg, loss_vf = masked_mean(pg, action_mask), masked_mean(vf, action_mask)",
        "n = max(action_mask.sum().item(), 1.0)\n"
        "        loss_pg, loss_vf = (pg * action_mask).sum() / n, (vf * action_mask).sum() / n")),
    "ppo_loss:values-shifted": ("ppo_loss", ("[0], values[0, :-1]", "[0], values[0, 1:]")),
    "reward_loss:wrong-order": ("reward_loss", ("logsigmoid(r[0] - r[1])", "logsigmoid(r[1] - r[0])")),
    "reward_loss:log-of-sigmoid": ("reward_loss", (
        "-nn.functional.logsigmoid(r[0] - r[1])", "-torch.log(torch.sigmoid(r[0] - r[1]))")),
    "reward_loss:python-if": ("reward_loss", (  # right on one comparison, a crash under vmap
        "(r[0] > r[1]).float().detach()", "torch.tensor(1.0 if r[0] > r[1] else 0.0)")),
    "reward_loss:ties-count": ("reward_loss", ("(r[0] > r[1])", "(r[0] >= r[1])")),
    "sample_categorical:left-searchsorted": ("sample_categorical", ("right=True", "right=False")),
    "sample_categorical:multinomial": ("sample_categorical", (  # the right law, but not the given u
        "u = torch.rand(probs.shape[0], generator=generator) if u is None else u",
        "return torch.multinomial(probs, 1, generator=generator).squeeze(1)")),
    "sample_categorical:unscaled-u": ("sample_categorical", ("[:, None] * cdf[:, -1:]", "[:, None]")),
    "dpppo:no-accountant-step": ("dpppo", ("state.account(plan)  #", "state.step += 1  #")),
    "dpppo:fixed-batch": ("dpppo", (  # the accountant's q assumes Poisson sampling
        "poisson_sample(len(units), plan.sample_rate, generator)",
        "torch.randperm(len(units), generator=generator)[:round(plan.expected_batch_size)]")),
    "dpppo:skips-empty-batches": ("dpppo", (
        "idx = rows[valid]  # one prompt a unit (m = 1), or up to m",
        "idx = rows[valid]\n        if len(idx) == 0:\n            continue")),
    "dpppo:constant-lr": ("dpppo", ("args.lr * (1 - it / plan.steps) if args.lr_schedule == \"linear\" else args.lr",
                                    "args.lr")),
    "_connect_dots:no-chord": ("_connect_dots", ("delta[:1] - 1", "delta.new_zeros(1)")),  # the mass below: lost
    "_connect_dots:slopes-in-eps": ("_connect_dots", ("delta.diff() / math.expm1(h)", "delta.diff() / h"),
                                    ("math.exp(h) * k", "k")),
    "_connect_dots:no-flat-top": ("_connect_dots", ("torch.cat([k, delta.new_zeros(1)])", "torch.cat([k, k[-1:]])")),
    "_epsilon:grid-only": ("_epsilon", (  # the first atom where delta is met: up to h too pessimistic
        "max(0.0, math.log(a[i].item() - delta) - log_b[i].item())", "loss[i].item()")),
    "_epsilon:ignores-infinity": ("_epsilon", ("p.new_zeros(1)]) + inf", "p.new_zeros(1)])")),
    "_epsilon:negative": ("_epsilon", ("max(0.0, math.log(a[i].item() - delta) - log_b[i].item())",
                                       "math.log(a[i].item() - delta) - log_b[i].item()")),
}


def _mutate(spec: str):
    """Blank the functions of dp_rlhf named in `spec` (separated by spaces: they raise NotImplementedError), or
    apply the wrong body WRONG[spec] (its reference text replaced in the function's source). Returns the undo."""
    import __future__
    import inspect
    fn, *edits = WRONG[spec] if spec in WRONG else (None,)
    names = [fn] if fn else spec.split()
    saved = {name: getattr(d, name) for name in names}
    if fn:
        src = inspect.getsource(saved[fn])
        for old, new in edits:
            if src.count(old) != 1:  # the reference changed under the wrong body: it must be rewritten
                raise ValueError(f"{spec}: {old!r} is not exactly once in {fn}'s source")
            src = src.replace(old, new)
        scope: dict = {}
        exec(compile(src, f"<wrong body {spec}>", "exec", flags=__future__.annotations.compiler_flag,
                     dont_inherit=True), vars(d), scope)
        setattr(d, fn, scope[fn])
    else:
        for name in names:
            def blank(*args, _name=name, **kwargs):
                raise NotImplementedError(f"exercise: implement {_name}")
            setattr(d, name, blank)
    return lambda: [setattr(d, name, f) for name, f in saved.items()]


if os.environ.get("DP_RLHF_MUTATE"):
    _mutate(os.environ["DP_RLHF_MUTATE"])


def _close(actual, expected, what: str, **tolerances):
    """assert_close whose failure says first which property broke (the graders' messages)."""
    torch.testing.assert_close(actual, expected, msg=lambda default: f"{what}\n{default}", **tolerances)


@pytest.fixture(scope="session", autouse=True)
def cache(tmp_path_factory):
    path = os.environ.get("DP_RLHF_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))
    os.environ["DP_RLHF_CACHE"] = path
    return path


@pytest.fixture(scope="session")
def tiny():
    """A tiny GPT-2 + tokenizer: the built-in base model at test size."""
    path = d.builtin_base_model(TINY_BASE_ARGS)
    return d.load_lm(path, "cpu")


def lora_parameters(model) -> dict:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def eps_of(q, sigma, steps, delta):
    rdp = d.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
    return d.get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)


# ------------------------------------------------------------------------------------ accountant


@pytest.mark.unit
@pytest.mark.parametrize("q,sigma,steps,delta,eps,order", [
    (0.04, 1.5, 2250, 1e-5, 7.329, None),             # Opacus README / tests
    (150 / 60000, 1.3, 15 * 400, 1e-5, 0.724, 19),     # TF-Privacy MNIST tutorial
    (100 / 100000, 1.0, 30 * 1000, 1e-7, 1.415, 13),   # TF-Privacy compute_dp_sgd_privacy
])
def test_accountant_golden_values(q, sigma, steps, delta, eps, order):
    got, got_order = eps_of(q, sigma, steps, delta)
    assert got == pytest.approx(eps, abs=0.005), f"epsilon {got:.4f}, Opacus / TF-Privacy publish {eps} (q={q}, " \
        f"sigma={sigma}, {steps} steps, delta={delta})"
    if order is not None:
        assert got_order == order, f"the best order is {got_order}, published {order}"


def _brute_force_rdp(q, sigma, alpha):
    """Plain-Python binomial sum of A_alpha (Mironov et al. 2019, Eq. for integer alpha)."""
    a = sum(math.comb(alpha, k) * (1 - q) ** (alpha - k) * q ** k * math.exp((k * k - k) / (2 * sigma ** 2))
            for k in range(alpha + 1))
    return math.log(a) / (alpha - 1)


@pytest.mark.unit
@pytest.mark.parametrize("q,sigma", [(0.01, 1.0), (0.1, 0.8), (0.5, 2.0), (0.003, 0.6)])
def test_integer_orders_match_brute_force(q, sigma):
    for alpha in (2, 3, 5, 8, 12, 20):
        ours = d.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[alpha])[0]
        assert ours == pytest.approx(_brute_force_rdp(q, sigma, alpha), rel=1e-9)


@pytest.mark.unit
@pytest.mark.parametrize("q,sigma,alpha,rdp", [  # log(A_alpha) / (alpha - 1), the binomial sum in 60-digit arithmetic
    (0.01, 1.0, 2, 1.7181342207454794e-4), (0.1, 0.8, 8, 3.61865742244435), (0.5, 2.0, 20, 1.7796588838340486),
    (0.003, 0.6, 12, 10.329419768161739),  # the last term, q^12 e^(132 / 0.72), is most of A
    (0.5, 0.6, 64, 88.184739372129586), (0.01, 1.1, 256, 101.1618942900286)])  # A overflows a float64
def test_rdp_known_values_at_integer_orders(q, sigma, alpha, rdp):
    got = d.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[alpha])[0]
    assert math.isfinite(got), f"RDP at order {alpha} is {got}: A_a overflows a float64 here, but its log does not"
    assert got == pytest.approx(rdp, rel=1e-9), f"RDP at order {alpha}, q = {q}, sigma = {sigma}: {got}, want {rdp}"


def _quadrature_rdp(q, sigma, alpha):
    """A_alpha = E_{z~N(0,s^2)}[((1-q) + q exp((2z-1)/(2 s^2)))^alpha], by a fine Riemann sum."""
    z = np.linspace(-40 * sigma - 20, 40 * sigma + 20, 2_000_001)
    log_mu0 = -z ** 2 / (2 * sigma ** 2) - 0.5 * np.log(2 * np.pi * sigma ** 2)
    log_ratio = np.logaddexp(np.log1p(-q), np.log(q) + (2 * z - 1) / (2 * sigma ** 2))
    terms = log_mu0 + alpha * log_ratio
    m = terms.max()
    return (m + np.log(np.exp(terms - m).sum() * (z[1] - z[0]))) / (alpha - 1)


@pytest.mark.parametrize("q,sigma,alpha", [(0.01, 1.0, 1.5), (0.1, 0.7, 2.5), (0.2, 0.5, 1.3), (0.05, 2.0, 7.5)])
def test_fractional_orders_bound_the_exact_integral(q, sigma, alpha):
    """The conservative series must never be below the true RDP, and should stay close to it
    (summing |terms| costs a few percent at small orders)."""
    ours = d.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[alpha])[0]
    exact = _quadrature_rdp(q, sigma, alpha)
    assert ours >= exact * (1 - 1e-6)
    assert ours <= exact * 1.1


@pytest.mark.unit
def test_rdp_edge_cases():
    orders = np.array([1.5, 2.0, 10.0])
    assert np.all(d.compute_rdp(q=0.0, noise_multiplier=1.0, steps=10, orders=orders) == 0)
    assert np.all(d.compute_rdp(q=0.3, noise_multiplier=1.0, steps=0, orders=orders) == 0)
    assert np.all(np.isinf(d.compute_rdp(q=0.3, noise_multiplier=0.0, steps=1, orders=orders)))
    assert np.allclose(d.compute_rdp(q=1.0, noise_multiplier=2.0, steps=3, orders=orders), 3 * orders / 8)
    for bad in (dict(q=1.5, noise_multiplier=1.0, steps=1), dict(q=0.1, noise_multiplier=-1.0, steps=1),
                dict(q=0.1, noise_multiplier=1.0, steps=-1)):
        with pytest.raises(ValueError):
            d.compute_rdp(orders=orders, **bad)


@pytest.mark.unit
def test_epsilon_monotone():
    base = eps_of(0.01, 1.0, 1000, 1e-5)[0]
    assert eps_of(0.01, 1.0, 2000, 1e-5)[0] > base
    assert eps_of(0.02, 1.0, 1000, 1e-5)[0] > base
    assert eps_of(0.01, 1.2, 1000, 1e-5)[0] < base


@pytest.mark.parametrize("name,cases", [("rdp", 25), ("pld", 10)])
def test_noise_multiplier_never_overshoots(name, cases):
    """sigma's epsilon (each accountant's own, recomputed here) is at most the target and within 0.1 % of it."""
    rng, cls = random.Random(0), d.ACCOUNTANTS[name]
    for _ in range(cases):
        target = rng.choice([0.5, 1, 2, 4, 8, 16])
        q, steps = rng.choice([1e-3, 0.01, 0.05, 0.3, 1.0]), rng.choice([1, 10, 300, 3000])
        delta = rng.choice([1e-5, 1e-6])
        sigma = d.get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps,
                                       accountant=cls)
        acc = cls()
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
        eps = acc.get_epsilon(delta)
        assert eps <= target, (target, q, steps, sigma, eps)
        assert eps >= target * (1 - 1e-3) or sigma < 1e-5, (target, q, steps, sigma, eps)  # and it is tight
    assert d.get_noise_multiplier(target_epsilon=math.inf, target_delta=1e-5, sample_rate=0.1, steps=10) == 0.0


@pytest.mark.unit
def test_moments_accountant_matches_compute_rdp_and_round_trips():
    acc = d.MomentsAccountant()
    for _ in range(100):
        acc.step(noise_multiplier=1.1, sample_rate=0.01)
    acc.step(noise_multiplier=0.8, sample_rate=0.02, num_steps=50)
    for _ in range(10):
        acc.step(noise_multiplier=1.1, sample_rate=0.01)
    assert acc.history == [[1.1, 0.01, 100], [0.8, 0.02, 50], [1.1, 0.01, 10]]  # run-length encoded
    rdp = (d.compute_rdp(q=0.01, noise_multiplier=1.1, steps=110, orders=ORDERS)
           + d.compute_rdp(q=0.02, noise_multiplier=0.8, steps=50, orders=ORDERS))
    assert acc.get_epsilon(1e-5) == pytest.approx(d.get_privacy_spent(orders=ORDERS, rdp=rdp, delta=1e-5)[0], rel=1e-12)
    other = d.MomentsAccountant()
    other.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert other.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    big = d.MomentsAccountant()
    big.step(noise_multiplier=1.0, sample_rate=0.001, num_steps=100_000)
    assert big.get_epsilon(1e-5) == pytest.approx(eps_of(0.001, 1.0, 100_000, 1e-5)[0])



# ------------------------------------------------------------------------------------ PLD accountant
# Against an independent implementation, Google's dp-accounting: every epsilon of ours lies between its
# optimistic estimate and its pessimistic one x (1 + 1e-4), at the same grid step. The break-it tests patch
# one small function at a time and show that the check then fails.
from dp_accounting import dp_event  # noqa: E402 (a test-only dependency: README's test command installs it)
from dp_accounting.pld import pld_privacy_accountant, privacy_loss_distribution  # noqa: E402
from scipy import optimize, stats  # noqa: E402 (dp-accounting's dependency)

logging.getLogger().setLevel(logging.ERROR)  # dp-accounting warns about each optimistic PLD it builds

NAMED = [  # (q, sigma, T, delta): the demos' stages, a large q, and the Opacus README's example
    (0.0064, 0.537, 50, 6.06e-6), (0.0040, 0.514, 126, 1.04e-5), (0.0040, 0.486, 40, 1.04e-5),
    (0.328, 3.325, 100, 8e-5), (0.04, 1.5, 2250, 1e-5)]
OPACUS = NAMED[4]


def _log_uniform(rng, a, b):
    return math.exp(rng.uniform(math.log(a), math.log(b)))


_rng = random.Random(30)
GRID = [(_log_uniform(_rng, 1e-3, 0.5), _log_uniform(_rng, 0.4, 5), round(_log_uniform(_rng, 1, 3000)),
         _log_uniform(_rng, 1e-8, 1e-3)) for _ in range(20)]


def ours(history, delta, h=1e-4):
    acc = d.PLDAccountant(h)
    for sigma, q, n in history:
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
    return acc.get_epsilon(delta)


def dp_pessimistic(history, delta, h=1e-4):
    """dp-accounting's PLDAccountant (pessimistic, connect-the-dots) composing each event n times."""
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=h)
    for sigma, q, n in history:
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), n)
    return acc.get_epsilon(delta)


def dp_optimistic(history, delta, h=1e-4):
    """dp-accounting's optimistic estimate: privacy buckets rounding every loss down."""
    total = None
    for sigma, q, n in history:
        one = privacy_loss_distribution.from_gaussian_mechanism(
            sigma, value_discretization_interval=h, sampling_prob=q, pessimistic_estimate=False,
            use_connect_dots=False).self_compose(n)
        total = one if total is None else total.compose(one)
    return total.get_epsilon_for_delta(delta)


def bounds(history, delta, h=1e-4):
    return dp_optimistic(history, delta, h), dp_pessimistic(history, delta, h)


def within(eps, lo_hi):
    lo, hi = lo_hi
    return lo <= eps <= hi * (1 + 1e-4)


def gaussian_epsilon(sigma, steps, delta):
    """The Gaussian mechanism's exact epsilon (Balle & Wang 2018, Thm. 8); T steps = sigma / sqrt(T)."""
    s = sigma / math.sqrt(steps)

    def excess(eps):
        return stats.norm.cdf(0.5 / s - eps * s) - math.exp(eps + stats.norm.logcdf(-0.5 / s - eps * s)) - delta
    return optimize.brentq(excess, 0, 200, xtol=1e-14, rtol=1e-15)




@pytest.mark.unit
def test_pld_by_hand_connect_the_dots():
    h, f64 = math.log(2), dict(dtype=torch.float64)  # e^h = 2: every number here is a binary fraction
    # atoms 1/2, 1/4, 1/4 at the losses 0, h, 2h: delta(eps_i) = sum over l > eps_i of p_l (1 - e^(eps_i - l)):
    # 1/4 (1 - 1/2) + 1/4 (1 - 1/4) = 0.3125 at 0, 1/4 (1 - 1/2) = 0.125 at h, 0 at 2h
    p = d._connect_dots(torch.tensor([0.3125, 0.125, 0.0], **f64), h)
    assert p.shape == (3,) and p.dtype == torch.float64, "one float64 mass per grid point"
    _close(p[1], torch.tensor(0.25, **f64), "a middle atom is the polyline's kink e^eps_i (s_i - s_(i-1)), slopes "
           "taken in x = e^eps (not in eps)")
    _close(p[0], torch.tensor(0.5, **f64), "the lowest atom takes the mass below the grid: its left slope is the "
           "chord's from (0, 1) to the first point")
    _close(p[2], torch.tensor(0.25, **f64), "past the last point the curve is flat: the top atom's right slope is 0")
    # 1/8 more at +infinity (delta never goes below it): atoms 1/2, 1/4, 1/8; delta 0.34375, 0.1875, 0.125
    _close(d._connect_dots(torch.tensor([0.34375, 0.1875, 0.125], **f64), h), torch.tensor([0.5, 0.25, 0.125], **f64),
           "with mass at +infinity (delta[-1] = 1/8) the atoms are 1/2, 1/4, 1/8")
    p = d._connect_dots(torch.tensor([0.5, 0.45, 0.1, 0.0], **f64), h)  # not convex: its second kink is -0.25
    assert (p >= 0).all(), f"{p.tolist()}: a negative kink (round-off on a convex curve) is 0, not a negative mass"


@pytest.mark.unit
def test_pld_by_hand_epsilon():
    h = math.log(2)  # e^h = 2
    pld = (-1, torch.tensor([0.25, 0.25, 0.25, 0.125], dtype=torch.float64), 0.125)  # losses -h, 0, h, 2h; 1/8 at inf
    # delta(0) = 1/8 + 1/4 (1 - 1/2) + 1/8 (1 - 1/4) = 0.34375; delta(h) = 1/8 + 1/8 (1 - 1/2) = 0.1875; delta(2h) = 1/8
    eps = lambda delta: d._epsilon(pld, h, delta)
    assert eps(0.1) == math.inf, "delta below the mass at +infinity (1/8): no finite eps"
    # on [0, h) the atoms above eps are at h and 2h: delta(eps) = (1/8 + 1/4 + 1/8) - e^eps (1/4 e^-h + 1/8 e^-2h)
    assert eps(0.2) == pytest.approx(math.log(0.3 / 0.15625), rel=1e-12), \
        f"eps(0.2) = {eps(0.2)}: between atoms solve delta(eps) = A - e^eps B exactly, A = 1/8 (at +infinity) + 1/4 " \
        "+ 1/8 and B = 1/4 e^-h + 1/8 e^-2h (not the next grid point, h)"
    assert eps(0.15) == pytest.approx(math.log(0.1 / 0.03125), rel=1e-12), \
        f"eps(0.15) = {eps(0.15)}: on [h, 2h) only the atom at 2h is above eps: A = 1/8 + 1/8, B = 1/8 e^-2h"
    assert eps(0.125) == pytest.approx(2 * h, rel=1e-12), "delta(2h) = 1/8: eps(1/8) = 2h"
    assert eps(0.4) == 0.0 and eps(0.6) == 0.0, "delta(0) = 0.34375 is below delta: eps is 0 (never negative)"


@pytest.mark.parametrize("q, sigma, steps, delta", NAMED)
def test_pld_named_settings_between_dp_accounting_estimates(q, sigma, steps, delta):
    history = [(sigma, q, steps)]
    eps, (lo, hi) = ours(history, delta), bounds(history, delta)
    assert lo <= eps <= hi * (1 + 1e-4), (eps, lo, hi)
    assert ours(history, delta, 1e-3) >= eps  # a coarser grid stays pessimistic: the tests' coarse grids are safe


def test_pld_opacus_example():
    q, sigma, steps, delta = OPACUS
    assert ours([(sigma, q, steps)], delta) == pytest.approx(6.7688, abs=1e-4)


def test_pld_random_grid_between_dp_accounting_estimates():
    h = 1e-3  # coarser than the default, on both sides: the grid's large-epsilon corners stay cheap
    for q, sigma, steps, delta in GRID:
        eps, lo_hi = ours([(sigma, q, steps)], delta, h), bounds([(sigma, q, steps)], delta, h)
        assert within(eps, lo_hi), (q, sigma, steps, delta, eps, lo_hi)


def test_pld_mixed_history_matches_dp_accounting_composing_both_events():
    history = [(0.9, 0.01, 200), (1.3, 0.05, 100), (2.0, 1.0, 3)]
    for delta in (1e-5, 1e-8):
        eps = ours(history, delta)
        assert within(eps, bounds(history, delta)), (delta, eps, bounds(history, delta))
        assert eps == pytest.approx(ours(history[::-1], delta), rel=1e-9)  # composition commutes


@pytest.mark.parametrize("sigma, steps, delta", [(1.0, 1, 1e-5), (0.8, 10, 1e-3), (2.0, 10, 1e-6),
                                                 (5.0, 1000, 1e-8), (20.0, 3000, 1e-5)])
def test_pld_gaussian_closed_form_approached_from_above(sigma, steps, delta):
    exact, eps = gaussian_epsilon(sigma, steps, delta), ours([(sigma, 1.0, steps)], delta)
    assert exact <= eps <= exact + 1e-3, (exact, eps)


def test_pld_never_above_the_moments_accountant():
    for q, sigma, steps, delta in GRID + NAMED:
        rdp = d.MomentsAccountant()
        rdp.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
        assert ours([(sigma, q, steps)], delta, 1e-3) <= rdp.get_epsilon(delta), (q, sigma, steps, delta)


def dp_accounting_sigma(target, q, steps, delta, guess, h=1e-3):
    """Bisection on dp-accounting's pessimistic PLD for the sigma that reaches `target` (to 1e-3 in sigma)."""
    lo, hi = 0.9 * guess, 1.1 * guess
    assert dp_pessimistic([(lo, q, steps)], delta, h) > target >= dp_pessimistic([(hi, q, steps)], delta, h)
    while hi / lo > 1 + 1e-3:
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if dp_pessimistic([(mid, q, steps)], delta, h) <= target else (mid, hi)
    return hi


@pytest.mark.parametrize("q, _sigma, steps, delta", NAMED[:4])
def test_pld_calibration_never_overshoots_and_matches_dp_accounting(q, _sigma, steps, delta):
    for target in (1, 2, 4, 8):
        sigma = d.get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps)
        eps = ours([(sigma, q, steps)], delta)  # what the ledger will compute: a fresh default accountant
        assert target * (1 - 1e-3) <= eps <= target, (target, sigma, eps)
        assert sigma == pytest.approx(dp_accounting_sigma(target, q, steps, delta, sigma), rel=0.01)


def test_calibration_is_a_drop_in_for_the_moments_accountant():
    kw = dict(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.01, steps=500)
    rdp_sigma = d.get_noise_multiplier(accountant=d.MomentsAccountant, **kw)
    rdp = d.MomentsAccountant()
    rdp.step(noise_multiplier=rdp_sigma, sample_rate=0.01, num_steps=500)
    assert 2.0 * (1 - 1e-3) <= rdp.get_epsilon(1e-5) <= 2.0
    assert d.get_noise_multiplier(accountant=d.PLDAccountant, **kw) < rdp_sigma  # the bracket went below it
    assert d.get_noise_multiplier(target_epsilon=math.inf, target_delta=1e-5, sample_rate=0.1, steps=10) == 0.0


def test_pld_edge_cases():
    assert ours([(0.0, 0.01, 10)], 1e-5) == math.inf  # no noise
    assert ours([(1.0, 0.0, 10)], 1e-5) == 0.0  # never sampled
    assert ours([], 1e-5) == 0.0
    assert ours([(0.05, 0.5, 1)], 1e-5) == math.inf  # half the mass leaks beyond PLD_MAX_LOSS: infinite
    assert d.PLDAccountant.epsilon_floor(1e-5) == 0.0
    assert 0 <= ours([(1e4, 1e-5, 10)], 1e-5) < 1e-3 and 0 <= ours([(1e5, 1e-3, 10)], 1e-5) < 1e-3  # huge sigma: no NaN
    # q T < delta: epsilon 0 at every sigma; calibration returns at once instead of halving sigma for ever
    assert d.get_noise_multiplier(target_epsilon=1.0, target_delta=1e-3, sample_rate=1e-5, steps=10) > 0
    for delta in (1e-11, 0.0, 1.0):
        with pytest.raises(ValueError):
            ours([(1.0, 0.01, 10)], delta)


def test_pld_state_dict_round_trip_restores_the_grid():
    acc = d.PLDAccountant(2e-4, tail_mass=1e-18)
    for sigma, q, n in [(0.9, 0.01, 200), (1.3, 0.05, 100)]:
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
    restored = d.PLDAccountant()
    restored.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert (restored.h, restored.tail, restored.history) == (2e-4, 1e-18, acc.history)
    assert restored.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    assert ours(acc.history, 1e-5) != acc.get_epsilon(1e-5)  # the default grid differs: it must travel


def test_pld_cache_and_incremental_composition(monkeypatch):
    calls = []
    compose = d._self_compose
    monkeypatch.setattr(d, "_self_compose", lambda p, n, *a: calls.append(n) or compose(p, n, *a))
    acc = d.PLDAccountant(1e-3)
    acc.step(noise_multiplier=1.0, sample_rate=0.02, num_steps=300)
    acc.get_epsilon(1e-5), acc.get_epsilon(1e-6)
    assert calls == [300, 300]  # remove and add, once; the second delta reuses them
    for n in (1, 2):  # a training loop: one step, then its epsilon
        acc.step(noise_multiplier=0.8, sample_rate=0.01, num_steps=1)
        eps = acc.get_epsilon(1e-5)
        assert calls[-2:] == [n, n] and len(calls) == 2 + 2 * n  # only the growing last run is recomposed
    assert eps == ours(acc.history, 1e-5, 1e-3)  # the very number a fresh (restored) ledger computes


def test_pld_break_rounding_every_loss_up(monkeypatch):
    """Privacy buckets rounding up (dp-accounting's, no connect-the-dots) overstate eps by about T h / 2."""
    q, sigma, steps, delta = OPACUS
    lo_hi = bounds([(sigma, q, steps)], delta)
    assert within(ours([(sigma, q, steps)], delta), lo_hi)

    def rounded_up(sigma, q, h, tail, remove):
        both = privacy_loss_distribution.from_gaussian_mechanism(
            sigma, value_discretization_interval=h, sampling_prob=q, use_connect_dots=False)
        pmf = (both._pmf_remove if remove else both._pmf_add).to_dense_pmf()
        return pmf._lower_loss, torch.tensor(pmf._probs, dtype=torch.float64), pmf._infinity_mass
    monkeypatch.setattr(d, "_step_pld", rounded_up)
    eps = ours([(sigma, q, steps)], delta)
    assert not within(eps, lo_hi) and eps > 6.85, eps


def test_pld_break_dropping_the_lower_tail(monkeypatch):
    """With a grid that starts at loss 0, the mass below moves up to the lowest atom (pessimistic); dropped, the
    composed delta shrinks and eps falls below the Gaussian's exact one."""
    sigma, steps, delta = 2.0, 10, 1e-6
    exact, right = gaussian_epsilon(sigma, steps, delta), d._connect_dots
    monkeypatch.setattr(d, "_loss_range", lambda s, q, t, f=d._loss_range: (0.0, f(s, q, t)[1]))
    assert ours([(sigma, 1.0, steps)], delta) >= exact

    def dropped(delta, h):  # the polyline keeps its first slope below the grid: as if no mass were there
        p = right(delta, h)
        p[0] = -(delta[1] - delta[0])
        return p
    monkeypatch.setattr(d, "_connect_dots", dropped)
    assert ours([(sigma, 1.0, steps)], delta) < exact


def test_pld_break_dropping_the_wrapped_mass(monkeypatch):
    """With a window cut to half its width, the mass above it wraps round the FFT to low losses; its Chernoff bound
    goes to +infinity (pessimistic). Dropped, eps falls below dp-accounting's optimistic estimate."""
    q, sigma, steps, delta = OPACUS
    lo, _ = bounds([(sigma, q, steps)], delta)

    def half(*args, f=d._window):
        start, end = f(*args)
        return start, start + (end - start) // 2
    monkeypatch.setattr(d, "_window", half)
    assert ours([(sigma, q, steps)], delta) >= lo
    monkeypatch.setattr(d, "_upper_tail", lambda *args: 0.0)
    assert ours([(sigma, q, steps)], delta) < lo


def test_pld_break_taking_the_larger_direction_per_step(monkeypatch):
    """Each step's worse direction (the larger delta at every eps) composed: no longer a pair of distributions
    that compose, and eps overshoots dp-accounting's pessimistic estimate (8.2 against 6.77). (Taking the direction
    with the larger one-step eps picks remove, which for the subsampled Gaussian also wins after composition.)"""
    q, sigma, steps, delta = OPACUS
    lo_hi = bounds([(sigma, q, steps)], delta)

    def worse_of_both(sigma, q, h, tail, remove):
        top = d._loss_range(sigma, q, tail)[1]
        i0, i1 = math.floor(-top / h), math.ceil(top / h)
        eps = torch.arange(i0, i1 + 1, dtype=torch.float64) * h
        worse = torch.maximum(d._log_delta_step(eps, sigma, q, True), d._log_delta_step(eps, sigma, q, False))
        return i0, d._connect_dots(worse.exp(), h), worse[-1].exp().item()
    monkeypatch.setattr(d, "_step_pld", worse_of_both)
    eps = ours([(sigma, q, steps)], delta)
    assert not within(eps, lo_hi) and eps > 7, eps


# ------------------------------------------------------------------------------------ DP-SGD


def _batch(tok, texts, max_prompt=0):
    return d.encode(tok, [""] * len(texts), texts, max_prompt=max_prompt, max_completion=40)


def test_per_sample_grads_match_per_example_loop_with_left_padding(tiny):
    lm, tok = tiny
    model = d.CausalLM(d.add_lora(__import__("copy").deepcopy(lm)))
    for p in lora_parameters(model).values():  # make B non-zero so every LoRA weight has a gradient
        torch.nn.init.normal_(p, std=0.05)
    ids, mask, loss_mask = _batch(tok, ["the film was great .", "i hated the plot and the long ending of it .",
                                        "ok ."])
    assert (mask == 0).any(1).sum() >= 2  # really left-padded
    params = {k: v.detach() for k, v in d.trainable(model).items()}
    loss_fn = d.sft_loss(model)
    batched = d.per_sample_grads(loss_fn, params, ids, mask, loss_mask)
    chunked = d.per_sample_grads(loss_fn, params, ids, mask, loss_mask, chunk_size=2)
    for i in range(3):  # the reference: one unpadded example at a time, plain autograd
        n = int(mask[i].sum())
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        logits = torch.func.functional_call(model, p, (ids[i:i + 1, -n:], mask[i:i + 1, -n:]))
        lp = d.token_logprobs(logits, ids[i:i + 1, -n:])[0]
        lm_ = loss_mask[i, -(n - 1):]
        (-(lp * lm_).sum() / lm_.sum()).backward()
        for k in params:
            torch.testing.assert_close(batched[k][i], p[k].grad, atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(chunked[k][i], p[k].grad, atol=1e-6, rtol=1e-4)
    # ... and they sum to the gradient of the summed batch loss
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    logits = torch.func.functional_call(model, p, (ids, mask))
    lp = d.token_logprobs(logits, ids)
    ((-(lp * loss_mask).sum(1) / loss_mask.sum(1)).sum()).backward()
    for k in params:
        torch.testing.assert_close(batched[k].sum(0), p[k].grad, atol=1e-6, rtol=1e-4)


def test_per_sample_grad_unchanged_when_another_sample_changes(tiny):
    """No padding leak, no batch statistic: sample 0's gradient ignores the rest of the batch."""
    lm, tok = tiny
    model = d.CausalLM(d.add_lora(__import__("copy").deepcopy(lm)))
    for p in lora_parameters(model).values():
        torch.nn.init.normal_(p, std=0.05)
    params = {k: v.detach() for k, v in d.trainable(model).items()}
    a = _batch(tok, ["the film was great .", "the plot ."])
    b = _batch(tok, ["the film was great .", "i would not recommend it to anyone , the ending was awful ."])
    ga = d.per_sample_grads(d.sft_loss(model), params, *a)
    gb = d.per_sample_grads(d.sft_loss(model), params, *b)
    assert a[0].shape != b[0].shape  # different padding
    for k in params:
        torch.testing.assert_close(ga[k][0], gb[k][0], atol=1e-6, rtol=1e-5)


@pytest.mark.unit
def test_privatize_without_noise_is_the_clipped_sum():
    g = {"a": torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [1.2, 0.0]]),
         "b": torch.tensor([[[0.0]], [[0.0]], [[1.0]], [[1.6]]])}
    out = d.privatize(g, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=10.0)
    assert set(out) == {"a", "b"} and out["a"].shape == (2,) and out["b"].shape == (1, 1), \
        "privatize returns one tensor per name, summed over the batch (no batch dimension)"
    one = lambda i: d.privatize({k: v[i:i + 1] for k, v in g.items()}, max_grad_norm=1.0, noise_multiplier=0.0,
                                expected_batch_size=1.0)
    _close(one(1)["a"], torch.tensor([0.3, 0.4]), "a gradient of norm 0.5 < C = 1 must pass unchanged: the factor "
           "is min(1, C / (norm + 1e-6)), never above 1")
    _close(one(3)["a"], torch.tensor([0.6, 0.0]), "clip the flat norm over all parameters together: sample 3's "
           "norm is 2 (a: 1.2, b: 1.6, each below C), so both halves scale by 1/2", atol=1e-5, rtol=1e-5)
    _close(one(3)["b"], torch.tensor([[0.8]]), "clip the flat norm over all parameters together: sample 3's norm "
           "is 2 (a: 1.2, b: 1.6, each below C), so both halves scale by 1/2", atol=1e-5, rtol=1e-5)
    # norms 5, 0.5, 1, 2 -> factors 1/5, 1, 1/(1 + 1e-6), 1/2; the sum over 4 samples, divided by 10
    f3 = 1 / (1 + 1e-6)
    _close(out["a"], torch.tensor([3 / 5 + 0.3 + 0.6, 4 / 5 + 0.4]) / 10, "the clipped gradients summed, divided "
           "by expected_batch_size = 10 (not the 4 samples)")
    _close(out["b"], torch.tensor([[f3 + 0.8]]) / 10, "the clipped gradients summed, divided by "
           "expected_batch_size = 10 (not the 4 samples)")


@pytest.mark.unit
def test_clipped_norms_at_most_c_and_divisor_is_expected_batch():
    torch.manual_seed(0)
    g = {"w": torch.randn(16, 5) * 10, "v": torch.randn(16, 3)}
    for i in range(16):  # each sample alone: its clipped contribution has norm <= C
        one = d.privatize({k: v[i:i + 1] for k, v in g.items()}, max_grad_norm=0.7, noise_multiplier=0.0,
                          expected_batch_size=1.0)
        norm = math.sqrt(sum(v.pow(2).sum() for v in one.values()))
        assert norm <= 0.7 + 1e-6, f"sample {i}'s clipped gradient has norm {norm:.4f} > C = 0.7 (w and v together)"
    a = d.privatize(g, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=4.0)
    b = d.privatize(g, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=8.0)
    _close(a["w"], 2 * b["w"], "the divisor is expected_batch_size (4, then 8), whatever the realised batch (16)")


@pytest.mark.unit
def test_noise_std_is_sigma_c_over_expected_batch():
    gen = torch.Generator().manual_seed(0)
    g = {"w": torch.zeros(3, 200_000)}
    out = d.privatize(g, max_grad_norm=2.0, noise_multiplier=1.5, expected_batch_size=10.0, generator=gen)["w"]
    assert out.mean().item() == pytest.approx(0.0, abs=0.002), "the noise has mean 0"
    assert out.std().item() == pytest.approx(1.5 * 2.0 / 10.0, rel=0.01), \
        f"noise std {out.std().item():.4f}: want sigma * C / expected batch = 1.5 * 2 / 10 (one draw, not per sample)"


@pytest.mark.unit
def test_empty_batch_gives_noise_only():
    gen = torch.Generator().manual_seed(0)
    out = d.privatize({"w": torch.zeros(0, 50_000)}, max_grad_norm=1.0, noise_multiplier=1.0,
                      expected_batch_size=5.0, generator=gen)["w"]
    assert out.shape == (50_000,), "an empty batch still gives one tensor per name, of the parameter's shape"
    assert out.std().item() == pytest.approx(0.2, rel=0.02), "an empty batch gives the noise alone: sigma C / qN = 0.2"


@pytest.mark.unit
def test_accountant_is_pluggable(monkeypatch):
    """Calibration (the plan), the ledger and sequential composition go through ACCOUNTANTS[name]: an
    accountant that charges twice the moments epsilon needs the sigma the moments one needs for half the
    target, and doubles a sequential ledger."""
    class Twice(d.MomentsAccountant):
        def get_epsilon(self, delta, orders=None):
            return 2 * super().get_epsilon(delta, orders)
    args = d.SFTArgs(steps=500, batch_size=10)
    rdp_sigma = d.plan_stage(args, 1000, 1.0, 1e-5, "rdp").noise_multiplier
    stages = {"a": {"epsilon": 1.0, "noise_multiplier": 1.1, "sample_rate": 0.02, "steps": 300, "accountant": "rdp"},
              "b": {"epsilon": 1.0, "noise_multiplier": 0.9, "sample_rate": 0.01, "steps": 200, "accountant": "rdp"}}
    rdp_total = d.compose_ledger(stages, 1e-5, "sequential")
    monkeypatch.setitem(d.ACCOUNTANTS, "rdp", Twice)
    assert d.plan_stage(args, 1000, 2.0, 1e-5, "rdp").noise_multiplier == pytest.approx(rdp_sigma, rel=2e-3)
    assert d.compose_ledger(stages, 1e-5, "sequential") == pytest.approx(2 * rdp_total)


@pytest.mark.unit
def test_poisson_sampling_rate():
    gen = torch.Generator().manual_seed(0)
    sizes = [len(d.poisson_sample(1000, 0.05, gen)) for _ in range(400)]
    assert np.mean(sizes) == pytest.approx(50, rel=0.03)
    assert np.var(sizes) == pytest.approx(1000 * 0.05 * 0.95, rel=0.2)  # binomial, not a fixed size
    assert len(d.poisson_sample(1000, 0.0, gen)) == 0


# ------------------------------------------------------------------------------------ the unit, not the record
@pytest.mark.unit
def test_units_pick_each_units_records_in_turn_from_its_own_offset():
    units = d.Units.of(["a", "b", "a", "c", "a"], 5)
    assert units.records == [[0, 2, 4], [1], [3]] and len(units) == 3
    seen = [units.pick(torch.tensor([0, 1]), t, 1)[0][:, 0].tolist() for t in range(3)]
    assert sorted(s[0] for s in seen) == [0, 2, 4] and all(s[1] == 1 for s in seen)  # a in turn, b always
    rows, valid = units.pick(torch.tensor([0, 2]), 0, 2)
    assert valid.tolist() == [[True, True], [True, False]] and rows[1].tolist() == [3, 3]  # padded by its first
    for t in range(4):  # a's records do not depend on which other units are sampled with it (nor the width)
        alone, beside = units.pick(torch.tensor([0]), t, 3), units.pick(torch.tensor([2, 0]), t, 3)
        assert set(alone[0][0][alone[1][0]].tolist()) == set(beside[0][1][beside[1][1]].tolist())
    more = d.Units.of(["z", "a", "b", "a", "c", "a"], 6)  # another unit added: a's turn is unchanged
    assert [more.records[1][i] - 1 for i in range(3)] == units.records[0] and more.offset[1:] == units.offset


def _one_step_sums(monkeypatch, stage, tiny, texts, units, m, C):
    """Every noisy update's privatised sum (the update times its divisor) in one step of `stage` at
    q = 1 (every unit sampled), sigma = 0 and clipping norm C: the test builds its own plan."""
    import copy
    lm, tok = tiny
    sums, right = [], getattr(d.dp_step, "__wrapped__", d.dp_step)

    def spy(state, loss_fn, batch, plan, *, expected_batch_size, **kw):
        noisy, aux = right(state, loss_fn, batch, plan, expected_batch_size=expected_batch_size, **kw)
        sums.append(torch.cat([g.flatten() for g in noisy.values()]).double() * expected_batch_size)
        return noisy, aux
    spy.__wrapped__ = right
    monkeypatch.setattr(d, "dp_step", spy)
    plan, gen = d.StagePlan(1.0, 1e-5, 50.0, 1.0, 1, 0.0, C), torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the value head's initial weights
    if stage == "sft":
        d.dp_sft(d.add_lora(copy.deepcopy(lm)), tok, [""] * len(texts), texts, plan,
                 d.SFTArgs(unit_records=m, max_completion=12, lr=1e-9), units=units, generator=gen)
    elif stage == "rm":
        rm = d.RewardModel(d.add_lora(copy.deepcopy(lm), rank=4), pad_token_id=tok.pad_token_id)
        d.dp_reward_model(rm, tok, ["a post"] * len(texts), texts, [t[::-1] for t in texts], plan,
                          d.RMArgs(unit_records=m, max_completion=12, lr=1e-9), units=units, generator=gen)
    else:  # greedy rollouts, every unit in the first of 2 minibatches: the other units' trajectories do not move
        greedy = getattr(d.sample, "__wrapped__", d.sample)
        randint = getattr(torch.randint, "__wrapped__", torch.randint)
        sample = lambda *a, **kw: greedy(*a, **{**kw, "greedy": True})
        minibatches = lambda *a, **kw: torch.zeros(a[1][0], dtype=torch.long) if len(a) == 2 else randint(*a, **kw)
        sample.__wrapped__, minibatches.__wrapped__ = greedy, randint
        monkeypatch.setattr(d, "sample", sample)
        monkeypatch.setattr(torch, "randint", minibatches)
        policy = d.ActorCritic(d.add_lora(copy.deepcopy(lm)))
        reward = lambda prompts, responses: torch.tensor([1.0 + len(y) for y in responses])  # never 0
        d.dpppo(policy, tok, texts, reward, plan, d.PPOArgs(steps=1, minibatches=2, response_min=3, response_max=3,
                                                          baseline="none", unit_records=m, lr=0.0),
                units=units, generator=gen)  # lr 0: every minibatch's gradient at the same parameters
    return sums


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
@pytest.mark.parametrize("m", [1, 3])
def test_a_unit_with_k_records_moves_one_steps_sum_by_at_most_c(monkeypatch, tiny, stage, m):
    """Adding a unit with k records (k = 1, 3, 8) to the same other units changes each noisy update's
    privatised sum by a vector of norm <= C, in one update only: the unit's sensitivity is C whatever k.
    Sampling or clipping records (each record its own unit) moves it by about k * C, and fails."""
    C = 1e-2  # below every gradient's norm here: each clipped contribution has norm C
    others = ["the film was great", "i hated it", "a fine cast", "too long", "so dull", "what a ride", "meh"]
    other_units = ["u0", "u1", "u0", "u2", "u0", "u1", "u3"]  # u0 has three distinct records, u1 two
    base = _one_step_sums(monkeypatch, stage, tiny, others, other_units, m, C)
    for k in (1, 3, 8):  # the new unit first: every other unit's position moves, its records must not
        new = [f"a new review, part {i}" for i in range(k)] if m > 1 else ["a new review"] * k
        sums = _one_step_sums(monkeypatch, stage, tiny, new + others, ["new"] * k + other_units, m, C)
        diffs = sorted(float((b - a).norm()) for a, b in zip(base, sums))
        assert len(sums) == len(base) and diffs[-1] <= C * (1 + 1e-3), f"{stage}: {k} records moved a sum: {diffs}"
        assert diffs[-1] > 0.5 * C and (len(diffs) == 1 or diffs[-2] < 1e-3 * C), diffs  # one update, the unit's
    if m == 1:  # break it: the same data with each record its own unit moves the sum by about k * C
        as_records = [_one_step_sums(monkeypatch, stage, tiny, x, None, m, C) for x in (others, new + others)]
        assert max(float((b - a).norm()) for a, b in zip(*as_records)) > 2 * C


@pytest.mark.unit
def test_a_units_gradient_is_the_mean_of_its_valid_records_and_a_nonfinite_one_zeroes_it_alone():
    """unit_records m = 4 on units of 2, 1 and 2 records: the noiseless sum is mean(a) + b (+ 0 for c, whose
    second record is non-finite): padding neither counts nor leaks, and the divisor is the valid count."""
    lin = torch.nn.Linear(3, 1, bias=False)

    def loss_fn(params, x, mask):  # the gradient is x itself
        return torch.func.functional_call(lin, params, (x,)).sum() + 0 * mask.sum()
    x = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 4.0], [1.0, 1.0, 1.0], [math.nan, 0, 0]])
    sums = []

    class Spy(d.Hooks):
        def step(self, stage, state, plan, update=None, **kw):
            sums.append(update["weight"] * plan.expected_batch_size)
    args = d.SFTArgs(lr=1e-9, unit_records=4, chunk_size=0)
    d.dp_train("x", lin, loss_fn, (x, torch.ones(5, 3, dtype=torch.long)), d.StagePlan(1.0, 1e-5, 3.0, 1.0, 1, 0.0,
               1e3), args, units=d.Units.of(["a", "a", "b", "c", "c"], 5), generator=torch.Generator(), hooks=Spy())
    torch.testing.assert_close(sums[0], torch.tensor([[0.5, 0.5, 4.0]]))


# ------------------------------------------------------------------------------------ LoRA


def test_lora_init_identity_trainable_merge_and_off(tiny):
    import copy
    lm, tok = tiny
    ids, mask, _ = _batch(tok, ["the film was great .", "i hated it ."])
    base_logits = d.CausalLM(lm)(ids, mask)
    model = d.add_lora(copy.deepcopy(lm))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_parameters(model))
    assert len(lora_parameters(model)) == 4 * lm.config.n_layer
    torch.testing.assert_close(d.CausalLM(model)(ids, mask), base_logits)
    for p in lora_parameters(model).values():
        torch.nn.init.normal_(p, std=0.1)
    lora_logits = d.CausalLM(model)(ids, mask)
    assert (lora_logits - base_logits).abs().max() > 1e-3
    with d.lora_disabled(model):
        torch.testing.assert_close(d.CausalLM(model)(ids, mask), base_logits)
    k_before = lm.transformer.h[0].attn.c_attn.weight[:, lm.config.n_embd:2 * lm.config.n_embd].clone()
    d.merge_lora(model)
    assert not lora_parameters(model)
    torch.testing.assert_close(d.CausalLM(model)(ids, mask), lora_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.weight[:, lm.config.n_embd:2 * lm.config.n_embd],
                               k_before)  # the key third is untouched


# ------------------------------------------------------------------------------------ DP SFT


def test_dp_sft_loss_falls_and_ledger(tiny):
    import copy
    lm, tok = tiny
    texts = [r["text"] for r in d.make_reviews(2064, seed=5)]
    heldout = _batch(tok, texts[:64])

    def nll(model):
        with torch.no_grad():
            logits = d.CausalLM(model)(heldout[0], heldout[1])
            lp = d.token_logprobs(logits, heldout[0])
            return (-(lp * heldout[2]).sum() / heldout[2].sum()).item()
    model = d.add_lora(copy.deepcopy(lm))
    before = nll(model)
    args = d.SFTArgs(steps=60, batch_size=128, lr=1e-2)
    entry = d.dp_sft(model, tok, [""] * 2000, texts[64:], d.plan_stage(args, 2000, 8.0, 1e-3), args,
                     generator=torch.Generator().manual_seed(0))
    assert nll(model) < before - 0.04  # measured: 2.458 -> 2.406 (2.38 at eps = inf)
    assert entry["steps"] == 60 and entry["num_private_examples"] == 2000
    assert 7.0 < entry["epsilon"] <= 8.0
    assert entry["sample_rate"] == pytest.approx(128 / 2000)
    fresh = d.PLDAccountant()  # the ledger is the default accountant's, recomputed from its entry
    fresh.step(noise_multiplier=entry["noise_multiplier"], sample_rate=entry["sample_rate"], num_steps=60)
    assert entry["accountant"] == "pld" and entry["epsilon"] == pytest.approx(fresh.get_epsilon(1e-3))


# ------------------------------------------------------------------------------------ PPO


def _gae_loop(rewards, values, gamma, lam):
    """Textbook GAE on one trajectory (lists), the reference."""
    adv, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_v = values[t + 1] if t + 1 < len(rewards) else 0.0
        last = rewards[t] + gamma * next_v - values[t] + gamma * lam * last
        adv[t] = last
    return adv


@pytest.mark.unit
def test_gae_matches_plain_loop():
    torch.manual_seed(0)
    r, v = torch.randn(3, 9), torch.randn(3, 9)
    m = torch.zeros(3, 9)
    m[0, 2:9], m[1, 3:6], m[2, 0:4] = 1, 1, 1  # different starts and lengths, padding after
    adv, ret = d.gae(r, v * m, m, gamma=0.9, lam=0.8)
    for i in range(3):
        cols = m[i].nonzero().flatten().tolist()
        ref = _gae_loop(r[i, cols].tolist(), v[i, cols].tolist(), 0.9, 0.8)
        torch.testing.assert_close(adv[i, cols], torch.tensor(ref))
        torch.testing.assert_close(ret[i, cols], torch.tensor(ref) + v[i, cols])
        assert (adv[i][m[i] == 0] == 0).all()


@pytest.mark.unit
def test_gae_on_hand_computed_values():
    act = torch.tensor([[0.0, 1, 1, 1, 0], [0.0, 0, 0, 1, 1], [1.0, 0, 0, 0, 0]])
    r = torch.tensor([[9.0, 1, 0, 2, 7], [4.0, 4, 4, 1, 1], [3.0, 8, 8, 8, 8]])  # off the response: not 0
    v = torch.tensor([[5.0, 1, 2, 1, 3], [6.0, 6, 6, 2, 0], [1.0, 9, 9, 9, 9]])
    adv, ret = d.gae(r, v, act, gamma=0.5, lam=0.5)
    assert adv.shape == ret.shape == act.shape, "returns (advantages, returns), each [B, T-1]"
    assert (adv[act == 0] == 0).all() and (ret[act == 0] == 0).all(), \
        f"advantages and returns must be 0 off the response (prompt and padding columns):\n{adv}\n{ret}"
    # by hand, gamma = lam = 0.5. Row 0: delta_3 = 2 - 1 = 1 (nothing after the last token), A_3 = 1; delta_2 = 0 +
    # 0.5 * 1 - 2 = -1.5, A_2 = -1.5 + 0.25 * 1 = -1.25; delta_1 = 1 + 0.5 * 2 - 1 = 1, A_1 = 1 + 0.25 * -1.25.
    # Row 1: A_4 = 1 - 0 = 1; A_3 = 1 + 0 - 2 + 0.25 * 1 = -0.75. Row 2: one token, A_0 = 3 - 1 = 2.
    last = torch.tensor([[0, 3], [1, 4], [2, 0]])
    _close(adv[last[:, 0], last[:, 1]], torch.tensor([1.0, 1.0, 2.0]), "a trajectory's last token has nothing after "
           "it: A = r - V there (not r + gamma V(next column) - V; the last column counts too)")
    want = torch.tensor([[0.0, 0.6875, -1.25, 1, 0], [0.0, 0, 0, -0.75, 1], [2.0, 0, 0, 0, 0]])
    _close(adv, want, "A_k = delta_k + gamma lam A_(k+1), delta_k = r_k + gamma V_(k+1) - V_k, along the response")
    _close(ret, (want + v) * act, "returns = advantages + values (on the response)")


@pytest.mark.unit
def test_ppo_loss_on_hand_computed_values():
    class Fixed(torch.nn.Module):  # log-probs and values as parameters, so the loss is a plain function of them
        def __init__(self):
            super().__init__()
            p = [[0.5, 0.5], [0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.6, 0.4], [0.55, 0.45], [0.5, 0.5], [0.5, 0.5]]
            self.logp = torch.nn.Parameter(torch.tensor(p).log())  # position t predicts ids[t + 1]
            self.v = torch.nn.Parameter(torch.tensor([9.0, 1, 1, 1, 0, 0.1, 4, 8]))

        def forward(self, ids, mask, start=0):
            return self.logp[None, start:].expand(ids.shape[0], -1, -1), self.v[None, start:].expand(ids.shape[0], -1)
    policy = Fixed()
    ids, mask = torch.tensor([0, 0, 0, 1, 0, 1, 0, 1]), torch.tensor([1, 1, 1, 1, 1, 1, 1, 0])  # 2 prompt tokens
    # the columns from prompt_len - 1 = 1 on: targets ids[2:], five response tokens and a padding column (junk)
    act = torch.tensor([1.0, 1, 1, 1, 1, 0])
    old_lp = torch.tensor([0.4, 0.6, 1 / 3, 0.8, 0.5, 0.1]).log()  # new 0.6 0.3 0.5 0.4 0.55: ratios 1.5 .5 1.5 .5 1.1
    adv = torch.tensor([1.0, 1, -1, -1, 2, 7])
    old_v, ret = torch.tensor([0.0, 0, 1, 0.5, 0, 3]), torch.tensor([1.0, 0, 2, 0.5, 0.1, 9])  # new V: 1 1 1 0 .1
    loss_fn = d.ppo_loss(policy, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    loss, aux = loss_fn(dict(policy.named_parameters()), ids, mask, act, old_lp, old_v, adv, ret)
    assert loss.shape == () and aux.shape == (3,), "returns (loss, aux = [policy loss, value loss, clip fraction])"
    # policy: max(-A r, -A clip(r, 0.8, 1.2)): A = 1, r = 1.5: -1.2 (clipped); A = 1, r = .5: -.5; A = -1, r = 1.5: 1.5;
    # A = -1, r = .5: .8 (clipped); A = 2, r = 1.1: -2.2 -> mean over the 5 tokens -0.32
    assert aux[0].item() == pytest.approx(-0.32), \
        f"policy loss {aux[0].item():.4f}, want -0.32: max(-A r, -A clip(r)), each branch wins once here; the " \
        "mean over the 5 response tokens (not the padding column)"
    # value: 0.5 max((V - R)^2, (V_old + clip(V - V_old, +-0.2) - R)^2): 0.5 max(0, .64) = .32 (clipped);
    # 0.5 max(1, .04) = .5; .5; 0.5 max(.25, .04) = .125; 0 -> mean 0.289
    assert aux[1].item() == pytest.approx(0.289), \
        f"value loss {aux[1].item():.4f}, want 0.289: 0.5 max((V - R)^2, (V_clip - R)^2) with V the value of the " \
        "state each token is chosen in (values[0, :-1]); the first token's clipped term wins"
    assert aux[2].item() == pytest.approx(0.8), "clip fraction: 4 of the 5 response tokens have |r - 1| > 0.2"
    assert loss.item() == pytest.approx(-0.32 + 0.1 * 0.289), "loss = policy loss + vf_coef * value loss"
    assert not aux.requires_grad, "aux is detached (statistics, not part of the gradient)"
    loss.backward()
    assert (policy.logp.grad[[1, 4]] == 0).all() and (policy.logp.grad[[2, 3, 5]] != 0).any(1).all(), \
        "a token where the clipped policy term wins has no policy gradient; the others have one"
    assert policy.logp.grad[6].eq(0).all() and policy.v.grad[6] == 0, "the padding column reached the gradient"
    assert policy.v.grad[1] == 0 and policy.v.grad[2] != 0, "where the clipped value term wins, V has no gradient"


@pytest.fixture(scope="session")
def small_gpt2():
    """A small GPT-2 with random weights (nothing trained, no tokenizer): the vmap smoke runs' model, in a second."""
    from transformers import GPT2Config, GPT2LMHeadModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, eos_token_id=0,
                                          pad_token_id=0, attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0)).eval()


def _randomised(module, gen):
    """Every trainable weight random and small (LoRA's B starts at 0: then every weight has a gradient)."""
    for p in d.trainable(module).values():
        p.data = torch.randn(p.shape, generator=gen) * 0.05
    return module


@pytest.mark.unit
def test_ppo_loss_under_vmap_on_a_small_gpt2(small_gpt2):
    """dpppo differentiates ppo_loss's closure per trajectory, vmap(grad(loss_fn)): it must run there and give a
    trajectory the gradient it has alone, and the columns from the last prompt position on give the full width's."""
    import copy
    gen = torch.Generator().manual_seed(0)
    policy = _randomised(d.ActorCritic(d.add_lora(copy.deepcopy(small_gpt2))), gen)
    ids, mask = torch.randint(1, 64, (2, 10), generator=gen), torch.ones(2, 10, dtype=torch.long)
    mask[1, :2] = 0  # row 1: a prompt of 2 tokens, left-padded to the prompts' width 4
    mask[0, 7:] = 0  # row 0: a response of 3 tokens, then padding; row 1's has 6
    act = mask[:, 1:].float()
    act[:, :3] = 0  # targets of response tokens: from column prompt_len - 1 = 3 on
    lp, v, adv, ret = (torch.randn(2, 9, generator=gen) for _ in range(4))  # not 0 off the response either
    cut = [x[:, 3:] for x in (act, lp, v, adv, ret)]
    loss_fn = d.ppo_loss(policy, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    params = {k: p.detach() for k, p in d.trainable(policy).items()}
    try:
        grads, aux = d.per_sample_grads(loss_fn, params, ids, mask, *cut, has_aux=True)
    except Exception as e:
        raise AssertionError(f"ppo_loss's closure fails under torch.func.vmap ({type(e).__name__}: {e}): no .item(), "
                             "float() or Python if on a tensor, no boolean-mask indexing") from e
    assert aux.shape == (2, 3) and all(g.shape[0] == 2 for g in grads.values()), "one (loss, aux) per trajectory"
    assert all(g.isfinite().all() for g in grads.values()), "a finite trajectory has a finite gradient"
    alone, alone_aux = torch.func.grad(loss_fn, has_aux=True)(params, ids[0], mask[0], *(x[0] for x in cut))
    _close(aux[0], alone_aux, "under vmap, trajectory 0's policy loss, value loss and clip fraction are its own")
    for k in params:
        _close(grads[k][0], alone[k], "under vmap, trajectory 0's gradient is its own alone", atol=1e-6, rtol=1e-4)
    full, full_aux = d.per_sample_grads(loss_fn, params, ids, mask, act, lp, v, adv, ret, has_aux=True)
    _close(full_aux, aux, "start = T - 1 - L: the trajectories given from column 0 (L = T - 1, start 0) must have the "
           "same loss as from column 3 (L = 6, start 3)")
    for k in params:
        _close(full[k], grads[k], "start = T - 1 - L: the trajectories given from column 0 must have the same gradient",
               atol=1e-6, rtol=1e-4)


@pytest.mark.unit
def test_kl_rewards_eq2():
    act = torch.tensor([[0.0, 0, 1, 1, 0, 0],   # a prompt, 2 response tokens, padding
                        [0.0, 1, 1, 1, 1, 1],   # a response to the last column
                        [0.0, 0, 0, 0, 0, 0]])  # no response token
    lp = torch.tensor([[9.0, 9, -1, -2, 5, 5], [3.0, -1, -1, -0.5, -3, -2], [1.0, 2, 3, 4, 5, 6]])
    ref = torch.tensor([[0.0, 1, -1.5, -1, 2, 3], [0.0, -1, -2, -0.5, -1, -2], [0.0, 0, 0, 0, 0, 0]])
    inputs = [x.clone() for x in (lp, ref, act)]
    rewards, kl = d.kl_rewards(torch.tensor([3.0, -2.0, 7.0]), lp, ref, act, kl_coef=0.5)
    for x, y in zip((lp, ref, act), inputs):
        assert torch.equal(x, y), "kl_rewards changed its inputs in place"
    assert rewards.shape == act.shape and kl.shape == (3,), "returns (rewards [B, T-1], kl [B])"
    _close(rewards[:2, 2], torch.tensor([-0.25, -0.5]), "-beta (log pi - log pi_sft) on a response token")
    _close(rewards[[0, 1], [3, 5]], torch.tensor([0.5 + 3.0, -2.0]), "the score goes on the row's last response "
           "token (row 0: column 3), not on the tensor's last column nor at the response's length")
    assert (rewards[:2][act[:2] == 0] == 0).all(), \
        f"the KL penalty reached a prompt or padding column (the log-probs there are not 0 here):\n{rewards}"
    assert (rewards[2] == 0).all(), "a row with no response token gets nothing, not even its score"
    _close(rewards, torch.tensor([[0.0, 0, -0.25, 0.5 + 3.0, 0, 0], [0.0, 0, -0.5, 0, 1, -2], [0.0, 0, 0, 0, 0, 0]]),
           "-beta (log pi - log pi_sft) on each response token, plus the score on the row's last response token")
    _close(kl, torch.tensor([-0.5, -1.0, 0.0]), "the second value is each row's KL summed over its response tokens")


def test_reference_equals_sft_model_at_ppo_init(tiny):
    import copy
    lm, tok = tiny
    sft = d.add_lora(copy.deepcopy(lm))
    for p in lora_parameters(sft).values():
        torch.nn.init.normal_(p, std=0.1)
    d.merge_lora(sft)
    policy = d.ActorCritic(d.add_lora(copy.deepcopy(sft)))
    ids, mask, _ = d.encode(tok, ["the film", "it is a very"], max_prompt=8)
    gen = torch.Generator().manual_seed(0)
    ro = d.rollout(policy, ids, mask, lengths=torch.tensor([4, 6]), generator=gen, eos_id=None)
    sft_lp = d.token_logprobs(d.CausalLM(sft)(ro.ids, ro.mask), ro.ids) * ro.action_mask
    torch.testing.assert_close(d.reference_logprobs(policy, ro), sft_lp)
    torch.testing.assert_close(ro.logprobs, sft_lp, atol=1e-5, rtol=1e-4)  # fresh LoRA: starts exactly at LM_sft
    assert ro.action_mask.sum(1).tolist() == [4.0, 6.0]
    for p in lora_parameters(policy).values():  # the policy moves; the reference must stay LM_sft (LoRA off)
        torch.nn.init.normal_(p, std=0.1)
    ro = d.rollout(policy, ids, mask, lengths=torch.tensor([4, 6]), generator=gen, eos_id=None)
    sft_lp = d.token_logprobs(d.CausalLM(sft)(ro.ids, ro.mask), ro.ids) * ro.action_mask
    torch.testing.assert_close(d.reference_logprobs(policy, ro), sft_lp)
    assert (ro.logprobs - sft_lp).abs().max() > 1e-3, "the moved policy's own log-probs differ from the reference's"


def _ppo_batch(policy, tok, prompts, lengths, seed):
    ids, mask, _ = d.encode(tok, prompts, max_prompt=8)
    ro = d.rollout(policy, ids, mask, lengths=torch.tensor(lengths), generator=torch.Generator().manual_seed(seed),
                   eos_id=None)
    ref = d.reference_logprobs(policy, ro)
    rewards, _ = d.kl_rewards(torch.arange(len(prompts)).float(), ro.logprobs, ref, ro.action_mask, 0.1)
    adv, ret = d.gae(rewards, ro.values, ro.action_mask, gamma=1.0, lam=0.95)
    return ro.ids, ro.mask, ro.action_mask, ro.logprobs, ro.values, adv, ret


def test_ppo_loss_on_the_response_columns_equals_the_full_loss(tiny):
    """dpppo passes the per-token tensors from the last prompt position on only (the heads skip
    the prompt): per-sample gradients and statistics must equal the full-width loss's."""
    import copy
    lm, tok = tiny
    policy = d.ActorCritic(d.add_lora(copy.deepcopy(lm)))
    for p in lora_parameters(policy).values():
        torch.nn.init.normal_(p, std=0.05)
    ids, mask, act, lp, v, adv, ret = _ppo_batch(policy, tok, ["the film was", "a"], [5, 3], seed=0)
    start = int(act.sum(0).nonzero().min())  # the first column that holds a response token
    assert start > 0
    loss_fn = d.ppo_loss(policy, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    params = {k: p.detach() for k, p in d.trainable(policy).items()}
    full, full_aux = d.per_sample_grads(loss_fn, params, ids, mask, act, lp, v, adv, ret, has_aux=True)
    cut, cut_aux = d.per_sample_grads(loss_fn, params, ids, mask, *(x[:, start:] for x in (act, lp, v, adv, ret)),
                                      has_aux=True)
    torch.testing.assert_close(cut_aux, full_aux)
    for k in full:
        torch.testing.assert_close(cut[k], full[k], atol=1e-6, rtol=1e-5)


@pytest.mark.unit
def test_sample_categorical_draws_the_given_distribution():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 1.0]]).repeat(100_000, 1)
    draws = d.sample_categorical(probs, torch.Generator().manual_seed(0)).view(-1, 2)
    freq = torch.bincount(draws[:, 0], minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.005, rtol=0)
    assert (draws[:, 1] == 3).all()  # a zero-probability token is never drawn


@pytest.mark.unit
def test_sample_categorical_inverts_the_cdf_at_the_given_u():
    u = torch.linspace(0, 0.999, 1000)
    got = d.sample_categorical(torch.tensor([[0.25, 0.0, 0.5, 0.25]]).expand(1000, -1), u=u)  # cdf .25 .25 .75 1
    assert got.dtype == torch.long and got.shape == (1000,), "one index per row, [B] long"
    want = torch.where(u < 0.25, 0, torch.where(u < 0.75, 2, 3))
    assert torch.equal(got, want), f"{(got != want).sum()} of 1000 draws are not the CDF inverted at the given u " \
        "(the smallest i with cdf_i > u; the same u, the same draw): e.g. u = 0.25 gives token 2"
    zero_first = d.sample_categorical(torch.tensor([[0.0, 0.5, 0.5]]), u=torch.tensor([0.0]))
    assert zero_first.tolist() == [1], "at u = 0 a zero-probability token was drawn: cdf_i > u, strictly"
    unscaled = d.sample_categorical(torch.tensor([[2.0, 0.0, 6.0], [2.0, 0.0, 6.0]]), u=torch.tensor([0.2, 0.3]))
    assert unscaled.tolist() == [0, 2], "a row need not sum to 1: u is scaled by the row's total (here 8)"


def test_fused_gelu_gives_gpt2s_logits(tmp_path):
    """load_lm swaps GPT-2's gelu_new for the same function as one fused kernel (speed only)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=1024, activation_function="gelu_new")
    ref = GPT2LMHeadModel(config).eval()
    ref.save_pretrained(tmp_path)
    d.load_lm("builtin", "cpu", TINY_BASE_ARGS)[1].save_pretrained(tmp_path)
    lm, _ = d.load_lm(str(tmp_path), "cpu")
    assert lm.config.activation_function == "gelu_pytorch_tanh"
    ids = torch.randint(0, 1024, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_dpppo_keeps_poisson_batches_and_one_accountant_step_an_iteration(tiny):
    """Algorithm 3's loop contract: each iteration a Poisson sample of prompts (its size varies, and may be 0), its
    noisy update and its accountant step, the empty ones too, hooks.step, and the linear lr schedule."""
    import copy
    lm, tok = tiny
    policy = d.ActorCritic(d.add_lora(copy.deepcopy(lm)))
    before = {k: v.clone() for k, v in d.trainable(policy).items()}
    rows, prompts = [], ["the film was", "it is a", "i loved the", "but the"] * 4
    args = d.PPOArgs(steps=12, batch_size=1, lr=1e-2, lr_schedule="linear", response_min=2, response_max=3)
    plan = d.plan_stage(args, len(prompts), 4.0, 1e-3)
    entry = d.dpppo(policy, tok, prompts, lambda p, r: torch.zeros(len(r)), plan, args,
                    generator=torch.Generator().manual_seed(0), hooks=d.RunHooks(log=rows.append))
    sizes = [r["ppo/batch_size"] for r in rows]
    assert len(rows) == 12, f"hooks.step once an iteration, the empty batches too: {len(rows)} calls in 12 iterations"
    assert len(set(sizes)) > 1, f"batch sizes {sizes}: a Poisson sample (each prompt with probability 1/16), whose " \
        "size varies, not a fixed size: the accountant assumes Poisson sampling"
    accountant = d.ACCOUNTANTS[plan.accountant]()
    accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, num_steps=12)
    assert entry["steps"] == 12 and entry["epsilon"] == pytest.approx(accountant.get_epsilon(1e-3), rel=1e-9), \
        f"epsilon {entry['epsilon']}: one accountant step each iteration (12), the empty ones too"
    assert [r["ppo/lr"] for r in rows] == pytest.approx([1e-2 * (1 - t / 12) for t in range(12)]), \
        "lr_schedule 'linear': iteration t's lr is args.lr * (1 - t / steps)"
    assert any(not torch.equal(before[k], p) for k, p in d.trainable(policy).items()), "no noisy update moved a weight"


def test_dpppo_raises_the_reward(tiny):
    """The grader of "implement dpppo": seeded, private (epsilon = 8), 15 iterations on the tiny
    model with a reward it can learn (periods in the response). It rises 0.4 -> 5 here."""
    import copy
    lm, tok = tiny
    torch.manual_seed(0)
    prompts = d.prefix_prompts(tok, [r["text"] for r in d.make_reviews(200, seed=3)], 2, 4, seed=0)
    policy = d.ActorCritic(d.add_lora(copy.deepcopy(lm)))
    rows = []
    args = d.PPOArgs(steps=15, batch_size=64, lr=3e-2, response_min=8, response_max=8)
    d.dpppo(policy, tok, prompts, lambda p, r: torch.tensor([float(y.count(" .")) for y in r]),
            d.plan_stage(args, len(prompts), 8.0, 1e-3), args, generator=torch.Generator().manual_seed(0),
            hooks=d.RunHooks(log=rows.append))
    reward = [r["ppo/reward_mean"] for r in rows]
    assert np.mean(reward[-3:]) > np.mean(reward[:3]) + 1.0, f"the reward did not rise: {reward}"
    assert 8.0 * (1 - 1e-3) <= rows[-1]["privacy/epsilon"] <= 8.0, "15 iterations spend the planned epsilon, 8"


def test_ppo_linear_lr_schedule_anneals_by_iteration(tiny):
    """--ppo-lr-schedule linear: AdamW's lr at iteration t is lr * (1 - t / T), a function of t only."""
    import copy
    lm, tok = tiny
    policy = d.ActorCritic(d.add_lora(copy.deepcopy(lm)))
    rows = []
    args = d.PPOArgs(steps=4, batch_size=4, lr=1e-2, lr_schedule="linear", response_min=2, response_max=2)
    d.dpppo(policy, tok, ["the film was", "it is a"] * 4, lambda p, r: torch.zeros(len(r)),
            d.plan_stage(args, 8, 8.0, 1e-3), args, generator=torch.Generator().manual_seed(0),
            hooks=d.RunHooks(log=rows.append))
    assert [r["ppo/lr"] for r in rows] == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])


def test_ppo_per_trajectory_gradient_ignores_the_rest_of_the_batch(tiny):
    """Trajectory 0's clipped gradient is the same whatever trajectory 1 is, including one of a
    different prompt length and response length (different padding on both sides)."""
    import copy
    lm, tok = tiny
    policy = d.ActorCritic(d.add_lora(copy.deepcopy(lm)))
    for p in lora_parameters(policy).values():
        torch.nn.init.normal_(p, std=0.05)
    torch.nn.init.normal_(policy.value_head.weight, std=0.1)
    a = _ppo_batch(policy, tok, ["the film was", "ok"], [5, 5], seed=0)
    b = _ppo_batch(policy, tok, ["the film was", "i would not recommend this long"], [5, 12], seed=0)
    assert a[0].shape != b[0].shape
    loss_fn = d.ppo_loss(policy, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    params = {k: v.detach() for k, v in d.trainable(policy).items()}
    assert "value_head.weight" in params  # value head is clipped jointly with LoRA
    ga = d.per_sample_grads(loss_fn, params, *a, has_aux=True)[0]
    gb = d.per_sample_grads(loss_fn, params, *b, has_aux=True)[0]
    ca = d.privatize({k: v[:1] for k, v in ga.items()}, max_grad_norm=0.01, noise_multiplier=0, expected_batch_size=1)
    cb = d.privatize({k: v[:1] for k, v in gb.items()}, max_grad_norm=0.01, noise_multiplier=0, expected_batch_size=1)
    for k in params:
        torch.testing.assert_close(ga[k][0], gb[k][0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ca[k], cb[k], atol=1e-8, rtol=1e-5)


# ------------------------------------------------------------------------------------ pipelines / CLI


def run_main(capsys, *args) -> tuple[int, str]:
    """The CLI in this process (no interpreter start-up: for the many bad-input cases): (exit code, stderr)."""
    capsys.readouterr()
    try:
        d.main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def run_cli(*args, env=None, timeout=600):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, os.path.join(HERE, "dp_rlhf.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_privacy_prints_both_accountants_golden_values(capsys):
    """Opacus README's example: the moments accountant's 7.329, the PLD's 6.769 (dp-accounting's), and back."""
    d.main(["privacy", "--noise-multiplier", "1.5", "--sample-rate", "0.04", "--steps", "2250", "--delta", "1e-5"])
    out = capsys.readouterr().out
    assert "rdp: epsilon=7.329" in out and "pld: epsilon=6.768" in out, out
    d.main(["privacy", "--epsilon", "7.3293", "--sample-rate", "0.04", "--steps", "2250", "--delta", "1e-5"])
    assert "rdp: noise_multiplier=1.5" in capsys.readouterr().out
    d.main(["privacy", "--epsilon", "0.005", "--sample-rate", "0.01", "--steps", "100", "--delta", "1e-5"])
    out = capsys.readouterr().out  # the moments accountant cannot reach it (its conversion's floor); PLD can
    assert "rdp: --epsilon 0.005 is not allowed" in out and "pld: noise_multiplier=" in out, out


@pytest.mark.parametrize("bad,word", [
    (["--epsilon", "0"], "--epsilon"), (["--epsilon", "-1"], "--epsilon"), (["--delta", "1.5"], "--delta"),
    (["--delta", "0"], "--delta"),
    (["--sample-rate", "0"], "--sample-rate"), (["--sample-rate", "1.2"], "--sample-rate"),
    (["--steps", "-3"], "--steps"),
    (["--steps", "0"], "--steps"), (["--noise-multiplier", "-0.5"], "--noise-multiplier"),
    (["--noise-multiplier", "nan"], "--noise-multiplier"), (["--sample-rate", "nan"], "--sample-rate"),
])
def test_cli_privacy_bad_values(bad, word, capsys):
    args = {"--sample-rate": "0.01", "--steps": "100", "--delta": "1e-5", "--noise-multiplier": "1.0"}
    args.update(dict(zip(bad[::2], bad[1::2])))
    if "--epsilon" in args:
        args.pop("--noise-multiplier")
    code, err = run_main(capsys, "privacy", *[x for kv in args.items() for x in kv])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and word in lines[0] and "allowed" in lines[0], err


TINY_SENTIMENT = ["--num-sft", "200", "--num-ppo", "200", "--num-test", "16",
                  "--sft-steps", "3", "--sft-batch-size", "20",
                  "--ppo-steps", "2", "--ppo-batch-size", "16", "--ppo-minibatches", "2", *TINY_BASE]
TINY_REAL = TINY_SENTIMENT[6:]  # without the built-in task's sizes, which real data refuses


def test_sentiment_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = run_cli("sentiment", "--out", str(out), "--epsilon", "4", *TINY_SENTIMENT)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert set(s) == {"task", "model", "epsilon", "accountant", "delta", "seed", "secret_noise", "data", "stages",
                      "total_epsilon", "composition", "eval", "seconds", "config"}
    assert s["secret_noise"] is True and s["config"]["sft"]["steps"] == 3
    assert s["task"] == "sentiment" and s["composition"] == "parallel"
    for stage in ("sft", "ppo"):
        e = s["stages"][stage]
        assert set(e) == {"epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "num_private_examples",
                          "accountant"}
        assert 0 < e["epsilon"] <= 4 and e["delta"] <= 1 / e["num_private_examples"]
    assert s["stages"]["ppo"]["steps"] == 2 and s["stages"]["sft"]["steps"] == 3
    assert s["total_epsilon"] == max(e["epsilon"] for e in s["stages"].values())
    assert set(s["eval"]) == {"pretrained", "sft", "aligned"}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"ppo/reward_mean", "ppo/kl", "ppo/loss_policy", "ppo/loss_value", "ppo/clip_frac",
            "privacy/epsilon"} <= set(rows[-1])
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(out / "policy")
    AutoTokenizer.from_pretrained(out / "policy")
    assert (out / "policy" / "model.safetensors").exists()


def test_resume_after_ctrl_c_mid_ppo_gives_the_uninterrupted_ledger(tmp_path, capsys):
    """Ctrl-C mid-DPPPO leaves <out>.partial with a checkpoint and one line saying how to go on;
    --resume finishes the run with the ledger of an uninterrupted one (same steps, same epsilon)."""
    import signal
    flags = ["sentiment", "--epsilon", "4", *TINY_SENTIMENT, "--ppo-steps", "8", "--checkpoint-every", "3"]
    out, work = tmp_path / "run", tmp_path / "run.partial"
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "dp_rlhf.py"), *flags, "--out", str(out)],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                         env={**os.environ, "DP_RLHF_STATUS_EVERY": "0"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # (a background
    seen = []  # shell starts children with SIGINT ignored, and the program rightly keeps ignoring it)
    for line in p.stderr:
        seen.append(line)
        if line.startswith("ppo") and ": 4/8" in line:  # after iteration 4 finished, during iteration 5
            p.send_signal(signal.SIGINT)
            break
    tail = p.communicate(timeout=120)[1].strip().splitlines()
    assert p.returncode == 130, "".join(seen) + "\n".join(tail)
    assert tail[-1] == f"the unfinished run is in {work}: continue it with --resume {work}"
    assert not out.exists() and not [f for f in work.rglob("*") if f.name.endswith(".partial")]
    ckpt = d.Checkpoint(str(work), 0)  # per stage its state as of its last finished step: SFT done, DPPPO at >= 4
    assert ckpt.saved("sft")[0]["step"] == 3 and ckpt.saved("ppo")[0]["step"] >= 4 and ckpt.saved("rm") is None
    code, err = run_main(capsys, *flags, "--out", str(out))  # a new run would throw the interrupted one away
    assert code == 2 and f"--resume {work}" in err and (work / "checkpoint").exists()
    code, err = run_main(capsys, "sentiment", "--resume", str(work))
    assert code == 0, err[-3000:]
    assert "resume: ppo from step" in err and not work.exists()
    code, err = run_main(capsys, *flags, "--out", str(tmp_path / "whole"))
    assert code == 0, err[-3000:]
    resumed, whole = (json.loads((tmp_path / x / "summary.json").read_text()) for x in ("run", "whole"))
    assert resumed["stages"] == whole["stages"] and resumed["total_epsilon"] == whole["total_epsilon"]
    assert resumed["config"] == whole["config"] | {"out": str(out)}
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / x / "policy" / "model.safetensors") for x in ("run", "whole"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_resume_keeps_the_accountant_that_kept_the_ledger(tmp_path):
    """A checkpoint's settings without an accountant are a moments-accountant run's; a stage's ledger is
    restored only into the accountant that kept it, and then reads the same epsilon."""
    (tmp_path / "old" / "checkpoint").mkdir(parents=True)
    (tmp_path / "old" / "checkpoint" / "meta.json").write_text(json.dumps({"config": {"task": "sentiment"}}))
    assert d.resume_args(d.SentimentArgs, "sentiment", str(tmp_path / "old")).accountant == "rdp"
    model, plans = torch.nn.Linear(2, 1), {a: d.StagePlan(4.0, 1e-5, 100, 0.1, 3, 1.0, 1.0, a) for a in d.ACCOUNTANTS}
    for kept_by, other in (("rdp", "pld"), ("pld", "rdp")):
        state = d.TrainState.new(model, 0.1, plans[kept_by])
        state.account(plans[kept_by])
        d.Checkpoint(str(tmp_path / kept_by), 1, config={}).mark("sft", state, final=True)
        restored = d.Checkpoint(str(tmp_path / kept_by), 1).restore("sft", d.TrainState.new(model, 0.1, plans[kept_by]),
                                                                    plans[kept_by])
        assert restored.accountant.get_epsilon(1e-5) == state.accountant.get_epsilon(1e-5) > 0
        with pytest.raises(d.UserError, match=f"kept by the {kept_by} accountant"):
            d.Checkpoint(str(tmp_path / kept_by), 1).restore("sft", d.TrainState.new(model, 0.1, plans[other]),
                                                             plans[other])


def test_sentiment_non_private_writes_infinity(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_main(capsys, "sentiment", "--out", str(out), "--epsilon", "inf", *TINY_SENTIMENT)
    assert code == 0, err[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["stages"]["ppo"]["epsilon"] == math.inf and s["stages"]["ppo"]["noise_multiplier"] == 0
    assert "Infinity" in (out / "summary.json").read_text()


def test_sentiment_real_loading_path(tmp_path, tiny):
    """What a user downloads, made tiny: a GPT-2 dir, a sequence classifier dir, an IMDb jsonl."""
    from transformers import GPT2Config, GPT2ForSequenceClassification
    lm, tok = tiny
    model_dir, clf_dir, data = tmp_path / "gpt2", tmp_path / "clf", tmp_path / "imdb.jsonl"
    lm.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    clf = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, num_labels=2,
                                                   id2label={0: "NEGATIVE", 1: "POSITIVE"},
                                                   label2id={"NEGATIVE": 0, "POSITIVE": 1},
                                                   pad_token_id=tok.eos_token_id))
    clf.save_pretrained(clf_dir)
    tok.save_pretrained(clf_dir)
    with open(data, "w") as f:
        for r in d.make_reviews(120, seed=3):
            f.write(json.dumps({"text": r["text"], "label": int(r["label"] == "positive")}) + "\n")
    out = tmp_path / "run"
    r = run_cli("sentiment", "--model", str(model_dir), "--dataset", str(data), "--reward-model", str(clf_dir),
                "--out", str(out), "--sft-steps", "2", "--ppo-steps", "2", "--batch-size", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["model"] == str(model_dir)
    # a local file has no public test split: a keyed hash sends about 10 % of it to the test set
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    d1, d3, held = d.hash_split(rows, lambda r: r["text"], [0.45, 0.45, 0.1], seed=0)
    stages = s["stages"]
    assert stages["sft"]["num_private_examples"] == len(d1) and stages["ppo"]["num_private_examples"] == len(d3)
    assert s["data"]["public_test"] is False and s["data"]["sizes"]["test"] == len(held) > 0


@pytest.mark.parametrize("bad,word", [
    (["--epsilon", "-2"], "--epsilon"),
    (["--delta", "2"], "--delta"), (["--model", "/nonexistent/dir"], "/nonexistent/dir"),
    (["--dataset", "/tmp/nope.jsonl"], "nope.jsonl"),
    (["--ppo-whiten", "batch"], "whiten"), (["--ppo-lr-schedule", "cosine"], "cosine"),
    (["--ppo-epochs", "4"], "--ppo-epochs"), (["--sft-lr", "-1"], "--sft-lr"),
    (["--ppo-minibatches", "0"], "--ppo-minibatches"), (["--ppo-kl-coef", "-1"], "--ppo-kl-coef"),
    (["--seed", "-1"], "--seed"), (["--device", "tpu"], "--device tpu"),
    (["--ppo-response-max", "400"], "--ppo-response-max 400"),  # past the model's positions
    (["--sft-max-grad-norm", "inf"], "--sft-max-grad-norm"), (["--dataset", "missing.jsonl"], "missing.jsonl"),
    (["--model", "missing-dir"], "missing-dir"),  # a Hub id form: fails fast offline, names the value
])
def test_sentiment_bad_values_one_line_nothing_written(tmp_path, bad, word, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, err = run_main(capsys, "sentiment", "--out", str(out), *(TINY_REAL if "--dataset" in bad else TINY_SENTIMENT),
                         *bad)
    assert code == 2
    lines = [x for x in err.strip().splitlines() if not x.startswith(("pre-training", "built-in base model"))]
    assert len(lines) == 1 and word in lines[0], err[-2000:]  # (the first test to run builds the base model)
    assert not list(tmp_path.glob("run*"))  # neither the run nor its unfinished <out>.partial


def test_only_user_errors_become_one_line(monkeypatch, tmp_path, capsys):
    """A bug (any exception but UserError) keeps its traceback; Ctrl-C before any checkpoint
    leaves nothing behind and exits 130."""
    def bug(*a, **k):
        raise ValueError("a bug in an exercise")
    monkeypatch.setattr(d, "cmd_privacy", bug)
    with pytest.raises(ValueError, match="a bug in an exercise"):
        d.main(["privacy", "--sample-rate", "0.01", "--steps", "10", "--noise-multiplier", "1"])

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(d, "load_lm", interrupt)
    with pytest.raises(SystemExit) as e:
        d.main(["sentiment", "--out", str(tmp_path / "run"), *TINY_SENTIMENT])
    assert e.value.code == 130 and capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    assert not list(tmp_path.iterdir())


def _bad_jsonl(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("content,word", [
    ("", "is empty"), ("\n\n", "is empty"), ('{"text": "a good film"}\n{"text": "a bad fi', "cannot read"),
    ('{"text": "a good film"}\n{"text": null}\n', "row 1: column 'text' is None"),
    ('{"text": "a good film"}\n{"text": 5}\n', "row 1: column 'text' is 5"),
    ('{"text": ""}\n', "row 0: column 'text' is ''"),
])
def test_bad_dataset_files_one_line(tmp_path, content, word, capsys):
    data = _bad_jsonl(tmp_path / "data.jsonl", content)
    code, err = run_main(capsys, "sentiment", "--dataset", data, "--out", str(tmp_path / "run"), *TINY_REAL)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and word in lines[0] and "data.jsonl" in lines[0], err[-2000:]


def test_bad_model_directories_one_line(tmp_path, tiny, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel
    lm, tok = tiny
    no_tok = tmp_path / "no_tokenizer"
    lm.save_pretrained(no_tok)
    small = tmp_path / "small_vocab"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(small)
    tok.save_pretrained(small)
    for model, word in ((no_tok, "tokenizer"), (small, "100 token embeddings")):
        code, err = run_main(capsys, "sentiment", "--model", str(model), "--out", str(tmp_path / "run"),
                             *TINY_SENTIMENT)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and word in lines[0] and str(model) in lines[0], err[-2000:]


def test_out_is_refused_when_taken_and_replaced_whole_with_overwrite(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, err = run_main(capsys, "sentiment", "--out", str(afile), *TINY_SENTIMENT)
    assert code == 2 and "existing file" in err and afile.read_text() == "x"
    out = tmp_path / "run"
    out.mkdir()
    (out / "reward_model").mkdir()  # a stale file of another run
    (out / "summary.json").write_text("{}")
    code, err = run_main(capsys, "sentiment", "--out", str(out), *TINY_SENTIMENT)
    assert code == 2 and "--overwrite" in err and (out / "summary.json").read_text() == "{}"
    code, err = run_main(capsys, "sentiment", "--out", str(out), "--overwrite", *TINY_SENTIMENT)
    assert code == 0, err[-2000:]
    assert json.loads((out / "summary.json").read_text())["task"] == "sentiment"
    assert not (out / "reward_model").exists() and not list(tmp_path.glob("run.*"))  # replaced whole
    assert "sft (eps=4" in err and "ppo (eps=4" in err  # status lines without a terminal


def test_hub_unreachable_is_one_line_and_fast(tmp_path):
    """No network here (nor in CI): a Hub id must fail in seconds, in one line, without the test
    switching the Hub client to offline mode itself."""
    import time
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "empty_hf_home")
    for flags, word in ((["--model", "gpt2"], "gpt2"), (["--dataset", "stanfordnlp/imdb"], "stanfordnlp/imdb")):
        t = time.time()
        r = subprocess.run([sys.executable, os.path.join(HERE, "dp_rlhf.py"), "sentiment", *flags,
                            *(TINY_REAL if "--dataset" in flags else TINY_SENTIMENT),
                            "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120, env=env)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and word in lines[0] and "builtin" in lines[0], r.stderr[-2000:]
        assert time.time() - t < 30  # imports included; minutes of retries before


def test_cached_sampling_matches_full_forward(tiny):
    """The key/value-cached sampler's log-probs and hidden states (hence PPO's pi_old and V_old)
    equal a full forward over the sampled sequences (left-padded prompts, per-row lengths, EOS)."""
    import copy
    lm, tok = tiny
    policy = d.ActorCritic(d.add_lora(copy.deepcopy(lm)))
    for p in d.trainable(policy).values():
        torch.nn.init.normal_(p, std=0.05)
    ids, mask, _ = d.encode(tok, ["the film", "it is a very long", "i"], max_prompt=8)
    ro = d.rollout(policy, ids, mask, lengths=torch.tensor([5, 9, 3]), generator=torch.Generator().manual_seed(0),
                   eos_id=tok.eos_token_id)
    logits, values = policy(ro.ids, ro.mask)
    act = ro.action_mask
    assert act[:, :ids.shape[1] - 1].sum() == 0 and act.sum(1).tolist()[0] <= 5 and act.sum(1).tolist()[2] <= 3
    assert (ro.ids[:, 1:][act.bool()] != tok.pad_token_id).sum() >= 1
    torch.testing.assert_close(ro.logprobs, d.token_logprobs(logits, ro.ids) * act, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ro.values, values[:, :-1] * act, atol=1e-4, rtol=1e-4)


def test_rollout_in_chunks_is_the_rollout_whole(tiny):
    """Sampling and the reference pass `rollout_chunk_size` rows at a time give what the whole batch
    gives: the same draws (every step's uniforms are drawn at once), tokens, log-probs and values,
    also when chunks stop at different steps (eos, per-row lengths)."""
    import copy
    lm, tok = tiny
    policy = d.ActorCritic(d.add_lora(copy.deepcopy(lm)))
    for p in d.trainable(policy).values():
        torch.nn.init.normal_(p, std=0.05)
    prompts = ["the film", "it is a very long", "i", "watching it", "smith gives a", "the plot was", "but"]
    ids, mask, _ = d.encode(tok, prompts, max_prompt=8)
    lengths = torch.tensor([5, 9, 3, 12, 1, 7, 4])
    whole, *chunked = (d.rollout(policy, ids, mask, lengths=lengths, generator=torch.Generator().manual_seed(0),
                                 eos_id=tok.eos_token_id, chunk_size=c) for c in (0, 3, 1))
    whole_ref = d.reference_logprobs(policy, whole)
    for ro, c in zip(chunked, (3, 1)):
        assert torch.equal(ro.ids, whole.ids) and torch.equal(ro.action_mask, whole.action_mask)
        for name in ("logprobs", "values"):
            torch.testing.assert_close(getattr(ro, name), getattr(whole, name), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(d.reference_logprobs(policy, ro, c), whole_ref, atol=1e-5, rtol=1e-5)


def test_a_dpppo_iteration_never_runs_the_lm_head_on_more_rows_than_the_chunk(tiny):
    """Memory is set by the chunk, not the rollout batch: in sampling, the reference pass and the
    greedy baseline, the LM head (the [rows, tokens, vocabulary] tensors) sees at most
    `rollout_chunk_size` rows; the update, at most one trajectory per vmapped sample."""
    import copy
    lm, tok = tiny
    policy = d.ActorCritic(d.add_lora(copy.deepcopy(lm)))
    rows = []
    handle = policy.lm.lm_head.register_forward_hook(lambda module, inputs, out: rows.append(out.shape[0]))
    args = d.PPOArgs(steps=2, batch_size=40, rollout_chunk_size=8, baseline="greedy", response_min=3, response_max=5)
    prompts = ["the film was", "it is a", "i loved the", "but the"] * 10
    try:
        d.dpppo(policy, tok, prompts, lambda p, r: torch.zeros(len(r)), d.plan_stage(args, 40, 4.0, 1e-3), args,
                generator=torch.Generator().manual_seed(0), eos_id=tok.eos_token_id)
    finally:
        handle.remove()
    assert max(rows) == 8 and len(rows) > 10  # q = 1: 40 trajectories an iteration, in chunks of 8


# ------------------------------------------------------------------------------------ RLHF


@pytest.mark.unit
def test_sentiment_repeats_counts_a_word_said_three_times_in_a_row():
    texts = [" loved loved loved it", " i loved it . i loved it", " the the end", " soundtrack . the the the", " loved"]
    m = d.sentiment_metrics(None, None, texts, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert m == {"reward": 3.0, "repeats": 2 / 5}  # "loved loved loved" and "the the the"; "loved" apart is fine


@pytest.mark.unit
def test_rouge_worked_example():
    # By hand: unigram overlap 6 (the x2, quick, brown, dog, jumps) of 8 predicted / 9 reference;
    # bigram overlap 2 (the quick, quick brown) of 7 / 8; LCS "the quick brown jumps the" = 5.
    s = d.rouge("The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog")
    f = lambda p, r: 2 * p * r / (p + r)
    assert s["rouge1"] == pytest.approx(f(6 / 8, 6 / 9))
    assert s["rouge2"] == pytest.approx(f(2 / 7, 2 / 8))
    assert s["rougeL"] == pytest.approx(f(5 / 8, 5 / 9))
    assert d.rouge("", "a b")["rouge1"] == 0.0 and d.rouge("a b", "a b")["rougeL"] == 1.0


@pytest.mark.unit
def test_reward_loss_by_hand():
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.r = torch.nn.Parameter(torch.tensor([1.5, -0.5]))

        def forward(self, ids, mask, response_mask):
            assert ids.shape == mask.shape == (2, 3) and response_mask.shape == (2, 2), \
                "the reward model scores the comparison's pair at once: ids, mask [2, T], response_mask [2, T-1]"
            return self.r
    rm = Fixed()
    ids, mask, response_mask = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.ones(2, 2)
    loss_fn = d.reward_loss(rm)
    loss, correct = loss_fn(dict(rm.named_parameters()), ids, mask, response_mask)
    assert loss.shape == () and correct.shape == (), "returns (loss, correct): two scalar tensors"
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0))), \
        f"loss {loss.item():.4f}: -log sigma(r_chosen - r_rejected) = log(1 + e^-2), and row 0 is the chosen"
    assert correct.item() == 1.0 and not correct.requires_grad, "correct: 1.0, detached, when r[0] > r[1]"
    loss.backward()
    s = 1 / (1 + math.exp(2.0))  # d loss / d r_chosen = -sigma(r_rejected - r_chosen)
    _close(rm.r.grad, torch.tensor([-s, s]), "the loss's gradient reaches both scores: -sigma(-2) and sigma(-2)")
    for r, want, right, what in [((-0.5, 1.5), math.log1p(math.exp(2.0)), 0.0, "the rejected scores higher"),
                                 ((0.3, 0.3), math.log(2), 0.0, "a tie (not a correct ranking: r[0] > r[1] strictly)"),
                                 ((-60.0, 60.0), 120.0, 0.0, "a large margin: -log sigma(-120) = 120 is finite (use "
                                  "logsigmoid: log(sigmoid(-120)) is log 0 in float32)")]:
        with torch.no_grad():
            rm.r.copy_(torch.tensor(r))
        loss, correct = loss_fn(dict(rm.named_parameters()), ids, mask, response_mask)
        assert loss.item() == pytest.approx(want, rel=1e-5) and correct.item() == right, \
            f"{what}: loss {loss.item()}, correct {correct.item()}; want {want:.4f} and {right}"


@pytest.mark.unit
def test_reward_loss_under_vmap_on_a_small_gpt2(small_gpt2):
    """dp_reward_model differentiates reward_loss's closure per comparison, vmap(grad(loss_fn)): it must run there,
    give `correct` per comparison, and a comparison the gradient it has alone."""
    import copy
    gen = torch.Generator().manual_seed(0)
    rm = _randomised(d.RewardModel(d.add_lora(copy.deepcopy(small_gpt2)), pad_token_id=0), gen)
    ids, mask = torch.randint(1, 64, (3, 2, 8), generator=gen), torch.ones(3, 2, 8, dtype=torch.long)
    mask[2, :, :2] = 0  # comparison 2: a prompt of 2 tokens, left-padded to 4
    mask[0, 1, 6:] = 0  # comparison 0: a shorter rejected completion
    ids, mask = torch.cat([ids[:1], ids[:1].flip(1), ids[2:]]) * mask, torch.cat([mask[:1], mask[:1].flip(1), mask[2:]])
    response_mask = mask[..., 1:].float()
    response_mask[..., :3] = 0  # comparison 1 is comparison 0 swapped: one of them is ranked right
    loss_fn = d.reward_loss(rm)
    params = {k: p.detach() for k, p in d.trainable(rm).items()}
    try:
        grads, correct = d.per_sample_grads(loss_fn, params, ids, mask, response_mask, has_aux=True)
    except Exception as e:
        raise AssertionError(f"reward_loss's closure fails under torch.func.vmap ({type(e).__name__}: {e}): no "
                             ".item(), float() or Python if on a tensor") from e
    with torch.no_grad():
        r = torch.stack([rm(ids[i], mask[i], response_mask[i]) for i in range(3)])
    _close(correct, (r[:, 0] > r[:, 1]).float(), "under vmap, correct is 1.0 where the chosen (row 0) scores higher")
    assert all(g.shape[0] == 3 and g.isfinite().all() for g in grads.values()), "one finite gradient per comparison"
    alone = torch.func.grad(loss_fn, has_aux=True)(params, ids[2], mask[2], response_mask[2])[0]
    for k in params:
        _close(grads[k][2], alone[k], "under vmap, comparison 2's gradient is the one it has alone", atol=1e-6,
               rtol=1e-4)


def test_one_comparison_is_one_per_sample_gradient(tiny):
    import copy
    lm, tok = tiny
    rm = d.RewardModel(d.add_lora(copy.deepcopy(lm)))
    for p in lora_parameters(rm).values():
        torch.nn.init.normal_(p, std=0.05)
    params = {k: v.detach() for k, v in d.trainable(rm).items()}
    assert "score.weight" in params
    enc = lambda cmps: d.encode_comparisons(tok, [c[0] for c in cmps], [c[1] for c in cmps], [c[2] for c in cmps],
                                            max_prompt=32, max_completion=16)
    a = enc([("post : my dog ran away tl;dr :", " my dog ran away", " cats"), ("post : hi tl;dr :", " hi", " no")])
    b = enc([("post : my dog ran away tl;dr :", " my dog ran away", " cats"),
             ("post : a much longer post about my sister and her car tl;dr :",
               " my sister took the car and i am sad .", " ok")])
    assert a[0].shape != b[0].shape
    ga = d.per_sample_grads(d.reward_loss(rm), params, *a, has_aux=True)[0]
    gb = d.per_sample_grads(d.reward_loss(rm), params, *b, has_aux=True)[0]
    for k in params:
        assert ga[k].shape[0] == 2  # one gradient per comparison, not per sequence
        torch.testing.assert_close(ga[k][0], gb[k][0], atol=1e-6, rtol=1e-5)


def test_builtin_rlhf_splits_are_disjoint():
    data, report = d.rlhf_data(d.RLHFArgs(num_sft=300, num_comparisons=300, num_ppo=300, num_test=50,
                                          num_comparisons_test=50))
    posts = {k: {r["prompt"] for r in v} for k, v in data.items()}
    names = list(posts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not posts[a] & posts[b], (a, b)
    # D1 and D3 are drawn by the keyed hash, 1/2 each of 600 posts: within 4 standard deviations
    assert abs(len(data["sft"]) - 300) < 4 * math.sqrt(150) and len(data["sft"]) + len(data["ppo"]) == 600
    assert len(data["comparisons"]) == 300 and len(data["test"]) == 50 and len(data["comparisons_test"]) == 50
    assert report["sizes"] == {k: len(v) for k, v in data.items()}


def test_ledger_parallel_and_sequential_against_hand_composition():
    stages = {"sft": dict(sample_rate=0.01, noise_multiplier=1.0, steps=300),
              "rm": dict(sample_rate=0.02, noise_multiplier=0.9, steps=100),
              "ppo": dict(sample_rate=0.05, noise_multiplier=1.2, steps=40)}
    for s in stages.values():
        s["epsilon"] = eps_of(s["sample_rate"], s["noise_multiplier"], s["steps"], 1e-5)[0]
    assert d.compose_ledger(stages, 1e-5, "parallel") == max(s["epsilon"] for s in stages.values())
    # Sequential, by hand: add the three RDP curves order by order, then convert once.
    rdp = np.zeros(len(ORDERS))
    for s in stages.values():
        for i, a in enumerate(ORDERS):
            rdp[i] += s["steps"] * d.compute_rdp(q=s["sample_rate"], noise_multiplier=s["noise_multiplier"], steps=1,
                                                 orders=[a])[0]
    eps = min(r + math.log1p(-1 / a) - (math.log(1e-5) + math.log(a)) / (a - 1) for a, r in zip(ORDERS, rdp))
    seq = d.compose_ledger(stages, 1e-5, "sequential")
    assert seq == pytest.approx(eps, rel=1e-9)
    assert max(s["epsilon"] for s in stages.values()) < seq < sum(s["epsilon"] for s in stages.values())


TINY_RLHF = ["--num-sft", "120", "--num-comparisons", "120", "--num-ppo", "120", "--num-test", "8",
             "--sft-steps", "2", "--rm-steps", "2", "--ppo-steps", "2", "--batch-size", "16",
             "--ppo-minibatches", "2", "--ppo-response-min", "8", "--ppo-response-max", "8", *TINY_BASE]


def test_rlhf_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = run_cli("rlhf", "--out", str(out), "--epsilon", "2", "--rm-epsilon", "1", "--composition", "sequential",
                *TINY_RLHF)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["task"] == "rlhf" and s["composition"] == "sequential" and set(s["stages"]) == {"sft", "rm", "ppo"}
    for name, e in s["stages"].items():  # --rm-epsilon overrides one stage's target (ablations)
        assert 0 < e["epsilon"] <= (1 if name == "rm" else 2) and e["delta"] <= 1 / e["num_private_examples"]
    assert s["stages"]["sft"]["epsilon"] > 1
    assert s["total_epsilon"] == pytest.approx(d.compose_ledger(s["stages"], s["delta"], "sequential"))
    for name in ("pretrained", "sft", "aligned"):
        assert set(s["eval"][name]) == {"reward", "rouge1", "rouge2", "rougeL", "true_preference"}
    assert 0 <= s["eval"]["rm_accuracy"] <= 1
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("rm/accuracy" in r for r in rows) and any("ppo/kl" in r for r in rows)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / "policy")
    rm, tok = d.load_reward_model(str(out / "reward_model"))  # the default `tokens` head
    assert rm.head == "tokens" and rm.loglik_coef.item() != 3.0 and tok is not None  # trained from its prior


@pytest.mark.parametrize("head", ["last", "tokens"])
def test_saved_reward_model_scores_like_ours(tmp_path, tiny, head):
    import copy
    from transformers import AutoModelForSequenceClassification
    lm, tok = tiny
    rm = d.RewardModel(d.add_lora(copy.deepcopy(lm)), head=head).eval()
    for p in lora_parameters(rm).values():
        torch.nn.init.normal_(p, std=0.05)
    d.save_reward_model(rm, tok, str(tmp_path / "rm"))
    prompts, summaries = ["post : my dog ran away tl;dr :", "post : hi tl;dr :"], [" my dog ran", " hi there"]
    ours = d.reward_model_scores(rm, tok, prompts, summaries, max_prompt=32, max_completion=16, device="cpu")
    assert ours.shape == (2,)
    if head == "tokens":  # LoRA merged into the LM + reward_head.safetensors
        loaded, _ = d.load_reward_model(str(tmp_path / "rm"))
        theirs = d.reward_model_scores(loaded, tok, prompts, summaries, max_prompt=32, max_completion=16, device="cpu")
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
        return
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    for i in range(2):  # as training encodes it, ending with eos (= pad): HF reads the last non-pad token
        ids, mask, _ = d.encode(tok, prompts[i:i + 1], summaries[i:i + 1], max_prompt=32, max_completion=16)
        assert ids[0, -1] == tok.eos_token_id == tok.pad_token_id
        with torch.no_grad():
            theirs = clf(input_ids=ids, attention_mask=mask).logits[0, 0]
        torch.testing.assert_close(theirs, ours[i], atol=1e-5, rtol=1e-4)  # ours: scored in a left-padded batch


def test_rlhf_real_loading_path(tmp_path, tiny, capsys):
    lm, tok = tiny
    model_dir = tmp_path / "gpt2"
    lm.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows, cmps = d.make_tldr(60, 40, seed=9)
    with open(tmp_path / "tldr.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": r["prompt"], "label": r["label"]}) + "\n" for r in rows)
    with open(tmp_path / "cmp.jsonl", "w") as f:
        f.writelines(json.dumps({k: c[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for c in cmps)
    out = tmp_path / "run"
    r = run_cli("rlhf", "--model", str(model_dir), "--dataset", str(tmp_path / "tldr.jsonl"), "--comparisons",
                str(tmp_path / "cmp.jsonl"), "--out", str(out), "--sft-steps", "2", "--rm-steps", "2", "--ppo-steps",
                "2", "--batch-size", "8", "--ppo-response-min", "6", "--ppo-response-max", "6")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert "true_preference" not in s["eval"]["aligned"]
    cmps = [json.loads(x) for x in (tmp_path / "cmp.jsonl").read_text().splitlines()]
    d2, d2_held = d.hash_split(cmps, lambda c: c["prompt"], [0.9, 0.1], seed=0)
    assert s["stages"]["rm"]["num_private_examples"] == len(d2) and len(d2_held) >= 2  # the held-out tenth
    code, err = run_main(capsys, "rlhf", "--model", str(model_dir), "--dataset", str(tmp_path / "tldr.jsonl"),
                         "--out", str(out / "x"))
    assert code == 2 and "--comparisons" in err.strip().splitlines()[-1]


def test_sweep_prints_the_table_with_seeds_and_confidence_intervals(tmp_path, capsys):
    out = tmp_path / "sweep"
    r = run_cli("sentiment", "--out", str(out), "--sweep", "2,inf", "--seeds", "0,1", *TINY_SENTIMENT)
    assert r.returncode == 0, r.stderr[-3000:]
    table = (out / "table.md").read_text()
    assert "eps=2" in table and "eps=inf" in table and "recovered" in table and "±" in table and table in r.stdout
    runs = [json.loads((out / f"eps2-seed{s}" / "summary.json").read_text()) for s in (0, 1)]
    assert [x["seed"] for x in runs] == [0, 1] and all(x["stages"]["ppo"]["epsilon"] <= 2 for x in runs)
    mean, ci = d.mean_ci([x["eval"]["aligned"]["reward"] for x in runs])
    assert f"{mean:+.3f} ± {ci:.3f}" in table
    csv = (out / "results.csv").read_text().splitlines()
    assert csv[0] == "metric,model,epsilon,seed,value"
    assert f"reward,aligned,2,1,{runs[1]['eval']['aligned']['reward']}" in csv
    code, err = run_main(capsys, "sentiment", "--out", str(out), "--sweep", "2,inf", "--seeds", "0,1", *TINY_SENTIMENT)
    assert code == 0 and err.count("reusing") == 4 and (out / "table.md").read_text() == table
    code, err = run_main(capsys, "sentiment", "--out", str(out), "--sweep", "2,abc", *TINY_SENTIMENT)
    assert code == 2 and "--sweep" in err.strip().splitlines()[-1]


@pytest.mark.unit
def test_mean_ci_and_recovered_by_hand():
    mean, ci = d.mean_ci([1.0, 2.0, 3.0])  # sd 1, t(2 dof) = 4.303
    assert mean == 2.0 and ci == pytest.approx(4.303 / math.sqrt(3))
    run = lambda seed, pre, aligned: {"seed": seed, "eval": {"pretrained": {"m": pre}, "aligned": {"m": aligned}}}
    results = {4.0: [run(0, 0.0, 1.0), run(1, 0.0, 0.5)], math.inf: [run(0, 0.0, 2.0), run(1, 0.0, -1.0)]}
    # the second seed's non-private run ends below the pre-trained model: no gain to recover, left out
    assert d.recovered(d.sweep_rows(results, "sentiment"), 4.0, "m") == [0.5]


@pytest.mark.unit
def test_audit_sweep_table_by_hand():
    """An audit sweep's table from two seeds' summaries: the claim (mean ± CI), each observer's bound per seed, the
    run's real epsilon when the noise was scaled, TPRs as means over seeds; results.csv's rows carry all of it."""
    def audit(seed, scale, spent, bounds, tprs):
        return {"seed": seed, "epsilon_claimed": 1.0, "noise_scale": scale, "stages": {"sft": {"epsilon": spent}},
                "epsilon_lower_bound": bounds[0], "fpr": [0.001, 0.01, 0.1], "mechanism_tpr_at_fpr": [0.0, 0.1, 0.2],
                "every_step": {"epsilon_lower_bound": bounds[0], "tpr_at_fpr": tprs},
                "final": {"epsilon_lower_bound": bounds[1], "tpr_at_fpr": [0.0, 0.0, 0.1]}}
    rows = d.sweep_rows({1.0: [audit(0, 0.25, 6.0, (1.5, 0.5), [0.1, 0.2, 0.4]),
                               audit(1, 0.25, 6.5, (2.0, 0.25), [0.3, 0.4, 0.6])]}, "audit")
    assert ("epsilon_lower_bound", "final", 1.0, 1, 0.25) in rows and len(rows) == 2 * 15
    assert d.sweep_table(rows, "audit").splitlines()[2:] == [
        "| | eps=1 |", "|---|---|", "| claimed | +1.000 ± 0.000 |",
        "| run with noise x, really | x0.25: 6.00 / x0.25: 6.50 |",
        "| lower bound, every-step | 1.50 / 2.00 |", "| lower bound, final | 0.50 / 0.25 |",
        "| TPR, claimed mechanism | 0.000 / 0.100 / 0.200 |", "| TPR, every-step attack | 0.200 / 0.300 / 0.500 |",
        "| TPR, final-iterate attack | 0.000 / 0.000 / 0.100 |"]


# ------------------------------------------------------------------------------------ privacy hardening


def _policy_weights(path):
    from safetensors.torch import load_file
    return load_file(str(path / "policy" / "model.safetensors"))


def test_noise_is_secret_by_default_and_reproducible_only_on_request(tmp_path, capsys):
    """Same --seed: default runs differ (noise, Poisson samples and rollouts come from OS entropy);
    with --reproducible-noise they are identical, and summary.json says which. In one process: each
    run reseeds the public generator, so noise drawn from it would repeat here too."""
    outs = {}
    for name, extra in (("a", []), ("b", []), ("c", ["--reproducible-noise"]), ("d", ["--reproducible-noise"])):
        out = tmp_path / name
        code, err = run_main(capsys, "sentiment", "--out", str(out), "--epsilon", "4", *TINY_SENTIMENT, "--ppo-steps",
                             "1", *extra)
        assert code == 0, err[-3000:]
        assert ("warning: --reproducible-noise" in err) == bool(extra)
        assert json.loads((out / "summary.json").read_text())["secret_noise"] is (not extra)
        outs[name] = _policy_weights(out)
    assert any(not torch.equal(outs["a"][k], outs["b"][k]) for k in outs["a"])
    assert all(torch.equal(outs["c"][k], outs["d"][k]) for k in outs["c"])


def test_private_generator_is_not_the_seed():
    draws = [d.private_generator().initial_seed() for _ in range(3)]
    assert len(set(draws)) == 3 and 0 not in draws
    assert d.private_generator(7).initial_seed() == 7


def test_nonfinite_per_sample_gradient_counts_as_zero():
    g = {"w": torch.tensor([[3.0, 4.0], [float("nan"), 1.0], [0.3, 0.4]]),
         "b": torch.tensor([[1.0], [2.0], [float("inf")]])}
    out = d.privatize(g, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=4.0)
    ref = d.privatize({k: v[:1] for k, v in g.items()}, max_grad_norm=1.0, noise_multiplier=0.0,
                      expected_batch_size=4.0)
    for k in g:  # rows 1 and 2 are dropped to zero; row 0 alone remains
        _close(out[k], ref[k], "a sample with a non-finite coordinate counts as zero, whole: none of its coordinates "
               "may reach the sum (row 1 is [nan, 1] and [2], row 2 [0.3, 0.4] and [inf])")
    assert d.finite_rows(g).tolist() == [True, False, False]


def test_nonfinite_gradients_are_logged_and_training_goes_on(tiny):
    import copy
    lm, tok = tiny
    model = d.CausalLM(d.add_lora(copy.deepcopy(lm)))
    texts = [r["text"] for r in d.make_reviews(40, seed=1)]
    ids, mask, loss_mask = d.encode(tok, [""] * 40, texts, max_prompt=0, max_completion=20)
    poison = torch.zeros(40)
    poison[:20] = 1.0  # half the records overflow
    base = d.sft_loss(model)

    def loss_fn(params, ids, mask, loss_mask, poison):  # a poisoned row's gradient is inf * g
        return base(params, ids, mask, loss_mask) * torch.where(poison[0] > 0, math.inf, 1.0)
    rows = []
    args = d.SFTArgs(steps=3, batch_size=20, lr=1e-2)
    d.dp_train("sft", model, loss_fn, (ids, mask, loss_mask, poison[:, None].expand(-1, ids.shape[1])),
               d.plan_stage(args, 40, 4.0, 1e-3), args, generator=torch.Generator().manual_seed(0),
               hooks=d.RunHooks(log=rows.append))
    assert rows[-1]["sft/nonfinite_grads"] > 0
    assert all(torch.isfinite(p).all() for p in lora_parameters(model).values())


def test_dpppo_takes_noise_only_steps_on_an_empty_batch(tiny):
    """An empty Poisson batch is a normal outcome: the iteration still makes its noisy update and
    its accountant step."""
    import copy
    lm, tok = tiny
    policy = d.ActorCritic(d.add_lora(copy.deepcopy(lm)))
    before = {k: v.clone() for k, v in d.trainable(policy).items()}
    rows = []
    args = d.PPOArgs(steps=3, batch_size=1e-9, response_min=2, response_max=3)
    entry = d.dpppo(policy, tok, ["the film", "it was"] * 50, d.builtin_sentiment_reward,
                    d.plan_stage(args, 100, 4.0, 1e-3), args, generator=torch.Generator().manual_seed(0),
                    hooks=d.RunHooks(log=rows.append))
    assert [r["ppo/batch_size"] for r in rows] == [0, 0, 0]
    assert entry["steps"] == 3 and 0 <= entry["epsilon"] <= 4.0  # (q T < delta here: the PLD spends 0)
    assert any(not torch.equal(before[k], p) for k, p in d.trainable(policy).items())  # the noise moved them


def test_cli_ppo_batch_size_two_survives_empty_batches(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_main(capsys, "sentiment", "--out", str(out), *TINY_SENTIMENT, "--num-ppo", "400",
                         "--ppo-batch-size", "2", "--ppo-steps", "12", "--reproducible-noise")  # seed 0: empty batches
    assert code == 0, err[-3000:]
    sizes = [json.loads(x)["ppo/batch_size"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "ppo/batch_size" in x]
    assert 0 in sizes and len(sizes) == 12


def test_finite_epsilon_with_infinite_clipping_is_refused(tmp_path, capsys):
    for bad in (["--sft-max-grad-norm", "inf"], ["--epsilon", "inf", "--sft-epsilon", "4", "--sft-max-grad-norm",
                                                 "inf"], ["--ppo-epsilon", "0"]):  # a stage's own epsilon too
        code, err = run_main(capsys, "sentiment", "--out", str(tmp_path / "run"), *TINY_SENTIMENT, *bad)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and bad[-2] in lines[0], err[-2000:]
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError):
        d.privatize({"w": torch.zeros(2, 3)}, max_grad_norm=math.inf, noise_multiplier=1.0, expected_batch_size=2)


def test_builtin_private_data_shares_no_text_with_the_public_corpus():
    base = d.BaseModelArgs()
    docs, texts = d.public_corpus(base)
    public = set(texts)
    assert len(public) > 20_000 and len(docs) == len(texts)
    data, _ = d.sentiment_data(d.SentimentArgs(seed=0))
    clash = [r["text"] for part in data.values() for r in part if r["text"] in public]
    assert not clash, clash[:3]
    data, _ = d.rlhf_data(d.RLHFArgs(seed=0, num_sft=500, num_comparisons=500, num_ppo=500, num_test=50,
                                     num_comparisons_test=50))
    assert not [r for part in data.values() for r in part if r["meta"]["post"] in public]


def _records(n, seed=0):
    return [{"prompt": r["prompt"], "label": r["label"]} for r in d.make_tldr(n, 0, seed=seed)[0]]


def test_hash_split_moves_no_other_record_when_one_is_added_or_removed():
    rows = _records(300)
    key = lambda r: r["prompt"]
    parts = d.hash_split(rows, key, [0.45, 0.45, 0.1], seed=3)
    where = {r["prompt"]: i for i, part in enumerate(parts) for r in part}
    assert sum(map(len, parts)) == 300 and all(len(p) > 10 for p in parts)
    for changed in (rows[1:], rows[:150] + [{"prompt": "post : a new user tl;dr :", "label": "x"}] + rows[150:],
                    list(reversed(rows))):
        again = d.hash_split(changed, key, [0.45, 0.45, 0.1], seed=3)
        for i, part in enumerate(again):
            assert all(where.get(r["prompt"], i) == i for r in part)
    other = d.hash_split(rows, key, [0.45, 0.45, 0.1], seed=4)  # the key of the hash is the seed
    assert [len(p) for p in other] != [len(p) for p in parts] or other[0] != parts[0]
    # the key is normalised: case and spacing do not move a record
    same = [{"prompt": f"Post :  Case {i}"} for i in range(20)] + [{"prompt": f"post : case {i}"} for i in range(20)]
    a, b = d.hash_split(same, key, [0.5, 0.5], 3)
    assert {d.normalise(r["prompt"]) for r in a}.isdisjoint({d.normalise(r["prompt"]) for r in b}) and a and b


def test_real_rlhf_data_one_user_one_stage(tmp_path):
    """The SFT file and the comparisons file share posts: those leave D1 and D3, and the counts
    are reported; with --user-column, a user's records all go to one stage."""
    rows = _records(200)
    cmps = [{"prompt": r["prompt"], "chosen": r["label"], "rejected": "no ."} for r in rows[:60]]  # 60 shared posts
    cmps += [{"prompt": f"post : other {i} tl;dr :", "chosen": "a", "rejected": "b"} for i in range(60)]
    for name, recs in (("sft.jsonl", rows), ("cmp.jsonl", cmps)):
        with open(tmp_path / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    args = d.RLHFArgs(dataset=str(tmp_path / "sft.jsonl"), comparisons=str(tmp_path / "cmp.jsonl"), seed=0)
    data, report = d.rlhf_data(args)
    posts = {k: {d.normalise(r["prompt"]) for r in v} for k, v in data.items()}
    d2 = posts["comparisons"] | posts["comparisons_test"]
    assert not (posts["sft"] | posts["ppo"] | posts["test"]) & d2
    assert not posts["sft"] & posts["ppo"]
    assert report["dropped_tldr_rows_with_comparisons"] == 60
    assert len(data["sft"]) + len(data["ppo"]) + len(data["test"]) == 140
    # by user: 35 users wrote 4 posts each; every user lands in exactly one of D1 / D3 / test
    with open(tmp_path / "sft_u.jsonl", "w") as f:
        f.writelines(json.dumps({**r, "user": f"u{i % 35}"}) + "\n" for i, r in enumerate(rows[60:]))
    with open(tmp_path / "cmp_u.jsonl", "w") as f:
        f.writelines(json.dumps({**c, "user": f"v{i % 7}"}) + "\n" for i, c in enumerate(cmps))
    args = d.RLHFArgs(dataset=str(tmp_path / "sft_u.jsonl"), comparisons=str(tmp_path / "cmp_u.jsonl"), seed=0,
                      user_column="user")
    data, report = d.rlhf_data(args)
    users = {k: {r["user"] for r in v} for k, v in data.items() if k in ("sft", "ppo", "test")}
    assert not users["sft"] & users["ppo"] and not users["sft"] & users["test"] and not users["ppo"] & users["test"]
    assert report["max_records_per_unit"]["sft"] == 4 and report["units"]["sft"] == len(users["sft"])


# ------------------------------------------------------------------------------------ neighbouring datasets
# Parallel composition and each stage's sensitivity argument need every stage input to be a function
# of its own record (or unit) alone. These tests add or remove one record (one user with a user
# column) and assert that no other unit's stage membership or exact input changes.


def _by_unit(inputs: dict) -> dict:
    """unit key -> the sorted (stage, input, tokens) of all its records: what each unit gives each stage."""
    out = {}
    for stage, lines in inputs.items():
        for x in lines:
            out.setdefault(x["key"], []).append((stage, json.dumps(x["input"], sort_keys=True),
                                                 json.dumps(x["tokens"])))
    return {k: sorted(v) for k, v in out.items()}


def _assert_only_changed(task, tok, args, load, records, neighbour, changed_units):
    """`load(records)` and `load(neighbour)` (the split, through files where there are files) give
    the same stage and the same inputs to every unit but `changed_units`, and each unit's records
    sit in one stage."""
    a, b = (d.stage_inputs(task, load(r), tok, args, tokens=True) for r in (records, neighbour))
    for inputs in (a, b):
        stage_of = {}
        for stage, lines in inputs.items():
            for x in lines:
                assert stage_of.setdefault(x["key"], stage) == stage, f"a unit in {stage_of[x['key']]} and {stage}"
    a, b = _by_unit(a), _by_unit(b)
    changed = {d.unit_key(d.normalise(u), args.seed) for u in changed_units}
    assert len(a) > 20 and len(set(a) ^ set(b)) <= len(changed)
    moved = [k for k in set(a) & set(b) if a[k] != b[k] and k not in changed]
    assert not moved, f"{len(moved)} other units' inputs moved, e.g. {str(a[moved[0]])[:200]}"
    assert {k for k in set(a) | set(b) if a.get(k) != b.get(k)} <= changed


def _new_review(i):
    return {"text": d.make_reviews(1, seed=900 + i)[0]["text"] + f" extra {i} ."}


def _writer(tmp_path, fmt):
    """records -> a file of them (.jsonl: each value keeps its JSON type; .csv: all text)."""
    def write(name, records):
        path = tmp_path / f"{name}.{fmt}"
        if fmt == "csv":
            import csv
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=sorted({k for r in records for k in r}))
                w.writeheader()
                w.writerows(records)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(path)
    return write


@pytest.mark.parametrize("path", ["builtin", "jsonl", "csv-users", "jsonl-users"])
def test_sentiment_inputs_move_only_for_the_added_or_removed_record(tiny, tmp_path, path):
    """Built-in data through the split; files through `sentiment_data` (loading included), with
    integer user ids beside a newcomer whose id is a float and a very long review."""
    lm, tok = tiny
    users, fmt = path.endswith("users"), path.split("-")[0]
    args = d.SentimentArgs(num_sft=5, num_ppo=5, num_test=5, base=TINY_BASE_ARGS, seed=1)  # caps would bind
    if path == "builtin":
        args = dataclasses.replace(args, num_sft=150, num_ppo=150, num_test=30)
        records, public = d.sentiment_records(args)
        load = lambda rs: d.split_sentiment(rs, public, args)[0]
    else:
        ids = (lambda i: f"{i % 60:03d}") if fmt == "csv" else (lambda i: i % 60)  # "007" must stay "007"
        reviews = d.make_reviews(300, 5)
        records = [{"text": r["text"], **({"user": ids(i)} if users else {})} for i, r in enumerate(reviews)]
        write = _writer(tmp_path, fmt)
        args = dataclasses.replace(args, dataset="reviews", user_column="user" if users else None)
        load = lambda rs: d.sentiment_data(dataclasses.replace(args, dataset=write("reviews", rs)))[0]
    unit = (lambda r: r["user"]) if users else (lambda r: r["text"])
    for j in (0, 7, 150):  # remove one record (with a user column: one user, all of their records)
        gone = unit(records[j])
        _assert_only_changed("sentiment", tok, args, load, records, [r for r in records if unit(r) != gone], [gone])
    long = {"text": " ".join(r["text"] for r in d.make_reviews(30, seed=77))}
    newcomer = "newcomer" if fmt == "csv" else 3.5  # an id of another type than everyone else's
    new = [{**_new_review(i), "user": newcomer} for i in range(3)] if users else [_new_review(0), long]
    for at in (0, 151):  # add one (a new user with three reviews), anywhere in the file
        for added in ([new[0]], new[1:]) if not users else (new,):
            _assert_only_changed("sentiment", tok, args, load, records, records[:at] + added + records[at:],
                                 [unit(x) for x in added])


def test_a_positional_prompt_length_draw_would_fail_the_neighbour_test(tiny, tmp_path, monkeypatch):
    """The break-it check: the prompt-length draw these tests replaced (one seeded stream consumed
    review by review) moves most prompts when one review is removed, and the test catches it."""
    def positional(tokenizer, texts, lo, hi, seed):
        rng = np.random.default_rng(seed)
        return [tokenizer.decode(t[:int(rng.integers(lo, hi + 1))])
                for t in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    monkeypatch.setattr(d, "prefix_prompts", positional)
    with pytest.raises(AssertionError, match="other units' inputs moved"):
        test_sentiment_inputs_move_only_for_the_added_or_removed_record(tiny, tmp_path, "jsonl")


def _tldr_files(users: bool):
    """TL;DR rows and comparisons that share posts (and, with users, users who share post texts)."""
    rows, cmps = d.make_tldr(240, 120, seed=11)
    rows = [{"prompt": r["prompt"], "label": r["label"]} for r in rows]
    cmps = [{k: c[k] for k in ("prompt", "chosen", "rejected")} for c in cmps]
    cmps += [{"prompt": r["prompt"], "chosen": r["label"], "rejected": "no ."} for r in rows[:40]]  # shared posts
    if users:
        rows = [{**r, "user": i % 50} for i, r in enumerate(rows)]
        rows += [{**r, "user": f"w{i % 20}"} for i, r in enumerate(rows[100:160])]  # two users, one post text
        cmps = [{**c, "user": f"v{i % 30}" if i % 3 else i % 50} for i, c in enumerate(cmps)]
    return rows, cmps


@pytest.mark.parametrize("path", ["builtin", "jsonl", "jsonl-users", "csv-users"])
def test_rlhf_inputs_move_only_for_the_added_or_removed_unit(tiny, tmp_path, path):
    lm, tok = tiny
    users, fmt = path.endswith("users"), path.split("-")[0]
    args = d.RLHFArgs(num_sft=5, num_ppo=5, num_comparisons=5, num_test=5, num_comparisons_test=5,
                      base=TINY_BASE_ARGS, user_column="user" if users else None)
    if path == "builtin":
        args = dataclasses.replace(args, num_sft=120, num_ppo=120, num_comparisons=120, num_test=20,
                                   num_comparisons_test=20)
        rows, cmps, public, public_cmps = d.rlhf_records(args)
        load = lambda rc: d.split_rlhf(*rc, public, public_cmps, args)[0]
    else:
        (rows, cmps), write = _tldr_files(users), _writer(tmp_path, fmt)
        load = lambda rc: d.rlhf_data(dataclasses.replace(args, dataset=write("tldr", rc[0]),
                                                          comparisons=write("cmp", rc[1])))[0]
    unit = (lambda r: r["user"]) if users else (lambda r: r["prompt"])
    for gone in (unit(rows[0]), unit(rows[130]), unit(cmps[5]), unit(cmps[-1])):  # a unit with all its records
        _assert_only_changed("rlhf", tok, args, load, (rows, cmps),
                             ([r for r in rows if unit(r) != gone], [c for c in cmps if unit(c) != gone]), [gone])
    # Add a unit whose one comparison is on a post other units have TL;DR rows for, and a unit with
    # TL;DR rows on posts other units have in another stage: nobody else moves.
    new = {"user": 2.5} if users else {}
    post = rows[120]["prompt"] if users else "post : a brand new post tl;dr :"
    added_cmp = [{"prompt": post, "chosen": " a", "rejected": " b", **new}]
    added_rows = [{"prompt": r["prompt"] if users else r["prompt"] + " again", "label": "x .", **new}
                  for r in rows[60:63]]
    for more_rows, more_cmps in ((added_rows, []), ([], added_cmp), (added_rows, added_cmp)):
        changed = [2.5] if users else {r["prompt"] for r in more_rows + more_cmps}
        _assert_only_changed("rlhf", tok, args, load, (rows, cmps), (rows[:10] + more_rows + rows[10:],
                                                                   more_cmps + cmps), changed)


def test_stages_train_on_exactly_the_dry_runs_inputs(tmp_path, capsys, monkeypatch):
    """What --dry-run writes as each stage's tokens is what the stage encodes and trains on (and
    what evaluation encodes for the test prompts): every `encode` call of a real run is recorded."""
    flags = ["rlhf", *TINY_RLHF, "--reproducible-noise"]
    assert run_main(capsys, *flags, "--out", str(tmp_path / "plan"), "--dry-run")[0] in (0, None)
    folder = tmp_path / "plan" / "inputs"
    inputs = {s: [json.loads(x)["tokens"] for x in (folder / f"{s}.jsonl").read_text().splitlines()]
              for s in ("sft", "rm", "ppo", "test")}
    calls, encode = [], d.encode

    def recording(tokenizer, prompts, completions=None, **kw):
        ids, mask, loss_mask = encode(tokenizer, prompts, completions, **kw)
        calls.append(sorted(row[m.bool()].tolist() for row, m in zip(ids, mask)))
        return ids, mask, loss_mask
    monkeypatch.setattr(d, "encode", recording)
    assert run_main(capsys, *flags, "--out", str(tmp_path / "run"))[0] in (0, None)
    expected = {"sft": inputs["sft"], "rm": [row for pair in inputs["rm"] for row in pair], "ppo": inputs["ppo"],
                "test": inputs["test"]}
    for stage, rows in expected.items():
        assert sorted(rows) in calls, f"no stage encoded {stage}'s inputs as the dry run wrote them"


def test_a_disjointness_refusal_says_what_was_dropped(tmp_path):
    rows = _records(50)
    cmps = [{"prompt": r["prompt"], "chosen": r["label"], "rejected": "no ."} for r in rows]  # every post
    for name, recs in (("tldr.jsonl", rows), ("cmp.jsonl", cmps)):
        with open(tmp_path / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    args = d.RLHFArgs(dataset=str(tmp_path / "tldr.jsonl"), comparisons=str(tmp_path / "cmp.jsonl"))
    with pytest.raises(d.UserError) as e:
        d.rlhf_data(args)
    msg = str(e.value)
    assert "sft (0)" in msg and "ppo (0)" in msg and "50 TL;DR rows were dropped" in msg and "\n" not in msg


TINY_SMOKE = ["--num-sft", "200", "--num-ppo", "200", "--num-test", "16", "--sft-steps", "3", "--sft-batch-size", "20",
              "--ppo-steps", "2", "--ppo-batch-size", "16", "--ppo-response-min", "8", "--ppo-response-max", "8"]


@pytest.mark.parametrize("bad,word", [
    (["rlhf", "--comparisons", "cmp.jsonl"], "--comparisons"),  # the built-in task would never read it
    (["sentiment", "--num-sft", "0"], "--num-sft 0"), (["sentiment", "--num-test", "0"], "--num-test 0"),
    (["sentiment", "--sweep", "4", "--seeds", "0,0"], "--seeds 0,0"), (["sentiment", "--sweep", "4,4"], "--sweep 4,4"),
    (["sentiment", "--reward-label", "positive"], "--reward-label"),
    (["sentiment", "--user-column", "u"], "--user-column"),
    (["sentiment", "--sft-steps", "2", "--sft-epochs", "3"], "--sft-epochs"), (["sentiment", "--plot"], "--plot"),
    (["sentiment", "--dry-run", "--sweep", "4,inf"], "--dry-run"),
    (["sentiment", "--test-fraction", "0.2"], "--test-fraction"),
    (["sentiment", "--epsilon", "inf", "--delta", "1e-6"], "--delta"),
    (["sentiment", "--epsilon", "inf", "--ppo-max-grad-norm", "2"], "--ppo-max-grad-norm"),
    (["sentiment", "--sweep", "2,4", "--epsilon", "3"], "--epsilon"),
    (["sentiment", "--seeds", "1,2", "--seed", "3"], "--seed"),
    (["sentiment", "--dataset", "x.jsonl", "--num-sft", "100"], "--num-sft"),
    (["sentiment", "--dataset", "x.jsonl", "--num-test", "100"], "--num-test"),
    (["sentiment", "--ppo-chunk-size", "-1"], "--ppo-chunk-size -1"),
    (["sentiment", "--prompt-min", "0"], "--prompt-min 0"),
    (["sentiment", "--checkpoint-every", "-1"], "--checkpoint-every"),
    (["rlhf", "--rm-lora-rank", "-1"], "--rm-lora-rank"),
    (["sentiment", "--base-n-embd", "65", "--base-n-head", "2"], "--base-n-embd 65"),
    (["sentiment", "--resume", "somewhere.partial", "--sft-lr", "1"], "--sft-lr"),
    (["audit", "--checkpoint-every", "5"], "--checkpoint-every"), (["rlhf", "--rm-head", "mean"], "--rm-head 'mean'"),
    (["audit", "--sft-batch-size", "64"], "--sft-batch-size"), (["audit", "--noise-scale", "-1"], "--noise-scale -1"),
    (["audit", "--noise-scale", "inf"], "--noise-scale inf"), (["audit", "--sft-epsilon", "4"], "--sft-epsilon"),
    (["audit", "--epsilon", "inf", "--noise-scale", "0.5"], "--noise-scale"),
    (["audit", "--sft-steps", "0"], "--sft-steps 0"),
    (["rlhf", "--batch-size", "8", "--sft-batch-size", "8", "--rm-batch-size", "8", "--ppo-batch-size", "8"],
     "--batch-size"), (["sentiment", "--epsilon", "inf", "--composition", "sequential"], "--composition"),
    (["rlhf", "--dataset", "t.jsonl", "--comparisons", "c.jsonl", "--user-column", "label"], "--user-column label"),
])
def test_flags_with_no_effect_or_bad_values_are_refused_in_one_line(tmp_path, bad, word, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    drop = set(bad) | ({"--num-sft", "--num-ppo", "--num-test"} if "--dataset" in bad else set())
    pairs = [] if bad[0] == "audit" or "--resume" in bad else [*TINY_BASE, *TINY_SMOKE]  # --flag value pairs
    extra = [x for flag, value in zip(pairs[::2], pairs[1::2]) if flag not in drop for x in (flag, value)]
    out = [] if "--resume" in bad else ["--out", str(tmp_path / "run")]
    code, err = run_main(capsys, bad[0], *extra, *out, *bad[1:])
    lines = [x for x in err.strip().splitlines() if not x.startswith(("pre-training", "built-in base model"))]
    assert code == 2 and len(lines) == 1 and word in lines[0], err[-2000:]
    assert not list(tmp_path.glob("run*"))


def test_dry_run_plans_what_the_run_then_does(tmp_path, capsys):
    """--dry-run trains nothing, writes plan.json and inputs/<stage>.jsonl; the plan is the ledger
    the real run then writes (same N, q, steps, sigma), and the inputs are what it trains on."""
    flags = ["rlhf", *TINY_RLHF]
    code, err = run_main(capsys, *flags, "--out", str(tmp_path / "plan"), "--dry-run")
    assert code in (0, None) and "plan (rlhf, nothing trained)" in err
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert not (tmp_path / "plan" / "policy").exists() and not (tmp_path / "plan" / "summary.json").exists()
    lines = {s: [json.loads(x) for x in (tmp_path / "plan" / "inputs" / f"{s}.jsonl").read_text().splitlines()]
             for s in ("sft", "rm", "ppo", "test", "rm_test")}
    assert {len(lines[s]) for s in ("sft", "rm", "ppo")}
    assert all(set(x) == {"key", "input", "tokens"} for x in lines["rm"])
    assert set(lines["rm"][0]["input"]) == {"prompt", "chosen", "rejected"} and len(lines["rm"][0]["tokens"]) == 2
    # the reward model's test comparisons are its training comparisons' kind: the same texts' form
    for part in ("rm", "rm_test"):
        assert all(x["input"][k].startswith(" ") and not x["input"][k].startswith("  ")
                   for x in lines[part] for k in ("chosen", "rejected")), part
    assert not {x["key"] for x in lines["sft"]} & {x["key"] for x in lines["ppo"]} & {x["key"] for x in lines["rm"]}
    code, err = run_main(capsys, *flags, "--out", str(tmp_path / "run"))
    assert code == 0, err[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    for name, p in plan["stages"].items():
        for k in ("num_private_examples", "sample_rate", "steps", "noise_multiplier", "delta"):
            assert s["stages"][name][k] == p[k], (name, k)
        assert s["stages"][name]["epsilon"] == pytest.approx(p["epsilon_spent"]) and p["epsilon_spent"] <= 4
        assert p["num_private_examples"] == len({x["key"] for x in lines[name]})  # N counts units


# ------------------------------------------------------------------------------------ audit


# ----- loaders: no column typed from other rows; one unit id across files -----
def _hub_snapshot(tmp_path, monkeypatch, repo: str):
    """The folder of dataset repository `repo` in a Hub cache of its own, network off: where a Hub id's
    files are read from offline (online they are downloaded there first)."""
    import datasets
    import huggingface_hub
    repo_dir = tmp_path / "hub" / f"datasets--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("0" * 40)
    (snapshot := repo_dir / "snapshots" / ("0" * 40)).mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for module in (huggingface_hub.constants, datasets.config):
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return snapshot


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_hub_csv_and_json_ids_are_read_as_written(tiny, tmp_path, monkeypatch, fmt):
    """A Hub dataset in CSV or JSON, 600 reviews of 60 users with ids like "00017" (CSV) or 64-bit
    integers (JSON): adding a user "guest" (CSV) or 2.5 (JSON) moves no other user. datasets' builders
    type a column from all its rows, so that user turned every other id into another string."""
    import datasets
    lm, tok = tiny
    snapshot, real = _hub_snapshot(tmp_path, monkeypatch, "org/reviews"), datasets.load_dataset
    # a loader that goes back to datasets.load_dataset gets the same file through datasets' own builder
    monkeypatch.setattr(datasets, "load_dataset", lambda path, *a, **k: real(
        fmt.replace("jsonl", "json"), data_files=str(snapshot / f"reviews.{fmt}"), split=k.get("split"),
        cache_dir=str(tmp_path / "typed")) if path == "org/reviews" else real(path, *a, **k))
    ids = (lambda i: f"{17 + i % 60:05d}") if fmt == "csv" else (lambda i: 2**62 + i % 60)
    records = [{"text": r["text"], "user": ids(i)} for i, r in enumerate(d.make_reviews(600, 5))]
    write, guest = _writer(snapshot, fmt), "guest" if fmt == "csv" else 2.5
    args = d.SentimentArgs(dataset="org/reviews", user_column="user", base=TINY_BASE_ARGS, seed=1)
    def load(rs):
        write("reviews", rs)
        return d.sentiment_data(args)[0]
    new = [{**_new_review(i), "user": guest} for i in range(3)]
    _assert_only_changed("sentiment", tok, args, load, records, records[:300] + new + records[300:], [guest])
    assert d.load_records("org/reviews", ("text",), user_columns=("user",))[0]["user"] == ids(0)


def test_one_unit_id_however_written_and_warnings_where_two_files_ids_differ(tmp_path, capsys):
    import unicodedata
    from decimal import Decimal
    groups = [("7", "7.0", "+7", " 7.000 ", 7, 7.0, Decimal("7.0"), "\uff17"), ("007",), ("7.5", Decimal("7.5")),
              ("0", "-0", "+0.0", 0, -0.0), ("-3", "-3.0", -3), ("1", 1, 1.0), (True, "true", "TRUE"),
              ("9007199254740993", "9007199254740993.0", Decimal("9007199254740993.0")), ("9007199254740992",),
              ("zoë", "zoe\u0308", " ZOË "), ("u 7", "U  7")]
    assert all(len({d.unit_id(v) for v in g}) == 1 for g in groups), [{d.unit_id(v) for v in g} for g in groups]
    assert len({d.unit_id(g[0]) for g in groups}) == len(groups)
    # A pandas float column's 7.0 in the TL;DR file, JSON's 7 in the comparisons, an NFC and an NFD name:
    # one user each, so in one stage (users 0-29 have comparisons and leave D1, D3 and test).
    rows = [{**r, "user": f"{i % 60}.0" if i % 40 else "zo\u00eb"} for i, r in enumerate(_records(240))]
    cmps = [{"prompt": r["prompt"], "chosen": r["label"], "rejected": "no .", "user": i % 30 if i % 40 else "zoe\u0308"}
            for i, r in enumerate(_records(120, seed=1))]
    files = {"tldr": ("csv", rows), "cmp": ("jsonl", cmps)}
    paths = {k: _writer(tmp_path, fmt)(k, recs) for k, (fmt, recs) in files.items()}
    capsys.readouterr()
    data, _ = d.rlhf_data(d.RLHFArgs(dataset=paths["tldr"], comparisons=paths["cmp"], user_column="user"))
    who = lambda r: unicodedata.normalize("NFC", r["user"]) if str(r["user"])[0] == "z" else int(float(r["user"]))
    rm = {who(r) for k in ("comparisons", "comparisons_test") for r in data[k]}
    assert rm and not rm & {who(r) for k in ("sft", "ppo", "test") for r in data[k]}
    warned = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning") and "group" not in x]
    assert len(warned) == 1 and "31 user(s) are written more than one way" in warned[0], warned
    # names in one file and numbers in the other, or mostly other ids: a warning each
    cmps = _writer(tmp_path, "jsonl")("cmp", [{**c, "user": i % 30} for i, c in enumerate(cmps)])
    for tldr_id, word in (lambda i: f"u{i}", "are numbers and those of"), (lambda i: i + 99, "only 0 of the 30"):
        rows = _writer(tmp_path, "csv")("tldr", [{**r, "user": tldr_id(i % 60)} for i, r in enumerate(_records(240))])
        d.rlhf_data(d.RLHFArgs(dataset=rows, comparisons=cmps, user_column="user"))
        warned = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning") and "group" not in x]
        assert len(warned) == 1 and word in warned[0], warned


def test_utf8_with_a_byte_order_mark_lines_split_at_newline_only_and_out_not_creatable(tmp_path, capsys):
    bom = "\ufeff"  # as spreadsheet programs save UTF-8
    (tmp_path / "a.jsonl").write_text(bom + '{"text": "one\u2028two\u0085three", "user": 9007199254740993.0}\n'
                                      '{"text": "caf\u00e9", "user": 9007199254740992}\r\n', encoding="utf-8")
    (tmp_path / "a.json").write_text(bom + '[{"text": "caf\u00e9"}]', encoding="utf-8")
    (tmp_path / "a.csv").write_text(bom + "text,user\ncaf\u00e9,7.0\n", encoding="utf-8")
    read = lambda name, *user: d.load_records(str(tmp_path / name), ("text",), user_columns=user)
    assert [r["text"] for r in read("a.jsonl", "user")] == ["one\u2028two\u0085three", "caf\u00e9"]
    assert [d.unit_id(r["user"]) for r in read("a.jsonl", "user")] == ["9007199254740993", "9007199254740992"]
    assert read("a.json") == [{"text": "caf\u00e9"}] and read("a.csv", "user") == [{"text": "caf\u00e9", "user": "7.0"}]
    (afile := tmp_path / "afile").write_text("x")
    for out in [str(afile / "run")] + (["/proc/run"] if os.path.isdir("/proc/self") else []):
        code, err = run_main(capsys, "sentiment", "--out", out, *TINY_SENTIMENT)
        assert code == 2 and len(err.strip().splitlines()) == 1 and f"--out {out} cannot be created" in err, err
    assert afile.read_text() == "x" and sorted(os.listdir(tmp_path)) == ["a.csv", "a.json", "a.jsonl", "afile"]


@pytest.mark.unit
def test_audit_bound_worked_examples():
    # delta = 0, every one of r = 100 guesses right: reject epsilon while p^100 < 0.05, where
    # p = e^eps / (1 + e^eps); so the bound is log(p / (1 - p)) at p = 0.05^(1/100).
    p = 0.05 ** (1 / 100)
    assert d.audit_epsilon_lower_bound(1000, 100, 100, 0.0) == pytest.approx(math.log(p / (1 - p)), abs=1e-6)
    # by hand, r = v = 2: P[Bin(2, p) >= 2] = p^2; the delta term's max over i of
    # P[2 > Bin >= 2 - i] / i is max(2p(1-p), (1 - p^2) / 2).
    eps, m, delta = 1.0, 50, 1e-3
    p = math.exp(eps) / (1 + math.exp(eps))
    by_hand = p * p + 2 * m * delta * max(2 * p * (1 - p), (1 - p * p) / 2)
    assert d.audit_p_value(m, 2, 2, eps, delta) == pytest.approx(by_hand)
    # chance-level guessing proves nothing; delta only weakens a bound
    assert d.audit_epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0
    assert d.audit_epsilon_lower_bound(1000, 100, 95, 1e-4) < d.audit_epsilon_lower_bound(1000, 100, 95, 0.0)


@pytest.mark.unit
def test_audit_bound_is_calibrated_on_randomized_response():
    """Randomized response at epsilon is where the counting bound is tight: over 2,000 simulated runs of
    100 guesses, the bound exceeds the true epsilon in at most alpha = 5 % of them (and is not vacuous)."""
    rng, eps, r, alpha = np.random.default_rng(0), 1.0, 100, 0.05
    rights = rng.binomial(r, math.exp(eps) / (1 + math.exp(eps)), size=2000)
    bounds = {v: d.audit_epsilon_lower_bound(1000, r, int(v), 0.0, alpha) for v in set(rights.tolist())}
    above = np.mean([bounds[v] > eps for v in rights])
    assert 0.01 < above <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / 2000), above


def test_audit_bound_is_calibrated_on_a_simulated_gaussian_mechanism():
    """The whole one-run audit (the optimal score, top-k guesses, Bonferroni) on 100 simulated runs of the
    exact Gaussian mechanism (q = 1, T steps) never proves more than its true epsilon, which the closed form
    of the Gaussian's privacy curve gives; and proves something in most runs."""
    from statistics import NormalDist
    phi = NormalDist().cdf
    sigma, steps, delta, m = 1.2, 4, 1e-5, 4000
    mu = math.sqrt(steps) / sigma  # T steps of the Gaussian mechanism: a Gaussian with mean mu / noise 1
    delta_at = lambda e: phi(-e / mu + mu / 2) - math.exp(e) * phi(-e / mu - mu / 2)
    lo, hi = 0.0, 50.0
    for _ in range(60):  # the true epsilon at delta
        lo, hi = (lo, (lo + hi) / 2) if delta_at((lo + hi) / 2) < delta else ((lo + hi) / 2, hi)
    gen, bounds = torch.Generator().manual_seed(0), []
    for _ in range(100):
        member = torch.rand(m, generator=gen) < 0.5
        x = member[:, None].double() + sigma * torch.randn(m, steps, generator=gen, dtype=torch.float64)
        order = torch.argsort(d.canary_llr(x, 1.0, sigma), descending=True)
        bounds.append(max(d.audit_epsilon_lower_bound(m, k, int(member[order[:k]].sum()), delta, 0.05 / 3)
                          for k in (20, 50, 100)))
    assert max(bounds) <= hi and np.mean(np.array(bounds) > 0) > 0.5, (hi, bounds[:10])


@pytest.mark.unit
def test_canary_score_and_the_mechanism_curve_by_hand():
    # the log-likelihood ratio of b + sigma z (b ~ Bernoulli(q)) against sigma z, by hand
    x, q, sigma = torch.tensor([[0.3, 1.2]], dtype=torch.float64), 0.2, 0.5
    by_hand = sum(math.log(0.8 + 0.2 * math.exp((v - 0.5) / sigma**2)) for v in (0.3, 1.2))
    assert d.canary_llr(x, q, sigma).item() == pytest.approx(by_hand)
    # q = 1: T steps of the Gaussian mechanism, whose trade-off curve is TPR = 1 - Phi(Phi^-1(1 - FPR) - mu)
    from statistics import NormalDist
    n, mu = NormalDist(), math.sqrt(4) / 1.5
    closed = [1 - n.cdf(n.inv_cdf(1 - f) - mu) for f in d.AUDIT_FPRS]
    assert d.mechanism_tradeoff(1.0, 1.5, 4, d.AUDIT_FPRS) == pytest.approx(closed, abs=0.01)
    # the empirical TPR at FPR: members above the threshold that 1 of 10 others (5 of 10) pass
    assert d.tpr_at_fpr(torch.tensor([5.0, 0.5, 3.0]), torch.arange(10.0) / 10, [0.1, 0.5]) == [2 / 3, 1.0]


TINY_AUDIT = dict(num_sft=120, canaries=400, guesses="25,50", sample_rate=0.25, sft=d.SFTArgs(epochs=2.0),
                  base=TINY_BASE_ARGS, reproducible_noise=True)


def test_audit_passes_an_honest_run_and_catches_noise_switched_off(tmp_path, monkeypatch):
    honest = d.run_audit(d.AuditArgs(epsilon=1.0, out=str(tmp_path / "honest"), **TINY_AUDIT))
    assert honest["stages"]["sft"]["epsilon"] <= 1.0
    assert honest["every_step"]["epsilon_lower_bound"] <= 1.0 and honest["final"]["epsilon_lower_bound"] <= 1.0
    # q and T from the expected D1 (120 reviews + 400 / 2 canaries), not from the secret coins
    sft = honest["stages"]["sft"]
    assert sft["sample_rate"] == 0.25 and sft["steps"] == 8 and sft["num_private_examples"] == 320
    # the every-step attack reaches the mechanism's own curve: within 4 standard errors at FPR 10 %
    tpr, theory = honest["every_step"]["tpr_at_fpr"][2], honest["mechanism_tpr_at_fpr"][2]
    assert abs(tpr - theory) < 4 * math.sqrt(theory * (1 - theory) / honest["members"]) + 0.05, (tpr, theory)
    assert honest["epsilon_claimed"] == sft["epsilon"] and honest["noise_scale"] == 1.0
    broken = d.run_audit(d.AuditArgs(epsilon=1.0, noise_scale=0.0, out=str(tmp_path / "broken"), **TINY_AUDIT))
    assert broken["epsilon_claimed"] == honest["epsilon_claimed"] <= 1.0  # it still *claims* epsilon 1 ...
    assert broken["stages"]["sft"]["epsilon"] == math.inf  # ... the mechanism run has no noise ...
    assert broken["every_step"]["epsilon_lower_bound"] > 2.0  # ... and the audit proves the claim false
    assert broken["every_step"]["tpr_at_fpr"][0] > 1 - 0.75 ** 8 - 0.05  # every member sampled at least once
    assert broken["mechanism_tpr_at_fpr"] == honest["mechanism_tpr_at_fpr"]  # the curve is the claim's, not the run's
    assert broken["every_step"]["epsilon_lower_bound"] <= broken["epsilon_provable"] == honest["epsilon_provable"]
    # the flag breaks the mechanism inside privatize, where the noise is drawn: the same run with it patched
    real = d.privatize
    monkeypatch.setattr(d, "privatize", lambda grads, **kw: real(grads, **{**kw, "noise_multiplier": 0.0}))
    patched = d.run_audit(d.AuditArgs(epsilon=1.0, out=str(tmp_path / "patched"), **TINY_AUDIT))
    assert patched["every_step"]["guesses"] == broken["every_step"]["guesses"]


# ------------------------------------------------------------------------------------ the file's shape


def _top_level_names(tree, lo, hi):
    """{name: node} of the top-level definitions whose first line is in [lo, hi)."""
    out = {}
    for node in tree.body:
        targets = [node] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else getattr(node, "targets", [])
        for t in targets:
            named = hasattr(t, "name" if isinstance(t, (ast.FunctionDef, ast.ClassDef)) else "id")
            if lo <= node.lineno < hi and named:
                out[getattr(t, "name", getattr(t, "id", None))] = node
    return out


def test_part_one_uses_nothing_defined_after_it():
    """Part I, the method, reads and runs alone, in reading order: no top-level definition in it uses a
    name defined after it, in Part I (a helper comes before its first use) or in Parts II and III
    (UserError, the CLI's flags, run directories, checkpoints, progress bars)."""
    src = open(d.__file__).read()
    lines = src.splitlines()
    part1, part2 = (next(i for i, x in enumerate(lines, 1) if x.startswith(b)) for b in ("# PART I:", "# PART II:"))
    tree = ast.parse(src)
    method, later = _top_level_names(tree, part1, part2), _top_level_names(tree, part2, len(lines) + 1)
    assert {"privatize", "dp_train", "dpppo", "Hooks", "StagePlan"} <= set(method)
    assert {"UserError", "RunHooks"} <= set(later)
    for i, (name, node) in enumerate(method.items()):
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        assert not used & set(later), f"Part I's {name} uses {sorted(used & set(later))}, defined after Part I"
        ahead = used & set(list(method)[i + 1:]) - {name}
        assert not ahead, f"Part I's {name} uses {sorted(ahead)}, defined after it: not in reading order"


# ------------------------------------------------------------------------------------ built-in base model


class _InductionOracle(torch.nn.Module):
    """A hand-made "LM" that copies perfectly: at each position it predicts the token that followed
    the first earlier occurrence of the current token (an ideal induction head); with `copy=False`
    it predicts nothing (all logits equal)."""

    def __init__(self, vocab_size, copy=True):
        super().__init__()
        self.lm_head = torch.nn.Linear(vocab_size, vocab_size, bias=False)
        torch.nn.init.eye_(self.lm_head.weight)
        self.vocab_size, self.copy = vocab_size, copy

    def transformer(self, input_ids, **_):
        t = input_ids.shape[1]
        same = (input_ids[:, :, None] == input_ids[:, None, :]) & (torch.arange(t)[None, :] < torch.arange(t)[:, None])
        first = same.float().argmax(-1)
        nxt = input_ids.gather(1, (first + 1).clamp(max=t - 1))
        h = torch.nn.functional.one_hot(nxt, self.vocab_size).float() * (same.any(-1) & self.copy)[..., None]
        return type("Out", (), {"last_hidden_state": h})


def test_copy_probe_on_a_hand_made_model():
    base = d.BaseModelArgs()
    tok = d.public_tokenizer(d.public_corpus(base)[0], base.vocab_size)
    posts = public_probe_posts(base, n=120)
    # By hand: the copier names whoever follows the first "my" of the post, which is the person
    # unless a filler sentence ("my family thinks ...") comes first; "feel" occurs once, before the feeling.
    words = [p["post"].split() for p in posts]
    expected = np.mean([w[w.index("my") + 1] == p["person"] for w, p in zip(words, posts)])
    assert 0.5 < expected < 1.0
    got = copy_probe(_InductionOracle(len(tok)), tok, posts)
    assert got["person"] == pytest.approx(expected) and got["feeling"] == 1.0
    blind = copy_probe(_InductionOracle(len(tok), copy=False), tok, posts)  # ties: the first candidate wins
    assert blind["person"] == pytest.approx(np.mean([p["person"] == d.PEOPLE[0] for p in posts]))


def probe_units(seeds=(0, 1, 2), out="runs/probe-units", n_posts=6000, n_compared=4000, per_post=4, per_user=5,
                extra=("--ppo-steps", "20", "--ppo-batch-size", "128", "--accountant", "rdp")) -> str:
    """NOTES, "The unit": the two unit-level designs on a generated TL;DR file where units have many records
    (`per_post` comparisons a post, `per_user` posts a user), rlhf at epsilon 4, the post or the user as the
    unit: one record of a sampled unit in turn (unit_records 1) against the mean of 4. Prints a table."""
    os.makedirs(out, exist_ok=True)
    rows, cmps = d.make_tldr(n_posts + n_compared, 0, seed=99)
    user = lambda i: f"user{i // per_user}"
    tldr = [{"prompt": r["prompt"], "label": r["label"], "user": user(i)} for i, r in enumerate(rows[:n_posts])]
    pairs, rng = [], np.random.default_rng(99)
    for i, r in enumerate(rows[n_posts:]):
        for _ in range(per_post):
            y = [d._summary(rng, r["meta"], "candidate") for _ in range(2)]
            p1 = 1 / (1 + math.exp(-2.0 * (d.true_preference(r["meta"], y[1]) - d.true_preference(r["meta"], y[0]))))
            chosen = int(rng.random() < p1)
            pairs.append({"prompt": r["prompt"], "chosen": y[chosen], "rejected": y[1 - chosen],
                          "user": user(n_posts + i)})
    for name, lines in (("tldr", tldr), ("comparisons", pairs)):
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)
    meta = {r["prompt"]: r["meta"] for r in rows}
    task = d.TASKS["rlhf"]
    right = task.metrics

    def metrics(args, data, texts, scores):  # the hidden preference, read back from the generator's facts
        return {**right(args, data, texts, scores),
                "true_preference": float(np.mean([d.true_preference(meta[r["prompt"]], y)
                                                  for y, r in zip(texts, data["test"])]))}
    task.metrics, results = metrics, {}
    try:
        for unit, m, seed in itertools.product(("post", "user"), (1, 4), seeds):
            cell = os.path.join(out, f"{unit}-m{m}-seed{seed}")
            if not os.path.exists(os.path.join(cell, "summary.json")):
                d.main(["rlhf", "--dataset", os.path.join(out, "tldr.jsonl"), "--comparisons",
                        os.path.join(out, "comparisons.jsonl"), "--seed", str(seed), "--out", cell, "--overwrite",
                        *(["--user-column", "user"] if unit == "user" else []),
                        *[f"--{s}-unit-records={m}" for s in ("sft", "rm", "ppo")], *extra])
            with open(os.path.join(cell, "summary.json")) as f:
                results.setdefault((unit, m), []).append(json.load(f))
    finally:
        task.metrics = right
    table = ("| unit | unit_records | RM accuracy | true preference: SFT -> aligned | units in D2 | seconds |\n"
             "|---|---|---|---|---|---|\n")
    for (unit, m), ss in results.items():
        cell = lambda *path: d._cell([functools.reduce(dict.get, path, s) for s in ss])
        table += (f"| {unit} | {m} | {cell('eval', 'rm_accuracy')} | {cell('eval', 'sft', 'true_preference')} -> "
                  f"{cell('eval', 'aligned', 'true_preference')} | {ss[0]['stages']['rm']['num_private_examples']} "
                  f"| {np.mean([s['seconds'] for s in ss]):.0f} |\n")
    print(table)
    return table


# ------------------------------------------------------------------------------------ evidence: bench and probe
# The measurements README and NOTES quote, re-runnable; they assert nothing, so they are tools, not tests:
# `python test_dp_rlhf.py --bench step|ppo` and `--probe`, each with its own flags (`--bench step --help`). The TRL
# peer runs this file in its own venv (transformers 4.x, perhaps no pytest): nothing here needs more than dp_rlhf.
GPT2_SIZES = dict(tiny=(2, 64, 2), small=(12, 768, 12), medium=(24, 1024, 16), large=(36, 1280, 20))  # layers, d, heads


@dataclasses.dataclass
class BenchArgs:
    """`--bench step`: a DP step's time and memory against a non-private one; `--bench ppo`: a DPPPO iteration."""
    model: str | None = d.arg(None, "GPT-2 size, random init (default small; ppo: the built-in model)",
                              choices=("builtin", "tiny", "small", "medium", "large"))
    batch: int | None = d.arg(None, "sequences per step (default 8; ppo: 64 prompts)", limit=">=1")
    seq_len: int = d.arg(64, "tokens per sequence", limit=">=1")
    device: str = d.arg("cuda" if torch.cuda.is_available() else "cpu", "cpu or cuda")
    rounds: int = d.arg(5, "timed rounds, each times every variant's step once (ppo: timed iterations)", limit=">=1")
    warmup: int = d.arg(2, "untimed steps of each variant first", limit=">=0")
    chunk_size: int | None = d.arg(None, "the chunked DP row's chunk (default: half the batch; ppo: 64)", limit=">=1")
    response: int = d.arg(15, "ppo: tokens per response (as the TRL peer)", limit=">=1")
    threads: int | None = d.arg(None, "torch CPU threads, also the children's (default: torch's)", limit=">=1")
    trl: str | None = d.arg(None, "ppo: the python of a virtual environment with trl 0.11 (README)")
    preset: str | None = d.arg(None, "'ppo --preset paper': App. B's DPPPO on GPT-2 124M, batch 256-4,096",
                               choices=("paper",))


STEP_ROWS = {  # variant: its row. 'hf' is what a user would otherwise run: the ratios' base
    "hf": "non-private: HF's forward + loss ({attn} attention)", "ours": "non-private: our vmap-safe forward",
    "dp": "DP: vmap per-sample grads + privatize", "dp_chunked": "DP, vmap chunk_size={chunk}",
    "loop": "DP, per-example loop"}


def _gpt2(ns, **config):
    """GPT-2 of size ns.model, random init, LoRA r=4 on q,v: the same weights at every call."""
    torch.manual_seed(0)
    n_layer, n_embd, n_head = GPT2_SIZES[ns.model]
    lm = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, **config))
    return d.add_lora(lm.to(ns.device).eval(), rank=4)


def step_variants(ns, names) -> tuple[dict, str]:
    """({variant: one step, with its own AdamW on the LoRA weights}, HF's attention) on one batch with a left-padded
    row. Ours runs eager attention, as `load_lm` does: under vmap sdpa has no batching rule and loops per sample."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (ns.batch, ns.seq_len), generator=gen).to(ns.device)
    mask = torch.ones_like(ids)
    mask[0, : ns.seq_len // 4] = 0
    loss_mask, labels = mask[:, 1:].float(), ids.masked_fill(mask == 0, -100)
    plan = d.StagePlan(epsilon=1.0, delta=1e-5, num_private_examples=ns.batch, sample_rate=1.0, steps=1,
                       noise_multiplier=1.0, max_grad_norm=1.0)
    hf = _gpt2(ns) if "hf" in names else None  # transformers' default attention: what a user gets
    ours = d.CausalLM(_gpt2(ns, attn_implementation="eager")) if set(names) - {"hf"} else None
    loss_fn, states = d.sft_loss(ours), {k: d.TrainState.new(hf if k == "hf" else ours, 1e-4, plan) for k in names}

    def update(state):
        state.optimizer.step(), state.optimizer.zero_grad(set_to_none=True)

    def hf_step(state):
        hf(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        update(state)

    def ours_step(state):
        lp = d.token_logprobs(ours(ids, mask), ids)
        (-(lp * loss_mask).sum(1) / loss_mask.sum(1)).mean().backward()
        update(state)

    def dp_step(state, chunk_size=None):
        d.dp_step(state, loss_fn, (ids, mask, loss_mask), plan, expected_batch_size=ns.batch, generator=gen,
                  chunk_size=chunk_size)

    def loop_step(state):  # the textbook way: one backward per example
        total = {k: torch.zeros_like(p) for k, p in state.params.items()}
        for i in range(ns.batch):
            g = torch.autograd.grad(loss_fn(state.params, ids[i], mask[i], loss_mask[i]), list(state.params.values()))
            norm = torch.sqrt(sum(x.pow(2).sum() for x in g))
            for t, x in zip(total.values(), g):
                t += x * (1.0 / (norm + 1e-6)).clamp(max=1.0)
        for k, p in state.params.items():
            p.grad = (total[k] + torch.randn(p.shape, generator=gen).to(ns.device)) / ns.batch
        update(state)

    fns = dict(hf=hf_step, ours=ours_step, dp=dp_step, dp_chunked=functools.partial(dp_step, chunk_size=ns.chunk_size),
               loop=loop_step)
    return {k: functools.partial(fns[k], states[k]) for k in names}, hf.config._attn_implementation if hf else ""


def _timed(step, device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - t


def _peak_memory(device: str, base: int) -> int:
    """Peak bytes above `base` (CUDA: allocated; CPU: the process's maximum resident set)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def _memory_now(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated()
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _step_memory(ns) -> dict:
    """One variant alone in a fresh process (a clean peak): what its steps add above the built model."""
    step = step_variants(ns, [ns.variant])[0][ns.variant]
    base = _memory_now(ns.device)
    if ns.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(ns.warmup + 1):
        step()
    return {"peak_bytes": _peak_memory(ns.device, base)}


def bench_step(ns):
    """Memory from a fresh process per variant; time from all variants in this one, interleaved (each round times
    every variant once, in an order rotated each round), so drift over the run hits every variant alike."""
    ns.chunk_size = ns.chunk_size or max(1, ns.batch // 2)
    names = list(STEP_ROWS)
    peak = {k: _child(sys.executable, ns, k, chunk_size=ns.chunk_size)["peak_bytes"] for k in names}
    steps, attn = step_variants(ns, names)
    for k in names:
        for _ in range(ns.warmup):
            steps[k]()
    times = {k: [] for k in names}
    for r in range(ns.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(_timed(steps[k], ns.device))
    cell = lambda xs, f: f"{np.median(xs):{f}} ({min(xs):{f}}-{max(xs):{f}})"
    print(f"GPT-2 {ns.model} (random init) + LoRA r=4 on q,v; batch {ns.batch} x {ns.seq_len} tokens, one row "
          f"left-padded; {ns.device}, {ns.threads} threads; time: median (min-max) of {ns.rounds} rounds after "
          f"{ns.warmup} warm-up steps, every variant once a round in a rotated order; x HF: the per-round ratios; "
          "peak memory: each variant in a fresh process")
    print("| step | time (s) | x non-private HF | peak memory (MiB) | x non-private HF |\n|---|---|---|---|---|")
    for k, label in STEP_ROWS.items():
        ratios = [t / h for t, h in zip(times[k], times["hf"])]
        print(f"| {label.format(attn=attn, chunk=ns.chunk_size)} | {cell(times[k], '.3f')} | {cell(ratios, '.2f')} | "
              f"{peak[k] / 2**20:.0f} | {peak[k] / max(peak['hf'], 1):.2f} |")
    for name, cls in d.ACCOUNTANTS.items():  # what the accountants cost: one epsilon, one sigma search
        t, acc = time.perf_counter(), cls()
        acc.step(noise_multiplier=1.5, sample_rate=0.04, num_steps=2250)
        eps, t1 = acc.get_epsilon(1e-5), time.perf_counter()
        sigma = d.get_noise_multiplier(target_epsilon=4.0, target_delta=6e-6, sample_rate=0.0064, steps=50,
                                       accountant=cls)
        print(f"{name}: epsilon {eps:.4f} (q=0.04, sigma=1.5, 2250 steps, delta=1e-5) in {t1 - t:.2f} s; sigma "
              f"{sigma:.3f} for epsilon 4 (q=0.0064, 50 steps, delta=6e-6) in {time.perf_counter() - t1:.2f} s")


def _bench_model_dir(ns) -> str:
    """A GPT-2 directory both our loop and the peer (TRL) load: the built-in base model, or a random-init GPT-2
    of the given size with the built-in tokenizer (trained alone: no base model to pre-train), written once."""
    if ns.model == "builtin":
        return d.builtin_base_model()
    path = os.path.join(d.cache_dir(), f"bench-random-{ns.model}")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        n_layer, n_embd, n_head = GPT2_SIZES[ns.model]
        base = d.BaseModelArgs()
        torch.manual_seed(0)
        with d._atomic_dir(path) as tmp:
            GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head)).save_pretrained(tmp)
            d.public_tokenizer(d.public_corpus(base)[0], base.vocab_size).save_pretrained(tmp)
    return path


def _bench_ppo_child(ns) -> dict:
    """DPPPO iterations of the real loop (`dpppo`) on one batch size: median seconds per phase, peak memory above
    the loaded model and in all. --preset paper: App. B's settings (minibatches of 256, prompts of 2-8 tokens,
    responses of 4-16) for one iteration."""
    torch.manual_seed(0)
    lm, tok = d.load_lm(ns.model_dir, ns.device)
    policy = d.ActorCritic(d.add_lora(lm)).to(ns.device)
    base, paper = _memory_now(ns.device), ns.preset == "paper"
    # review openings, as many prompts as the batch: q = 1, every prompt every iteration.
    prompts = d.prefix_prompts(tok, [r["text"] for r in d.make_reviews(ns.batch, seed=0)], 2, 8 if paper else 7, 0)
    rows, length = [], (4, 16) if paper else (ns.response, ns.response)
    args = d.PPOArgs(steps=ns.warmup + ns.rounds, batch_size=ns.batch, response_min=length[0],
                     response_max=length[1], chunk_size=ns.chunk_size or d.PPOArgs.chunk_size,
                     minibatches=max(1, ns.batch // 256) if paper else 1, lr=3e-3 if paper else d.PPOArgs.lr)
    if ns.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    plan = d.plan_stage(args, len(prompts), ns.epsilon, 1e-5)
    d.dpppo(policy, tok, prompts, d.builtin_sentiment_reward, plan, args, generator=torch.Generator().manual_seed(0),
            hooks=d.RunHooks(log=rows.append, device=ns.device))
    timed = rows[ns.warmup:]
    phases = {k[5:]: float(np.median([r[k] for r in timed])) for k in timed[0] if k.startswith("time/")}
    return {"phases": phases, "total": float(np.median([sum(r[f"time/{p}"] for p in phases) for r in timed])),
            "peak_bytes": _peak_memory(ns.device, base), "peak_total": _peak_memory(ns.device, 0)}


def _trl_child(ns) -> dict:
    """The peer: TRL 0.11's classic PPOTrainer (the gpt2-sentiment recipe: batched `generate`, then `step`),
    non-private and fully fine-tuned, one epoch over one minibatch of the batch; prompts of 2-7 random token ids,
    15 new tokens, a toy reward. Runs in TRL's own venv (transformers 4.x); trl is imported here only."""
    from transformers import PreTrainedTokenizerFast
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
    torch.manual_seed(0)
    random.seed(0)
    # tokenizer.json itself: tokenizer configs written by transformers 5 do not load in 4.x
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(ns.model_dir, "tokenizer.json"),
                                  eos_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    model, ref = (AutoModelForCausalLMWithValueHead.from_pretrained(ns.model_dir) for _ in range(2))
    trainer = PPOTrainer(PPOConfig(batch_size=ns.batch, mini_batch_size=ns.batch, ppo_epochs=1, learning_rate=1.41e-5,
                                   log_with=None), model, ref, tok)
    vocab = list(range(min(len(tok), 200)))
    gen = dict(min_length=-1, top_k=0.0, top_p=1.0, do_sample=True, pad_token_id=tok.eos_token_id)
    times = []
    for _ in range(ns.warmup + ns.rounds):
        queries = [torch.tensor([random.choice(vocab) for _ in range(random.randint(2, 7))]) for _ in range(ns.batch)]
        t = time.perf_counter()
        responses = trainer.generate(queries, return_prompt=False, batch_size=ns.batch, max_new_tokens=ns.response,
                                     **gen)
        trainer.step(queries, responses, [torch.tensor(float((r == vocab[1]).sum())) for r in responses])
        times.append(time.perf_counter() - t)
    return {"phases": {}, "total": float(np.median(times[ns.warmup:])), "peak_bytes": None}


def _child(python: str, ns, variant: str, **flags) -> dict:
    """`--bench --variant` in a fresh process (clean timing and peak memory): its JSON line."""
    cmd = [python, os.path.abspath(__file__), "--bench", ns.what, "--variant", variant, "--model", ns.model,
           "--batch", str(ns.batch), "--seq-len", str(ns.seq_len), "--device", ns.device, "--rounds", str(ns.rounds),
           "--warmup", str(ns.warmup), "--response", str(ns.response), "--threads", str(ns.threads)]
    cmd += [x for k, v in flags.items() if v is not None for x in (f"--{k.replace('_', '-')}", str(v))]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        raise d.UserError(f"bench {variant} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_paper(ns, model_dir: str):
    """`--bench ppo --preset paper`: one DPPPO iteration at epsilon = 4 with App. B's settings at rollout batches
    256, 1,024 and 4,096 (or --batch): what the preset needs before renting a GPU."""
    print(f"DPPPO iteration, --preset paper: {ns.model} GPT-2 (random init, vocabulary 50,257), epsilon 4, "
          f"minibatches of 256, {ns.device}, {ns.threads} threads, rollout chunk {d.PPOArgs.rollout_chunk_size}")
    print("| batch (minibatches) | sampling | reference | reward | update | s / iteration | s / trajectory | "
          "peak memory (MiB) |\n|---|---|---|---|---|---|---|---|")
    for batch in [ns.batch] if "batch" in ns.given else (256, 1024, 4096):
        r = _child(sys.executable, argparse.Namespace(**{**vars(ns), "batch": batch, "warmup": 0, "rounds": 1}),
                   "ppo", model_dir=model_dir, epsilon="4", preset="paper")
        ph = " | ".join(f"{r['phases'].get(p, 0):.1f}" for p in ("sampling", "reference", "reward", "update"))
        print(f"| {batch:,} ({max(1, batch // 256)}) | {ph} | {r['total']:.1f} | {r['total'] / batch:.4f} | "
              f"{r['peak_total'] / 2**20:,.0f} |", flush=True)


def bench_ppo(ns):
    """`--bench ppo`: one DPPPO iteration at epsilon = inf and 4, by phase, each in a fresh process; the TRL peer."""
    model_dir = _bench_model_dir(ns)
    if ns.preset == "paper":
        return bench_paper(ns, model_dir)
    rows = {f"ours, epsilon = {eps}": _child(sys.executable, ns, "ppo", model_dir=model_dir, epsilon=eps,
                                             chunk_size=ns.chunk_size) for eps in ("inf", "4")}
    if ns.trl:
        rows["TRL 0.11 PPOTrainer, non-private, full fine-tune"] = _child(ns.trl, ns, "trl", model_dir=model_dir)
    ref = rows["ours, epsilon = inf"]["total"]
    trl = next((r["total"] for k, r in rows.items() if k.startswith("TRL")), None)
    print(f"PPO iteration: {ns.model} GPT-2 ({model_dir}), batch {ns.batch} prompts of 2-7 tokens, responses "
          f"{ns.response} tokens, {ns.device}, {ns.threads} threads, median of {ns.rounds} iterations")
    print("| loop | sampling | reference | reward | update | s / iteration | x eps=inf | x TRL | peak memory (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        ph = [f"{r['phases'][p]:.3f}" if p in r["phases"] else "" for p in ("sampling", "reference", "reward",
                                                                             "update")]
        mem = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] is not None else ""
        x_trl = f"{r['total'] / trl:.2f}" if trl else ""
        print(f"| {name} | {' | '.join(ph)} | {r['total']:.3f} | {r['total'] / ref:.2f} | {x_trl} | {mem} |")


def bench(ns):
    """`--bench step|ppo`, or one `--variant` of it (a child: prints its JSON line)."""
    if ns.threads:
        torch.set_num_threads(ns.threads)
    ns.threads, ns.given = ns.threads or torch.get_num_threads(), {k for k in ("batch", "model") if getattr(ns, k)}
    ns.model = ns.model or ("builtin" if ns.what == "ppo" and not ns.preset else "small")
    ns.batch = ns.batch or (64 if ns.what == "ppo" else 8)
    if ns.what == "step" and (ns.model == "builtin" or ns.preset or ns.trl):
        raise d.UserError("--bench step with --model builtin, --preset or --trl is not allowed; use --model tiny, "
                          "small, medium or large (or --bench ppo)")
    if ns.variant:
        return print(json.dumps({"ppo": _bench_ppo_child, "trl": _trl_child}.get(ns.variant, _step_memory)(ns)))
    return (bench_ppo if ns.what == "ppo" else bench_step)(ns)


@dataclasses.dataclass
class ProbeArgs:
    """`--probe`: the copy probe and the reward-feature probe of a base model (no private data)."""
    model: str = d.arg("builtin", "'builtin', a Hub id or a local dir")
    num_comparisons: int = d.arg(4000, "built-in comparisons to fit the linear probes on", limit=">=1")
    seed: int = d.arg(0, "seed of the probe's comparisons", limit=">=0")
    device: str | None = d.arg(None, "'cpu' or 'cuda'")
    base: d.BaseModelArgs = dataclasses.field(default_factory=d.BaseModelArgs)


def public_probe_posts(args: d.BaseModelArgs, n: int = 500) -> list[dict]:
    """Held-out *public* posts for the copy probe (their own seed: not in the corpus, not private)."""
    rng = np.random.default_rng(args.seed + 2)
    return [d._post(rng) for _ in range(n)]


@torch.no_grad()
def copy_probe(lm, tokenizer, posts: list[dict], device: str = "cpu", batch: int = 250) -> dict:
    """Does the model read its prompt? Top-1 accuracy of the post's person among PEOPLE after "... tl;dr :
    my", and of its feeling among FEELINGS after "... my <person> <event> and i feel": chance (1/16,
    1/12) if it ignores the post, 1 if it copies. A candidate scores the log-probability of its tokens."""
    model = d.CausalLM(lm)

    def top1(prompts, candidates, answers):
        words, scores = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in candidates], []
        for s in range(0, len(prompts), batch):
            chunk = prompts[s:s + batch]
            if all(len(w) == 1 for w in words):  # one forward pass: the next-token distribution
                ids, mask, _ = d.encode(tokenizer, chunk, max_prompt=512)
                logits = model(ids.to(device), mask.to(device))[:, -1].float()
                scores.append(logits.log_softmax(-1)[:, [w[0] for w in words]].cpu())
                continue
            columns = []
            for c in candidates:
                ids, mask, targets = d.encode(tokenizer, chunk, [" " + c] * len(chunk), max_prompt=512,
                                              max_completion=16)
                targets[:, -1] = 0  # the word only, not the closing eos
                columns.append((d.token_logprobs(model(ids.to(device), mask.to(device)).cpu(), ids) * targets).sum(-1))
            scores.append(torch.stack(columns, 1))
        best = torch.cat(scores).argmax(-1).tolist()
        return float(np.mean([candidates[i] == a for i, a in zip(best, answers)]))

    prompts = [d.TLDR_PROMPT.format(post=p["post"]) + " my" for p in posts]
    feel = [d.TLDR_PROMPT.format(post=p["post"]) + f" my {p['person']} {p['event']} and i feel" for p in posts]
    return {"person": top1(prompts, d.PEOPLE, [p["person"] for p in posts]),
            "feeling": top1(feel, d.FEELINGS, [p["feeling"] for p in posts])}


@torch.no_grad()
def reward_features(lm, tokenizer, prompts, responses, *, batch: int = 256) -> dict:
    """What a reward head could read from a frozen LM per (x, y): the last hidden state, the mean and
    sum of y's hidden states, y's summed and mean log-likelihood, y's length."""
    out, device = {k: [] for k in ("last", "mean_h", "sum_h", "loglik", "mean_loglik", "length")}, lm.device
    for s in range(0, len(prompts), batch):
        ids, mask, resp = (t.to(device) for t in d.encode(tokenizer, prompts[s:s + batch], responses[s:s + batch],
                                                          max_prompt=96, max_completion=48))
        h = d.hidden_states(lm, ids, mask)
        lp, n = (d.token_logprobs(lm.lm_head(h), ids) * resp).sum(-1), resp.sum(-1)
        pooled = (h[:, 1:] * resp[..., None]).sum(1)
        for k, v in (("last", h[:, -1]), ("mean_h", pooled / n[:, None]), ("sum_h", pooled), ("loglik", lp[:, None]),
                     ("mean_loglik", (lp / n)[:, None]), ("length", n[:, None])):
            out[k].append(v.double().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def linear_probe_accuracy(train: tuple, test: tuple, keys: list[str]) -> float:
    """Held-out accuracy of a Bradley-Terry logistic regression on (chosen - rejected) features."""
    x, x_test = (torch.cat([pair[0][k] - pair[1][k] for k in keys], 1) for pair in (train, test))
    scale = x.std(0) + 1e-6
    x, x_test = x / scale, x_test / scale
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        (loss := torch.nn.functional.softplus(-x @ w).mean() + 1e-4 * w.pow(2).sum()).backward()
        return loss
    opt.step(closure)
    return float((x_test @ w.detach() > 0).double().mean())


def probe(args: ProbeArgs):
    """Does the model copy from its prompt, and what can a reward head read from it?"""
    device = args.device or "cpu"
    lm, tok = d.load_lm(args.model, device, args.base)
    print(f"copy probe ({args.model}, 500 public held-out posts): " + ", ".join(
        f"{k} top-1 {v:.3f}" for k, v in copy_probe(lm, tok, public_probe_posts(args.base), device=device).items())
        + f" (chance {1 / len(d.PEOPLE):.3f}, {1 / len(d.FEELINGS):.3f})")
    cmps, n = d.make_tldr(0, args.num_comparisons + 1000, seed=50_000 + args.seed)[1], args.num_comparisons
    feats = [tuple(reward_features(lm, tok, [c["prompt"] for c in part], [" " + c[w] for c in part])
                   for w in ("chosen", "rejected")) for part in (cmps[:n], cmps[n:])]
    tp = lambda c, w: d.true_preference(c["meta"], c[w])
    ceiling = np.mean([(tp(c, "chosen") > tp(c, "rejected")) + 0.5 * (tp(c, "chosen") == tp(c, "rejected"))
                       for c in cmps[n:]])
    print(f"\nwhat a linear reward head can read from the frozen model: held-out accuracy on 1,000 built-in "
          f"comparisons (trained on {n}; the hidden preference itself: {ceiling:.3f})\n")
    print("| features | accuracy |\n|---|---|")
    for keys in (["last"], ["mean_h"], ["sum_h", "length"], ["loglik"], ["loglik", "length"],
                 ["mean_loglik", "length"], ["mean_loglik", "length", "mean_h"], ["loglik", "length", "mean_h"]):
        print(f"| {' + '.join(keys)} | {linear_probe_accuracy(*feats, keys):.3f} |")


def tools_main(argv: list[str]):
    """`--bench step|ppo` and `--probe`, each with its own flags (BenchArgs', ProbeArgs'), checked as dp_rlhf's."""
    is_probe = "--probe" in argv
    config = ProbeArgs() if is_probe else BenchArgs()
    parser = argparse.ArgumentParser(prog="test_dp_rlhf.py", description=config.__doc__)
    if is_probe:
        parser.add_argument("--probe", action="store_true", required=True, help="the probes")
    else:
        parser.add_argument("--bench", dest="what", choices=["step", "ppo"], required=True,
                            help="'step': one DP-SGD step; 'ppo': one DPPPO iteration by phase, beside TRL with --trl")
        parser.add_argument("--variant", choices=[*STEP_ROWS, "ppo", "trl"], help=argparse.SUPPRESS)  # a child
        parser.add_argument("--model-dir", help=argparse.SUPPRESS)
        parser.add_argument("--epsilon", type=float, default=math.inf, help=argparse.SUPPRESS)
    d._add_dataclass_args(parser, config)
    ns = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        d.check_config(args := d._build_dataclass(config, ns))
        if is_probe:
            return probe(args)
        return bench(argparse.Namespace(**{**vars(ns), **dataclasses.asdict(args)}))
    except d.UserError as e:  # as dp_rlhf's main: a bad flag is one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def test_bench_step_prints_every_variant_with_its_spread():
    """`--bench step` on a tiny GPT-2, one round: a row per variant in order, each column filled, HF's the base."""
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--bench", "step", "--model", "tiny", "--batch", "2",
                        "--seq-len", "8", "--rounds", "1", "--warmup", "0", "--threads", "1"], cwd=HERE,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    num, spread = r"(-?[\d.]+)", r"([\d.]+) \(([\d.]+)-([\d.]+)\)"
    rows = [re.fullmatch(rf"\| (.+) \| {spread} \| {spread} \| {num} \| {num} \|", line)
            for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| step |")]
    assert all(rows), r.stdout
    rows = [m.groups() for m in rows]  # label, time (median, min, max), x HF (median, min, max), MiB, x HF
    assert [g[0] for g in rows] == [label.format(attn="sdpa", chunk=1) for label in STEP_ROWS.values()], r.stdout
    assert rows[0][4:] == ("1.00",) * 3 + rows[0][7:8] + ("1.00",), r.stdout  # the base: HF's own step
    assert all(g[1] == g[2] == g[3] and float(g[1]) > 0 for g in rows), r.stdout  # one round: min = median = max
    assert [line.split(":")[0] for line in r.stdout.splitlines()[-2:]] == list(d.ACCOUNTANTS), r.stdout


def test_bench_and_probe_refuse_bad_flags_in_one_line(capsys):
    for argv, words in ((["--bench", "step", "--model", "builtin"], "--bench step with --model builtin"),
                        (["--bench", "ppo", "--rounds", "0"], "--rounds 0 is not allowed"),
                        (["--probe", "--num-comparisons", "0"], "--num-comparisons 0 is not allowed")):
        with pytest.raises(SystemExit) as e:
            tools_main(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err

# ------------------------------------------------------------------------------------ exercises: handouts, check
# A handout is a folder a student gets: dp_rlhf.py with the exercise's functions blanked (signature, docstring, a
# TODO), the grader test_exercise.py (the exercise's tests and what they use, cut out of this file with `ast`:
# nothing from the exercise block above, no reference such as _gae_loop), pytest.ini, requirements.txt and
# EXERCISE.md. No git history: the answers are not one `git diff` away.
HANDOUT_FILES = ("EXERCISE.md", "dp_rlhf.py", "pytest.ini", "requirements.txt", "test_exercise.py")
GRADER = "python -m pytest -q test_exercise.py"
TEACHER_ONLY = {"Exercise", "EXERCISES", "WRONG", "_mutate", "check_exercises", "handout", "_gae_loop",
                "_brute_force_rdp", "_quadrature_rdp"}  # never in a grader: wrong bodies, references, the tools


def _exercises(numbers: str) -> list:
    """'1,3a' -> those exercises; '3' is 3a, 3b and 3c; 'all', every one."""
    by_number, out = {e.number: e for e in EXERCISES}, []
    for n in (x.strip() for x in numbers.split(",")):
        picked = [e for k, e in by_number.items() if n in (k, "all") or (k[:-1] == n and k[-1].isalpha())]
        if not picked:
            raise ValueError(f"exercise {n!r}: " + ("9 is a sweep, the README's command: no handout, no grader"
                                                    if n == SWEEP else f"choose from {', '.join(by_number)}, all"))
        out += [e for e in picked if e not in out]
    return out


def _selected(selection: str, name: str) -> bool:
    """pytest -k's rule on a test's name: each word a case-insensitive substring of it, with and / or / not."""
    import re
    return eval(re.sub(r"\w+", lambda m: m[0] if m[0] in ("and", "or", "not") else str(m[0].lower() in name.lower()),
                       selection))


def _grader_tests(exercises) -> list[str]:
    """The test functions the exercises' graders select, in this file's order (the order pytest runs them in)."""
    tree = _tree(open(__file__).read())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
            and any(_selected(e.grader, n.name) for e in exercises)]


def _blanked(source: str, names) -> str:
    """`source` with each top-level function in `names` cut to its signature, its docstring and a TODO."""
    lines, found = source.splitlines(keepends=True), {}
    for node in _tree(source).body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            found[node.name] = node
    if set(names) - set(found):
        raise ValueError(f"dp_rlhf.py has no function {sorted(set(names) - set(found))}")
    for node in sorted(found.values(), key=lambda n: -n.lineno):  # bottom up: the line numbers above stay right
        doc, pad = node.body[0], " " * node.body[0].col_offset
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            raise ValueError(f"{node.name} has no docstring: a blanked function's docstring is its contract")
        lines[doc.end_lineno:node.end_lineno] = [f"{pad}# TODO (exercise): write {node.name}; its docstring is the "
                                                 "contract\n", f'{pad}raise NotImplementedError("exercise: write '
                                                 f'{node.name}")\n']
    return "".join(lines)


def _pasted_back(blanked: str, reference: str, names) -> str:
    """Each function of `names` in `blanked` (a handout's dp_rlhf.py) given its body in `reference` back."""
    ref_lines, lines = reference.splitlines(keepends=True), blanked.splitlines(keepends=True)
    ref = {n.name: n for n in _tree(reference).body if isinstance(n, ast.FunctionDef)}
    for node in sorted((n for n in _tree(blanked).body if isinstance(n, ast.FunctionDef) and n.name in names),
                       key=lambda n: -n.lineno):
        r = ref[node.name]
        lines[node.body[0].end_lineno:node.end_lineno] = ref_lines[r.body[0].end_lineno:r.end_lineno]
    return "".join(lines)


def _grader_source(exercises) -> str:
    """The exercises' tests with what they use of this file, transitively (imports, constants, fixtures, helpers,
    the autouse fixtures), in this file's order; a top-level expression (logging's level) goes with the statement
    before it."""
    source = open(__file__).read()
    tree, lines = _tree(source), source.splitlines(keepends=True)
    defined, imports, roots = {}, [], set(_grader_tests(exercises))
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
            defined.update({(a.asname or a.name).split(".")[0]: node for a in node.names})
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined[node.name] = node
            roots |= {node.name for k in getattr(node, "decorator_list", []) for kw in getattr(k, "keywords", [])
                      if kw.arg == "autouse" and getattr(kw.value, "value", False)}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                defined.update({n.id: node for n in ast.walk(target) if isinstance(n, ast.Name)})
    uses = lambda node: ({n.id for n in ast.walk(node) if isinstance(n, ast.Name)}  # and fixtures, by parameter
                         | {a.arg for n in ast.walk(node) if isinstance(n, ast.FunctionDef) for a in n.args.args})
    needed, todo, configure = set(), list(roots), []
    while todo:
        name = todo.pop()
        if name in defined and name not in needed:
            needed.add(name)
            todo += uses(defined[name]) if not isinstance(defined[name], (ast.Import, ast.ImportFrom)) else []
    kept = lambda node: any(v is node for k, v in defined.items() if k in needed)
    for before, node in zip(tree.body, tree.body[1:]):
        if isinstance(node, ast.Expr) and kept(before) and uses(node) <= set(defined):
            configure.append(node)
            needed |= uses(node)  # names of imports: nothing more to follow
    if needed & TEACHER_ONLY:
        raise ValueError(f"a grader uses {sorted(needed & TEACHER_ONLY)}: teacher-only")
    out = [f'"""Exercise {", ".join(e.number for e in exercises)}: the grader, `{GRADER}` in this folder. It fails '
           'until\nyour dp_rlhf.py is right; a failure says which property broke. (Built from dp-rlhf\'s '
           'test_dp_rlhf.py.)"""\n\n']
    for node in imports:
        kept = [a for a in node.names if (a.asname or a.name).split(".")[0] in needed]
        if kept:
            out.append(ast.unparse(type(node)(**{**node.__dict__, "names": kept})) + "\n")
    for node in tree.body:
        name = getattr(node, "name", None) or next(iter(k for k, v in defined.items() if v is node), None)
        if node in configure or (not isinstance(node, (ast.Import, ast.ImportFrom)) and name in needed):
            first = min([node.lineno] + [k.lineno for k in getattr(node, "decorator_list", [])])
            out.append("\n\n" + "".join(lines[first - 1:node.end_lineno]))
    return "".join(out)


def handout(numbers: str, out: str) -> str:
    """Write the handout of exercises `numbers` ('1', '3', '1,4') into the new (or empty) folder `out`."""
    exercises = _exercises(numbers)
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"{out} is not empty: a handout goes into a new folder")
    blank = [f for e in exercises for f in e.blank]
    grader = _grader_source(exercises)
    requirements = open(os.path.join(HERE, "requirements.txt")).read().rstrip() + "\npytest\n"
    requirements += "dp-accounting  # the grader's oracle\n" if "dp_accounting" in grader else ""
    text = [f"# Exercise {e.number}: {e.title}\n\n{e.text}\n\n**Expected time:** {e.student}.\n" for e in exercises]
    write = ("**Write** " + ", ".join(f"`{f}`" for f in blank) + " in `dp_rlhf.py`: under " + ("its docstring, its "
             "body" if len(blank) == 1 else "each docstring, the body") + " is a `# TODO` that raises "
             "NotImplementedError. The docstring is the contract: the inputs and their shapes, what is returned, in "
             "order, the constants that matter. The rest of `dp_rlhf.py` works; use it.\n"
             if blank else "**Nothing is blank:** `dp_rlhf.py` is the working reference. Break it as the text "
             "says, run the grader, then put it back.\n")
    doc = ("\n".join(text) + "\n" + write + "\nThe paper: Wu et al., \"Privately Aligning Language Models with "
           "Reinforcement Learning\", ICLR 2024 (arXiv 2310.16960).\n\n**Grade it** from this folder:\n\n"
           f"    pip install -r requirements.txt   # once\n    {GRADER}\n\n" + ("It fails until the code is right. "
           if blank else "It passes on the working code, and must fail on the broken one. ") + "Read the first "
           "failure (`-x` stops there): its message names the property that broke.\n")
    os.makedirs(out, exist_ok=True)
    files = {"EXERCISE.md": doc, "dp_rlhf.py": _blanked(open(os.path.join(HERE, "dp_rlhf.py")).read(), blank),
             "pytest.ini": open(os.path.join(HERE, ".pytest.ini")).read(), "requirements.txt": requirements,
             "test_exercise.py": grader}
    assert sorted(files) == sorted(HANDOUT_FILES)
    for name, content in files.items():
        with open(os.path.join(out, name), "w") as f:
            f.write(content)
    return out


def _blocks(tree, top: bool = False) -> list[list[str]]:
    """Every statement list in `tree`, at any depth, each statement as ast.dump (positions left out); the module's
    own list only with `top` (no function body is one, and dumping each whole def twice costs seconds)."""
    return [[ast.dump(s) for s in getattr(n, f)] for n in ast.walk(tree) if top or n is not tree
            for f in ("body", "orelse", "finalbody")
            if isinstance(getattr(n, f, None), list) and getattr(n, f) and isinstance(getattr(n, f)[0], ast.stmt)]


@functools.lru_cache(maxsize=None)
def _tree(source: str) -> ast.Module:
    """ast.parse, once a source (ten handouts parse the same two files): the trees are only read."""
    return ast.parse(source)


@functools.lru_cache(maxsize=None)
def _parsed(source: str) -> tuple:
    """(tree, every statement, every statement list) of `source`, the statements as ast.dump."""
    blocks = _blocks(_tree(source))
    return _tree(source), [s for b in blocks for s in b], blocks


def _answer_leaks(reference: str, names, sources) -> list[str]:
    """What of the reference bodies of `names` appears in `sources` (compared by AST): a whole body (as a run of
    any statement list), or one statement of it that the reference has nowhere else."""
    import collections
    ref, everywhere = _parsed(reference)[0], collections.Counter(_parsed(reference)[1])
    seen, blocks, leaks = set(), [], []
    for source in sources:
        seen.update(_parsed(source)[1])
        blocks += _parsed(source)[2]
    for fn in (n for n in ref.body if isinstance(n, ast.FunctionDef) and n.name in names):
        body = [ast.dump(s) for s in fn.body[1:]]  # after the docstring
        own = collections.Counter(s for b in _blocks(ast.Module(fn.body[1:], []), top=True) for s in b)
        leaks += [f"{fn.name}'s body" for b in blocks if any(b[i:i + len(body)] == body for i in range(len(b)))]
        leaks += [f"{fn.name}: {s[:100]}" for s, c in own.items() if everywhere[s] == c and s in seen]
    return leaks


class _Outcome:
    """A pytest plugin: the test functions collected and the failures (test, the first line of its message)."""

    def __init__(self):
        self.collected, self.failures = [], []

    def pytest_collection_finish(self, session):
        self.collected = list(dict.fromkeys(item.originalname for item in session.items))

    def pytest_runtest_logreport(self, report):
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = (crash.message if crash is not None else str(report.longrepr)).strip().splitlines() or [""]
            self.failures.append((report.nodeid.split("::")[-1], message[0]))


def _run_grader(selection: str, mutation: str | None = None) -> tuple:
    """(pytest's exit code, _Outcome, seconds): the grader run in this process, with `mutation` applied."""
    import contextlib
    import io
    import time
    undo, outcome, t = _mutate(mutation) if mutation else (lambda: None), _Outcome(), time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-p", "no:unraisableexception",  # its gc at
                                "-k", selection, os.path.abspath(__file__)], plugins=[outcome])  # exit: 3 s a run
    finally:
        undo()
    return int(code), outcome, time.perf_counter() - t


def check_exercises(numbers: str = "all") -> bool:
    """Each grader passes as the code is, and fails blanked and on each named wrong body: a table, a row each. The
    runs share this process (torch is imported once); a mutation is undone before the next run."""
    import tempfile
    os.environ["DP_RLHF_TEST_CACHE"] = os.environ.get("DP_RLHF_TEST_CACHE") or tempfile.mkdtemp()
    ok = True
    print("| # | variant | the grader | s | |\n|---|---|---|---|---|", flush=True)
    for ex in _exercises(numbers):
        variants = [("as is", None)] + [("blank", " ".join(ex.blank))] * bool(ex.blank) + [(w, w) for w in ex.wrong]
        for label, mutation in variants:
            try:
                code, outcome, seconds = _run_grader(ex.grader, mutation)
            except ValueError as e:  # the reference moved under a wrong body: a row that says so, not a crash
                print(f"| {ex.number} | `{label}` | cannot apply: {e} | 0 | WRONG |", flush=True)
                ok = False
                continue
            if mutation is None:
                handed = _grader_tests([ex])
                good = code == 0 and outcome.collected == handed
                result = (f"pass ({len(outcome.collected)} tests)" if good else f"exit {code}: " + (
                    "; ".join(f"{t}: {m}" for t, m in outcome.failures[:1]) or f"ran {outcome.collected}, the "
                    f"handout has {handed}"))
            else:  # 1: a test failed (not 2, 3, 4: broken, nor 5: none selected)
                good = code == 1 and bool(outcome.failures)
                result = (f"fails: {outcome.failures[0][0]}: {outcome.failures[0][1]}" if outcome.failures
                          else f"exit {code}")[:160]
            ok &= good
            print(f"| {ex.number} | {label if mutation is None else f'`{label}`'} | {result.replace('|', '/')} | "
                  f"{seconds:.0f} | {'ok' if good else 'WRONG'} |", flush=True)
    return ok


def test_every_wrong_body_applies_to_the_reference_and_is_undone():
    """Each WRONG entry still edits its function's current source (it compiles, and changes the function), and
    its undo puts the reference back; every exercise names only existing wrong bodies. The check runs them."""
    for spec, (fn, *_edits) in WRONG.items():
        right = getattr(d, fn)
        undo = _mutate(spec)
        assert getattr(d, fn) is not right, spec
        undo()
        assert getattr(d, fn) is right, spec
    assert all(w in WRONG for e in EXERCISES for w in e.wrong) and all(len(e.wrong) >= 3 for e in EXERCISES if e.blank)


def test_handouts_hide_the_answers_and_paste_back_to_the_reference(tmp_path):
    """Every exercise's handout: its dp_rlhf.py is the reference with the exercise's bodies blanked (pasted back, it
    is the reference, byte for byte); no blanked body, nor any statement of one that the reference has nowhere
    else, appears in any file of it (by AST); its grader holds the exercise's tests and nothing teacher-only."""
    reference = open(os.path.join(HERE, "dp_rlhf.py")).read()
    for ex in EXERCISES:
        out = handout(ex.number, str(tmp_path / ex.number))
        assert sorted(os.listdir(out)) == sorted(HANDOUT_FILES), f"exercise {ex.number}: {os.listdir(out)}"
        files = {f: open(os.path.join(out, f)).read() for f in HANDOUT_FILES}
        assert _pasted_back(files["dp_rlhf.py"], reference, ex.blank) == reference, ex.number
        blanked = {n.name: n for n in _tree(files["dp_rlhf.py"]).body if isinstance(n, ast.FunctionDef)}
        for name in ex.blank:
            assert [type(s) for s in blanked[name].body] == [ast.Expr, ast.Raise], f"{name} is not blank"
        leaks = _answer_leaks(reference, ex.blank, [files["dp_rlhf.py"], files["test_exercise.py"]])
        assert not leaks, f"exercise {ex.number}'s handout shows its answer: {leaks}"
        for f in ex.blank:  # the detector can fail: in the reference it finds the body, and statements of it
            found = _answer_leaks(reference, [f], [reference])
            assert f"{f}'s body" in found and any(x.startswith(f"{f}: ") for x in found), (f, found)
        grader = _tree(files["test_exercise.py"])
        tests = [n.name for n in grader.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
        assert tests == _grader_tests([ex]) and tests, f"exercise {ex.number}'s grader holds {tests}"
        names = {getattr(n, "id", None) or getattr(n, "name", None) for n in ast.walk(grader)}
        assert not names & TEACHER_ONLY, f"exercise {ex.number}'s grader holds {names & TEACHER_ONLY}"
        assert GRADER in files["EXERCISE.md"] and "unit:" in files["pytest.ini"] and "pytest" in files[
            "requirements.txt"] and ("dp-accounting" in files["requirements.txt"]) == (ex.number == "8")
    with pytest.raises(ValueError, match="not empty"):
        handout("1", str(tmp_path / "1"))
    with pytest.raises(ValueError, match="sweep"):
        handout("9", str(tmp_path / "9"))
    assert [e.number for e in _exercises("3,1")] == ["3a", "3b", "3c", "1"]


def test_a_handout_fails_as_handed_out_and_passes_with_the_reference_pasted_back(tmp_path):
    """The grader command, run as EXERCISE.md prints it inside exercise 4's folder: it fails on the blank and
    passes once the reference body is pasted back."""
    reference, ex = open(os.path.join(HERE, "dp_rlhf.py")).read(), _exercises("4")[0]
    out = handout("4", str(tmp_path / "ex4"))
    env = {k: v for k, v in os.environ.items() if k != "DP_RLHF_MUTATE"}
    grade = lambda: subprocess.run([sys.executable, *GRADER.split()[1:]], cwd=out, capture_output=True, text=True,
                                   env=env, timeout=600)
    r = grade()
    assert r.returncode == 1 and "NotImplementedError: exercise: write reward_loss" in r.stdout, r.stdout[-3000:]
    path = os.path.join(out, "dp_rlhf.py")
    pasted = _pasted_back(open(path).read(), reference, ex.blank)
    with open(path, "w") as f:
        f.write(pasted)
    r = grade()
    assert r.returncode == 0 and f"{len(_grader_tests([ex]))} passed" in r.stdout, r.stdout[-3000:]


def test_check_exercises_on_a_ci_sized_subset():
    """--check-exercises on three exercises (every variant of each): their graders pass as is and fail blanked and
    on every named wrong body, so they cannot decay unseen. The whole check is README's command."""
    env = {k: v for k, v in os.environ.items() if k != "DP_RLHF_MUTATE"}
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--check-exercises", "3a,3c,5"], cwd=HERE,
                       capture_output=True, text=True, env=env, timeout=600)
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 3") or line.startswith("| 5")]
    assert r.returncode == 0 and len(rows) == sum(2 + len(e.wrong) for e in _exercises("3a,3c,5")), \
        r.stdout[-4000:] + r.stderr[-2000:]
    assert all(row.endswith("| ok |") for row in rows), r.stdout


def test_readme_lists_each_exercise_as_its_grader_runs():
    """README's exercise table names each exercise's functions and grader selection as EXERCISES does."""
    readme = open(os.path.join(HERE, "README.md")).read()
    for ex in EXERCISES:
        row = next((line for line in readme.splitlines() if line.startswith(f"| {ex.number} |")), "")
        assert f"`{ex.grader}`" in row and all(f"`{f}`" in row for f in ex.blank + ex.wrong[:1] * (not ex.blank)), \
            f"README's row of exercise {ex.number} is out of date: {row!r}"


if __name__ == "__main__":
    if {a.split("=")[0] for a in sys.argv[1:]} & {"--bench", "--probe"}:  # tools with flags of their own
        sys.exit(tools_main(sys.argv[1:]))
    parser = argparse.ArgumentParser(description="The exercises' handouts and their check (README, Exercises); "
                                     "the unit probe (NOTES.md); the benchmark and the base model's probes.")
    parser.add_argument("--handout", metavar="N[,M]", help="write exercise N's handout (3: 3a, 3b and 3c) to --out")
    parser.add_argument("--out", metavar="DIR", help="the handout's folder: new, or empty")
    parser.add_argument("--check-exercises", nargs="?", const="all", metavar="N[,M]",
                        help="each grader as is (must pass), blanked and on each wrong body (must fail)")
    parser.add_argument("--probe-units", action="store_true", help="the unit-level probe runs (NOTES.md)")
    parser.add_argument("--bench", choices=["step", "ppo"], help="a DP step against non-private ones, or a DPPPO "
                        "iteration by phase (its flags: --bench step --help)")
    parser.add_argument("--probe", action="store_true", help="the base model's copy and reward-feature probes "
                        "(its flags: --probe --help)")
    ns = parser.parse_args()
    try:
        if ns.handout:
            if not ns.out:
                parser.error("--handout needs --out DIR")
            path = handout(ns.handout, ns.out)
            print(f"wrote {path}/: " + ", ".join(HANDOUT_FILES) + f". The student runs `{GRADER}` there.")
        elif ns.check_exercises:
            sys.exit(0 if check_exercises(ns.check_exercises) else 1)
        elif ns.probe_units:
            probe_units()
        else:
            parser.print_help()
    except ValueError as e:
        parser.error(str(e))
