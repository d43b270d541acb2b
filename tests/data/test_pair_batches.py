"""Stage 0's pair loader with the cost index: each data-parallel rank opens only its own
records, and the ranks together take exactly the pairs one process takes."""
from collections import Counter

from keyetron.data.dataset import DocumentBuilder, MediaConfig, SampleDataset
from keyetron.data.demo import make_demo
from keyetron.data.loader import LoaderConfig
from keyetron.data.sources import open_source
from keyetron.data.tokenizer import KeyeTokenizer
from keyetron.model import load_model_config
from keyetron.model.siglip_text import load_text_config
from keyetron.data.cost_index import build_cost_index
from keyetron.data.pairs import CaptionTokenizer, ContrastiveBatchBuilder, PairBatches, PairDataset

MEDIA = MediaConfig(image_max_tokens=16)


def test_each_rank_opens_only_its_own_records_and_the_union_is_one_process_batch(tmp_path):
    make_demo(tmp_path / "demo", seed=2, train_size=40, eval_size=2)
    manifest = str(tmp_path / "demo" / "train.jsonl")
    cfg = load_model_config("tiny")
    costs = build_cost_index(SampleDataset(open_source(manifest), DocumentBuilder(
        cfg, KeyeTokenizer(cfg.tokenizer), MEDIA)), tmp_path / "index.json")
    candidates = [c is not None and c.kind == "image" and len(c.vit_patches) == 1 for c in costs]
    builder = ContrastiveBatchBuilder(CaptionTokenizer.for_tower(load_text_config("tiny")), MEDIA)

    def loader(rank, dp, batch):
        source = open_source(manifest)
        opened = Counter()
        record = source.record

        def counted(index):
            opened[index] += 1
            return record(index)

        source.record = counted
        return PairBatches(PairDataset(source, builder, candidates=candidates), batch, LoaderConfig(seed=4),
                          rank, dp), opened

    ranks = [loader(r, 2, 3) for r in range(2)]
    single, _ = loader(0, 1, 6)
    for _ in range(3):
        union = [sid for ld, _ in ranks for sid in ld.next_batch().sample_ids]
        assert union == list(single.next_batch().sample_ids)
    opened = [set(o) for _, o in ranks]
    assert not opened[0] & opened[1], "a record was opened by both ranks"
    assert all(max(o.values()) == 1 for _, o in ranks) and sum(len(o) for o in opened) == 18
