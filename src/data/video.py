"""Video files in and out through PyAV: probe metadata, decode frames at timestamps, write.

Training reads a handful of frames (2 fps) out of long clips, so decoding everything is the
cost to avoid: `probe_video` reads container/stream headers only, and `decode_frames`
seeks to the keyframe before a wanted time when the gap from the current position is
large, otherwise it decodes forward. Only the chosen frames are converted to RGB.

Every failure a user can hit with a bad file (missing, not a video, truncated, no frames,
undecodable) surfaces as `MediaError(path, reason)`, never as a raw PyAV exception, so a
data loader can skip or report the sample by path.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.container import InputContainer
from av.video.stream import VideoStream

from keyetron.data.errors import MediaError

_REENCODE_HINT = "re-encode it (e.g. `ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4`) or drop the sample"


@dataclass(frozen=True)
class VideoInfo:
    """Stream metadata; times in seconds relative to the first frame."""

    path: str
    duration: float
    fps: float
    num_frames: int
    height: int
    width: int
    codec: str


@contextmanager
def _open_video(path: str | Path) -> Iterator[tuple[InputContainer, VideoStream]]:
    """Open `path` and yield (container, first video stream), mapping every failure to MediaError."""
    p = Path(path)
    if not p.exists():
        raise MediaError(p, "file not found; check the path in the dataset manifest")
    if not p.is_file():
        raise MediaError(p, "is not a regular file; point the sample at a video file")
    try:
        container = av.open(str(p), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise MediaError(p, f"cannot be opened as a video ({exc}); the file is not a media container or is "
                            f"truncated/corrupt: {_REENCODE_HINT}") from exc
    try:
        if not container.streams.video:
            raise MediaError(p, "has no video stream (audio-only, data file, or an empty recording whose track "
                                "was dropped); drop the sample or fix its path")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield container, stream
    finally:
        container.close()


def _positive_fraction(*candidates: Fraction | None) -> Fraction | None:
    for c in candidates:
        if c is not None and c > 0:
            return c
    return None


def _count_packets(container: InputContainer, stream: VideoStream) -> tuple[int, float]:
    """Demux (no decoding) to count frames and find the end time: for streams without an index."""
    tb = stream.time_base
    count, first, last = 0, None, None
    for packet in container.demux(stream):
        if packet.size == 0:  # the flush packet demux yields at the end
            continue
        count += 1
        if packet.pts is not None:
            first = packet.pts if first is None else min(first, packet.pts)
            end = packet.pts + (packet.duration or 0)
            last = end if last is None else max(last, end)
    span = float((last - first) * tb) if (first is not None and last is not None and tb) else 0.0
    return count, span


def probe_video(path: str | Path) -> VideoInfo:
    """Metadata from the container and stream headers, without decoding any frame.

    Frame count comes from the stream index (`nb_frames`); if absent it is derived from
    duration x fps; if the duration is unknown too (raw elementary streams), packets are
    demuxed and counted. Raises MediaError when the file holds no video frame.
    """
    with _open_video(path) as (container, stream):
        ctx = stream.codec_context
        height, width = int(ctx.height or 0), int(ctx.width or 0)
        if height <= 0 or width <= 0:
            raise MediaError(path, f"video stream reports size {height}x{width}; the header is broken: "
                                   f"{_REENCODE_HINT}")
        timed = bool(stream.duration or container.duration)
        # With container timestamps the average rate is the real one (decord reports the same);
        # raw elementary streams get a made-up average (25) and the codec's rate is better.
        rates = (stream.average_rate, stream.guessed_rate) if timed else (stream.guessed_rate, stream.average_rate)
        rate = _positive_fraction(*rates, stream.base_rate)
        num_frames = int(stream.frames or 0)
        duration = 0.0
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        if num_frames <= 0 and duration > 0 and rate is not None:
            num_frames = int(round(duration * float(rate)))
        if num_frames <= 0 or rate is None:
            num_frames, span = _count_packets(container, stream)
            duration = duration or span
            if rate is None and num_frames > 0 and duration > 0:
                rate = Fraction(num_frames) / Fraction(duration)
        if num_frames <= 0:
            raise MediaError(path, "contains no video frames (empty or interrupted recording); drop the sample")
        if rate is None:
            raise MediaError(path, f"frame rate cannot be determined from the file: {_REENCODE_HINT}")
        fps = float(rate)
        if duration <= 0:
            duration = num_frames / fps
        return VideoInfo(str(path), duration, fps, num_frames, height, width, ctx.name)


class _FrameCursor:
    """Forward decoding position in one stream, with a look-ahead frame and seeking."""

    def __init__(self, path: str | Path, container: InputContainer, stream: VideoStream,
                 fps: float) -> None:
        self.path, self.container, self.stream = path, container, stream
        self.origin = stream.start_time or 0  # pts of the first frame; times are reported relative to it
        self.frame_period = 1.0 / fps
        self.current: av.VideoFrame | None = None  # last decoded frame at or before the target
        self.current_time = -math.inf
        self.exhausted = False
        self._frames = container.decode(stream)
        self.last_seen_time = -self.frame_period  # so a first frame without pts is at 0.0
        self.serial = 0  # counts frames taken as `current`: identifies them for the RGB cache
        # Raw elementary streams carry no timestamps: times are then counted from the start and
        # a seek would lose the count, so such streams are only decoded forward.
        self.pending: av.VideoFrame | None  # decoded frame past the target, kept for the next one
        self.pending, self.pending_time = self._next()
        self.seekable = self.pending is not None and self.pending.pts is not None

    def _time_of(self, frame: av.VideoFrame) -> float:
        if frame.pts is None:  # no timestamp: assume constant frame rate after the previous one
            return self.last_seen_time + self.frame_period
        return float((frame.pts - self.origin) * self.stream.time_base)

    def _next(self) -> tuple[av.VideoFrame | None, float]:
        try:
            frame = next(self._frames, None)
        except av.FFmpegError as exc:
            raise MediaError(self.path, f"decoding failed after {max(self.last_seen_time, 0):.3f}s ({exc}); the file "
                                        f"is truncated or corrupt: {_REENCODE_HINT}") from exc
        if frame is None:
            self.exhausted = True
            return None, math.inf
        t = self._time_of(frame)
        self.last_seen_time = t
        return frame, t

    def seek(self, t: float, tolerance: float) -> None:
        """Jump to the keyframe at or before t (ready for `advance_to(t)`).

        Some indexes place the landing keyframe after t (seeks by decode time with B-frames);
        then seek again further back, doubling the margin, down to the start.
        """
        margin = 0.0
        while True:
            when = max(t - margin, 0.0)
            try:
                self.container.seek(self.origin + int(when / self.stream.time_base), stream=self.stream,
                                    backward=True, any_frame=False)
            except av.FFmpegError as exc:
                raise MediaError(self.path, f"seeking to {when:.3f}s failed ({exc}): {_REENCODE_HINT}") from exc
            self._frames = self.container.decode(self.stream)
            self.current, self.current_time = None, -math.inf
            self.exhausted = False
            self.pending, self.pending_time = self._next()
            if self.pending is None or self.pending_time <= t + tolerance or when == 0.0:
                return
            margin = max(2 * margin, 1.0)

    def take_pending(self) -> None:
        self.current, self.current_time = self.pending, self.pending_time
        self.pending, self.pending_time = None, math.inf
        self.serial += 1

    def advance_to(self, t: float, tolerance: float) -> None:
        """Decode forward until the next frame starts after `t`; `current` is then the frame shown at t."""
        while True:
            if self.pending is None:
                if self.exhausted:
                    return
                self.pending, self.pending_time = self._next()
                if self.pending is None:
                    return
            if self.pending_time > t + tolerance:
                return
            self.take_pending()


def decode_frames(path: str | Path, timestamps: Sequence[float], *, seek_gap_s: float = 2.0) -> np.ndarray:
    """Decode the frames shown at `timestamps` (seconds from the first frame) as RGB uint8.

    Returns an array (len(timestamps), H, W, 3) in the order of `timestamps`; duplicates and
    any order are allowed. The frame shown at t is the last one whose start is <= t (1 ms
    tolerance for rounded timestamps); times past the end give the last frame. Targets are
    visited in time order; when the next one is more than `seek_gap_s` ahead, the decoder
    seeks to the keyframe before it instead of decoding every frame in between. If decoding
    ends more than two frame periods before the header's duration and a later time was
    asked for, the file is truncated -> MediaError.
    """
    times = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(times)) or np.any(times < 0):
        raise ValueError(f"timestamps must be finite and >= 0 seconds, got {times.tolist()}")
    info = probe_video(path)
    out = np.empty((len(times), info.height, info.width, 3), dtype=np.uint8)
    if len(times) == 0:
        return out
    tolerance = min(1e-3, 0.25 / info.fps)
    with _open_video(path) as (container, stream):
        cursor = _FrameCursor(path, container, stream, info.fps)
        rgb_cache: dict[int, np.ndarray] = {}
        for i in np.argsort(times, kind="stable"):
            t = float(times[i])
            gap = t - max(cursor.current_time, 0.0)
            if gap > seek_gap_s and cursor.seekable:
                cursor.seek(t, tolerance)
            cursor.advance_to(t, tolerance)
            if cursor.current is None:  # seek landed after t, or t before the first frame: take the first one
                if cursor.pending is None:
                    raise MediaError(path, f"no decodable frame at or after {t:.3f}s; the file is truncated or "
                                           f"corrupt: {_REENCODE_HINT}")
                cursor.take_pending()
            stream_end = cursor.current_time + cursor.frame_period
            ends_early = stream_end < info.duration - 2 * cursor.frame_period
            if cursor.exhausted and ends_early and t > stream_end + cursor.frame_period:
                raise MediaError(path, f"frame at {t:.3f}s requested but decodable frames end at "
                                       f"{cursor.current_time:.3f}s (header says {info.duration:.3f}s); the file is "
                                       f"truncated: {_REENCODE_HINT}")
            key = cursor.serial
            if key not in rgb_cache:
                rgb_cache = {key: _to_rgb(path, cursor.current, info)}  # targets are sorted: older frames are done
            out[i] = rgb_cache[key]
    return out


def _to_rgb(path: str | Path, frame: av.VideoFrame, info: VideoInfo) -> np.ndarray:
    rgb = frame.to_ndarray(format="rgb24")
    if rgb.shape != (info.height, info.width, 3):
        raise MediaError(path, f"frame size changes mid-stream ({rgb.shape[1]}x{rgb.shape[0]} vs header "
                               f"{info.width}x{info.height}): {_REENCODE_HINT}")
    return rgb


def write_video(path: str | Path, frames: np.ndarray | Sequence[np.ndarray], fps: float, *, codec: str = "libx264",
                crf: int = 18, gop: int | None = None, faststart: bool = False) -> Path:
    """Encode RGB uint8 frames (N, H, W, 3) to a yuv420p file; H and W must be even.

    Used to re-encode problem files and to build synthetic clips for tests and smoke runs.
    `gop` sets the keyframe interval (None keeps the encoder default); `faststart` puts the
    index at the start of an mp4 so the file can be read while still being written.
    """
    frames = [np.ascontiguousarray(f, dtype=np.uint8) for f in frames]
    if not frames:
        raise ValueError(f"write_video({path}): no frames given")
    h, w = frames[0].shape[:2]
    if h % 2 or w % 2:
        raise ValueError(f"write_video({path}): yuv420p needs even sizes, got {w}x{h}")
    options = {"movflags": "faststart"} if faststart else {}
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf)} if codec in ("libx264", "libx265") else {}
        if gop is not None:
            stream.codec_context.gop_size = gop
        for rgb in frames:
            if rgb.shape != (h, w, 3):
                raise ValueError(f"write_video({path}): frame of shape {rgb.shape}, expected {(h, w, 3)}")
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    return Path(path)
