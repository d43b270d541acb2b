"""Rewards for post-training: one interface, rule-based verifiable rewards, composition per source."""
from keyetron.rewards.base import (Composite, Reward, RewardFn, RewardTable, answer_text, reference, score_safely,
                                   split_think)
from keyetron.rewards.judge import JudgeReward, PreferenceReward, engine_judge
from keyetron.rewards.rules import RULES

__all__ = ["Composite", "JudgeReward", "PreferenceReward", "RULES", "Reward", "RewardFn", "RewardTable", "answer_text", "reference", "score_safely",
           "engine_judge", "split_think"]
