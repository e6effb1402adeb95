r"""Advantage actor-critic (A2C) on gymnasium's CartPole-v1: the reinforcement learning problem of the study.

The recipe is that of Stable-Baselines3's A2C, whose optimizer is RMSProp:
``n_envs`` environments stepped in lockstep for ``n_steps`` steps per update,
``n_steps``-step returns bootstrapped from the critic
(:math:`\gamma = 0.99`, no bootstrap past a pole that fell, a bootstrap from
the last state past the 500-step time limit), loss
:math:`-\log\pi(a|s)\,A + \tfrac12 (R - V(s))^2`, the gradient's norm clipped
to 0.5, and separate 64-64 tanh networks for the policy and the value. The
targets move as the policy changes: the value net chases the returns of a
policy that the same steps change.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rmsprop.tools.compare.problems import Problem

__all__ = ["CartPoleA2C"]

# Evaluation episodes start from states drawn with this seed: the same held-out starts for every run.
EVALUATION_SEED = 10_000


def _make_env(num_envs: int):
    import gymnasium

    return gymnasium.make_vec("CartPole-v1", num_envs=num_envs, vectorization_mode="vector_entry_point")


def _mlp(outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, outputs))


class _ActorCritic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.policy = _mlp(2)
        self.value = _mlp(1)


class CartPoleA2C(Problem):
    """A2C on CartPole-v1; one optimizer step per rollout of ``n_envs * n_steps`` environment steps.

    Figures: ``eval_return``, the mean return of ``evaluation_episodes``
    greedy episodes from fixed held-out starts (one per evaluation
    environment, up to 500 steps), and ``episode_return``, the mean return of
    the training episodes that ended since the previous log point (NaN if
    none did). The final figure ``late_eval_return`` averages ``eval_return``
    over the log points of the last quarter of training, since an A2C
    policy's return swings from one update to the next.
    """

    n_envs, n_steps, gamma, value_coefficient = 16, 5, 0.99, 0.5
    evaluation_episodes = 8
    max_grad_norm = 0.5
    env_steps_per_step = n_envs * n_steps

    def __init__(self, seed: int, steps: int) -> None:
        torch.manual_seed(seed)
        self.model = _ActorCritic()
        self.actions = torch.Generator().manual_seed(seed)
        self.env = _make_env(self.n_envs)
        observations, _ = self.env.reset(seed=seed)
        self.observations = torch.from_numpy(observations)
        self.evaluation_env = _make_env(self.evaluation_episodes)
        # After a step that ends an episode, the vector env's next step only resets that environment.
        self.resetting = np.zeros(self.n_envs, dtype=bool)
        self.running_returns = np.zeros(self.n_envs)
        self.finished_returns: list[float] = []
        self.late_from = math.ceil(0.75 * steps)
        self.step = 0
        self.late_evaluations: list[float] = []

    def training_loss(self, step: int) -> Tensor:
        self.step = step
        observations, actions, rewards, terminated, valid = [], [], [], [], []
        for _ in range(self.n_steps):
            with torch.no_grad():
                probabilities = F.softmax(self.model.policy(self.observations), dim=-1)
            action = torch.multinomial(probabilities, 1, generator=self.actions)[:, 0]
            next_observations, reward, terminal, truncated, _ = self.env.step(action.numpy())
            observations.append(self.observations)
            actions.append(action)
            rewards.append(torch.from_numpy(reward))
            terminated.append(torch.from_numpy(terminal))
            valid.append(torch.from_numpy(~self.resetting))
            self._count_returns(reward, terminal | truncated)
            self.observations = torch.from_numpy(next_observations)
        states = torch.stack([*observations, self.observations])
        values = self.model.value(states)[..., 0]
        returns = self._returns(values.detach(), rewards, terminated, valid)
        mask = torch.stack(valid).float()
        log_probabilities = F.log_softmax(self.model.policy(states[:-1]), dim=-1)
        chosen = log_probabilities.gather(-1, torch.stack(actions)[..., None])[..., 0]
        advantages = (returns - values[:-1]).detach()
        policy_loss = -(chosen * advantages * mask).sum()
        value_loss = ((returns - values[:-1]).square() * mask).sum()
        return (policy_loss + self.value_coefficient * value_loss) / mask.sum()

    def _count_returns(self, reward: np.ndarray, done: np.ndarray) -> None:
        self.running_returns += reward
        self.finished_returns.extend(self.running_returns[done].tolist())
        self.running_returns[done] = 0.0
        self.resetting = done

    def _returns(self, values: Tensor, rewards: list[Tensor], terminated: list[Tensor], valid: list[Tensor]) -> Tensor:
        """n-step returns; a reset step carries the value of the state its episode ended in."""
        running = values[-1]
        returns = []
        for t in reversed(range(self.n_steps)):
            bootstrapped = rewards[t] + self.gamma * (~terminated[t]).float() * running
            running = torch.where(valid[t], bootstrapped, values[t])
            returns.append(running)
        return torch.stack(returns[::-1])

    def _evaluation_return(self) -> float:
        observations, _ = self.evaluation_env.reset(seed=EVALUATION_SEED)
        returns = np.zeros(self.evaluation_episodes)
        running = np.ones(self.evaluation_episodes, dtype=bool)
        while running.any():
            greedy = self.model.policy(torch.from_numpy(observations)).argmax(dim=-1)
            observations, reward, terminal, truncated, _ = self.evaluation_env.step(greedy.numpy())
            returns += reward * running
            running &= ~(terminal | truncated)
        return float(returns.mean())

    def evaluate(self) -> dict[str, float]:
        evaluation = self._evaluation_return()
        if self.step >= self.late_from:
            self.late_evaluations.append(evaluation)
        finished = self.finished_returns
        self.finished_returns = []
        return {"eval_return": evaluation, "episode_return": float(np.mean(finished)) if finished else math.nan}

    def final_metrics(self) -> dict[str, float]:
        evaluations = self.late_evaluations or [self._evaluation_return()]
        return {"late_eval_return": float(np.mean(evaluations))}
