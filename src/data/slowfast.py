"""Slow-Fast video encoding: which sampled frames are "slow" (full detail) and which are "fast".

Keye-VL-1.5 spends its video token budget unevenly: a frame that looks like the latest
slow frame adds little new information, so it becomes a fast frame at ~30% of the tokens.
Planning a video is four steps (reference section 3):

1. sample frames uniformly at `fps` (capped by the source fps, and at most as many frames
   as can each get the minimum tokens under the budget);
2. frame types: the first frame is slow; every later frame is compared with the latest
   slow frame and becomes fast when similar enough, otherwise the new slow frame;
3. token budget: the largest per-slow-frame count T in [48, 768] such that
   n_slow * T + n_fast * max(int(0.3 * T), 48) <= budget;
4. one slow and one fast resolution per video: the source size smart-resized to T tokens
   and to the fast count.

Two named profiles: `paper` (threshold 0.95, 75,000 tokens, budget respected exactly) and
`keye-vl-utils` (threshold 0.90, 65,536 tokens, and the public code's arithmetic: its
frame sampling, its similarity averaged in float32 (a fraction exactly at the threshold falls
just under it), its binary search that lands one token above the largest fitting T, its
smart resize). A second similarity, `gray-mad`, is offered because the public metric is
lenient: two unrelated noise frames score 1.0 there.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from keyetron.data.resize import PATCH_FACTOR, num_tokens, resize_to_tokens
from keyetron.data.hsv import rgb_to_hsv_uint8
from keyetron.data.video import open_video

SimilarityName = Literal["keye-hsv-patch", "gray-mad"]
SLOW, FAST = 0, 1


@dataclass(frozen=True)
class SlowFastProfile:
    """Every number that decides a Slow-Fast plan."""

    name: str
    similarity_threshold: float  # frame is fast when similarity >= threshold (compat: similarity in float32)
    total_tokens: int  # budget of LLM tokens for all frames of one video
    fps: float = 2.0
    min_tokens: int = 48  # per-frame floor, also the lower end of the T search
    max_tokens: int = 768  # per-slow-frame ceiling
    fast_ratio: float = 0.3
    fast_min_tokens: int = 48
    similarity: SimilarityName = "keye-hsv-patch"
    similarity_max_tokens: int = 256  # frames are compared at this size, not at full resolution
    patch_cosine_threshold: float = 0.7  # keye-hsv-patch: a 28x28 patch matches above this cosine
    compat: bool = False  # keye-vl-utils 1.5.2 arithmetic (sampling, float32 similarity, search overshoot, resize)

    def __post_init__(self) -> None:
        if not 0 < self.min_tokens <= self.max_tokens:
            raise ValueError(f"profile {self.name}: need 0 < min_tokens <= max_tokens, got {self.min_tokens}, "
                             f"{self.max_tokens}")
        if not 0 < self.fast_min_tokens <= self.min_tokens:
            raise ValueError(f"profile {self.name}: fast_min_tokens ({self.fast_min_tokens}) must be in "
                             f"(0, min_tokens={self.min_tokens}] so that the frame cap keeps the budget feasible")
        if self.total_tokens < self.min_tokens or self.fps <= 0 or not 0 < self.fast_ratio <= 1:
            raise ValueError(f"profile {self.name}: total_tokens >= min_tokens, fps > 0 and 0 < fast_ratio <= 1 "
                             f"required, got {self.total_tokens}, {self.fps}, {self.fast_ratio}")
        if self.similarity not in ("keye-hsv-patch", "gray-mad"):
            raise ValueError(f"profile {self.name}: unknown similarity {self.similarity!r}; use 'keye-hsv-patch' "
                             f"or 'gray-mad'")


PROFILES: dict[str, SlowFastProfile] = {
    "paper": SlowFastProfile("paper", similarity_threshold=0.95, total_tokens=75_000),
    "keye-vl-utils": SlowFastProfile("keye-vl-utils", similarity_threshold=0.90, total_tokens=65_536, compat=True),
}


def get_profile(profile: str | SlowFastProfile) -> SlowFastProfile:
    """A profile by name ('paper', 'keye-vl-utils') or the profile itself."""
    if isinstance(profile, SlowFastProfile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"unknown Slow-Fast profile {profile!r}; known: {sorted(PROFILES)}")
    return PROFILES[profile]


@dataclass(frozen=True)
class SlowFastPlan:
    """How one video becomes LLM tokens. Sizes are (height, width) in pixels, multiples of 28."""

    n_frames: int
    frame_types: tuple[int, ...]  # 0 slow, 1 fast
    timestamps: tuple[float, ...]  # seconds from the first frame
    slow_hw: tuple[int, int]
    fast_hw: tuple[int, int]
    visual_tokens: int  # LLM tokens of all frames (markers and timestamp text excluded)
    source_hw: tuple[int, int]
    profile: str = "paper"

    @property
    def n_slow(self) -> int:
        return self.n_frames - self.n_fast

    @property
    def n_fast(self) -> int:
        return sum(self.frame_types)

    @property
    def slow_tokens(self) -> int:
        return num_tokens(*self.slow_hw)

    @property
    def fast_tokens(self) -> int:
        return num_tokens(*self.fast_hw)

    @property
    def frame_tokens(self) -> tuple[int, ...]:
        return tuple(self.fast_tokens if t == FAST else self.slow_tokens for t in self.frame_types)


# ---------------------------------------------------------------- 1. sampling

def max_frames(profile: str | SlowFastProfile, total_tokens: int | None = None) -> int:
    """Most frames that can each get `min_tokens` under the budget."""
    prof = get_profile(profile)
    budget = total_tokens or prof.total_tokens
    if budget < prof.min_tokens:
        raise ValueError(f"a video token budget of {budget} cannot hold one frame of {prof.min_tokens} tokens")
    return budget // prof.min_tokens


def sample_frame_indices(num_frames: int, source_fps: float, profile: str | SlowFastProfile = "paper",
                         fps: float | None = None, total_tokens: int | None = None) -> np.ndarray:
    """Indices of the source frames to keep, sampled uniformly at `fps` over the clip.

    Default: n = floor(duration * fps) frames (at least one), each taken at the middle of its
    1/fps slot. Compat: keye-vl-utils' `linspace(0, num_frames - 1, n).round()` in float32,
    including its 0 frames for clips shorter than 1/fps.
    """
    prof = get_profile(profile)
    rate = min(fps or prof.fps, source_fps)
    n = min(int(num_frames / source_fps * rate), max_frames(prof, total_tokens))
    if prof.compat:
        return torch.linspace(0, num_frames - 1, n).round().long().numpy()
    n = max(n, 1 if num_frames > 0 else 0)
    return np.floor((np.arange(n) + 0.5) * num_frames / n).astype(np.int64)


# ---------------------------------------------------------------- 2. frame types

def _resize_for_similarity(frames: np.ndarray, profile: SlowFastProfile) -> torch.Tensor:
    """All frames at one small size (<= similarity_max_tokens), as the public code does it: (N, 3, h, w) uint8."""
    _, h, w, _ = frames.shape
    size = resize_to_tokens(h, w, profile.similarity_max_tokens, profile.min_tokens, compat=profile.compat)
    nchw = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # uint8, channels-last memory
    return F.interpolate(nchw, size=list(size), mode="bilinear", antialias=True)  # channels-last memory too


class _Features(NamedTuple):
    """What a frame is compared by: unit patch vectors and their norms (keye-hsv-patch), or luma (gray-mad)."""

    values: np.ndarray | torch.Tensor
    norms: torch.Tensor | None


def _frame_features(frame: torch.Tensor, similarity: SimilarityName) -> _Features:
    """Features of one small frame (3, h, w) uint8."""
    if similarity == "gray-mad":  # BT.601 luma
        rgb = frame.permute(1, 2, 0).numpy().astype(np.float32)
        return _Features(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32), None)
    hsv = torch.from_numpy(rgb_to_hsv_uint8(frame.permute(1, 2, 0).numpy()))  # (h, w, 3), any strides
    h, w, _ = hsv.shape
    gh, gw = h // PATCH_FACTOR, w // PATCH_FACTOR
    # Channel-major patch vectors (c, p1, p2) reduced by torch in float32, as the public code does:
    # the cosines then equal its cosines bit for bit, not merely to within float32 rounding.
    patches = torch.empty(gh, gw, 3, PATCH_FACTOR, PATCH_FACTOR)
    patches.copy_(hsv.reshape(gh, PATCH_FACTOR, gw, PATCH_FACTOR, 3).permute(0, 2, 4, 1, 3))  # + uint8 -> float32
    patches = patches.reshape(gh, gw, -1)
    norm = torch.linalg.vector_norm(patches, dim=-1, keepdim=True) + 1e-8
    return _Features(patches.div_(norm), norm[..., 0])


def _similarity(a: _Features, b: _Features, profile: SlowFastProfile) -> float:
    if a.norms is None or b.norms is None:  # gray-mad
        return 1.0 - float(np.abs(a.values - b.values).mean()) / 255.0
    cosine = (a.values * b.values).sum(dim=-1)
    counted = ~((a.norms < 0.01) & (b.norms < 0.01))  # patches black in both frames carry no evidence
    if not counted.any():
        return 1.0
    matched = cosine[counted] > profile.patch_cosine_threshold
    if profile.compat:
        # The public code averages in float32: a fraction exactly at the threshold (207 of 230 patches
        # = 0.9) becomes 0.89999998 < 0.9 there, so that frame is slow, not fast.
        return matched.float().mean().item()
    return matched.sum().item() / matched.numel()


def frame_similarity(a: np.ndarray, b: np.ndarray, profile: str | SlowFastProfile = "paper") -> float:
    """Similarity in [0, 1] of two RGB uint8 frames of one size, with the profile's metric.

    keye-hsv-patch: fraction of 28x28 HSV patches whose cosine exceeds 0.7 (patches black in
    both ignored), rounded to float32 under a compat profile as the public code does.
    gray-mad: 1 - mean |luma difference| / 255.
    """
    prof = get_profile(profile)
    small = _resize_for_similarity(np.stack([a, b]), prof)
    return _similarity(_frame_features(small[0], prof.similarity), _frame_features(small[1], prof.similarity), prof)


def classify_frames(frames: np.ndarray, profile: str | SlowFastProfile = "paper") -> tuple[int, ...]:
    """Frame types (0 slow, 1 fast), comparing each frame with the latest slow frame."""
    prof = get_profile(profile)
    if len(frames) == 0:
        return ()
    small = _resize_for_similarity(frames, prof)
    types = [SLOW]
    key = _frame_features(small[0], prof.similarity)
    for frame in small[1:]:
        feat = _frame_features(frame, prof.similarity)
        if _similarity(key, feat, prof) < prof.similarity_threshold:
            types.append(SLOW)
            key = feat
        else:
            types.append(FAST)
    return tuple(types)


# ---------------------------------------------------------------- 3-4. budget and sizes

def _budget_cost(t: int, n_slow: int, n_fast: int, prof: SlowFastProfile) -> int:
    return n_slow * t + n_fast * max(int(prof.fast_ratio * t), prof.fast_min_tokens)


def slow_token_budget(n_slow: int, n_fast: int, profile: str | SlowFastProfile = "paper",
                      total_tokens: int | None = None) -> int:
    """Per-slow-frame token count T for this mix of frames.

    Default: the largest T in [min_tokens, max_tokens] whose cost fits the budget. Compat:
    keye-vl-utils' search, which returns the smallest T that does NOT fit (or max_tokens),
    hence its small overshoot.
    """
    prof = get_profile(profile)
    budget = total_tokens or prof.total_tokens
    lo, hi = prof.min_tokens, prof.max_tokens
    if prof.compat:
        while lo < hi:
            mid = (lo + hi) // 2
            if _budget_cost(mid, n_slow, n_fast, prof) > budget:
                hi = mid
            else:
                lo = mid + 1
        return lo
    while lo < hi:  # invariant: lo fits (or is the floor), answer in [lo, hi]
        mid = (lo + hi + 1) // 2
        if _budget_cost(mid, n_slow, n_fast, prof) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def frame_sizes(source_hw: tuple[int, int], n_slow: int, n_fast: int, profile: str | SlowFastProfile = "paper",
                total_tokens: int | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """(slow_hw, fast_hw): the source size resized to T tokens, and to 30% of the slow frame's tokens."""
    prof = get_profile(profile)
    t = slow_token_budget(n_slow, n_fast, prof, total_tokens)
    h, w = source_hw
    slow_hw = resize_to_tokens(h, w, t, prof.min_tokens, compat=prof.compat)
    # The fast count follows the slow frame actually produced (a small source may use fewer than T).
    fast_cap = max(int(num_tokens(*slow_hw) * prof.fast_ratio), prof.fast_min_tokens)
    fast_hw = resize_to_tokens(h, w, fast_cap, prof.min_tokens, compat=prof.compat)
    return slow_hw, fast_hw


def _build_plan(frame_types: tuple[int, ...], timestamps: tuple[float, ...], source_hw: tuple[int, int],
                prof: SlowFastProfile, total_tokens: int | None) -> SlowFastPlan:
    n_fast = sum(frame_types)
    n_slow = len(frame_types) - n_fast
    slow_hw, fast_hw = frame_sizes(source_hw, n_slow, n_fast, prof, total_tokens)
    tokens = n_slow * num_tokens(*slow_hw) + n_fast * num_tokens(*fast_hw)
    return SlowFastPlan(len(frame_types), frame_types, timestamps, slow_hw, fast_hw, tokens, source_hw, prof.name)


def plan_frames(frames: np.ndarray, timestamps: list[float] | tuple[float, ...],
                profile: str | SlowFastProfile = "paper", total_tokens: int | None = None) -> SlowFastPlan:
    """Plan already-sampled RGB uint8 frames (N, H, W, 3) taken at `timestamps` seconds."""
    prof = get_profile(profile)
    if len(frames) != len(timestamps):
        raise ValueError(f"{len(frames)} frames but {len(timestamps)} timestamps")
    source_hw = (int(frames.shape[1]), int(frames.shape[2]))
    return _build_plan(classify_frames(frames, prof), tuple(float(t) for t in timestamps), source_hw, prof,
                       total_tokens)


def plan_video(path: str | Path, profile: str | SlowFastProfile = "paper", fps: float | None = None,
               total_tokens: int | None = None,
               similarity_threshold: float | None = None) -> tuple[SlowFastPlan, np.ndarray]:
    """Probe, decode only the sampled frames, and plan; returns (plan, frames (N, H, W, 3) uint8).

    Raises keyetron.data.video.MediaError for unusable files.
    """
    prof = get_profile(profile)
    if similarity_threshold is not None:
        prof = replace(prof, similarity_threshold=similarity_threshold)
    with open_video(path) as video:
        info = video.info
        indices = sample_frame_indices(info.num_frames, info.fps, prof, fps, total_tokens)
        timestamps = [int(i) / info.fps for i in indices]
        frames = video.frames_at(timestamps)
    return plan_frames(frames, timestamps, prof, total_tokens), frames


def estimate_video_tokens(duration_s: float, source_hw: tuple[int, int], *, source_fps: float | None = None,
                          profile: str | SlowFastProfile = "paper", fps: float | None = None,
                          total_tokens: int | None = None) -> int:
    """Upper bound of a video's visual tokens from metadata only (no decoding), for cost estimates.

    Frame types are unknown before decoding, so this is the maximum over every possible
    number of fast frames (the first frame is always slow) of the tokens the plan would use.
    Without `source_fps` the source is assumed at least as fast as the sampling rate.
    """
    prof = get_profile(profile)
    src_fps = source_fps or fps or prof.fps
    num_frames = int(round(duration_s * src_fps))
    n = len(sample_frame_indices(num_frames, src_fps, prof, fps, total_tokens))
    best = 0
    for n_fast in range(n):
        slow_hw, fast_hw = frame_sizes(source_hw, n - n_fast, n_fast, prof, total_tokens)
        best = max(best, (n - n_fast) * num_tokens(*slow_hw) + n_fast * num_tokens(*fast_hw))
    return best


__all__ = [
    "FAST", "PROFILES", "SLOW", "SlowFastPlan", "SlowFastProfile", "classify_frames", "estimate_video_tokens",
    "frame_similarity", "frame_sizes", "get_profile", "max_frames", "plan_frames", "plan_video",
    "rgb_to_hsv_uint8", "sample_frame_indices", "slow_token_budget",
]
