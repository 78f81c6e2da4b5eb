"""Matrix-product kernels chosen by measurement (kernels.py): the choice, its cache, and
float32 parity with every candidate forced."""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from susurrus import kernels, load_model, native, quantize
from susurrus.engine import native_step
from susurrus.errors import SusurrusError

from .conftest import AUDIO, busy_loops, requires_shared
from .test_transcribe import check_parity, english_wer, run_parity, tokens_of


def test_choice_follows_recorded_timings():
    # Timings recorded on two machines (ms): an AMD EPYC Zen 4, where oneDNN beats MKL's
    # F.linear on one row of the output projection and `weight @ x.T` wins on five rows,
    # and a Sapphire Rapids Xeon, where F.linear is best for the small layers.
    amd_one_row = {"linear": 9.7, "onednn": 4.1, "weight_first": 9.8}
    amd_five_rows = {"linear": 18.6, "onednn": 7.0, "weight_first": 5.1}
    intel_small = {"linear": 0.012, "onednn": 0.019, "weight_first": 0.016}
    assert kernels.choose(amd_one_row) == "onednn"
    assert kernels.choose(amd_five_rows) == "weight_first"
    assert kernels.choose(intel_small) == "linear"
    # Within 5% of the reference's own path is noise: keep F.linear.
    assert kernels.choose({"linear": 1.04, "onednn": 1.0}) == "linear"
    assert kernels.choose({"onednn": 2.0, "weight_first": 1.0}) == "weight_first"
    # Five rows of base's projection with the weight packed for oneDNN (Zen 4, cold,
    # ms): faster by more than 5%, so worth its second copy; within 5% it is not.
    assert kernels.choose({"linear": 12.0, "onednn": 4.4, "weight_first": 3.7,
                           "onednn_packed": 3.2}) == "onednn_packed"
    assert kernels.choose({"linear": 0.35, "onednn": 0.126, "weight_first": 0.28,
                           "onednn_packed": 0.122}) == "onednn"
    # An int8 decoder's steps of one row and five together (Zen 4, ms): the two kernels'
    # results differ by more than the order of sums, so the weight-only one must win by
    # more than 7.5% (tiny.en), else FBGEMM, what int8 had, stays (base).
    tie = kernels.INT8_TIE
    assert kernels.choose({"fbgemm": 6.18, "int8pack": 5.53}, "fbgemm", tie) == "int8pack"
    assert kernels.choose({"fbgemm": 11.45, "int8pack": 11.06}, "fbgemm", tie) == "fbgemm"


def test_bucket_for_rows():
    c = kernels.CANDIDATES
    one, two, three, packed = c["linear"], c["onednn"], c["weight_first"], c["onednn_packed"]
    choices = ((1, one, one), (8, packed, two), (32, three, three))
    with kernels.packed_weights():
        assert kernels.pick(choices, 1) is one
        assert kernels.pick(choices, 5) is packed
        assert kernels.pick(choices, 8) is packed
        assert kernels.pick(choices, 40) is three  # beyond the largest bucket: its choice
    # Outside beam search, the fastest kernel that keeps no second copy of the weight.
    assert kernels.pick(choices, 5) is two
    with kernels.packed_weights(False):
        assert kernels.pick(choices, 8) is two


def test_a_packed_choice_keeps_its_plain_runner_up():
    five_rows = {"linear": 12.0, "onednn": 4.4, "weight_first": 3.7, "onednn_packed": 3.2}
    assert kernels._choices(5, five_rows) == {"5": "onednn_packed", "5:plain": "weight_first"}
    assert kernels._choices(1, {"linear": 2.0, "onednn": 1.0}) == {"1": "onednn"}
    table = kernels.KernelTable({"float32:8x8": {"1": "onednn", "5": "onednn_packed",
                                                 "5:plain": "weight_first"}})
    assert table.kernels("float32:8x8") == (
        (1, kernels.CANDIDATES["onednn"], kernels.CANDIDATES["onednn"]),
        (5, kernels.CANDIDATES["onednn_packed"], kernels.CANDIDATES["weight_first"]),
    )
    assert kernels._valid_entry("float32:8x8", table.choices["float32:8x8"])
    # A packed kernel as the plain choice is a corrupt entry.
    assert not kernels._valid_entry("float32:8x8", {"5": "onednn", "5:plain": "onednn_packed"})


@pytest.mark.parametrize("name", list(kernels.CANDIDATES))
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_every_candidate_computes_the_same_product(name, rows):
    torch.manual_seed(rows)
    linear = nn.Linear(384, 1536)
    x = torch.randn(rows, 1, 384)
    expected = F.linear(x, linear.weight, linear.bias)
    got = kernels.CANDIDATES[name](x, linear.weight, linear.bias)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_split_products_do_not_depend_on_the_thread_count():
    """The engine changes the thread count with the machine's load: a product cut into
    parts (one row, a beam's five; an odd output count goes weight-first) sums each output
    the same way whatever the count."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    for rows, out_features in ((1, 1536), (5, 1152), (1, 51865 // 5)):
        x, weight, bias = torch.randn(rows, 384), torch.randn(out_features, 384), None
        results = []
        try:
            for count in (1, 2, 3):
                torch.set_num_threads(count)
                results.append(kernels.CANDIDATES["split"](x, weight, bias))
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(results[0], r) for r in results[1:]), (rows, out_features)


def test_a_steps_kernels_give_the_same_sums_for_any_thread_count():
    """Every kernel a decoding step's product may be measured for, at each of its row
    counts, sums the same way with one thread or two: the engine changes the count with
    the machine's load, and a window's numbers must not change with it (MKL's F.linear
    does for some counts of a few rows: it is not a candidate there)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    weight = torch.randn(1536, 384)
    bias = torch.randn(1536)
    try:
        for rows in range(1, 13):
            bucket = next((b for b in kernels.STEP_BUCKETS if rows <= b), 32)
            x = torch.randn(rows, 384)
            for name, kernel in kernels.CANDIDATES.items():
                if not kernels._usable(name, torch.float32, bucket, kernels.PACKED_STEP_ROWS):
                    continue
                results = []
                for count in (1, 2):
                    torch.set_num_threads(count)
                    results.append(kernel(x, weight, bias))
                assert torch.equal(*results), (name, rows)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(kernels.ATTENTION))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_attention_candidate_computes_the_same_attention(name, dtype):
    torch.manual_seed(0)
    # Five queries (beams) on one audio, and rows at different positions under a mask.
    q = torch.randn(2, 6, 5, 64, dtype=dtype)
    k = torch.randn(2, 6, 1500, 64, dtype=dtype)
    v = torch.randn(2, 6, 1500, 64, dtype=dtype)
    mask = (torch.arange(1500) <= torch.tensor([40, 1200])[:, None])[:, None, None, :]
    for m in (None, mask):
        expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m)
        got = kernels.ATTENTION[name](q, k, v, m)
        assert got.dtype == dtype and got.shape == expected.shape
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("name", list(kernels.LONG_ATTENTION))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries", [1500, 89])  # as many as the keys, or fewer
def test_every_encoder_attention_candidate_computes_the_same_attention(name, dtype, queries):
    torch.manual_seed(0)
    q = torch.randn(1, 6, queries, 64, dtype=dtype)
    k, v = (torch.randn(1, 6, 1500, 64, dtype=dtype) for _ in range(2))
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. an output buffer of the wrong shape, resized
        got = kernels.LONG_ATTENTION[name](q, k, v)
    assert got.dtype == dtype and got.shape == expected.shape
    # bfloat16: its scores are rounded to bfloat16 in the blocks (SDPA keeps them in float32).
    tolerance = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)


def test_the_encoder_attention_choice_is_measured_and_applied(tiny_en, tmp_path, monkeypatch):
    _fresh(monkeypatch)
    model = copy.deepcopy(tiny_en)
    model.encoder.set_layer_dtype(torch.bfloat16)
    table = kernels.table_for(model, tmp_path / "kernels.json")
    key = "encoder-attention:bfloat16:6x1500x64"
    timings = table.timings[key]["1"]
    best = min(timings, key=timings.__getitem__)
    expected = "sdpa" if timings["sdpa"] <= timings[best] * 1.05 else best
    assert table.choices[key] == {"1": expected}
    monkeypatch.setenv("SUSURRUS_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    kernels.tune(model)
    kernel = model.encoder.blocks[0].attn.long_kernel
    assert kernel is (None if expected == "sdpa" else kernels.LONG_ATTENTION[expected])
    # The decoder's attention never takes it: its self-attention is masked or causal, and
    # a prompt's attention to the audio through the blocks (bfloat16 scores) cost `auto`
    # 0.6 to 0.8 WER points on the long inputs (base en-long greedy, tiny.en en-synth).
    assert all(b.cross_attn.long_kernel is None for b in model.decoder.blocks)


def _fresh(monkeypatch):
    # A new process as far as the choices go: nothing remembered in memory.
    monkeypatch.setattr(kernels, "_tables", {})


def _write_record(path, data: dict) -> None:
    """A cache file edited by a test, its choices recorded as made on an idle machine:
    had another process (a test's leftover) used the cores during the load that wrote it,
    its busy marks would have the next load measure them again instead of following it."""
    data.pop("busy", None)
    path.write_text(json.dumps(data))


def test_choices_are_measured_once_and_cached(tiny_en, tmp_path, monkeypatch):
    _fresh(monkeypatch)
    # Measured as on an idle machine (a test's leftover process would mark the choices
    # busy, and the next load would measure them again: another test's subject).
    monkeypatch.setattr(kernels, "others_took_cores", lambda *args, **kwargs: False)
    path = tmp_path / "kernels.json"
    table = kernels.table_for(tiny_en, path)
    data = json.loads(path.read_text())
    entry = data["machines"][kernels.machine_key()]
    # Every product shape of tiny.en (384 wide, 1536 in the MLP, 51864 tokens) is there,
    # with the decoder's layers timed together in whole steps, each bucket with a known
    # kernel, and whether greedy steps screen the projection.
    assert set(entry) == {
        "float32:384x384",
        "float32:1152x384",  # self-attention's queries, keys and values in one product
        "float32:1536x384",
        "float32:384x1536",
        "projection:float32:51864x384",
        f"decoder:float32:384x{len(kernels._decoder_layers(tiny_en)[1])}",
        kernels._attention_key(tiny_en),  # with the step kernels timed
        "encoder-attention:float32:6x1500x64",
        "screen:float32:51864x384",
    }
    assert entry["screen:float32:51864x384"]["1"] in kernels.SCREEN
    assert {rows for rows in entry["float32:384x384"] if rows.isdigit()} == {
        "1", "4", "5", "8", "32", "1500"
    }
    assert set(entry["encoder-attention:float32:6x1500x64"].values()) <= set(
        kernels.LONG_ATTENTION
    )
    for key, buckets in entry.items():
        if not key.startswith(("attention:", "encoder-attention:", "screen:")):
            assert set(buckets.values()) <= set(kernels.CANDIDATES)
    assert entry == table.choices
    # A packed weight is a second copy of it: never timed for the encoder's many rows, nor
    # for the projection's one row (the screen's work) or 32 (the screen's deferred sums).
    packed = "onednn_packed"
    for key, buckets in table.timings.items():
        if key.startswith("float32:"):
            assert set(buckets) == {"1500"} and packed not in buckets["1500"]
    projection = table.timings["projection:float32:51864x384"]
    assert packed in projection["5"]
    assert packed not in projection["1"] and packed not in projection["32"]
    decoder = f"decoder:float32:384x{len(kernels._decoder_layers(tiny_en)[1])}"
    assert all(packed in found for found in table.timings[decoder].values())
    # Each choice is the measured minimum (or F.linear within 5% of it).
    for key, buckets in table.timings.items():
        for rows, found in buckets.items():
            if key.startswith("screen:"):
                assert entry[key][rows] == kernels.choose(found, preferred="full")
            elif not key.startswith("attention:"):
                assert entry[key][rows] == kernels.choose(found)
                plain = entry[key].get(f"{rows}:plain")
                assert (plain is not None) == (entry[key][rows] in kernels.PACKED)
                if plain:
                    unpacked = {n: t for n, t in found.items() if n not in kernels.PACKED}
                    assert plain == kernels.choose(unpacked)
    # The attention of steps: its type (tiny.en's own float32, nothing else asked) and
    # one kernel for every bucket of audios, the fastest of those timed (the two products
    # on a near tie).
    key = kernels._attention_key(tiny_en)
    assert key == "attention:float32:384x6x4:1500:" + "+".join(
        ["matmul"] + (["native"] if native.available() else []))
    timed = table.timings[key]
    totals = {name: timed["1"][f"float32/{name}"] + timed["8"][f"float32/{name}"]
              for name in kernels._step_attention_kernels()}
    assert all(t > 0 for t in totals.values())
    chosen = kernels.choose(totals, preferred="matmul")
    assert entry[key] == {"dtype": "float32", "1": chosen, "8": chosen}
    assert tiny_en.decoder.blocks[0].cross_attn.step_kernel is kernels.ATTENTION[chosen]

    # The next process reads the file and measures nothing.
    _fresh(monkeypatch)

    def measure(*args, **kwargs):
        raise AssertionError("measured again despite a valid cache")

    monkeypatch.setattr(kernels.KernelTable, "measure", measure)
    again = kernels.table_for(tiny_en, path)
    assert again.choices == entry


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"format": 0, "machines": {}}),
        "stale",  # the right key with a kernel this version does not know
    ],
)
def test_a_corrupt_or_stale_cache_is_ignored_and_measured_again(
    tiny_en, tmp_path, monkeypatch, caplog, content
):
    _fresh(monkeypatch)
    path = tmp_path / "kernels.json"
    if content == "stale":
        content = json.dumps(
            {"format": kernels.FORMAT, "machines": {kernels.machine_key(): {"x": {"1": "turbo"}}}}
        )
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="susurrus.kernels"):
        table = kernels.table_for(tiny_en, path)
    if content.startswith("{not"):
        assert "ignoring the kernel cache" in caplog.text
    elif "turbo" in content:
        assert "stale" in caplog.text
    assert "float32:384x384" in table.choices
    data = json.loads(path.read_text())
    assert data["format"] == kernels.FORMAT
    assert data["machines"][kernels.machine_key()] == table.choices


def test_each_cache_format_has_a_file_of_its_own(tmp_path, monkeypatch, caplog):
    # An older susurrus (format 6, kernels.json) beside this one: neither reads nor rewrites
    # the other's file, so neither takes the other's entries for stale and measures again.
    _fresh(monkeypatch)
    monkeypatch.delenv("SUSURRUS_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("SUSURRUS_CACHE_DIR", str(tmp_path))
    older = tmp_path / "kernels.json"
    older_text = json.dumps(
        {"format": 6, "machines": {kernels.machine_key(): {"float32:128x128": {"1": "linear"}}}}
    )
    older.write_text(older_text)
    with caplog.at_level(logging.WARNING, logger="susurrus.kernels"):
        table = kernels.table_for(nn.Sequential(nn.Linear(128, 128)))
    assert "stale" not in caplog.text
    assert older.read_text() == older_text
    assert kernels.cache_path() == tmp_path / f"kernels-{kernels.FORMAT}.json"
    saved = json.loads(kernels.cache_path().read_text())
    assert saved["machines"][kernels.machine_key()] == table.choices
    # The next start reads its own file and measures nothing.
    _fresh(monkeypatch)
    with caplog.at_level(logging.INFO, logger="susurrus.kernels"):
        caplog.clear()
        assert kernels.table_for(nn.Sequential(nn.Linear(128, 128))).choices == table.choices
    assert "measur" not in caplog.text


def test_a_busy_machine_is_told_from_recorded_samples():
    # others_running() samples: idle, a busy loop beside 2 threads on 2 cores, and the
    # same loop on 8 cores, where it takes none of the 2 threads' cores.
    assert not kernels.machine_busy([0, 0, 1, 0, 0], cpus=2, threads=2)
    assert kernels.machine_busy([1, 1, 2, 0, 1], cpus=2, threads=2)
    assert not kernels.machine_busy([1, 1, 2, 0, 1], cpus=8, threads=2)
    assert not kernels.machine_busy([None, None], cpus=2, threads=2)
    # Threads with a core each beside the others: the cores the threads leave free go first.
    assert kernels.threads_left(0, threads=2, cpus=2) == 2
    assert kernels.threads_left(1, threads=2, cpus=2) == 1
    assert kernels.threads_left(3, threads=2, cpus=2) == 1
    assert kernels.threads_left(1, threads=8, cpus=8) == 7
    assert kernels.threads_left(10, threads=8, cpus=16) == 6
    assert kernels.threads_left(None, threads=8, cpus=8) == 8
    # More threads than cores (OMP_NUM_THREADS above them): no more than the cores.
    assert kernels.threads_left(1, threads=16, cpus=8) == 7


def test_a_busy_measurement_is_told_from_recorded_cpu_time():
    # /proc/stat ticks (100 a second) over one second of measuring with 2 threads on a
    # 2-core VM: idle, and with a busy loop that took 0.7 of a core.
    start = kernels.CpuMark(busy=1000, own=500, at=10.0)
    idle = kernels.CpuMark(busy=1203, own=700, at=11.0)
    loaded = kernels.CpuMark(busy=1200, own=630, at=11.0)
    assert kernels.others_cores(start, idle) == pytest.approx(0.03)
    assert not kernels.others_took_cores(start, idle, cpus=2, threads=2)
    assert kernels.others_took_cores(start, loaded, cpus=2, threads=2)
    assert not kernels.others_took_cores(start, loaded, cpus=8, threads=2)  # cores to spare
    assert not kernels.others_took_cores(None, loaded, cpus=2, threads=2)  # no /proc
    # Over 50 ms, two ticks are the sampling's error, not a process.
    short = kernels.CpuMark(busy=1012, own=510, at=10.05)
    assert not kernels.others_took_cores(start, short, cpus=2, threads=2)


def test_choices_measured_on_a_busy_machine_are_measured_again_when_it_is_idle(
    tmp_path, monkeypatch, caplog
):
    _fresh(monkeypatch)
    path = tmp_path / "kernels.json"
    # Choices measured idle before (stated: the test machine may be busy) stay when the
    # machine is busy later.
    with monkeypatch.context() as idle:
        idle.setattr(kernels, "others_took_cores", lambda *args, **kwargs: False)
        kernels.table_for(nn.Sequential(nn.Linear(128, 128)), path)
    _fresh(monkeypatch)
    model = nn.Sequential(nn.Linear(1024, 1024))  # 0.3 s of measuring: many ticks
    with busy_loops(torch.get_num_threads()):
        with caplog.at_level(logging.INFO, logger="susurrus.kernels"):
            kernels.table_for(model, path)
    assert "other processes used the cores" in caplog.text
    assert json.loads(path.read_text())["busy"] == {kernels.machine_key(): ["float32:1024x1024"]}
    # The next process finds the machine idle (stated, as above): it measures again and
    # trusts the result.
    _fresh(monkeypatch)
    monkeypatch.setattr(kernels, "_idle_now", lambda: True)
    monkeypatch.setattr(kernels, "others_took_cores", lambda *args, **kwargs: False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="susurrus.kernels"):
        table = kernels.table_for(model, path)
    assert "measuring them again now that it is idle" in caplog.text
    assert "measured 1 product shapes" in caplog.text  # the busy one only
    assert not table.busy and json.loads(path.read_text())["busy"] == {}
    assert {"float32:128x128", "float32:1024x1024"} <= set(table.choices)


def test_a_packed_weight_is_made_once_and_follows_its_weight():
    weight = torch.randn(64, 32)
    x = torch.randn(3, 32)
    packed = kernels.packed_weight(weight)
    assert kernels.packed_weight(weight) is packed
    torch.testing.assert_close(kernels.CANDIDATES["onednn_packed"](x, weight, None), x @ weight.T)
    with torch.no_grad():
        weight.mul_(2)  # written in place (as load_state_dict does): packed again
    assert kernels.packed_weight(weight) is not packed
    torch.testing.assert_close(kernels.CANDIDATES["onednn_packed"](x, weight, None), x @ weight.T)
    key = id(weight)
    del weight, packed
    gc.collect()
    assert key not in kernels._packs  # dropped with its weight


@requires_shared
def test_packed_weights_serve_beam_search_only(tiny_en):
    """A packed copy doubles a weight's memory: greedy decoding (with its fallbacks) never
    makes one; beam search takes the packed choice, with the plain choice's tokens."""
    model = copy.deepcopy(tiny_en)
    layers = kernels._decoder_layers(model)[1]
    onednn, packed = kernels.CANDIDATES["onednn"], kernels.CANDIDATES["onednn_packed"]
    audio = str(AUDIO / "jfk.flac")
    for layer in layers:
        layer.kernel_choices = {torch.float32: ((1 << 30, onednn, onednn),)}
    plain = model.transcribe(audio, temperature=0.0, beam_size=5)
    for layer in layers:
        layer.kernel_choices = {torch.float32: ((1 << 30, packed, onednn),)}
    greedy = model.transcribe(audio)  # default temperatures: a fallback would sample 5 rows
    assert not any(id(layer.weight) in kernels._packs for layer in layers)
    beam = model.transcribe(audio, temperature=0.0, beam_size=5)
    # Every layer of the steps (the audio's keys and values are made once per window).
    stepping = [m for b in model.decoder.blocks for m in (b.attn.qkv, b.attn.out, b.mlp[0])]
    assert all(id(layer.weight) in kernels._packs for layer in stepping)
    assert tokens_of(beam) == tokens_of(plain)
    assert english_wer([greedy["text"], beam["text"]], ["jfk.flac"] * 2) < 0.05


def test_the_loaded_model_uses_its_choices(tiny_en):
    layer = tiny_en.decoder.blocks[0].mlp[0]
    assert isinstance(layer, kernels.TunedLinear)
    assert isinstance(tiny_en.decoder.project, kernels.TunedProjection)
    x = torch.randn(3, 1, layer.in_features)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_fused_self_attention_computes_and_saves_the_three_layers(tiny_en):
    """Self-attention's queries, keys and values come from one product on the CPU, while
    the state dict keeps the checkpoints' three layers (export, conversions)."""
    from susurrus.model import Whisper

    attn = tiny_en.decoder.blocks[0].attn
    assert isinstance(attn.qkv, kernels.TunedLinear) and not hasattr(attn, "query")
    state = tiny_en.state_dict()
    assert set(state) == set(Whisper(tiny_en.dims).state_dict())
    x = torch.randn(2, 3, 384)
    prefix = "decoder.blocks.0.attn."
    q, k, v = attn.project_qkv(x)
    torch.testing.assert_close(q, F.linear(x, state[prefix + "query.weight"],
                                           state[prefix + "query.bias"]))
    torch.testing.assert_close(k, F.linear(x, state[prefix + "key.weight"]))
    torch.testing.assert_close(v, F.linear(x, state[prefix + "value.weight"],
                                           state[prefix + "value.bias"]))


def test_attention_type_follows_recorded_timings():
    """bfloat16 attention, asked for by `auto`, is kept only where it pays: timings (ms of
    whole steps through the two products) recorded on an AMD EPYC Zen 4, and an imagined
    CPU where bfloat16 loses. The kernel is the two products either way."""
    zen4 = {"1": {"bfloat16/matmul": 4.24, "float32/matmul": 4.12},
            "8": {"bfloat16/matmul": 11.7, "float32/matmul": 14.2}}
    slow_bf16 = {"1": {"bfloat16/matmul": 8.0, "float32/matmul": 4.7},
                 "8": {"bfloat16/matmul": 25.0, "float32/matmul": 14.0}}
    assert kernels.choose_attention(zen4, torch.bfloat16, torch.float32) == {
        "dtype": "bfloat16", "1": "matmul", "8": "matmul"
    }
    assert kernels.choose_attention(slow_bf16, torch.bfloat16, torch.float32) == {
        "dtype": "float32", "1": "matmul", "8": "matmul"
    }
    # Near tie (within the VM's noise between processes): the asked type, which halves the
    # audio's keys, also when float32 came out 8% faster.
    tie = {"1": {"bfloat16/matmul": 4.3, "float32/matmul": 4.2},
           "8": {"bfloat16/matmul": 14.6, "float32/matmul": 14.0}}
    assert kernels.choose_attention(tie, torch.bfloat16, torch.float32)["dtype"] == "bfloat16"
    noisy = {"1": {"bfloat16/matmul": 4.80, "float32/matmul": 4.22},
             "8": {"bfloat16/matmul": 14.6, "float32/matmul": 13.8}}
    assert kernels.choose_attention(noisy, torch.bfloat16, torch.float32)["dtype"] == "bfloat16"


# Forced paths are checked on part of the parity set: the long reading (four windows, each
# after the first with its previous text as a prompt of many rows) and three single
# windows, of which one may differ, as one of the whole set's fifteen English files may.
# The measured choice is checked on all of it by test_transcribe.py.
FORCED_FILES = frozenset({
    "en_lj_LJ001-0001-0016_concat.flac", "jfk.flac", "en_arctic_a0024.flac",
    "en_lj_LJ001-0005.flac",
})


@requires_shared
@pytest.mark.parametrize("name", list(kernels.ATTENTION))
def test_float32_parity_with_each_attention_forced(name, monkeypatch):
    """Token for token with the reference whichever attention the steps take."""
    monkeypatch.setenv(kernels.ENV_FORCE_ATTENTION, name)
    model = load_model("tiny.en", device="cpu")
    assert model.decoder.blocks[0].cross_attn.step_kernel is kernels.ATTENTION[name]
    check_parity(*run_parity(model, "tiny.en", "greedy", FORCED_FILES), most_differing=0.25)


@requires_shared
@pytest.mark.parametrize("name", list(kernels.CANDIDATES))
def test_float32_parity_with_each_kernel_forced(name, monkeypatch):
    """Token for token with the reference whichever kernel every product takes."""
    monkeypatch.setenv(kernels.ENV_FORCE, name)
    model = load_model("tiny.en", device="cpu")
    assert model.decoder.blocks[0].mlp[0].kernel_choices[torch.float32][0][1] is (
        kernels.CANDIDATES[name]
    )
    # Greedy here (beam 5 with each forced kernel passed too, at 3 minutes more); the
    # measured choice is checked in both settings by test_transcribe.py.
    check_parity(*run_parity(model, "tiny.en", "greedy", FORCED_FILES), most_differing=0.25)


def test_an_int8_decoders_step_kernel_is_measured_cached_and_applied(tmp_path, monkeypatch):
    """int8 decoders choose their steps' kernel from whole steps (with the output
    projection) of one row and of five (FBGEMM within 7.5%), cache it with the rest under
    a key naming the kernels timed, and give the same one to every layer whatever the row
    count; the output projection takes it if native, else FBGEMM's two-row product."""
    _fresh(monkeypatch)
    monkeypatch.setenv("SUSURRUS_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    monkeypatch.setattr(native_step, "ENABLED", False)  # whole native steps: next test
    model = load_model("tiny.en", compute_type="int8")
    key, layers = kernels._int8_layers(model)
    # 4 blocks of 8 products (qkv fused, the audio's keys and values), attention in float32.
    assert key == "int8-decoder:float32:384x32:" + "+".join(kernels._int8_candidates())
    assert kernels._int8_candidates()[:2] == ["fbgemm", "int8pack"] or (
        not quantize.weight_only_supported())
    assert ("native" in key) == native.available()
    table = kernels.table_for(model)
    entry = table.choices[key]
    timings = table.timings[key]
    assert set(timings) == {"1", "5", "all"}
    for found in timings.values():
        assert set(found) <= set(quantize.STEP_KERNELS) and all(t > 0 for t in found.values())
    assert entry == {"all": kernels.choose(timings["all"], "fbgemm", tie=kernels.INT8_TIE)}
    assert set(timings["all"]) == set(kernels._int8_candidates())
    assert all(layer.step_kernel == entry["all"] for layer in layers)
    projection = model.decoder.token_embedding.projection.step_kernel
    assert projection == ("native" if entry["all"] == "native" else "fbgemm")
    saved = json.loads((tmp_path / "kernels.json").read_text())
    assert saved["machines"][kernels.machine_key()][key] == entry
    # A kernel this version does not know makes the entry stale.
    assert not kernels._valid_entry(key, {"all": "turbo"})
    assert not kernels._valid_entry(key, {"1": "int8pack"})  # one kernel, not per bucket
    assert kernels._valid_entry(key, entry)


@requires_shared
@pytest.mark.skipif(not native.available(), reason="no native kernels here")
def test_whole_steps_choose_between_the_chosen_parts_and_the_native_step(
    tmp_path, monkeypatch
):
    """Where a part of the step was measured faster through PyTorch (here: recorded so),
    whole steps decide between the parts as chosen and every part native in one call
    (which saves the loop's calls): measured once, cached, applied, and a recorded choice
    followed either way."""
    _fresh(monkeypatch)
    path = tmp_path / "kernels.json"
    monkeypatch.setenv("SUSURRUS_KERNEL_CACHE", str(path))
    model = load_model("tiny.en", compute_type="int8")
    fused = kernels._fused_key(model)
    attention, (int8, layers) = kernels._attention_key(model), kernels._int8_layers(model)
    assert fused == f"fused:{attention}|{int8}"

    def record(entries: dict) -> dict:
        data = json.loads(path.read_text())
        machine = data["machines"][kernels.machine_key()]
        machine.pop(fused, None)
        machine.update(entries)
        _write_record(path, data)
        _fresh(monkeypatch)
        return machine

    # The parts recorded as faster through PyTorch: the step is timed both ways.
    parts = {attention: {"dtype": "float32", "1": "matmul", "8": "matmul"},
             int8: {"all": "fbgemm"}}
    record(parts)
    model = load_model("tiny.en", compute_type="int8")
    table = kernels.table_for(model)
    totals = table.timings[fused]["all"]
    assert set(totals) == set(kernels.FUSED) and all(t > 0 for t in totals.values())
    choice = "fused" if totals["fused"] <= totals["chosen"] * kernels.FUSED_TIE else "chosen"
    assert table.choices[fused] == {"all": choice}
    saved = json.loads(path.read_text())["machines"][kernels.machine_key()]
    assert saved[fused] == {"all": choice}
    assert kernels._valid_entry(fused, {"all": choice})
    assert not kernels._valid_entry(fused, {"all": "turbo"})
    for recorded in ("fused", "chosen"):
        record({**parts, fused: {"all": recorded}})
        model = load_model("tiny.en", compute_type="int8")
        decoder = model.decoder
        steps = [native_step.plan(decoder, rows) for rows in kernels.FUSED_BUCKETS]
        layers = kernels._int8_layers(model)[1] + [decoder.token_embedding.projection]
        cross = decoder.blocks[0].cross_attn
        if recorded == "fused":
            assert all(step is not None for step in steps)
            assert all(m.step_kernel == "native" for m in layers)
            assert cross.step_kernel is kernels.ATTENTION["native"]
        else:
            assert steps == [None, None]
            assert all(m.step_kernel == "fbgemm" for m in layers)
            assert cross.step_kernel is kernels.ATTENTION["matmul"]
        text = model.transcribe(str(AUDIO / "jfk.flac"), temperature=0.0)["text"]
        assert "ask not what your country can do for you" in text.lower(), text


@requires_shared
@pytest.mark.skipif(not native.available(), reason="no native kernels here")
def test_auto_keeps_the_audio_keys_in_float16_unless_measured_slower(tmp_path, monkeypatch):
    """`auto` asks for the audio's keys and values in float16 where the native attention
    reads them (half a window's memory). Whole steps decide between them and float32 as
    for any attention type; the int8 kernel measured beside them applies whichever type
    won (its key names the type asked for, not the one chosen)."""
    _fresh(monkeypatch)
    path = tmp_path / "kernels.json"
    monkeypatch.setenv("SUSURRUS_KERNEL_CACHE", str(path))
    assert quantize.resolve_compute_type("auto", torch.device("cpu")).cache_dtype == (
        None if quantize.bfloat16_tiles() else torch.float16)
    monkeypatch.setattr(quantize, "bfloat16_tiles", lambda: False)
    load_model("tiny.en", compute_type="auto")
    machine = json.loads(path.read_text())["machines"][kernels.machine_key()]
    attention = next(k for k in machine if k.startswith("attention:float16:"))
    int8 = next(k for k in machine if k.startswith("int8-decoder:float16:"))
    assert machine[attention]["dtype"] in ("float16", "float32")
    for dtype, kernel in (("float32", "native"), ("float16", "fbgemm")):
        data = json.loads(path.read_text())
        data["machines"][kernels.machine_key()].update(
            {attention: {"dtype": dtype, "1": "native", "8": "native"}, int8: {"all": kernel},
             # (FBGEMM's parts kept as chosen rather than the whole native step)
             f"fused:{attention}|{int8}": {"all": "chosen"}})
        _write_record(path, data)
        _fresh(monkeypatch)
        model = load_model("tiny.en", compute_type="auto")
        decoder = model.decoder
        assert decoder.blocks[0].cross_attn.attention_dtype == (
            torch.float16 if dtype == "float16" else None)
        assert all(m.step_kernel == kernel for m in kernels._int8_layers(model)[1])
        with torch.inference_mode():
            cache = decoder.new_cache(1)
            decoder.fill_cross_cache(cache, torch.randn(1, 1500, 384))
        assert cache.cross_k[0].dtype == getattr(torch, dtype)
        text = model.transcribe(str(AUDIO / "jfk.flac"), temperature=0.0)["text"]
        assert "ask not what your country can do for you" in text.lower(), (dtype, text)


def test_an_int8_layers_many_row_kernel_is_measured_cached_and_applied(tmp_path, monkeypatch):
    """Each int8 shape's products of many rows (the encoder's) take the kernel timed
    faster for 1500 rows (the dequantized float product on a near tie: its activations
    stay unrounded), cached with the rest and given to every encoder layer of that shape;
    the decoder's (prompt passes, the audio's keys and values) always take the dequantized
    product, which keeps words (see kernels._apply_int8_rows); the output projection is
    not timed (its rows always go through FBGEMM). The measurements that run the decoder
    after that choice already take it: without VNNI the int8 one takes 0.4 s a call."""
    _fresh(monkeypatch)
    monkeypatch.setenv("SUSURRUS_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    ran: list[tuple[int, str]] = []  # (layer, many-row kernel) of every such product

    def spy(kernel: str, call):
        def run(self, x):
            ran.append((id(self), kernel))
            return call(self, x)

        return run

    for name, method in (("int_mm", "_per_row"), ("dequantized", "_dequantized")):
        original = getattr(quantize.Int8Linear, method)
        monkeypatch.setattr(quantize.Int8Linear, method, spy(name, original))
    model = load_model("tiny.en", compute_type="int8")
    assert isinstance(model.decoder.blocks[0].cross_attn.key, quantize.Int8Linear)  # all int8
    table = kernels.table_for(model)
    shapes = kernels._int8_rows_shapes(model)
    assert (1152, 384) in shapes and (51864, 384) not in shapes  # stacked q/k/v; projection
    saved = json.loads((tmp_path / "kernels.json").read_text())["machines"]
    for out_features, in_features in shapes:
        key = f"int8-rows:{out_features}x{in_features}"
        timings = table.timings[key]["1500"]
        assert set(timings) == set(quantize.ROWS_KERNELS) and all(t > 0 for t in timings.values())
        assert table.choices[key] == {"1500": kernels.choose(timings, "dequantized")}
        assert saved[kernels.machine_key()][key] == table.choices[key]
        assert kernels._valid_entry(key, table.choices[key])
    projection = model.decoder.token_embedding.projection
    decoder = {id(m) for m in model.decoder.modules()}
    for layer in model.modules():
        if isinstance(layer, quantize.Int8Linear) and layer is not projection:
            key = f"int8-rows:{layer.out_features}x{layer.in_features}"
            assert layer.rows_kernel == table.choices[key]["1500"]
            # Its dequantized products through the float32 kernel measured for its shape.
            floats = table.choices[f"float32:{layer.out_features}x{layer.in_features}"]
            assert saved[kernels.machine_key()][
                f"float32:{layer.out_features}x{layer.in_features}"] == floats
            assert layer.float_product is kernels.CANDIDATES[floats["1500"]]
            # The decoder's sequences keep their activations unrounded whatever was measured.
            assert layer.sequence_kernel == ("dequantized" if id(layer) in decoder else None)
    # Every product of many rows ran through its layer's kernel: the encoder's and the
    # decoder's sequences (3-D) are all that ran here (no step of 64 rows).
    own = {id(m): m.sequence_kernel or m.rows_kernel
           for m in model.modules() if isinstance(m, quantize.Int8Linear)}
    used = [(own[layer], kernel) for layer, kernel in ran if layer in own]
    assert used and all(chosen == kernel for chosen, kernel in used), used
    # A decoder layer's step of many rows (2-D) takes the measured kernel, its sequences
    # the dequantized product.
    layer = next(m for m in model.decoder.modules() if isinstance(m, quantize.Int8Linear)
                 and m is not projection)
    ran.clear()
    with torch.inference_mode():
        layer(torch.randn(64, layer.in_features))
        layer(torch.randn(1, 64, layer.in_features))
    assert [kernel for _, kernel in ran] == [layer.rows_kernel, "dequantized"]
    assert not kernels._valid_entry("int8-rows:384x384", {"1500": "turbo"})


@pytest.mark.parametrize(
    "native_bfloat16, bfloat16_faster, int8_faster, expected",
    [
        (True, True, True, "bfloat16"),  # Zen 4: closer to float32 than int8, as fast
        (True, False, True, "int8"),
        (True, False, False, "float32"),
        (False, True, True, "int8"),  # VNNI without bfloat16: never measured in it
        (False, None, False, "float32"),  # AVX2 only (Zen 3)
    ],
)
def test_auto_runs_the_encoder_in_the_type_measured_fastest(
    tmp_path, monkeypatch, native_bfloat16, bfloat16_faster, int8_faster, expected
):
    """On a CPU without bfloat16 tiles (AMX), `auto` runs the encoder's layers in bfloat16
    where the CPU computes in it and each shape's products of 1500 rows measured faster
    so, else in int8 where each measured faster in int8, else in float32: recorded choices
    of such CPUs. $SUSURRUS_ENCODER overrides them."""
    if native_bfloat16 and not quantize.native_bfloat16():
        pytest.skip("no native bfloat16 here (its products would be measured in it)")
    _fresh(monkeypatch)
    monkeypatch.setattr(quantize, "bfloat16_tiles", lambda: False)
    monkeypatch.setattr(quantize, "native_bfloat16", lambda: native_bfloat16)
    # tiny.en's encoder: q, k, v and out 384x384; the MLP's 1536x384 and 384x1536.
    shapes = ("384x384", "1536x384", "384x1536")
    int8 = "int_mm" if int8_faster else "dequantized"
    recorded = {f"int8-rows:{shape}": {"1500": int8} for shape in shapes}
    if bfloat16_faster is not None:
        bfloat16 = "bfloat16" if bfloat16_faster else "float32"
        recorded.update({f"bfloat16-rows:{shape}": {"1500": bfloat16} for shape in shapes})
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps(
        {"format": kernels.FORMAT, "machines": {kernels.machine_key(): recorded}}
    ))
    monkeypatch.setenv("SUSURRUS_KERNEL_CACHE", str(path))

    def encoder_type(model: nn.Module) -> str:
        layers = [m for m in model.encoder.modules() if isinstance(m, (nn.Linear, nn.Conv1d))]
        if any(isinstance(m, quantize.Int8Linear) for m in model.encoder.modules()):
            return "int8"
        assert len({m.weight.dtype for m in layers}) == 1
        return {torch.float32: "float32", torch.bfloat16: "bfloat16"}[layers[0].weight.dtype]

    model = load_model("tiny.en", compute_type="auto")
    assert encoder_type(model) == expected
    assert isinstance(model.decoder.blocks[0].mlp[0], quantize.Int8Linear)  # always int8
    assert model.encoder.blocks[0].mlp_ln.weight.dtype == torch.float32  # the stream's
    # The decoder's projections of the audio stay float32 (once a window, never a step).
    cross = model.decoder.blocks[0].cross_attn
    assert all(isinstance(m, quantize.Int8Linear) for m in (cross.query, cross.out))
    assert all(type(m) in (nn.Linear, kernels.TunedLinear) and m.weight.dtype == torch.float32
               for m in (cross.key, cross.value))
    saved = json.loads(path.read_text())["machines"][kernels.machine_key()]
    assert {k for k in saved if k.startswith("bfloat16-rows:")} == (
        {k for k in recorded if k.startswith("bfloat16-rows:")})  # nothing measured again
    monkeypatch.setenv("SUSURRUS_ENCODER", "int8" if expected != "int8" else "float32")
    forced = load_model("tiny.en", compute_type="auto")
    assert encoder_type(forced) == os.environ["SUSURRUS_ENCODER"]
    monkeypatch.setenv("SUSURRUS_ENCODER", "fast")
    with pytest.raises(SusurrusError, match="SUSURRUS_ENCODER"):
        load_model("tiny.en", compute_type="auto")


@pytest.mark.skipif(not quantize.native_bfloat16(), reason="no native bfloat16 here")
def test_the_encoders_bfloat16_products_are_measured_against_float32(tmp_path, monkeypatch):
    """Where the CPU computes in bfloat16, each encoder shape's products of 1500 rows are
    timed in float32 and bfloat16 and the faster type cached, float32 on a near tie."""
    _fresh(monkeypatch)
    monkeypatch.setattr(quantize, "bfloat16_tiles", lambda: False)
    monkeypatch.setenv("SUSURRUS_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    encoder = load_model("tiny.en", compute_type="float32").encoder
    kernels.encoder_type(encoder, torch.float32)
    table = kernels._known(kernels.cache_path(), kernels.machine_key())
    for shape in ("384x384", "1536x384", "384x1536"):
        key = f"bfloat16-rows:{shape}"
        timings = table.timings[key]["1500"]
        assert set(timings) == {"float32", "bfloat16"} and all(t > 0 for t in timings.values())
        assert table.choices[key] == {
            "1500": kernels.choose(timings, "float32", kernels.BFLOAT16_ROWS_TIE)}
        assert kernels._valid_entry(key, table.choices[key])
    assert not kernels._valid_entry("bfloat16-rows:384x384", {"1500": "int8"})
