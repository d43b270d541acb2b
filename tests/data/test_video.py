"""PyAV video I/O: header-only probing, frames at timestamps (with and without seeking), clear errors."""
import av
import numpy as np
import pytest

from fractions import Fraction

from keyetron.data import video
from keyetron.data.video import MediaError, VideoInfo, decode_frames, open_video, probe_video, write_video

FPS = 10
N_FRAMES = 48


def palette(n: int) -> np.ndarray:
    """n well-separated RGB colours: frame i is painted with colour i, so a decoded frame tells its index."""
    i = np.arange(n)
    return np.stack([(i * 53) % 256, (i * 97 + 60) % 256, (255 - i * 31) % 256], axis=-1).astype(np.uint8)


def frame_index(frame: np.ndarray, colours: np.ndarray) -> int:
    mean = frame.reshape(-1, 3).mean(axis=0)
    return int(np.argmin(np.abs(colours.astype(float) - mean).sum(axis=1)))


@pytest.fixture(scope="module")
def coloured(tmp_path_factory) -> tuple:
    """A 4.8 s, 10 fps clip with a keyframe every 6 frames (so seeks land between targets)."""
    colours = palette(N_FRAMES)
    frames = np.broadcast_to(colours[:, None, None, :], (N_FRAMES, 84, 112, 3))
    path = tmp_path_factory.mktemp("video") / "coloured.mp4"
    write_video(path, frames, FPS, gop=6)
    return path, colours


def test_palette_is_distinguishable_after_encoding(coloured):
    path, colours = coloured
    gaps = np.abs(colours[:, None].astype(int) - colours[None].astype(int)).sum(-1) + np.eye(N_FRAMES, dtype=int) * 999
    assert gaps.min() > 30  # codec error on flat frames is a few levels: nearest colour is unambiguous


def test_probe_reads_the_header(coloured):
    path, _ = coloured
    info = probe_video(path)
    assert isinstance(info, VideoInfo)
    assert (info.num_frames, info.height, info.width, info.codec) == (N_FRAMES, 84, 112, "h264")
    assert info.fps == pytest.approx(FPS) and info.duration == pytest.approx(N_FRAMES / FPS, abs=1e-6)


@pytest.mark.parametrize("seek_gap_s", [0.3, float("inf")], ids=["seeking", "forward-only"])
def test_frames_at_requested_timestamps_in_any_order(coloured, seek_gap_s):
    path, colours = coloured
    wanted = [0, 47, 3, 3, 20, 21, 40, 12, 0, 33]
    frames = decode_frames(path, [i / FPS for i in wanted], seek_gap_s=seek_gap_s)
    assert frames.shape == (len(wanted), 84, 112, 3) and frames.dtype == np.uint8
    assert [frame_index(f, colours) for f in frames] == wanted
    assert np.abs(frames[0].astype(int) - colours[0]).max() <= 6  # RGB (not BGR, not YUV)


def test_sparse_targets_seek_and_decode_fewer_frames(coloured, monkeypatch):
    path, colours = coloured
    decoded = []
    original = video._FrameCursor._next

    def counting_next(self):
        decoded.append(1)
        return original(self)

    monkeypatch.setattr(video._FrameCursor, "_next", counting_next)
    counts = {}
    for gap in (1.0, float("inf")):
        decoded.clear()
        frames = decode_frames(path, [0.0, 2.5, 4.4], seek_gap_s=gap)
        assert [frame_index(f, colours) for f in frames] == [0, 25, 44]
        counts[gap] = len(decoded)
    assert counts[float("inf")] >= 30  # forward-only walks through every reference frame up to 4.4 s
    assert counts[1.0] <= 12  # seeks land on keyframes 24 and 42 (every 6th frame)


def test_a_time_between_frames_gives_the_frame_on_screen(coloured):
    path, colours = coloured
    times = [0.04, 0.19, 1.0 - 1e-5, 2.55, 4.79]  # 1.0 - 1e-5 is 1.0 rounded badly: frame 10
    frames = decode_frames(path, times, seek_gap_s=0.5)
    assert [frame_index(f, colours) for f in frames] == [0, 1, 10, 25, 47]


def test_times_past_the_end_give_the_last_frame(coloured):
    path, colours = coloured
    assert frame_index(decode_frames(path, [9.0])[0], colours) == N_FRAMES - 1


def test_no_timestamps_and_bad_timestamps(coloured):
    path, _ = coloured
    assert decode_frames(path, []).shape == (0, 84, 112, 3)
    with pytest.raises(ValueError, match="timestamps"):
        decode_frames(path, [-1.0])
    with pytest.raises(ValueError, match="timestamps"):
        decode_frames(path, [float("nan")])


def test_probe_of_a_raw_h264_stream_counts_packets(tmp_path):
    colours = palette(17)
    path = tmp_path / "raw.h264"
    with av.open(str(path), mode="w", format="h264") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for c in colours:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), c, np.uint8), format="rgb24")))
        container.mux(stream.encode(None))
    info = probe_video(path)
    assert info.num_frames == 17 and (info.height, info.width) == (48, 64)
    assert [frame_index(f, colours) for f in decode_frames(path, [0.0, 0.5])] == [0, 5]


def encode(path, frames: np.ndarray, fps: int, codec: str, options: dict) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = options
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))


def moving_texture(n: int, h: int = 96, w: int = 128) -> np.ndarray:
    """Noise texture panning right, brightening over time: every frame differs and predicts well."""
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (h, w + 2 * n, 3), dtype=np.uint8)
    return np.stack([np.clip(texture[:, 2 * i:2 * i + w].astype(int) + i, 0, 255).astype(np.uint8) for i in range(n)])


def full_decode(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


# case: (encoder, options, container suffix, whether frames are skipped when sampling 2 fps of 25)
SKIP_CASES = {
    "h264-b-pyramid": ("libx264", {"crf": "23", "x264-params": "bframes=8:b-pyramid=normal:b-adapt=2:keyint=15"}, "mp4",
                       True),
    "h264-p-only": ("libx264", {"crf": "23", "x264-params": "bframes=0"}, "mp4", False),
    "hevc": ("libx265", {"crf": "28", "x265-params": "log-level=0:bframes=4:b-pyramid=1"}, "mp4", True),
    "vp9": ("libvpx-vp9", {"crf": "30", "b": "0"}, "webm", False),  # not told to skip: decodes everything
}


@pytest.mark.parametrize("case", SKIP_CASES)
def test_frames_nothing_predicts_from_are_skipped_between_targets_and_never_returned(tmp_path, monkeypatch, case):
    encoder, options, suffix, skips = SKIP_CASES[case]
    path = tmp_path / f"{case}.{suffix}"
    encode(path, moving_texture(75), 25, encoder, options)
    everything = full_decode(path)
    decoded = []
    original = video._FrameCursor._next
    monkeypatch.setattr(video._FrameCursor, "_next", lambda self: decoded.append(1) or original(self))
    rng = np.random.default_rng(1)
    samplings = {"every frame": np.arange(75), "2 fps": np.round(np.linspace(0, 74, 6)).astype(int),
                 "every 3rd": np.arange(1, 75, 3), "random": np.sort(rng.choice(75, 12, replace=False))}
    for name, wanted in samplings.items():
        for gap in (float("inf"), 0.3):  # forward only, and seeking between targets
            decoded.clear()
            frames = decode_frames(path, wanted / 25, seek_gap_s=gap)
            differ = [int(i) for f, i in zip(frames, wanted) if not np.array_equal(f, everything[i])]
            assert not differ, (case, name, gap, differ)  # bit-identical to decoding every frame
            if name == "2 fps" and gap == float("inf"):
                assert (len(decoded) < 70) == skips, len(decoded)  # B-frames between targets not decoded
            if name == "every frame":
                assert len(decoded) >= 75


def test_open_video_probes_and_decodes_through_one_open(coloured, monkeypatch):
    path, colours = coloured
    opened = []
    original = av.open
    monkeypatch.setattr(video.av, "open", lambda *a, **k: opened.append(a[0]) or original(*a, **k))
    with open_video(path) as clip:
        assert clip.info == probe_video(path) and len(opened) == 2  # one for open_video, one for probe_video
        assert [frame_index(f, colours) for f in clip.frames_at([0.0, 1.2])] == [0, 12]
        with pytest.raises(RuntimeError, match="already called"):
            clip.frames_at([2.0])
    assert len(opened) == 2


def test_write_video_rejects_odd_sizes(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 35, 64, 3), np.uint8), 10)


# ------------------------------------------------------------------------- bad inputs


def assert_media_error(exc_info, path, *advice):
    err = exc_info.value
    assert isinstance(err, ValueError) and err.path == str(path)
    assert str(path) in str(err)
    assert any(a in str(err) for a in advice), str(err)


@pytest.mark.parametrize("call", [probe_video, lambda p: decode_frames(p, [0.0])], ids=["probe", "decode"])
def test_missing_file(tmp_path, call):
    path = tmp_path / "nope.mp4"
    with pytest.raises(MediaError) as exc_info:
        call(path)
    assert_media_error(exc_info, path, "not found")


def test_text_file_named_mp4(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is a caption file, not a video\n" * 50)
    with pytest.raises(MediaError) as exc_info:
        probe_video(path)
    assert_media_error(exc_info, path, "re-encode", "drop the sample")


def test_truncated_mp4_with_index_at_the_end(coloured, tmp_path):
    data = coloured[0].read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])  # the moov index at the end is lost
    with pytest.raises(MediaError) as exc_info:
        decode_frames(path, [0.0])
    assert_media_error(exc_info, path, "truncated")


def test_truncated_mp4_with_index_at_the_start(tmp_path):
    rng = np.random.default_rng(0)  # noise frames: every frame is big, so the cut loses most of them
    full = write_video(tmp_path / "full.mp4", rng.integers(0, 256, (30, 48, 64, 3), dtype=np.uint8), FPS,
                       faststart=True)
    data = full.read_bytes()
    path = tmp_path / "cut_faststart.mp4"
    path.write_bytes(data[: len(data) // 2])
    info = probe_video(path)  # the header is intact: probing reads only the header
    assert info.num_frames == 30
    decode_frames(path, [0.0])  # the start is still there
    with pytest.raises(MediaError) as exc_info:
        decode_frames(path, [0.0, 2.9])
    assert_media_error(exc_info, path, "truncated")


@pytest.mark.parametrize("suffix", ["mp4", "avi"])
def test_zero_frame_video(tmp_path, suffix):
    path = tmp_path / f"empty.{suffix}"
    container = av.open(str(path), mode="w")
    stream = container.add_stream("libx264", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    container.start_encoding()  # header written, no frame ever muxed
    container.close()
    for call in (probe_video, lambda p: decode_frames(p, [0.0])):
        with pytest.raises(MediaError) as exc_info:
            call(path)
        assert_media_error(exc_info, path, "drop the sample")
