"""Rollouts: many sampled responses per multimodal prompt, with the log-probs training computes."""
from keyetron.rollout.engine import KVCache, Rollout, RolloutStats, generate, rollout_document
from keyetron.rollout.sampling import SamplingParams, choose, sampling_probs, sequence_seed

__all__ = ["KVCache", "Rollout", "RolloutStats", "SamplingParams", "choose", "generate", "rollout_document",
           "sampling_probs", "sequence_seed"]
