"""Data blends: Megatron-LM's --data-path forms, weights per epoch, determinism, resume, one source = plain."""

import numpy as np
import pytest

from megatron_pack.config.datasets import build_datasets
from megatron_pack.config.spec import DataArgs, TrainArgs, TrainConfig
from megatron_pack.data.blend import BlendedPackedDataset, BlendError, blend_schedule, parse_blend
from megatron_pack.data.eval_batches import eval_batches
from megatron_pack.data.packed_dataset import PackedSFTDataset
from megatron_pack.data.sampling import DataPosition, TrainStream
from megatron_pack.files.indexed import SFTDatasetWriter


def _write(path, n, first_token, seed):
    """``n`` conversations whose tokens all equal ``first_token + i``: a sequence tells its source."""
    rng = np.random.default_rng(seed)
    with SFTDatasetWriter(path) as w:
        for i in range(n):
            k = int(rng.integers(5, 60))
            w.add([first_token + i] * k, [0] + [1] * (k - 1), [0])
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("blend")
    # A: ids 1..80, B: ids 101..130 (small: repeated), C: ids 201..260
    return [_write(str(d / "a"), 80, 1, 0), _write(str(d / "b"), 30, 101, 1), _write(str(d / "c"), 60, 201, 2)]


def _source_of(token: int) -> int:
    return token // 100


def _cfg(data_path, mode="bfd", seed=1234, **data):
    return TrainConfig(data=DataArgs(data_path=data_path, seq_length=64, valid_fraction=data.pop("valid_fraction", 0.0),
                                     **data),
                       train=TrainArgs(global_batch_size=4, micro_batch_size=2, train_iters=1, seed=seed))


def test_parse_forms_and_errors():
    assert parse_blend("a") == parse_blend(["a"]) and parse_blend("a").weights is None
    b = parse_blend(["3", "x/a", "1", "y/b"])
    assert b.prefixes == ("x/a", "y/b") and b.weights == (0.75, 0.25) and b.names == ("a", "b")
    assert parse_blend(["p/a", "q/a"]).names == ("a#0", "a#1")
    assert parse_blend(["p", "q"]).weights is None
    for bad, why in ((["1", "a", "2"], "give one PREFIX"), (["0", "a"], "> 0"), (["-1", "a", "1", "b"], "> 0"),
                     (["1", "2"], "number"), (["a", "0.5"], "give one PREFIX")):
        with pytest.raises(BlendError, match=why):
            parse_blend(bad, "--data-path")


def test_cli_accepts_megatron_blend_syntax(tmp_path):
    from megatron_pack.config.cli import parse_args, to_argv

    cfg = parse_args(["--data-path", "0.3", "A", "0.7", "B", "--train-iters", "1"])
    assert cfg.data.data_path == ["0.3", "A", "0.7", "B"]
    assert parse_args(to_argv(cfg)).data.data_path == cfg.data.data_path  # round trip
    assert parse_args(["--data-path", "A", "--train-iters", "1"]).data.data_path == "A"  # one prefix: plain
    cfg = parse_args(["--train-data-path", "A", "--valid-data-path", "1", "V", "--train-iters", "1"])
    assert (cfg.data.train_data_path, cfg.data.valid_data_path) == ("A", ["1", "V"])


@pytest.mark.parametrize("argv, msg", [
    (["--data-path", "0.3", "A", "0.7", "--train-iters", "1"], "--data-path"),
    (["--data-path", "A", "--train-data-path", "B", "--train-iters", "1"], "--train-data-path"),
    (["--valid-data-path", "V", "--train-iters", "1"], "required: --data-path (or --train-data-path)"),
])
def test_cli_rejects_bad_blends(argv, msg, capsys):
    from megatron_pack.config.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(argv)
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("k", [2, 3, 6, 10])
def test_schedule_keeps_every_prefix_close_to_the_weights(k):
    """Never a sequence ahead of its weight nor one behind, for any number of sources: every
    prefix of an epoch is within one sequence (the property test is test_blend_schedule.py)."""
    worst_ahead = worst_behind = 0.0
    for seed in range(40):
        rng = np.random.default_rng([k, seed])
        w = rng.dirichlet(np.ones(k) * float(rng.choice([0.2, 1.0, 5.0])))
        n = int(rng.integers(50, 600))
        sched = blend_schedule(w, n)
        counts = np.cumsum(np.eye(k, dtype=np.int64)[sched], axis=0)  # counts after each draw
        dev = counts - np.outer(np.arange(1, n + 1), w)
        worst_ahead, worst_behind = max(worst_ahead, dev.max()), max(worst_behind, -dev.min())
    assert worst_ahead < 1.0
    assert worst_behind < 1.0, worst_behind
    # negative control: the same counts in blocks (all of one source first) break the bound
    w = np.full(k, 1.0 / k)
    blocks = np.sort(blend_schedule(w, 100))
    counts_b = np.cumsum(np.eye(k, dtype=np.int64)[blocks], axis=0)
    assert np.abs(counts_b - np.outer(np.arange(1, 101), w)).max() >= 1.0


def test_schedule_by_size_is_exact():
    sched = blend_schedule([7, 3, 5], 15)
    assert np.bincount(sched).tolist() == [7, 3, 5]


def _tokens_source(item) -> int:
    toks = item["tokens"][item["tokens"] != 0]
    srcs = {_source_of(int(t)) for t in toks}
    assert len(srcs) == 1, "a sequence mixes sources"
    return srcs.pop()


def test_weights_hold_within_each_epoch(sources):
    ds = build_datasets(_cfg(["0.5", sources[0], "0.2", sources[1], "0.3", sources[2]], mode="bfd")).train
    assert isinstance(ds, BlendedPackedDataset)
    w = np.array([0.5, 0.2, 0.3])
    for epoch in range(3):
        ds.set_epoch(epoch)
        n = len(ds)
        src = np.array([_tokens_source(ds[i]) for i in range(n)])  # read from the tokens themselves
        assert (src == ds.source).all()
        counts = np.cumsum(np.eye(3, dtype=np.int64)[src], axis=0)
        assert np.abs(counts - np.outer(np.arange(1, n + 1), w)).max() < 1.0, epoch


def test_small_source_is_repeated_as_a_stream(sources):
    """B is upsampled: every B sequence appears once before any appears twice."""
    ds = build_datasets(_cfg(["0.1", sources[0], "0.9", sources[1]])).train
    seen = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        for i in np.flatnonzero(ds.source == 1):
            seen.append(tuple(ds[int(i)]["tokens"].tolist()))
    b_per_epoch = len(PackedSFTDataset(ds._views[min(k for k in ds._views if k[0] == 1)].data, 64, "bfd",
                                       use_cache=False))
    assert len(seen) > 2 * b_per_epoch  # really repeated
    first = seen[:b_per_epoch]
    assert len(set(first)) == b_per_epoch  # one full pass before repeats


def test_deterministic_and_seeded(sources):
    blend = ["0.6", sources[0], "0.4", sources[2]]

    def tokens(seed):
        ds = build_datasets(_cfg(blend, seed=seed)).train
        return [ds[i]["tokens"].tolist() for i in range(len(ds))]

    assert tokens(1) == tokens(1)
    assert tokens(1) != tokens(2)  # negative control: the seed matters


def _steps(stream, n):
    out = []
    for _ in range(n):
        out.append([(m["tokens"].tolist(), m["source"].tolist()) for m in stream.next_step()])
    return out


@pytest.mark.parametrize("mode", ["bfd", "random"])
def test_resume_keeps_the_blend_position(sources, mode):
    blend = ["0.5", sources[0], "0.2", sources[1], "0.3", sources[2]]
    cfg = _cfg(blend)
    cfg.data.packing.pack_mode = mode
    ds = build_datasets(cfg).train
    steps_per_epoch = len(ds) // 4
    total = steps_per_epoch + 5  # crosses a blend epoch boundary
    full = _steps(TrainStream(ds, 4, 2, 0, 1), total)
    for cut in (3, steps_per_epoch + 2):
        first = TrainStream(build_datasets(cfg).train, 4, 2, 0, 1)
        a = _steps(first, cut)
        pos = DataPosition.from_state_dict(first.pos.state_dict())
        b = _steps(TrainStream(build_datasets(cfg).train, 4, 2, 0, 1, pos), total - cut)
        assert a + b == full, cut
    # negative control: resuming at the wrong step is noticed
    wrong = DataPosition(epoch=0, step_in_epoch=2)
    assert _steps(TrainStream(build_datasets(cfg).train, 4, 2, 0, 1, wrong), 1) != full[3:4]


@pytest.mark.parametrize("mode", ["bfd", "random"])
def test_blend_of_one_source_equals_the_plain_run(sources, mode):
    def stream(data_path, seed=1234):
        cfg = _cfg(data_path, seed=seed, valid_fraction=0.1)
        cfg.data.packing.pack_mode = mode
        ds = build_datasets(cfg)
        return ds, TrainStream(ds.train, 4, 2, 0, 1)

    plain_ds, plain = stream(sources[0])
    blend_ds, blend = stream(["1", sources[0]])
    assert isinstance(blend_ds.train, BlendedPackedDataset) and not isinstance(plain_ds.train, BlendedPackedDataset)
    n = 2 * (len(plain_ds.train) // 4) + 3  # two epochs and then some (random re-plans every epoch)
    strip = lambda steps: [[t for t, _ in s] for s in steps]  # noqa: E731
    assert strip(_steps(blend, n)) == strip([[(m["tokens"].tolist(), None) for m in plain.next_step()]
                                             for _ in range(n)])
    plain_valid = [m["tokens"].tolist() for b in eval_batches(plain_ds.valid, 4, 2, 0, 1) for m in b]
    blend_valid = [m["tokens"].tolist() for b in eval_batches(blend_ds.valid, 4, 2, 0, 1) for m in b]
    assert plain_valid == blend_valid
    # negative control: another seed gives another run
    other_ds, other = stream(["1", sources[0]], seed=99)
    assert strip(_steps(other, 2)) != strip(_steps(stream(["1", sources[0]])[1], 2))


def test_held_out_blend_scores_every_sequence_once_with_its_source(sources):
    ds = build_datasets(_cfg(["0.9", sources[0], "0.1", sources[2]], valid_fraction=0.2))
    assert ds.train_names == ("a", "c") and ds.valid.names == ("a", "c")
    assert ds.num_valid_conversations == 16 + 12
    seen = []
    for batch in eval_batches(ds.valid, 4, 2, 0, 1):
        for m in batch:
            rows = m["tokens"].reshape(2, -1)
            for row, s in zip(rows, m["source"].tolist()):
                toks = row[row != 0]
                if toks.numel():
                    assert {_source_of(int(t)) for t in toks} == {2 * s}  # a -> 0, c -> 2
                    seen.append(tuple(toks.tolist()))
    assert len(seen) == len(set(seen)) == len(ds.valid)


def test_valid_data_path_is_the_held_out_set(sources):
    ds = build_datasets(_cfg(sources[0], valid_data_path=["1", sources[1], "1", sources[2]], valid_fraction=0.3))
    assert ds.num_train_conversations == 80 and ds.num_valid_conversations == 90  # nothing held out of A
    assert ds.valid.names == ("b", "c") and ds.train_names == ()


def test_blend_plan_feeds_the_batch_balancer(sources):
    """The balancer's per-sequence attention cost from the blend's plan view equals the one
    computed from the items the blend serves (pieces copied from each source's plan)."""
    from megatron_pack.data.balance import sequence_sum_sq

    ds = build_datasets(_cfg(["0.5", sources[0], "0.2", sources[1], "0.3", sources[2]])).train
    sq = sequence_sum_sq(ds.plan, True)
    for i in range(len(ds)):
        item = ds[i]
        cu = item["cu_seqlens"][: int(item["num_cu_seqlens"])].numpy()
        assert sq[i] == float(((cu[1:] - cu[:-1]) ** 2).sum()), i
    assert ds.plan.seq_offsets[-1] == ds.plan.piece_lengths.size == ds.plan.pieces_per_sequence().sum()


def test_token_sources_follow_rows_and_cp_chunks():
    import torch

    from megatron_pack.training.step import token_sources

    batch = {"source": torch.tensor([1, 0]), "tokens": torch.zeros(1, 8)}
    assert token_sources(batch).tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    # under CP: local tokens carry their document (segment) id; documents start at 0, 4, 6 of rows of 4
    cp = {"source": torch.tensor([1, 0]), "tokens": torch.zeros(1, 4), "num_cu_seqlens": torch.tensor(4),
          "cu_seqlens_padded": torch.tensor([0, 4, 6, 8, -1], dtype=torch.int32),
          "segment_ids": torch.tensor([[0, 0, 1, 2]])}
    assert token_sources(cp).tolist() == [1, 1, 0, 0]
    assert token_sources({"tokens": torch.zeros(1, 4)}) is None
