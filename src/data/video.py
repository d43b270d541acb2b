"""Video files in and out through PyAV: probe metadata, decode frames at timestamps, write.

Training reads a handful of frames (2 fps) out of long clips, so decoding everything is the
cost to avoid: `probe_video` reads container/stream headers only, and `decode_frames`
seeks to the keyframe before a wanted time when the gap from the current position is
large, otherwise it decodes forward. Between wanted frames the decoder skips the frames
no other frame is predicted from (B-frames, mostly): they cannot change any wanted frame.
Only the chosen frames are converted to RGB. `open_video` probes and decodes through one
opened file (opening parses the container and starts the decoder: not free).

Every failure a user can hit with a bad file (missing, not a video, truncated, no frames,
undecodable) surfaces as `MediaError(path, reason)`, never as a raw PyAV exception, so a
data loader can skip or report the sample by path.
"""
from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
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


def _probe(path: str | Path, container: InputContainer, stream: VideoStream) -> tuple[VideoInfo, bool]:
    """(metadata, whether packets were demuxed to count frames: then the container is used up)."""
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
    demuxed = False
    if num_frames <= 0 or rate is None:
        num_frames, span = _count_packets(container, stream)
        demuxed = True
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
    return VideoInfo(str(path), duration, fps, num_frames, height, width, ctx.name), demuxed


def probe_video(path: str | Path) -> VideoInfo:
    """Metadata from the container and stream headers, without decoding any frame.

    Frame count comes from the stream index (`nb_frames`); if absent it is derived from
    duration x fps; if the duration is unknown too (raw elementary streams), packets are
    demuxed and counted. Raises MediaError when the file holds no video frame.
    """
    with _open_video(path) as (container, stream):
        return _probe(path, container, stream)[0]


_LOOKAHEAD = 16  # packets demuxed ahead of the decoder: enough to meet the next frame in presentation order
# Decoders that read skip_frame for every packet and skip exactly the frames nothing is predicted
# from (checked frame for frame against full decodes, tests/data/test_video.py). Others, e.g.
# libdav1d, read it once when opened and then drop wanted frames too: they decode everything.
_SKIPS_UNREFERENCED_FRAMES = frozenset({"h264", "hevc"})
# Containers whose packets carry presentation timestamps, which the skip decision reads. AVI
# stores none: with B-frames its packet times are in decode order (and its frame times are
# unreliable, skipping or not).
_PRESENTATION_TIMESTAMPS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "mpegts"})


class _FrameCursor:
    """Forward decoding position in one stream, with a look-ahead frame and seeking.

    `targets` are all the times (sorted, seconds) that will be asked for. With H.264 and HEVC
    in MP4/MOV, Matroska/WebM or MPEG-TS, a frame shown at none of them is decoded only if
    other frames are predicted from it: the decoder is told to skip it otherwise (skip_frame
    NONREF, set per packet).
    """

    def __init__(self, path: str | Path, container: InputContainer, stream: VideoStream, fps: float,
                 targets: list[float], tolerance: float) -> None:
        self.path, self.container, self.stream = path, container, stream
        self.origin = stream.start_time or 0  # pts of the first frame; times are reported relative to it
        self.frame_period = 1.0 / fps
        self._time_base = (stream.time_base.numerator, stream.time_base.denominator) if stream.time_base else (0, 1)
        self.targets, self.tolerance = targets, tolerance
        self.current: av.VideoFrame | None = None  # last decoded frame at or before the target
        self.current_time = -math.inf
        self.exhausted = False
        self._frames = self._decode()
        self.last_seen_time = -self.frame_period  # so a first frame without pts is at 0.0
        self.serial = 0  # counts frames taken as `current`: identifies them for the RGB cache
        # Raw elementary streams carry no timestamps: times are then counted from the start and
        # a seek would lose the count, so such streams are only decoded forward.
        self.pending: av.VideoFrame | None  # decoded frame past the target, kept for the next one
        self.pending, self.pending_time = self._next()
        self.seekable = self.pending is not None and self.pending.pts is not None

    def _seconds(self, pts: int) -> float:
        return (pts - self.origin) * self._time_base[0] / self._time_base[1]  # exact int / int: float(Fraction)

    def _shown_at_a_target(self, packet: av.Packet, ahead: deque[av.Packet]) -> bool:
        """Whether the frame in `packet` may be the frame on screen at one of the targets.

        A frame is on screen from its time until the next frame's, looked for among the packets
        demuxed ahead; when that one is not among them the interval only grows, so the answer
        errs on the side of decoding.
        """
        later = [p.pts for p in ahead if p.pts is not None and p.pts > packet.pts]
        start = self._seconds(packet.pts) - self.tolerance
        end = self._seconds(min(later)) - self.tolerance if later else math.inf
        i = bisect.bisect_left(self.targets, start)
        return i < len(self.targets) and self.targets[i] < end

    def _decode(self) -> Iterator[av.VideoFrame]:
        """Frames from the container's current position, in presentation order."""
        codec = self.stream.codec_context
        packets = self.container.demux(self.stream)
        if codec.name not in _SKIPS_UNREFERENCED_FRAMES or self.container.format.name not in _PRESENTATION_TIMESTAMPS:
            for packet in packets:
                yield from codec.decode(packet)
            return
        ahead = deque(itertools.islice(packets, _LOOKAHEAD))
        first = True  # decoded in full: the decoder opens with it (and it is a keyframe)
        while ahead:
            packet = ahead.popleft()
            ahead.extend(itertools.islice(packets, 1))
            unwanted = (not first and packet.pts is not None and packet.size > 0
                        and not self._shown_at_a_target(packet, ahead))
            codec.skip_frame = "NONREF" if unwanted else "DEFAULT"
            first = False
            yield from codec.decode(packet)

    def _next(self) -> tuple[av.VideoFrame | None, float]:
        try:
            frame = next(self._frames, None)
        except av.FFmpegError as exc:
            raise MediaError(self.path, f"decoding failed after {max(self.last_seen_time, 0):.3f}s ({exc}); the file "
                                        f"is truncated or corrupt: {_REENCODE_HINT}") from exc
        if frame is None:
            self.exhausted = True
            return None, math.inf
        t = self._seconds(frame.pts) if frame.pts is not None else self.last_seen_time + self.frame_period
        self.last_seen_time = t
        return frame, t

    def seek(self, t: float) -> None:
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
            self._frames = self._decode()
            self.current, self.current_time = None, -math.inf
            self.exhausted = False
            self.pending, self.pending_time = self._next()
            if self.pending is None or self.pending_time <= t + self.tolerance or when == 0.0:
                return
            margin = max(2 * margin, 1.0)

    def take_pending(self) -> None:
        self.current, self.current_time = self.pending, self.pending_time
        self.pending, self.pending_time = None, math.inf
        self.serial += 1

    def advance_to(self, t: float) -> None:
        """Decode forward until the next frame starts after `t`; `current` is then the frame shown at t."""
        while True:
            if self.pending is None:
                if self.exhausted:
                    return
                self.pending, self.pending_time = self._next()
                if self.pending is None:
                    return
            if self.pending_time > t + self.tolerance:
                return
            self.take_pending()


class VideoFile:
    """One opened video: its metadata (`info`) and the frames shown at given times. Made by `open_video`."""

    def __init__(self, path: str | Path, container: InputContainer, stream: VideoStream, info: VideoInfo) -> None:
        self.path, self.info = path, info
        self._container, self._stream = container, stream
        self._decoded = False

    def frames_at(self, timestamps: Sequence[float], *, seek_gap_s: float = 2.0) -> np.ndarray:
        """The frames shown at `timestamps` (seconds from the first frame) as RGB uint8; see `decode_frames`.

        Decodes from the current position of the opened file: call it once per `open_video`.
        """
        times = np.asarray(timestamps, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(times)) or np.any(times < 0):
            raise ValueError(f"timestamps must be finite and >= 0 seconds, got {times.tolist()}")
        info, path = self.info, self.path
        out = np.empty((len(times), info.height, info.width, 3), dtype=np.uint8)
        if len(times) == 0:
            return out
        if self._decoded:
            raise RuntimeError(f"{path}: frames_at was already called on this open_video(); open the file again")
        self._decoded = True
        tolerance = min(1e-3, 0.25 / info.fps)
        order = np.argsort(times, kind="stable")
        cursor = _FrameCursor(path, self._container, self._stream, info.fps, times[order].tolist(), tolerance)
        rgb_cache: dict[int, np.ndarray] = {}
        for i in order:
            t = float(times[i])
            gap = t - max(cursor.current_time, 0.0)
            if gap > seek_gap_s and cursor.seekable:
                cursor.seek(t)
            cursor.advance_to(t)
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


@contextmanager
def open_video(path: str | Path) -> Iterator[VideoFile]:
    """Open `path` once for both probing and decoding: `video.info`, then `video.frames_at(times)`.

    Raises MediaError for unusable files, as `probe_video` does.
    """
    with _open_video(path) as (container, stream):
        info, used_up = _probe(path, container, stream)
        if not used_up:
            yield VideoFile(path, container, stream, info)
            return
    # Counting the frames read the whole stream (a raw elementary stream): decode from a fresh open.
    with _open_video(path) as (container, stream):
        yield VideoFile(path, container, stream, info)


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
    with open_video(path) as video:
        return video.frames_at(timestamps, seek_gap_s=seek_gap_s)


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
