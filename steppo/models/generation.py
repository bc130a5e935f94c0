"""Batched sampling with a KV cache: token ids in, token ids and their log-probs out.

Each row samples with its own `torch.Generator`, so a row's tokens depend on its seed and its
logits, not on which other rows share the batch. Finished rows leave the batch (their cache
rows are dropped), so a long response does not make every row pay for it.
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
) -> list[Sample]:
    """Sample one response per prompt (left-padded batch, one forward per new token).

    Args:
        prompts: B token-id lists (non-empty).
        max_new_tokens: B per-row budgets (>= 1).
        stop_ids: ids that end a response (kept as its last token).
        generators: B CPU generators (None = torch's global one).
    """
    B = len(prompts)
    if B == 0:
        return []
    device = next(model.parameters()).device
    generators = generators or [None] * B
    P = max(len(p) for p in prompts)
    input_ids = torch.full((B, P), pad_id, dtype=torch.long)
    attention = torch.zeros((B, P), dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
        attention[b, P - len(p):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache()
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
    next_pos = attention.sum(1)
    rows = list(range(B))  # original row of each live batch row
    results: list[Sample | None] = [None] * B
    responses: list[list[int]] = [[] for _ in range(B)]
    logprobs: list[list[float]] = [[] for _ in range(B)]
    budget = torch.tensor(max_new_tokens)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
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
    return results  # type: ignore[return-value]
