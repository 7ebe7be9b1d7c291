"""Manifests, labels, the sharded resumable loader, bad input, backends, mixtures, demo data, CLI."""

import os

import numpy as np
import pytest
import torch

from sslam_fast import cli
from sslam_fast.data import audio
from sslam_fast.data import (
    ManifestError,
    build_loader,
    epoch_order,
    make_demo_dataset,
    norm_stats,
    read_label_descriptors,
    read_labels,
    read_manifest,
)


@pytest.fixture(scope="session")
def sf():
    """soundfile, for the tests that write audio files or decode them (the loader reads files with
    it); only those skip where it is not installed (the GPU image has none)."""
    return pytest.importorskip("soundfile", reason="soundfile is not installed")


@pytest.fixture(scope="module")
def demo(tmp_path_factory, sf):
    """12 one-second clips at 22.05 kHz (so the loader resamples)."""
    return make_demo_dataset(str(tmp_path_factory.mktemp("demo")), num_clips=12, seconds=1.0, sample_rate=22050, seed=3)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- manifests


def test_read_manifest_fairseq_layout(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("/data/audioset\nbal/a b.wav\t320000\nunbal/c.flac\t160000\n")
    m = read_manifest(str(path))
    assert m.root == "/data/audioset" and len(m) == 2
    assert m.paths == ["bal/a b.wav", "unbal/c.flac"] and m.sizes == [320000, 160000]
    assert m.path(1) == "/data/audioset/unbal/c.flac"


@pytest.mark.parametrize(
    "body,line,message",
    [
        ("/root\na.wav\t10\nb.wav 20\n", 3, "expected"),
        ("/root\na.wav\tten\n", 2, "not an integer"),
        ("/root\na.wav\t10\n\nb.wav\t3\n", 3, "expected"),
        ("\na.wav\t10\n", 1, "root directory"),
        ("/root\na.wav\t-5\n", 2, "negative"),
    ],
)
def test_malformed_manifest_names_file_and_line(tmp_path, body, line, message):
    path = tmp_path / "bad.tsv"
    path.write_text(body)
    with pytest.raises(ManifestError, match=rf"bad\.tsv:{line}: .*{message}"):
        read_manifest(str(path))


def test_labels_and_descriptors(tmp_path):
    (tmp_path / "label_descriptors.csv").write_text('0,/m/09x0r,Speech\n1,/m/04rlf,"Music, live"\n\n2,/m/0jbk,Animal\n')
    (tmp_path / "train.tsv").write_text("/r\na.wav\t10\nb.wav\t10\n")
    (tmp_path / "train.lbl").write_text("a\t/m/09x0r,/m/0jbk\nb\t/m/04rlf\n")
    descriptors = read_label_descriptors(str(tmp_path / "label_descriptors.csv"))
    assert descriptors == {"/m/09x0r": 0, "/m/04rlf": 1, "/m/0jbk": 2}
    manifest = read_manifest(str(tmp_path / "train.tsv"))
    assert read_labels(str(tmp_path / "train.lbl"), descriptors, manifest) == [[0, 2], [1]]
    (tmp_path / "bad.lbl").write_text("a\t/m/09x0r\nb\t/m/nope\n")
    with pytest.raises(ManifestError, match=r"bad\.lbl:2: label '/m/nope'"):
        read_labels(str(tmp_path / "bad.lbl"), descriptors)
    (tmp_path / "short.lbl").write_text("a\t/m/09x0r\n")
    with pytest.raises(ManifestError, match="1 label lines for 2 entries"):
        read_labels(str(tmp_path / "short.lbl"), descriptors, manifest)


def test_manifest_command_writes_readable_manifest(tmp_path, capsys, sf):
    (tmp_path / "sub").mkdir()
    sf.write(tmp_path / "sub" / "x.flac", np.zeros(1234, np.float32), 8000)
    sf.write(tmp_path / "y.wav", np.zeros(4321, np.float32), 16000)
    (tmp_path / "junk.wav").write_text("not audio")
    (tmp_path / "notes.txt").write_text("ignored")
    assert cli.main(["manifest", str(tmp_path), "-o", str(tmp_path / "m.tsv")]) == 0
    assert "2 entries, 1 unreadable" in capsys.readouterr().out
    m = read_manifest(str(tmp_path / "m.tsv"))
    assert m.root == str(tmp_path) and m.paths == ["sub/x.flac", "y.wav"] and m.sizes == [1234, 4321]


# ---------------------------------------------------------------------------------------------- loader


def test_shards_are_disjoint_and_reshuffled_per_epoch():
    shards = [epoch_order(103, seed=1, epoch=0, rank=r, world_size=4) for r in range(4)]
    assert all(len(s) == 25 for s in shards)
    flat = np.concatenate(shards)
    assert len(set(flat.tolist())) == 100
    assert not np.array_equal(epoch_order(103, 1, 0), epoch_order(103, 1, 1))
    assert np.array_equal(epoch_order(103, 1, 5, 2, 4), epoch_order(103, 1, 5, 2, 4))
    assert not np.array_equal(epoch_order(103, 1, 0), epoch_order(103, 2, 0))


def test_resharding_mid_epoch_continues_the_same_permutation():
    """3 ranks consume 4 entries each of a 103-entry epoch, then 2 ranks deal the rest."""
    from sslam_fast.data.loader import consumed_entries, resharded_state

    full = epoch_order(103, seed=1, epoch=2)
    old = [{"epoch": 2, "position": 4, "seed": 1, "rank": r, "world_size": 3} for r in range(3)]
    assert consumed_entries(old[0]) == 12
    seen = [epoch_order(103, 1, 2, r, 3)[:4] for r in range(3)]
    new = [resharded_state(old, r, 2) for r in range(2)]
    assert all(s["start"] == 12 and s["position"] == 0 and s["world_size"] == 2 for s in new)
    rest = [epoch_order(103, 1, 2, r, 2, start=new[r]["start"]) for r in range(2)]
    assert sorted(np.concatenate(seen + rest).tolist()) == sorted(full[:102].tolist())  # one dropped: 91 % 2
    assert consumed_entries(dict(new[0], position=len(rest[0]))) == 102
    assert consumed_entries(dict(new[0], epoch=3)) == 0  # the start applies to its own epoch only


def test_loader_batches_and_features(demo):
    loader = build_loader(demo, batch_size=4, backend="torch", num_workers=0, infinite=False)
    batches = list(loader)
    assert len(batches) == 3
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(12))
    first = batches[0]
    assert first["fbank"].shape == (4, 1, 1024, 128) and first["fbank"].dtype == torch.float32
    manifest = read_manifest(demo)
    for row, index in enumerate(first["index"].tolist()):
        expected = audio.load_features(manifest.path(index))
        torch.testing.assert_close(first["fbank"][row, 0], expected, rtol=0, atol=1e-5)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0


def test_write_features_equals_pad_crop_normalise():
    from sslam_fast.data.loader import write_features

    fbank = torch.randn(1500, 128) * 5 - 4
    for frames in (1, 998, 1024, 1500):
        out = torch.full((1024, 128), float("nan"))
        write_features(fbank[:frames], out, -6.627, 5.359)
        assert torch.equal(out, audio.normalise(audio.pad_or_crop(fbank[:frames]), -6.627, 5.359)), frames


def test_worker_slot_ring_gives_the_same_batches(demo):
    """Workers write features into a shared ring of slots that is reused many times over here (12
    clips, batches of 4, 40 batches); every batch must equal the one computed in the main process."""
    kwargs = dict(batch_size=4, seed=4, backend="torch")
    want = take(build_loader(demo, num_workers=0, **kwargs), 40)
    got = take(build_loader(demo, num_workers=2, **kwargs), 40)
    for w, g in zip(want, got):
        assert torch.equal(w["index"], g["index"])
        assert torch.equal(w["fbank"], g["fbank"])
    assert len({b["fbank"].data_ptr() for b in got}) == len(got)  # no batch aliases another


def test_loader_ranks_see_disjoint_clips(demo):
    seen = []
    for rank in range(3):
        loader = build_loader(demo, batch_size=2, rank=rank, world_size=3, backend="torch", num_workers=0, infinite=False)
        seen.append(torch.cat([b["index"] for b in loader]).tolist())
    assert all(len(s) == 4 for s in seen)
    assert len(set(sum(seen, []))) == 12


def test_resume_continues_with_the_same_batches(demo):
    reference = take(build_loader(demo, batch_size=5, seed=7, backend="torch", num_workers=2), 6)  # crosses epochs
    loader = build_loader(demo, batch_size=5, seed=7, backend="torch", num_workers=2)
    take(loader, 3)
    state = loader.state_dict()
    resumed = build_loader(demo, batch_size=5, seed=7, backend="torch", num_workers=0)
    resumed.load_state_dict(state)
    for want, got in zip(reference[3:], take(resumed, 3)):
        assert torch.equal(want["index"], got["index"])
        torch.testing.assert_close(want["fbank"], got["fbank"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="seed"):
        build_loader(demo, batch_size=5, seed=8).load_state_dict(state)


def test_dali_loader_shards_resumes_and_hands_out_batches_that_stay_valid(demo):
    """The DALI backend: ranks see disjoint clips; a batch handed out is not overwritten by the
    pipeline's next runs (its features are torch's own, computed from DALI's buffers); a resumed
    loader continues with the very same batches, across an epoch boundary."""
    pytest.importorskip("nvidia.dali", reason="DALI not installed")
    seen = []
    for rank in range(3):
        loader = build_loader(demo, batch_size=2, rank=rank, world_size=3, backend="dali", num_workers=1, infinite=False)
        seen.append(torch.cat([b["index"] for b in loader]).tolist())
    assert all(len(s) == 4 for s in seen) and len(set(sum(seen, []))) == 12

    batches = iter(build_loader(demo, batch_size=5, seed=7, backend="dali", num_workers=2))
    first = next(batches)
    snapshot = first["fbank"].clone()
    reference = [first] + [next(batches) for _ in range(5)]
    assert torch.equal(first["fbank"], snapshot)
    assert len({b["fbank"].data_ptr() for b in reference}) == len(reference)

    loader = build_loader(demo, batch_size=5, seed=7, backend="dali", num_workers=2)
    take(loader, 3)
    resumed = build_loader(demo, batch_size=5, seed=7, backend="dali", num_workers=1)
    resumed.load_state_dict(loader.state_dict())
    for want, got in zip(reference[3:], take(resumed, 3)):
        assert torch.equal(want["index"], got["index"])
        torch.testing.assert_close(want["fbank"], got["fbank"], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def broken_folder(tmp_path_factory, sf):
    """Good clips mixed with every kind of broken file; returns (manifest, good paths, bad paths)."""
    root = tmp_path_factory.mktemp("broken")
    rng = np.random.default_rng(0)
    good = []
    for i in range(7):
        rate = (16000, 32000, 44100)[i % 3]
        path = root / f"good_{i}.{('wav', 'flac', 'ogg')[i % 3]}"
        sf.write(path, (0.1 * rng.standard_normal(rate // 2)).astype(np.float32), rate)
        good.append(path)
    bad = {
        "empty.wav": lambda p: sf.write(p, np.zeros(0, np.float32), 16000),
        "truncated.flac": lambda p: p.write_bytes(_flac_bytes(sf, root)[:300]),
        "not_audio.wav": lambda p: p.write_text("hello\n" * 100),
        "nan.wav": lambda p: sf.write(p, np.full(8000, np.nan, np.float32), 16000, subtype="FLOAT"),
        "inf.wav": lambda p: sf.write(p, np.array([0.0, np.inf] * 4000, np.float32), 16000, subtype="FLOAT"),
        "too_long.wav": lambda p: sf.write(p, np.zeros(16000 * 5, np.int16), 16000),
        "too_short.wav": lambda p: sf.write(p, np.zeros(100, np.float32), 16000),
        "unreadable.wav": lambda p: p.mkdir(),
    }
    for name, make in bad.items():
        make(root / name)
    entries = [p.name for p in good] + list(bad) + ["missing.wav"]
    order = np.random.default_rng(1).permutation(len(entries))
    manifest = root / "train.tsv"
    manifest.write_text(f"{root}\n" + "".join(f"{entries[i]}\t1000\n" for i in order))
    return str(manifest), sorted(str(p) for p in good), sorted(str(root / n) for n in list(bad) + ["missing.wav"])


def _flac_bytes(sf, root):
    path = root / "_source.flac"
    sf.write(path, np.random.default_rng(2).standard_normal(16000).astype(np.float32) * 0.1, 16000)
    data = path.read_bytes()
    path.unlink()
    return data


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_bad_files_are_skipped_reported_and_batches_refilled(broken_folder, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI not installed")
    manifest, good, bad = broken_folder
    loader = build_loader(manifest, batch_size=3, backend=backend, num_workers=2, infinite=False, drop_last=False, max_seconds=4.0)
    m = read_manifest(manifest)
    for epoch in range(2):
        batches = list(loader)
        delivered = sorted(m.path(i) for b in batches for i in b["index"].tolist())
        assert delivered == good, f"epoch {epoch}"
        assert [len(b["index"]) for b in batches] == [3, 3, 1]
        for b in batches:
            assert torch.isfinite(b["fbank"]).all()
        skipped = [s for s in loader.skipped if s.epoch == epoch]
        assert sorted(s.path for s in skipped) == bad
    reasons = {os.path.basename(s.path): s.reason for s in loader.skipped}
    assert "NaN or Inf" in reasons["nan.wav"] and "NaN or Inf" in reasons["inf.wav"]
    assert "limit" in reasons["too_long.wav"] and "shorter than one" in reasons["too_short.wav"]
    assert loader.num_skipped == 2 * len(bad)
    if backend == "dali":  # the truncated FLAC passes the header check and stops DALI's decoder
        assert loader._dali.rebuilds == 2 and "cannot decode" in reasons["truncated.flac"]


def test_dali_and_torch_backends_agree_on_mixed_rates_and_bad_files(broken_folder):
    pytest.importorskip("nvidia.dali", reason="DALI not installed")
    manifest = broken_folder[0]
    kwargs = dict(batch_size=3, num_workers=2, infinite=False, drop_last=False, max_seconds=4.0, seed=3)
    by_backend = {}
    for backend in ("torch", "dali"):
        loader = build_loader(manifest, backend=backend, **kwargs)
        by_backend[backend] = (list(loader), sorted(s.path for s in loader.skipped))
    (torch_batches, torch_skips), (dali_batches, dali_skips) = by_backend["torch"], by_backend["dali"]
    assert torch_skips == dali_skips
    assert len(torch_batches) == len(dali_batches) == 3
    for t, d in zip(torch_batches, dali_batches):
        assert torch.equal(t["index"], d["index"])
        torch.testing.assert_close(d["fbank"], t["fbank"], rtol=0, atol=5e-4)


@pytest.mark.parametrize("route", ["by_container", "after_dali_fails"])
def test_every_container_reaches_the_batch_with_both_backends(tmp_path, monkeypatch, route, sf):
    """wav, flac, ogg and mp3 give the same features with either backend. DALI's libsndfile cannot
    open MP3: it is decoded by soundfile and fed to the graph as float WAV, known by its container
    or (route "after_dali_fails") once DALI has stopped on it."""
    pytest.importorskip("nvidia.dali", reason="DALI not installed")
    if route == "after_dali_fails":
        monkeypatch.setattr("sslam_fast.data.dali.NOT_DECODED_BY_DALI", frozenset())
    t = np.arange(32000) / 32000
    clip = (0.3 * np.sin(2 * np.pi * 700 * t) + 0.05 * np.random.default_rng(0).standard_normal(32000)).astype(np.float32)
    rows = []
    for fmt, subtype in [("wav", "PCM_16"), ("flac", "PCM_24"), ("ogg", "VORBIS"), ("mp3", "MPEG_LAYER_III")]:
        sf.write(tmp_path / f"clip.{fmt}", clip, 32000, format=fmt.upper(), subtype=subtype)
        rows.append(f"clip.{fmt}\t32000\n")
    (tmp_path / "m.tsv").write_text(f"{tmp_path}\n" + "".join(rows))
    batches = {}
    for backend in ("torch", "dali"):
        loader = build_loader(str(tmp_path / "m.tsv"), batch_size=4, backend=backend, num_workers=1, infinite=False)
        batches[backend] = list(loader)
        assert loader.num_skipped == 0 and len(batches[backend]) == 1
        if backend == "dali":
            assert loader._dali.rebuilds == (route == "after_dali_fails")
    want, got = batches["torch"][0], batches["dali"][0]
    assert torch.equal(want["index"], got["index"])
    loud = want["fbank"] > (-10.0 - audio.NORM_MEAN) / (2 * audio.NORM_STD)  # log-mel above -10, as for the golden cases
    assert loud.float().mean() > 0.5
    torch.testing.assert_close(got["fbank"][loud], want["fbank"][loud], rtol=0, atol=1e-4)


def test_dali_feed_error_rebuilds_and_loses_nothing(demo, monkeypatch):
    """A pipeline that refuses a feed (DALI raising outside outputs()) is rebuilt and the clips in
    flight are fed again: the same batches come out."""
    pytest.importorskip("nvidia.dali", reason="DALI not installed")
    from sslam_fast.data import dali as data_dali

    kwargs = dict(batch_size=4, seed=2, backend="dali", num_workers=1, infinite=False)
    want = list(build_loader(demo, **kwargs))
    real, calls = data_dali.file_pipeline, []

    def failing_once(*args, **kw):
        pipe = real(*args, **kw)
        if not calls:
            def refuse(*_, **__):
                raise RuntimeError("injected: pipeline refused the feed")
            pipe.feed_input = refuse
        calls.append(pipe)
        return pipe

    monkeypatch.setattr(data_dali, "file_pipeline", failing_once)
    loader = build_loader(demo, **kwargs)
    got = list(loader)
    assert len(calls) == 2 and loader._dali.rebuilds == 1
    assert [b["index"].tolist() for b in got] == [b["index"].tolist() for b in want]
    for w, g in zip(want, got):
        torch.testing.assert_close(g["fbank"], w["fbank"], rtol=0, atol=1e-6)


def test_stack_rows_reuses_consecutive_rows_and_copies_others():
    from sslam_fast.data.loader import _stack_rows

    batch = torch.randn(5, 7, 3)
    view = _stack_rows([batch[1], batch[2], batch[3]])
    assert view.data_ptr() == batch[1].data_ptr() and torch.equal(view, batch[1:4])
    gathered = _stack_rows([batch[0], batch[2]])
    assert gathered.data_ptr() != batch.data_ptr() and torch.equal(gathered, batch[[0, 2]])
    other = torch.randn(7, 3)
    assert torch.equal(_stack_rows([batch[4], other]), torch.stack([batch[4], other]))



def test_check_data_reports_bad_entries_by_line_and_writes_a_clean_manifest(broken_folder, tmp_path, capsys):
    manifest, good, bad = broken_folder
    m = read_manifest(manifest)
    labels = os.path.splitext(manifest)[0] + ".lbl"
    with open(labels, "w", encoding="utf-8") as f:  # one label line per entry, named after its file
        f.writelines(f"{os.path.basename(p)}\t/m/x\n" for p in m.paths)
    clean = tmp_path / "clean.tsv"
    try:
        status = cli.main(["check-data", manifest, "-o", str(clean), "--num-workers", "2", "--max-seconds", "4"])
    finally:
        os.unlink(labels)
    out, err = capsys.readouterr()
    assert status == 1 and f"{len(good)} of {len(good) + len(bad)} entries decode" in out
    for i, path in enumerate(m.paths):
        line = f"{manifest}:{i + 2}: {m.path(i)}: "
        assert (line in err) == (m.path(i) in bad), path
    kept = read_manifest(str(clean))
    assert kept.root == m.root and sorted(kept.path(i) for i in range(len(kept))) == good
    kept_labels = (tmp_path / "clean.lbl").read_text().splitlines()
    assert [row.split("\t")[0] for row in kept_labels] == [os.path.basename(p) for p in kept.paths]
    loader = build_loader(str(clean), batch_size=1, backend="torch", num_workers=0, infinite=False, max_seconds=4.0)
    assert len(list(loader)) == len(good) and loader.num_skipped == 0
    assert cli.main(["check-data", str(clean), "--num-workers", "0", "--max-seconds", "4"]) == 0


# ---------------------------------------------------------------------------------------------- backends, mixture


def test_dali_backend_equals_torch_backend(demo):
    pytest.importorskip("nvidia.dali", reason="DALI not installed")
    kwargs = dict(batch_size=4, seed=2, num_workers=0, infinite=False)
    torch_batches = list(build_loader(demo, backend="torch", **kwargs))
    dali_batches = list(build_loader(demo, backend="dali", **kwargs))
    assert len(torch_batches) == len(dali_batches) == 3
    for t, d in zip(torch_batches, dali_batches):
        assert torch.equal(t["index"], d["index"])
        torch.testing.assert_close(d["fbank"], t["fbank"], rtol=0, atol=5e-4)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_mixture_batch_equals_model_side_mixing(demo, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI not installed")
    from sslam_fast.mixing import partial_mixture

    given = build_loader(demo, batch_size=4, backend=backend, num_workers=0, mixture=True, mix_windows=(32, 400))
    batch = next(iter(given))
    assert batch["mix_windows"].tolist() == [32, 400]
    assert torch.equal(batch["mixture"], partial_mixture(batch["fbank"], (32, 400)))
    assert torch.equal(batch["mixture"][:, :, 32:272], batch["fbank"][:, :, 32:272])

    drawn = take(build_loader(demo, batch_size=4, backend=backend, num_workers=0, mixture=True, seed=5), 4)
    for b in drawn:
        w1, w2 = b["mix_windows"].tolist()
        assert w1 % 16 == 0 and w2 % 16 == 0 and 0 <= w1 <= 496 and w1 + 240 <= w2 <= 782
        assert torch.equal(b["mixture"], partial_mixture(b["fbank"], (w1, w2)))
    assert len({tuple(b["mix_windows"].tolist()) for b in drawn}) > 1
    resumed = build_loader(demo, batch_size=4, backend=backend, num_workers=0, mixture=True, seed=5)
    resumed.load_state_dict({"epoch": 0, "position": 8})
    assert torch.equal(next(iter(resumed))["mix_windows"], drawn[2]["mix_windows"])


@pytest.mark.gpu
def test_gpu_device_loader_equals_cpu(demo):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    kwargs = dict(batch_size=4, seed=2, num_workers=0, infinite=False)
    cpu = list(build_loader(demo, backend="torch", **kwargs))
    gpu = list(build_loader(demo, backend="torch", device="cuda", **kwargs))
    for c, g in zip(cpu, gpu):
        assert g["fbank"].is_cuda and torch.equal(c["index"], g["index"])
        torch.testing.assert_close(g["fbank"].cpu(), c["fbank"], rtol=0, atol=5e-4)


# ---------------------------------------------------------------------------------------------- demo data, stats, CLI


def test_demo_dataset_is_deterministic_and_varied(tmp_path, sf):
    a = make_demo_dataset(str(tmp_path / "a"), num_clips=5, seconds=2.0, seed=1)
    b = make_demo_dataset(str(tmp_path / "b"), num_clips=5, seconds=2.0, seed=1)
    c = make_demo_dataset(str(tmp_path / "c"), num_clips=5, seconds=2.0, seed=2)
    ma, mb, mc = read_manifest(a), read_manifest(b), read_manifest(c)
    assert ma.sizes == [32000] * 5
    clips = [sf.read(ma.path(i))[0] for i in range(5)]
    for i in range(5):
        assert np.array_equal(clips[i], sf.read(mb.path(i))[0])
    assert not np.array_equal(clips[0], sf.read(mc.path(0))[0])
    assert len({round(float(np.std(x)), 4) for x in clips}) == 5
    assert all(np.abs(x).max() > 0.02 for x in clips)


def test_norm_stats_of_padded_fbanks(demo, capsys):
    mean, std, clips = norm_stats(demo)
    m = read_manifest(demo)
    raw = torch.stack([audio.pad_or_crop(audio.kaldi_fbank(audio.subtract_mean(audio.load_audio(m.path(i))))) for i in range(len(m))]).double()
    assert clips == 12
    assert mean == pytest.approx(float(raw.mean()), abs=1e-6)
    assert std == pytest.approx(float(raw.std(unbiased=False)), abs=1e-6)
    assert cli.main(["norm-stats", demo, "--num-workers", "0"]) == 0
    out = capsys.readouterr().out
    assert f"norm_mean {mean:.4f}" in out and f"norm_std {std:.4f}" in out


def test_demo_data_command(tmp_path, capsys, sf):
    assert cli.main(["demo-data", str(tmp_path / "d"), "--num-clips", "3", "--seconds", "0.5"]) == 0
    m = read_manifest(str(tmp_path / "d" / "train.tsv"))
    assert len(m) == 3 and all(os.path.exists(m.path(i)) for i in range(3))


def test_cli_registry_rejects_duplicates():
    with pytest.raises(ValueError, match="manifest"):
        cli.register("manifest", "again", lambda p: None, lambda a: 0)
    assert {"manifest", "norm-stats", "demo-data"} <= set(cli.SUBCOMMANDS)
