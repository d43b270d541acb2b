"""Samples -> training documents, with every unusable sample counted, logged and named.

``DocumentBuilder`` turns one parsed ``Sample`` into a ``Document``: images are decoded and
smart-resized, videos are Slow-Fast planned and only their sampled frames decoded, the
chat is rendered in Keye's token layout, and 3D positions and next-token targets are
computed. Each image and each video frame is its own ViT item with grid (1, h, w), so slow
and fast frames of one video can have different sizes.

``estimate_cost`` gives the balancer what a sample will cost without decoding anything:
image sizes come from file headers, video token counts from the container's duration
(an upper bound: frame types are unknown before decoding).

``SampleDataset`` joins a source of raw records to the builder. A record that cannot be
used (bad JSON, a missing or mistyped field, a missing / truncated / non-video file, an
oversized image) becomes ``None`` and one entry in the ``SkipLog`` with the sample id,
where it is, and why; the job goes on and the end-of-run summary lists the skips.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field, replace

import torch

from keyetron.batch import IGNORE_INDEX, Document
from keyetron.data.errors import MediaError
from keyetron.data.image import (MAX_SOURCE_PIXELS, PATCH, image_size, load_image, normalise, patchify, probe_image,
                                 resize_rgb)
from keyetron.data.render import VideoLayout, prompt_of, render_sample
from keyetron.data.resize import IMAGE_MAX_TOKENS, IMAGE_MIN_TOKENS
from keyetron.data.samples import Part, Sample, SampleError, parse_sample
from keyetron.data.slowfast import FAST, estimate_video_tokens, get_profile, plan_video, sample_frame_indices
from keyetron.data.sources import SampleSource
from keyetron.data.tokenizer import KeyeTokenizer
from keyetron.data.video import probe_video
from keyetron.model.config import KeyeConfig
from keyetron.positions import compute_position_ids, llm_grids

log = logging.getLogger("keyetron.data")


@dataclass
class MediaConfig:
    """How images and videos become visual tokens (the recipe's ``data.media``)."""

    image_min_tokens: int = IMAGE_MIN_TOKENS
    image_max_tokens: int = IMAGE_MAX_TOKENS  # paper: up to 20,480 LLM tokens per image
    max_source_pixels: int = MAX_SOURCE_PIXELS  # larger image headers are refused (bombs)
    video_profile: str = "paper"  # Slow-Fast profile: "paper" or "keye-vl-utils"
    video_fps: float | None = None  # None: the profile's (2.0)
    video_total_tokens: int | None = None  # None: the profile's budget (75,000 for "paper")

    def __post_init__(self) -> None:
        get_profile(self.video_profile)  # unknown names fail at config load, naming the choices
        if not 0 < self.image_min_tokens <= self.image_max_tokens:
            raise ValueError(f"need 0 < image_min_tokens <= image_max_tokens, got {self.image_min_tokens}, "
                             f"{self.image_max_tokens}")


@dataclass(frozen=True)
class Skip:
    sample_id: str
    location: str
    reason: str


class SkipLog:
    """Every sample the loader could not use: counted by cause, each logged with its id."""

    MAX_KEPT = 10_000  # entries kept for the summary; the counts cover all of them

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.entries: list[Skip] = []

    def add(self, kind: str, sample_id: str, location: str, reason: str) -> None:
        self.counts[kind] += 1
        if len(self.entries) < self.MAX_KEPT:
            self.entries.append(Skip(sample_id, location, reason))
        log.warning("skipped sample %s (%s, %s): %s", sample_id, location, kind, reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self, limit: int = 20) -> str:
        if not self.total:
            return "skipped samples: none"
        lines = [f"skipped samples: {self.total} (" + ", ".join(f"{k}: {n}" for k, n in sorted(self.counts.items()))
                 + ")"]
        lines += [f"  {s.sample_id} [{s.location}]: {s.reason}" for s in self.entries[:limit]]
        if self.total > limit:
            lines.append(f"  ... and {self.total - limit} more (all are in the log)")
        return "\n".join(lines)

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "entries": [dict(vars(s)) for s in self.entries]}

    def load_state_dict(self, state: dict) -> None:
        self.counts = Counter(state["counts"])
        self.entries = [Skip(**e) for e in state["entries"]]


class SkipRecorder(SkipLog):
    """Collects skips as ``(kind, sample_id, location, reason)`` events instead of counting them,
    for whoever records them elsewhere (another rank's log, the cost index)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str, str, str]] = []

    def add(self, kind: str, sample_id: str, location: str, reason: str) -> None:
        self.events.append((kind, sample_id, location, reason))


@dataclass(frozen=True)
class SampleCost:
    """What a sample costs, from metadata only: the balancer's input."""

    sample_id: str
    llm_tokens: int  # upper bound for videos (frame types unknown before decoding)
    vit_patches: tuple[int, ...] = field(default=())  # 14x14 patches per image / per video frame
    kind: str = "text"  # video (has a video) | image (has images) | text: the data mixture's categories


def _pixels(rgb, hw: tuple[int, int]) -> torch.Tensor:
    return patchify(normalise(resize_rgb(rgb, hw)))


def decode_media(part: Part, media: MediaConfig, patch_size: int = PATCH):
    """One image or video part -> (render entry, pixel tensors, grids), one tensor and grid per ViT item.

    The entry is the image's LLM token count or the video's VideoLayout. This is the decode
    work a ``keyetron.io`` decode server runs for remote ranks, so both paths share it.
    """
    if part.kind == "image":
        img = load_image(part.value, media.image_min_tokens, media.image_max_tokens, media.max_source_pixels)
        return img.size.llm_tokens, [img.pixel_values], [img.size.grid_thw]
    plan, frames = plan_video(part.value, media.video_profile, media.video_fps, media.video_total_tokens)
    pixels, grids = [], []
    for frame, kind in zip(frames, plan.frame_types):
        hw = plan.fast_hw if kind == FAST else plan.slow_hw
        pixels.append(_pixels(frame, hw))
        grids.append((1, hw[0] // patch_size, hw[1] // patch_size))
    return VideoLayout(plan.timestamps, plan.frame_types, plan.slow_tokens, plan.fast_tokens), pixels, grids


class DocumentBuilder:
    """Sample -> Document (tokens, loss mask, 3D positions, pixels and grids)."""

    def __init__(self, model: KeyeConfig, tokenizer: KeyeTokenizer, media: MediaConfig | None = None,
                 decoder=None):
        self.model = model
        self.decoder = decoder  # None: decode here; else e.g. keyetron.io.RemoteDecoder (same results)
        self.tok = tokenizer
        self.media = media or MediaConfig()
        self.profile = get_profile(self.media.video_profile)
        for name, want in (("<|image_pad|>", model.image_token_id), ("<|video_pad|>", model.video_token_id),
                           ("<|vision_start|>", model.vision_start_token_id)):
            if tokenizer.token_id(name) != want:
                raise ValueError(f"tokenizer {tokenizer.path} gives {name} id {tokenizer.token_id(name)} but model "
                                 f"config {model.name} expects {want}; they must come from the same vocabulary")
        self.visual_ids = (model.image_token_id, model.video_token_id)

    def _visual(self, sample: Sample):
        """Per media part: its render entry (token count or VideoLayout), patches and per-item grids."""
        entries, pixels, grids = [], [], []
        decode = decode_media if self.decoder is None else self.decoder.decode
        for part in sample.media:
            entry, part_pixels, part_grids = decode(part, self.media, self.model.vision.patch_size)
            entries.append(entry)
            pixels += part_pixels
            grids += part_grids
        return entries, pixels, grids

    def build(self, sample: Sample, prompt_only: bool = False) -> Document:
        """The training document; with ``prompt_only`` the evaluation prompt (no targets)."""
        return self._render(prompt_of(sample) if prompt_only else sample, prompt_only)

    def build_prompt(self, sample: Sample, think: str | None = None) -> Document:
        """The generation prompt of ``sample``: its conversation without a final assistant turn
        (a reference answer, when there is one), then the assistant header; ``think`` overrides
        the sample's own thinking mode."""
        if think is not None:
            sample = replace(sample, think=think)
        if sample.turns[-1].role == "assistant":
            sample = prompt_of(sample)
        return self._render(sample, True)

    def _render(self, sample: Sample, prompt_only: bool) -> Document:
        entries, pixels, grids = self._visual(sample)
        ids, mask = render_sample(sample, self.tok, entries, generation_prompt=prompt_only)
        input_ids = torch.tensor(ids, dtype=torch.long)
        grid = torch.tensor(grids, dtype=torch.long) if grids else None
        blocks = llm_grids(grid, self.model.projector.merge_size) if grids else []
        positions = compute_position_ids(input_ids, blocks, self.visual_ids)
        if prompt_only:
            targets = torch.full_like(input_ids, IGNORE_INDEX)
        else:
            targets = Document.shift_targets(input_ids, torch.tensor(mask, dtype=torch.bool))
        return Document(input_ids, targets, positions, torch.cat(pixels) if pixels else None, grid, sample.sample_id)

    def estimate_cost(self, sample: Sample) -> SampleCost:
        """Token and patch counts from file headers and text only; nothing is decoded."""
        entries, patches, frame_overhead = [], [], 0
        for part in sample.media:
            if part.kind == "image":
                size = image_size(probe_image(part.value, self.media.max_source_pixels),
                                  self.media.image_min_tokens, self.media.image_max_tokens)
                entries.append(size.llm_tokens)
                patches.append(size.patches)
                continue
            info = probe_video(part.value)
            tokens = estimate_video_tokens(info.duration, (info.height, info.width), source_fps=info.fps,
                                           profile=self.profile, fps=self.media.video_fps,
                                           total_tokens=self.media.video_total_tokens)
            # Render n one-pad slow frames (frame markers and timestamp text counted exactly),
            # then add the remaining pads and the fast markers every frame after the first may get.
            times = tuple(int(i) / info.fps for i in sample_frame_indices(
                info.num_frames, info.fps, self.profile, self.media.video_fps, self.media.video_total_tokens))
            n = len(times)
            entries.append(VideoLayout(times, (0,) * n, 1, 1))
            frame_overhead += (tokens - n) + 2 * (n - 1)
            per_frame = math.ceil(tokens / n)
            patches += [per_frame * self.model.projector.merge_size ** 2] * n
        ids, _ = render_sample(sample, self.tok, entries)
        kinds = {part.kind for part in sample.media}
        kind = "video" if "video" in kinds else "image" if kinds else "text"
        return SampleCost(sample.sample_id, len(ids) + frame_overhead, tuple(patches), kind)


def sample_id_of(raw, fallback: str) -> str:
    sid = raw.get("id") if isinstance(raw, dict) else None
    return sid if isinstance(sid, str) and sid else fallback


class SampleDataset:
    """A source of raw records plus the builder: ``document(i)`` or a counted skip."""

    def __init__(self, source: SampleSource, builder: DocumentBuilder, skips: SkipLog | None = None,
                 prompts: bool = False):
        self.source = source
        self.builder = builder
        self.skips = skips if skips is not None else SkipLog()
        self.prompts = prompts  # records are generation prompts: a conversation may end with the user

    def __len__(self) -> int:
        return len(self.source)

    def _with_record(self, index: int, use):
        with self.source.record(index) as rec:
            sid = sample_id_of(rec.raw, f"<{rec.location}>")
            if rec.error is not None:
                self.skips.add("bad_record", sid, rec.location, rec.error)
                return None
            try:
                sample = parse_sample(rec.raw, rec.root, line=None, prompt=self.prompts)
            except SampleError as err:
                self.skips.add("bad_sample", sid, rec.location, err.reason)
                return None
            try:
                return use(sample)
            except SampleError as err:
                self.skips.add("bad_sample", sid, rec.location, err.reason)
            except MediaError as err:
                self.skips.add("bad_media", sid, rec.location, str(err))
            except (OSError, RuntimeError, ValueError) as err:  # a decoder failing in a way we did not foresee
                log.exception("unexpected error on sample %s (%s)", sid, rec.location)
                self.skips.add("error", sid, rec.location, f"{type(err).__name__}: {err}")
            return None

    def sample(self, index: int) -> Sample | None:
        return self._with_record(index, lambda s: s)

    def document(self, index: int, prompt_only: bool = False) -> Document | None:
        return self._with_record(index, lambda s: self.builder.build(s, prompt_only))

    def prompt(self, index: int, think: str | None = None) -> Document | None:
        """The generation prompt of record ``index`` (``DocumentBuilder.build_prompt``)."""
        return self._with_record(index, lambda s: self.builder.build_prompt(s, think))

    def cost(self, index: int) -> SampleCost | None:
        return self._with_record(index, self.builder.estimate_cost)


__all__ = ["DocumentBuilder", "MediaConfig", "decode_media", "SampleCost", "SampleDataset", "Skip", "SkipLog",
           "SkipRecorder"]
