"""Manifest / shard records -> documents; every bad input is a counted skip naming the sample."""
import io
import json
import tarfile

import av
import numpy as np
import pytest
from PIL import Image

from keyetron.batch import IGNORE_INDEX
from keyetron.data.dataset import DocumentBuilder, MediaConfig, SampleDataset, SkipLog
from keyetron.data.sources import ConcatSource, JsonlSource, SourceError, TarShardSource, open_source
from keyetron.data.tokenizer import KeyeTokenizer
from keyetron.data.video import write_video

MEDIA = MediaConfig(image_max_tokens=64, video_total_tokens=400, video_fps=2.0)


@pytest.fixture(scope="module")
def tok():
    return KeyeTokenizer()


@pytest.fixture()
def builder(tok, tiny_cfg):
    return DocumentBuilder(tiny_cfg, tok, MEDIA)


def png(path, hw=(120, 90), colour=(200, 30, 30)):
    Image.new("RGB", (hw[1], hw[0]), colour).save(path)
    return path


def moving_square(path, n=16, fps=8, hw=(96, 128)):
    frames = np.full((n, *hw, 3), 230, np.uint8)
    for i in range(n):
        x = 4 + i * 6
        frames[i, 30:60, x:x + 30] = (20, 20, 200)
    return write_video(path, frames, fps)


def image_sample(sid, image):
    return {"id": sid, "task": "vqa", "messages": [
        {"role": "user", "content": [{"image": image}, "What colour?"]},
        {"role": "assistant", "content": "red"}]}


def video_sample(sid, video):
    return {"id": sid, "task": "video", "messages": [
        {"role": "user", "content": [{"video": video}, "Which way does it move?"]},
        {"role": "assistant", "content": "right"}]}


def write_manifest(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_image_and_video_samples_become_documents(tmp_path, builder, tiny_cfg):
    png(tmp_path / "a.png")
    moving_square(tmp_path / "v.mp4")
    src = JsonlSource(write_manifest(tmp_path / "m.jsonl", [image_sample("img", "a.png"), video_sample("vid", "v.mp4"),
                                                            {"id": "txt", "text": "Plain text."}]))
    ds = SampleDataset(src, builder)
    img, vid, txt = (ds.document(i) for i in range(3))
    assert ds.skips.total == 0
    # the image: one grid, pads match the merged grid, only the answer is trained
    assert img.vision_grid_thw.shape == (1, 3)
    pads = int((img.input_ids == tiny_cfg.image_token_id).sum())
    assert pads == int(img.vision_grid_thw.prod()) // 4
    trained = builder.tok.decode(img.input_ids[1:][img.targets[:-1] != IGNORE_INDEX].tolist())
    assert trained == "<think>\n\n</think>\n\nred<|im_end|>"
    # the video: one grid per sampled frame, at most two sizes (slow and fast), pads match
    assert vid.vision_grid_thw.shape[0] >= 4 and (vid.vision_grid_thw[:, 0] == 1).all()
    assert len({tuple(g) for g in vid.vision_grid_thw[:, 1:].tolist()}) <= 2
    assert int((vid.input_ids == tiny_cfg.video_token_id).sum()) == int(vid.vision_grid_thw.prod(1).sum()) // 4
    assert txt.pixel_values is None and (txt.targets != IGNORE_INDEX).sum() == len(txt) - 1


def test_cost_estimate_needs_no_decoding_and_bounds_the_document(tmp_path, builder, monkeypatch):
    png(tmp_path / "a.png", hw=(300, 500))
    moving_square(tmp_path / "v.mp4")
    src = JsonlSource(write_manifest(tmp_path / "m.jsonl", [image_sample("img", "a.png"), video_sample("vid", "v.mp4")]))
    ds = SampleDataset(src, builder)
    docs = [ds.document(0), ds.document(1)]
    import keyetron.data.dataset as dataset_mod

    def no_decoding(*a, **k):
        raise AssertionError("estimate_cost decoded media")
    monkeypatch.setattr(dataset_mod, "load_image", no_decoding)
    monkeypatch.setattr(dataset_mod, "plan_video", no_decoding)
    img_cost, vid_cost = ds.cost(0), ds.cost(1)
    assert img_cost.llm_tokens == len(docs[0])  # images are exact
    assert img_cost.vit_patches == (int(docs[0].vision_grid_thw.prod()),)
    assert vid_cost.llm_tokens >= len(docs[1])  # videos: an upper bound
    assert len(vid_cost.vit_patches) == docs[1].vision_grid_thw.shape[0]
    assert sum(vid_cost.vit_patches) >= docs[1].pixel_values.shape[0]


def zero_frame_video(path):
    container = av.open(str(path), mode="w")
    stream = container.add_stream("libx264", rate=8)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    container.start_encoding()
    container.close()
    return path


def test_bad_inputs_are_counted_skips_with_id_and_reason(tmp_path, builder):
    png(tmp_path / "ok.png")
    full = moving_square(tmp_path / "full.mp4", n=40).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(full[: len(full) // 2])
    zero_frame_video(tmp_path / "zero.mp4")
    (tmp_path / "text.mp4").write_text("this is not a video")
    png(tmp_path / "huge.png", hw=(2000, 2000))
    lines = [
        image_sample("good", "ok.png"),
        video_sample("truncated", "cut.mp4"),
        video_sample("zero_frames", "zero.mp4"),
        video_sample("not_a_video", "text.mp4"),
        image_sample("missing", "nope.png"),
        image_sample("oversized", "huge.png"),
        {"id": "no_messages", "task": "vqa"},
        {"id": "mistyped", "messages": "hello"},
        {"id": 7, "text": "id is not a string"},
        "{not json",
        {"id": "good_text", "text": "still training"},
    ]
    ds = SampleDataset(JsonlSource(write_manifest(tmp_path / "m.jsonl", lines)),
                       DocumentBuilder(builder.model, builder.tok, MediaConfig(max_source_pixels=1000 * 1000)))
    docs = [ds.document(i) for i in range(len(lines))]
    assert [d.sample_id for d in docs if d is not None] == ["good", "good_text"]
    skipped = {s.sample_id: s for s in ds.skips.entries}
    assert set(skipped) == {"truncated", "zero_frames", "not_a_video", "missing", "oversized", "no_messages",
                            "mistyped", "<m.jsonl:9>", "<m.jsonl:10>"}
    assert ds.skips.counts == {"bad_media": 5, "bad_sample": 3, "bad_record": 1}
    assert "truncated" in skipped["truncated"].reason and "cut.mp4" in skipped["truncated"].reason
    assert "zero.mp4" in skipped["zero_frames"].reason and "drop the sample" in skipped["zero_frames"].reason
    assert "cannot be opened as a video" in skipped["not_a_video"].reason
    assert "not found" in skipped["missing"].reason and "nope.png" in skipped["missing"].reason
    assert "above the limit" in skipped["oversized"].reason
    assert "messages" in skipped["no_messages"].reason and "messages" in skipped["mistyped"].reason
    assert "not valid JSON" in skipped["<m.jsonl:10>"].reason
    assert skipped["truncated"].location == "m.jsonl:2"
    summary = ds.skips.summary()
    assert summary.startswith("skipped samples: 9") and "zero_frames [m.jsonl:3]" in summary


def test_decompression_bomb_is_refused_before_decoding(tmp_path, builder):
    Image.new("L", (1, 1)).save(tmp_path / "bomb.png")
    data = bytearray((tmp_path / "bomb.png").read_bytes())
    # rewrite the IHDR size to 100000 x 100000 (CRC is not checked before the size guard)
    data[16:24] = (100000).to_bytes(4, "big") * 2
    (tmp_path / "bomb.png").write_bytes(bytes(data))
    ds = SampleDataset(JsonlSource(write_manifest(tmp_path / "m.jsonl", [image_sample("bomb", "bomb.png")])), builder)
    assert ds.document(0) is None
    assert "bomb" in ds.skips.entries[0].reason or "above the limit" in ds.skips.entries[0].reason


def make_shard(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_shard_reads_groups_and_cleans_scratch(tmp_path, builder):
    buf = io.BytesIO()
    Image.new("RGB", (56, 84), (10, 200, 10)).save(buf, format="PNG")
    shard = make_shard(tmp_path / "shard-000.tar", [
        ("s/000001.json", json.dumps(image_sample("wds-img", "000001.png")).encode()),
        ("s/000001.png", buf.getvalue()),
        ("s/000002.json", json.dumps({"id": "wds-txt", "text": "hello"}).encode()),
        ("s/000003.json", b"{broken"),
        ("s/000004.png", buf.getvalue()),  # media without its json
    ])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    src = open_source(shard, scratch_dir=scratch)
    assert isinstance(src, TarShardSource) and len(src) == 4
    ds = SampleDataset(src, builder)
    docs = [ds.document(i) for i in range(4)]
    assert docs[0].sample_id == "wds-img" and docs[0].vision_grid_thw.tolist() == [[1, 6, 4]]
    assert docs[1].sample_id == "wds-txt" and docs[2] is None and docs[3] is None
    assert ds.skips.counts == {"bad_record": 2}
    assert list(scratch.iterdir()) == []  # extracted media are removed after use


def test_sources_concatenate_and_refuse_what_they_cannot_read(tmp_path):
    a = write_manifest(tmp_path / "a.jsonl", [{"id": "a1", "text": "x"}, "", {"id": "a2", "text": "y"}])
    b = write_manifest(tmp_path / "b.jsonl", [{"id": "b1", "text": "z"}])
    cat = ConcatSource([JsonlSource(a), JsonlSource(b)])
    assert len(cat) == 3 and [cat.record(i).raw["id"] for i in range(3)] == ["a1", "a2", "b1"]
    assert cat.record(1).location == "a.jsonl:3"  # blank lines are skipped but keep line numbers
    with pytest.raises(SourceError, match="does not exist"):
        JsonlSource(tmp_path / "missing.jsonl")
    (tmp_path / "bad.tar").write_text("not a tar")
    with pytest.raises(SourceError, match="bad.tar"):
        TarShardSource(tmp_path / "bad.tar")
    with pytest.raises(SourceError, match="unknown source type"):
        open_source(tmp_path / "x.parquet")


def test_prompt_only_documents_end_with_the_generation_prompt(tmp_path, builder):
    png(tmp_path / "a.png")
    ds = SampleDataset(JsonlSource(write_manifest(tmp_path / "m.jsonl", [image_sample("img", "a.png")])), builder)
    doc = ds.document(0, prompt_only=True)
    assert (doc.targets == IGNORE_INDEX).all()
    assert builder.tok.decode(doc.input_ids[-12:].tolist()).endswith(
        "What colour?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_skip_log_state_round_trips():
    log = SkipLog()
    log.add("bad_media", "s1", "m.jsonl:1", "gone")
    other = SkipLog()
    other.load_state_dict(log.state_dict())
    assert other.counts == log.counts and other.entries == log.entries
