"""The RL controller that searches expressions, and the REINFORCE search loop around it.

As in Neural Architecture Search (Zoph & Le, 2017) and "Searching for activation functions" (Ramachandran et al.,
2017): a GRU emits the token sequence of :mod:`retrieval_core.rl.expressions` one token at a time, each token fed
back (embedded) as the next input; the reward of the decoded expression (a validation retrieval metric, an SVM
accuracy) trains it by REINFORCE with an exponential-moving-average baseline and an entropy bonus, with Adam.
The defaults are METHODS.md's: hidden 128, baseline decay 0.95, entropy weight 0.0025, lr 2e-4.

Rewards are the expensive part (each one is a retrieval evaluation), so they are cached by the expression's
canonical string: a repeated sample costs nothing. The search is deterministic for a seed, so an interrupted
search is resumed by running it again with the same seed and the rewards already computed (``reward_cache``):
it replays the same samples without calling the reward function for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from retrieval_core.rl.expressions import Expr, ExpressionError, Grammar, decode


class Controller(nn.Module):
    """GRU policy over the token sequence of a :class:`Grammar`.

    The input at each step is the embedding of the previous token (a learned start embedding first); each token
    kind (operand, unary, binary) has one output head. A position whose vocabulary is smaller than its kind's
    (the first unit's operands cannot be ``prev``) uses the first logits of the head only. At the grammar's
    guarded position (the last unit's second operand) the tokens :func:`~retrieval_core.rl.expressions.allowed_tokens`
    rules out for a row get probability 0 (their logits are masked before the softmax), so no sampled sequence
    describes a constant and the log-probabilities and entropies are those of the distribution sampled from.

    Args:
        grammar: the token layout to sample.
        hidden: GRU hidden size.
        embedding_dim: size of the token embeddings fed back as inputs.
    """

    def __init__(self, grammar: Grammar, hidden: int = 128, embedding_dim: int = 32):
        super().__init__()
        self.kinds = grammar.token_kinds
        self.sizes = grammar.vocab_sizes
        self.n_variables = len(grammar.variables)
        self.prev_token = grammar.prev_token
        self.guarded_position = grammar.guarded_position
        kind_sizes = grammar.kind_sizes
        # One embedding table for all kinds: token t of kind k is row offset[k] + t; the last row is the start.
        self.offsets: dict[str, int] = {}
        rows = 0
        for kind, size in kind_sizes.items():
            self.offsets[kind] = rows
            rows += size
        self.start_row = rows
        self.embedding = nn.Embedding(rows + 1, embedding_dim)
        self.cell = nn.GRUCell(embedding_dim, hidden)
        self.heads = nn.ModuleDict({kind: nn.Linear(hidden, size) for kind, size in kind_sizes.items()})

    def sample(
        self, batch: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample ``batch`` token sequences.

        Returns:
            (batch, length) int64 tokens, (batch,) summed log-probabilities and (batch,) summed entropies of the
            per-position distributions; the last two carry gradients.
        """
        weight = self.embedding.weight
        rows = torch.full((batch,), self.start_row, dtype=torch.long, device=weight.device)
        h = torch.zeros(batch, self.cell.hidden_size, device=weight.device, dtype=weight.dtype)
        tokens, log_prob, entropy = [], 0.0, 0.0
        # Liveness (see expressions.allowed_tokens): does the previous unit, and this unit's first operand, use a
        # variable?
        prev_live = torch.zeros(batch, dtype=torch.bool, device=weight.device)
        first_live = unit_live = prev_live
        for position, (kind, size) in enumerate(zip(self.kinds, self.sizes)):
            h = self.cell(self.embedding(rows), h)
            logits = self.heads[kind](h)[:, :size]
            if position == self.guarded_position:
                ruled_out = torch.ones(batch, size, dtype=torch.bool, device=weight.device)
                ruled_out[:, : self.n_variables] = False
                if size > self.prev_token:
                    ruled_out[:, self.prev_token] = ~prev_live
                logits = logits.masked_fill(ruled_out & ~first_live[:, None], -math.inf)
            log_p = torch.log_softmax(logits, dim=1)
            p = log_p.exp()
            token = torch.multinomial(p, 1, generator=generator).squeeze(1)
            log_prob = log_prob + log_p.gather(1, token[:, None]).squeeze(1)
            entropy = entropy - (p * log_p.masked_fill(p == 0, 0.0)).sum(dim=1)  # 0 log 0 = 0
            tokens.append(token)
            rows = token + self.offsets[kind]
            if kind == "operand":
                live = (token < self.n_variables) | ((token == self.prev_token) & prev_live)
                if position % 5 == 0:
                    first_live = live
                else:
                    unit_live = first_live | live
            elif kind == "binary":
                prev_live = unit_live
        return torch.stack(tokens, dim=1), log_prob, entropy


@dataclass(frozen=True)
class StepStats:
    """One controller update: the batch's mean and max reward, the baseline it was compared to, the mean entropy
    of the sampled sequences, and the best reward seen so far."""

    step: int
    mean_reward: float
    max_reward: float
    baseline: float
    entropy: float
    best_reward: float


@dataclass(frozen=True)
class SearchResult:
    """What :func:`search` found.

    Attributes:
        best_expression: canonical string of the best expression (the first one sampled on a tie).
        best_reward: its reward.
        history: one :class:`StepStats` per step.
        n_evaluated: distinct expressions the reward function was called on in this run.
        n_distinct: distinct expressions sampled (some found in the cache).
        rewards: reward of every distinct expression sampled, by canonical string.
        seed: the seed of the run.
    """

    best_expression: str
    best_reward: float
    history: tuple[StepStats, ...]
    n_evaluated: int
    n_distinct: int
    rewards: dict[str, float] = field(repr=False)
    seed: int

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` best distinct expressions, best first (ties by string, so the order is reproducible)."""
        return sorted(self.rewards.items(), key=lambda item: (-item[1], item[0]))[:k]


def search(
    grammar: Grammar,
    reward_fn: Callable[[Expr], float],
    *,
    steps: int,
    batch: int,
    seed: int,
    lr: float = 2e-4,
    baseline_decay: float = 0.95,
    entropy_weight: float = 0.0025,
    hidden: int = 128,
    reward_cache: MutableMapping[str, float] | None = None,
    progress: bool = True,
) -> SearchResult:
    """Search the grammar's expressions for the highest reward by REINFORCE.

    Each step samples ``batch`` sequences, scores them, and takes one Adam step on
    ``-mean((r - b) log p) - entropy_weight * mean(H)``. The baseline ``b`` starts at the first batch's mean
    reward and then follows ``b <- decay b + (1 - decay) mean(r)``, updated after the step that used it.

    Args:
        grammar: the search space.
        reward_fn: expression -> reward, higher is better (e.g. mAP of the transformed embeddings). It only
            ever sees expressions that use a variable (the controller cannot sample a constant). An
            :class:`ExpressionError` it raises (e.g. from non-finite values) scores 0; any other exception
            propagates, and so does a non-finite reward (a bug to see, not a bad expression to skip).
        steps: controller updates.
        batch: sequences sampled per update.
        seed: seeds the controller's initial weights and its sampling; the same seed gives the same run.
        lr: Adam learning rate.
        baseline_decay: decay of the moving-average baseline.
        entropy_weight: weight of the entropy bonus, which keeps the controller exploring.
        hidden: GRU hidden size.
        reward_cache: rewards already known, by canonical string; filled in place as rewards arrive. Pass the
            rewards of an interrupted run with the same seed to resume it.
        progress: show a tqdm bar.
    """
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got {steps} and {batch}")
    if not 0.0 <= baseline_decay < 1.0:
        raise ValueError(f"baseline_decay must be in [0, 1), got {baseline_decay}")
    cache: MutableMapping[str, float] = {} if reward_cache is None else reward_cache
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controller = Controller(grammar, hidden=hidden)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(controller.parameters(), lr=lr)

    seen: dict[str, float] = {}
    n_evaluated = 0
    best_expression, best_reward = "", -math.inf
    baseline: float | None = None
    history: list[StepStats] = []
    bar = tqdm(range(steps), desc=f"expression search (seed {seed})", disable=not progress)
    for step in bar:
        tokens, log_prob, entropy = controller.sample(batch, generator)
        rewards = []
        for row in tokens.tolist():
            expr = decode(row, grammar)
            key = str(expr)
            if key not in cache:
                cache[key] = _score(reward_fn, expr)
                n_evaluated += 1
            reward = cache[key]
            seen[key] = reward
            rewards.append(reward)
            if reward > best_reward:
                best_expression, best_reward = key, reward
        mean_reward = math.fsum(rewards) / batch
        if baseline is None:
            baseline = mean_reward
        advantage = torch.tensor(rewards, dtype=torch.float64) - baseline
        loss = -(advantage.to(log_prob.dtype) * log_prob).mean() - entropy_weight * entropy.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(
            StepStats(step, mean_reward, max(rewards), baseline, float(entropy.detach().mean()), best_reward)
        )
        baseline = baseline_decay * baseline + (1.0 - baseline_decay) * mean_reward
        bar.set_postfix(mean=f"{mean_reward:.4f}", best=f"{best_reward:.4f}")
    return SearchResult(best_expression, best_reward, tuple(history), n_evaluated, len(seen), seen, seed)


def _score(reward_fn: Callable[[Expr], float], expr: Expr) -> float:
    try:
        reward = float(reward_fn(expr))
    except ExpressionError:
        return 0.0
    if not math.isfinite(reward):
        raise ValueError(f"reward_fn returned {reward} for {expr}")
    return reward
