"""Speculative Jacobi decoding (method=sjd; Teng et al. 2024, arXiv 2410.01699): each model call verifies a
window of draft codes at once and keeps the sampling distribution exactly (`sjd_codes`)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from t2i.models.gpt import GPT
from t2i.sampling.draws import draw, filter_logits
from t2i.sampling.guidance import guided_logits
from t2i.sampling.options import SamplingConfig, SamplingStats
from t2i.sampling.progress import Progress
from t2i.sampling.steps import fixed_shape_step


def sjd_codes(model: GPT, prefix: torch.Tensor, n: int, cfg: SamplingConfig, scales: torch.Tensor,
              guided_until: int, generators: list[torch.Generator], stats: SamplingStats,
              progress: Progress | None = None, step: str = "eager") -> torch.Tensor:
    """Speculative Jacobi decoding (Teng et al. 2024): prefix [n (+ n null-text rows), L] -> codes [n, image_len].

    Each model call feeds the last committed code and every sequence's window of draft codes (the KV
    cache is first rolled back to the committed codes: later writes overwrite the rest), then verifies
    each sequence's drafts left to right as speculative sampling does: a draft x drawn from q is
    accepted with probability min(1, p(x) / q(x)), p the model's distribution given the codes before it
    (guided, tempered and filtered as token-by-token sampling does); at the first rejection the code is
    drawn from the residual max(0, p - q) normalised, and when the whole window is accepted the call's
    last output gives one more code. So every code is distributed as token-by-token sampling draws it,
    and every call gives at least one. Greedy: a draft is accepted when it is the argmax, which gives
    exactly the greedy codes.

    Drafts. The unverified rest of the window becomes the next drafts, each distributed as this call's p
    at its position (the Jacobi iteration; its q = that p); the positions new to the window start as
    uniformly random codes with q a point mass on the drawn code (the paper's random initialisation).
    cfg.sjd_coupling "none" draws each next draft afresh from p, so a draft rarely repeats and is
    rarely accepted; "maximal" (Speculative Coupled Decoding, So et al. 2025) keeps the previous draft x
    with probability min(1, p(x) / q(x)), q the previous draft's distribution, and otherwise draws from
    max(0, p - q) normalised: the new draft is still distributed as p, but equals the previous one as
    often as any draw from p can, so drafts settle and get accepted. Why verification stays exact: a
    draft at position j depends only on the codes, drafts and random numbers at positions before j and
    its own (the model is causal), and its verification tests it once against p given the positions
    before it, with a uniform nothing else has used; so given everything the test of position j sees
    besides the draft itself, the draft is distributed as the q it is divided by. The keep test reuses
    the acceptance uniform of the same position from this call: a position past the first rejection was
    not tested, so that uniform is unused (and the random stream is the same for both couplings).

    cfg.sjd_group_size g > 0 (Grouped Speculative Decoding, So et al. 2025; NOT the sampling distribution):
    a draft x with p(x) > 0 is accepted with probability min(1, p(G) / q(G)), G the codes within g ranks of
    x in p's order (the codes the model rates nearly as likely as x: near-equivalent image codes), so
    drafts the model finds about as plausible as its likelier codes pass more often.

    Batches: sequences accept different numbers of codes. Each keeps its own count (`done`) and random
    stream; the cache keeps the codes all sequences have accepted (the minimum) and the sequences ahead
    re-feed theirs. A sequence more than a window ahead waits (draws nothing) until the others catch
    up, so each sequence's codes are those it gets alone.

    `step` (sampling.step, t2i.sampling.steps): "eager" runs each call over the window from the minimum count,
    its length as the counts spread; "static", "compiled" and "frozen" run one shape, W + 1 positions per row,
    each row's window at its own position (GPT.forward_at with a position per row), both guidance halves
    throughout, in a cache with W positions of room past the image's end (a finished sequence's window runs
    there, its outputs unused). Why a position per row rather than one window from the minimum: a window
    covering every row's drafts would have to be as long as the counts can spread (the whole image), and each
    row's own window is exactly the W + 1 positions it verifies. No sequence then waits for the others; each
    still draws only while it has codes to draw, so it gets the codes it gets alone, the eager step's codes.
    """
    held = (nullcontext((None, model.new_cache(len(prefix)))) if step == "eager"
            else fixed_shape_step(model, step, len(prefix), cfg.sjd_window))
    with held as (forward_at, cache):
        return _sjd_loop(model, forward_at, cache, prefix, n, cfg, scales, guided_until, generators, stats, progress)


def _sjd_loop(model: GPT, forward_at, cache, prefix: torch.Tensor, n: int, cfg: SamplingConfig, scales: torch.Tensor,
             guided_until: int, generators: list[torch.Generator], stats: SamplingStats,
             progress: Progress | None) -> torch.Tensor:
    """sjd_codes' loop, its windows through `forward_at` (a fixed-shape step on `cache`), or eager (None)."""
    gpt = model.cfg
    T, V, W = gpt.image_len, gpt.n_image_codes, cfg.sjd_window
    device = prefix.device
    start = prefix.shape[1] - 1  # the position of the token before the first code
    if start:  # the prompt but its last token, which the first window feeds
        model(prefix[:, :-1], cache, last=1, head_rows=1)
        stats.model_calls += 1
        if progress is not None:
            progress(0, T)
    before = prefix[:, -1]  # each row's token before code 0 (the null text's own in the unconditional half)
    scales = torch.cat([scales, scales.new_ones(1)])[:, None]  # position T: the output past the last code (unused)
    tokens = torch.zeros(n, T + W, dtype=torch.long, device=device)  # codes before done[i], then the drafts
    done = torch.zeros(n, dtype=torch.long, device=device)
    steps = torch.arange(W, device=device)
    # random numbers in float32 whatever the default dtype (prompt_uniforms)
    init = torch.stack([torch.rand(W, generator=g, dtype=torch.float32) for g in generators]).to(device)
    drafts = (init * V).long().clamp(max=V - 1)
    q = F.one_hot(drafts, V).float()  # each draft's distribution
    while True:
        c = int(done.min())  # codes every sequence has accepted
        if c == T:
            return tokens[:, :T]
        # a fixed-shape step runs every row at its own position: none waits
        active = (done < T) & ((done - c <= W) | (forward_at is not None))
        ends = (done + W).clamp(max=T)  # each verifies its drafts at done .. ends - 1
        count = torch.where(active, ends - done, 0)
        tokens.scatter_(1, done[:, None] + steps, drafts)
        if forward_at is None:
            end = int(ends[active].max())  # the window: codes c .. end - 1 (a waiting sequence's own beyond it wait too)
            halves = 2 if c < guided_until else 1
            first = before[:halves * n] if c == 0 else tokens[:, c - 1].repeat(halves)
            window = torch.cat([first[:, None], tokens[:, c:end].repeat(halves, 1)], 1)
            cache.length = start + c
            logits = guided_logits(model(window, cache, head_rows=V).float(), n, scales[c:end + 1])  # output j: code c + j
            # the window's outputs at each sequence's positions done .. done + W
            at = ((done - c)[:, None] + torch.arange(W + 1, device=device)).clamp(max=end - c)
            logits = logits.gather(1, at[..., None].expand(-1, -1, V))
        else:  # each row's code before done, then its drafts, at positions start + done ..; both halves throughout
            halves = 2 if guided_until else 1
            previous = tokens.gather(1, (done - 1).clamp(min=0)[:, None]).squeeze(1)
            first = torch.where((done == 0).repeat(halves), before[:halves * n], previous.repeat(halves))
            window = torch.cat([first[:, None], drafts.repeat(halves, 1)], 1)
            at = (done[:, None] + torch.arange(W + 1, device=device)).clamp(max=T)  # output j: code done + j
            logits = guided_logits(forward_at(window, (start + done).repeat(halves), cache, V).float(), n, scales[at])
        stats.model_calls += 1
        draws = torch.zeros(n, 3 * W + 1, dtype=torch.float32)
        for row in active.nonzero().squeeze(1).tolist():
            draws[row] = torch.rand(3 * W + 1, generator=generators[row], dtype=torch.float32)
        draws = draws.to(device)
        u_accept, u_code, u_draft, u_init = draws[:, :W], draws[:, W], draws[:, W + 1:2 * W + 1], draws[:, 2 * W + 1:]
        if cfg.greedy:
            best = logits.argmax(-1)  # [n, W + 1]
            accepted = (drafts == best[:, :W]) & (steps < count[:, None])
            m = accepted.long().cumprod(1).sum(1)  # drafts accepted, in order
            code = best.gather(1, m[:, None]).squeeze(1)
        else:
            p = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)  # [n, W + 1, V]
            px = p[:, :W].gather(-1, drafts[..., None]).squeeze(-1)
            qx = q.gather(-1, drafts[..., None]).squeeze(-1)  # > 0: each draft was drawn from its q
            if cfg.sjd_group_size:
                p_group, q_group = group_masses(p[:, :W], q, drafts, cfg.sjd_group_size)
                ratio = torch.where(px > 0, p_group / q_group, 0.0)  # never a code that p rules out
            else:
                ratio = px / qx
            accepted = (u_accept < ratio) & (steps < count[:, None])
            m = accepted.long().cumprod(1).sum(1)
            p_m = p.gather(1, m[:, None, None].expand(-1, 1, V)).squeeze(1)
            q_m = q.gather(1, m.clamp(max=W - 1)[:, None, None].expand(-1, 1, V)).squeeze(1)
            residual = (p_m - q_m).clamp_min(0)
            # rejected: the residual; the window all accepted: the next position's p (p == q up to rounding: p)
            rejected = (m < count) & (residual.sum(-1) > 0)
            code = draw(torch.where(rejected[:, None], residual, p_m), u_code)
        new = active & (done + m < T)  # the window all accepted up to the last code gives none more
        rows = new.nonzero().squeeze(1)
        tokens[rows, done[rows] + m[rows]] = code[rows]
        # the next window: positions new_done + k, which this call's outputs cover up to ends
        source = m[:, None] + 1 + steps  # their index in `at`
        refined = source <= count[:, None]
        random = (u_init * V).long().clamp(max=V - 1)
        if cfg.greedy:
            drafted = best.gather(1, source.clamp(max=W))
            q_next = q
        else:
            p_source = p.gather(1, source.clamp(max=W)[..., None].expand(-1, -1, V))
            if cfg.sjd_coupling == "maximal":
                drafted = coupled_drafts(p_source, drafts, q, source, u_accept, u_draft)
            else:
                drafted = draw(p_source.flatten(0, 1), u_draft.flatten()).view(n, W)
            q_next = torch.where(refined[..., None], p_source, F.one_hot(random, V).float())
        drafts = torch.where(active[:, None], torch.where(refined, drafted, random), drafts)
        q = torch.where(active[:, None, None], q_next, q)
        done = torch.where(active, (done + m + 1).clamp(max=T), done)
        if progress is not None:  # the positions every sequence has committed
            progress(int(done.min()), T)


def coupled_drafts(p: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor, source: torch.Tensor,
                   u_keep: torch.Tensor, u_draw: torch.Tensor) -> torch.Tensor:
    """Next drafts distributed as p [n, W, V], each as often as possible the previous draft at its position
    (maximal coupling): drafts [n, W] and q [n, W, V] are the previous drafts and their distributions, source
    [n, W] each next draft's index among them (W or more: a position without one: a plain draw from p)."""
    W = drafts.shape[1]
    previous = source.clamp(max=W - 1)
    x = drafts.gather(1, previous)
    q_x = q.gather(1, previous[..., None].expand_as(p))
    keep = (source < W) & (u_keep.gather(1, previous) < p.gather(-1, x[..., None]).squeeze(-1)
                           / q_x.gather(-1, x[..., None]).squeeze(-1))
    residual = (p - q_x).clamp_min(0)
    # p == q (up to rounding) leaves no residual: x is kept, and should rounding miss, the redraw is from p
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    redrawn = draw(torch.where((source < W)[..., None], residual, p).flatten(0, 1), u_draw.flatten())
    return torch.where(keep, x, redrawn.view_as(x))


def group_masses(p: torch.Tensor, q: torch.Tensor, x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The probabilities under p and q [..., V] of each code x's group [...]: the codes within `size` ranks of x
    in p's order, x included (grouped speculative decoding)."""
    order = p.argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(-1).gather(-1, x[..., None])
    lo, hi = (rank - size).clamp(min=0), (rank + size + 1).clamp(max=p.shape[-1])
    masses = []
    for probs in (p, q):
        # [..., V + 1]: the mass of the first k codes; float64, so that a small q(x) survives the difference
        cumulative = F.pad(probs.gather(-1, order).double().cumsum(-1), (1, 0))
        masses.append((cumulative.gather(-1, hi) - cumulative.gather(-1, lo)).squeeze(-1).float())
    return masses[0], masses[1]
