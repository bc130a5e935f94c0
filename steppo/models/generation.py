"""Batched sampling with a KV cache: token ids in, token ids and their log-probs out.

Each row samples with its own `torch.Generator`, so a row's tokens depend on its seed and its
logits, not on which other rows share the batch. Finished rows leave the batch (their cache
rows are dropped), so a long response does not make every row pay for it. An episode's keys and
values can be kept between steps (`EpisodeCache`), so the next step prefills only its new
observation tokens.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel


@dataclass
class Sample:
    """One generated response.

    Attributes:
        response_ids: sampled ids, the stop token included when one was sampled.
        logprobs: log-prob of each sampled id under the sampling distribution (logits / T).
        cut: the token budget ran out before a stop token.
    """

    response_ids: list[int]
    logprobs: list[float]
    cut: bool


def cache_keyword(model: PreTrainedModel) -> str:
    """The forward() keyword that takes a KV cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (earlier releases)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _pick(
    logp: torch.Tensor, greedy: bool, generators: list[torch.Generator | None]
) -> torch.Tensor:
    """(B, V) log-probs -> (B,) token ids: argmax, or inverse-CDF sampling with one uniform
    draw per row from that row's generator."""
    if greedy:
        return logp.argmax(-1)
    u = torch.stack([torch.rand((), generator=g) for g in generators]).to(logp.device)
    cdf = torch.cumsum(logp.exp(), dim=-1)
    idx = (cdf < (u * cdf[:, -1]).unsqueeze(1)).sum(-1)
    return idx.clamp(max=logp.shape[-1] - 1)


@dataclass
class EpisodeCache:
    """The keys and values an episode's context left in the model, to extend next step.

    Attributes:
        ids: the tokens whose keys/values are stored (the last prompt + all but the last
            sampled token: the last one was never fed to the model).
        layers: per layer (keys, values), each (kv_heads, len(ids), head_dim).
    """

    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]


def _layer_kv(cache: DynamicCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]  # transformers < 4.56


def reusable_prefix(cache: EpisodeCache | None, prompt: list[int]) -> int:
    """How many leading prompt tokens `cache` already holds (at least one token stays to feed)."""
    if cache is None or len(cache.ids) == 0 or len(prompt) < len(cache.ids):
        return 0
    if prompt[: len(cache.ids)] != cache.ids:
        return 0
    return min(len(cache.ids), len(prompt) - 1)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    max_new_tokens: list[int],
    stop_ids: set[int],
    temperature: float = 1.0,
    greedy: bool = False,
    generators: list[torch.Generator | None] | None = None,
    pad_id: int = 0,
    caches: list[EpisodeCache | None] | None = None,
    keep_caches: bool = False,
) -> tuple[list[Sample], list[EpisodeCache | None]]:
    """Sample one response per prompt (batched, one forward per new token).

    With `caches`, each row whose prompt extends its cached ids feeds only the new tokens (the
    observation since its last step): its cached keys/values are placed before them, so the
    prefill costs the new tokens instead of the whole history. Row layout::

        [pad .. | cached keys (c_i) | pad .. | new prompt tokens (s_i)] then one token a step

    Args:
        prompts: B token-id lists (non-empty).
        max_new_tokens: B per-row budgets (>= 1).
        stop_ids: ids that end a response (kept as its last token).
        generators: B CPU generators (None = torch's global one).
        caches: B episode caches (None entries: no cache).
        keep_caches: return each row's cache after generation (else Nones).

    Returns: the samples and, per row, its new cache (or None).
    """
    B = len(prompts)
    if B == 0:
        return [], []
    device = next(model.parameters()).device
    generators = generators or [None] * B
    caches = caches or [None] * B
    reuse = [reusable_prefix(c, p) for c, p in zip(caches, prompts)]
    suffixes = [p[r:] for p, r in zip(prompts, reuse)]
    C, S = max(reuse), max(len(x) for x in suffixes)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    attention = torch.zeros((B, C + S), dtype=torch.long)
    positions = torch.zeros((B, S), dtype=torch.long)
    for b, (suffix, r) in enumerate(zip(suffixes, reuse)):
        n = len(suffix)
        input_ids[b, S - n:] = torch.tensor(suffix, dtype=torch.long)
        attention[b, C - r: C] = 1
        attention[b, C + S - n:] = 1
        positions[b, S - n:] = torch.arange(r, r + n)
    input_ids, attention, positions = input_ids.to(device), attention.to(device), positions.to(device)
    cache = DynamicCache()
    if C > 0:
        template = next(c for c, r in zip(caches, reuse) if r > 0)
        for layer, (k0, v0) in enumerate(template.layers):
            keys = k0.new_zeros((B, k0.shape[0], C, k0.shape[2]))
            values = v0.new_zeros((B, v0.shape[0], C, v0.shape[2]))
            for b, (c, r) in enumerate(zip(caches, reuse)):
                if r:
                    keys[b, :, C - r:] = c.layers[layer][0][:, :r]
                    values[b, :, C - r:] = c.layers[layer][1][:, :r]
            cache.update(keys, values, layer)
    kv = cache_keyword(model)
    out = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{kv: cache},
    )
    logits = out.logits[:, -1]
    next_pos = positions[:, -1] + 1
    rows = list(range(B))  # original row of each live batch row
    results: list[Sample | None] = [None] * B
    kept: list[EpisodeCache | None] = [None] * B
    responses: list[list[int]] = [[] for _ in range(B)]
    logprobs: list[list[float]] = [[] for _ in range(B)]
    budget = torch.tensor(max_new_tokens)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    n_layers = len(cache.layers) if hasattr(cache, "layers") else len(cache.key_cache)
    while rows:
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        tok = _pick(logp, greedy, [generators[r] for r in rows])
        lp = logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
        is_stop = torch.isin(tok, stop).tolist()
        tok_list, lp_list = tok.tolist(), lp.tolist()
        keep = []
        for i, r in enumerate(rows):
            responses[r].append(tok_list[i])
            logprobs[r].append(lp_list[i])
            if is_stop[i] or len(responses[r]) >= int(budget[r]):
                results[r] = Sample(responses[r], logprobs[r], cut=not is_stop[i])
                if keep_caches:
                    real = attention[i].nonzero().squeeze(1)
                    kept[r] = EpisodeCache(
                        ids=prompts[r] + responses[r][:-1],
                        layers=[tuple(t[i][:, real].clone() for t in _layer_kv(cache, layer)) for layer in range(n_layers)],
                    )
            else:
                keep.append(i)
        if not keep:
            break
        if len(keep) < len(rows):
            idx = torch.tensor(keep, device=device)
            cache.batch_select_indices(idx)
            attention, next_pos, tok = attention[idx], next_pos[idx], tok[idx]
            rows = [rows[i] for i in keep]
        attention = torch.cat([attention, attention.new_ones(len(rows), 1)], dim=1)
        out = model(
            input_ids=tok.unsqueeze(1),
            attention_mask=attention,
            position_ids=next_pos.unsqueeze(1),
            use_cache=True,
            **{kv: cache},
        )
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return results, kept  # type: ignore[return-value]
