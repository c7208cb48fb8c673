import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from conftest import CYCLES, tiny_model, write_hf_folder, write_official
from rgchat import modelfile
from rgchat.checkpoint import convert
from rgchat.loader import load_file
from rgchat.errors import RGChatError
from rgchat.quant import Int8Linear

# The fuzz test is deterministic by default (a CI run must not fail by luck); RGCHAT_FUZZ=N explores N fresh
# random cases instead.
MAX_EXAMPLES = int(os.environ.get("RGCHAT_FUZZ", "150"))
DERANDOMIZE = "RGCHAT_FUZZ" not in os.environ


@pytest.fixture
def sources(tmp_path, tokenizer_path):
    model = tiny_model(CYCLES, seed=51)
    return model, write_hf_folder(model, tmp_path / "hf", tokenizer_path), write_official(
        model, tmp_path / "kaggle", tokenizer_path)


def split(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def rewrite_metadata(path, **changes):
    header, data = split(path)
    header["__metadata__"].update(changes)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("precision", ["f32", "bf16", "int8", "int4"])
def test_hf_and_official_sources_convert_to_identical_files(tmp_path, sources, precision):
    _, hf_dir, pt_file = sources
    a = convert(hf_dir, precision, tmp_path / "a" / "model.safetensors")
    b = convert(pt_file, precision, tmp_path / "b" / "model.safetensors")
    (ha, da), (hb, db) = split(a), split(b)
    assert da == db  # the tensor data, byte for byte
    assert ha["__metadata__"]["tensor_sha256"] == hb["__metadata__"]["tensor_sha256"]
    assert {k: v for k, v in ha.items() if k != "__metadata__"} == {k: v for k, v in hb.items() if k != "__metadata__"}
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (hf_dir / "tokenizer.model").read_bytes()


def test_converted_file_reloads_bit_identically(tmp_path, sources):
    model, hf_dir, _ = sources
    path = convert(hf_dir, "f32", tmp_path / "m.safetensors")
    loaded, mf = load_file(path)
    assert mf.precision == "f32" and mf.config == CYCLES and mf.metadata["name"] == "hf"
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    int8 = convert(hf_dir, "int8", tmp_path / "q.safetensors")
    first = {n: t.clone() for n, t in load_file(int8)[0].state_dict().items()}
    again = convert(hf_dir, "int8", tmp_path / "q2.safetensors")
    assert split(int8)[1] == split(again)[1]
    assert all(torch.equal(first[n], t) for n, t in load_file(again)[0].state_dict().items())


def test_tensors_are_aligned_for_the_kernels(tmp_path, sources):
    """Data starts 64-byte aligned; a tensor that still lands unaligned (after odd-sized ones) is copied,
    since torch's int8 kernel crashes on unaligned weights."""
    _, hf_dir, _ = sources
    path = convert(hf_dir, "int8", tmp_path / "m.safetensors")
    header, _ = split(path)
    mf = modelfile.open_file(path)
    assert mf.data_start % modelfile.ALIGN == 0
    offsets = {name: entry["data_offsets"][0] for name, entry in header.items() if name != "__metadata__"}
    assert any(o % modelfile.ALIGN for o in offsets.values())  # this tiny model has odd-sized tensors
    assert all(t.data_ptr() % modelfile.ALIGN == 0 for t in mf.tensors().values())
    # the mapped tensors are views of the file where aligned, copies elsewhere
    mapped = [n for n, o in offsets.items() if o % modelfile.ALIGN == 0 and o != header[n]["data_offsets"][1]]
    base = torch.frombuffer(mf.buffer, dtype=torch.uint8, count=1).data_ptr()
    assert all(mf.tensor(n).data_ptr() == base + mf.data_start + offsets[n] for n in mapped)
    model, _ = load_file(path)
    x = torch.randn(5, CYCLES.width, dtype=torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, Int8Linear) and m.weight.shape[1] == CYCLES.width]
    assert len(linears) > 20
    for module in linears:  # each runs through torch's small-batch int8 kernel (a crash before alignment)
        assert torch.isfinite(module(x)).all()


def test_source_checksums_are_recorded(tmp_path, sources):
    _, hf_dir, _ = sources
    mf = modelfile.open_file(convert(hf_dir, "int8", tmp_path / "m.safetensors"))
    files = mf.source["files"]
    assert "config.json" in files and all(len(f["sha256"]) == 64 for f in files.values())
    assert mf.metadata["tokenizer_sha256"] == modelfile.sha256_file(hf_dir / "tokenizer.model")


def test_damaged_files_are_refused(tmp_path, sources):
    _, hf_dir, _ = sources
    good = convert(hf_dir, "int8", tmp_path / "m.safetensors")
    raw = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[:-10])
    with pytest.raises(RGChatError, match="truncated"):
        load_file(truncated)

    tampered = tmp_path / "tampered.safetensors"
    flipped = bytearray(raw)
    flipped[-5] ^= 0x40
    tampered.write_bytes(bytes(flipped))
    with pytest.raises(RGChatError, match="checksum"):
        load_file(tampered)

    newer = tmp_path / "newer.safetensors"
    newer.write_bytes(raw)
    rewrite_metadata(newer, format_version="99")
    with pytest.raises(RGChatError, match="newer rgchat"):
        load_file(newer)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(3)}, str(foreign))
    with pytest.raises(RGChatError, match="not an rgchat model file"):
        load_file(foreign)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(RGChatError):
        load_file(garbage)

    header, data = split(good)
    for damage in ([1, 2], {**header, "embed_tokens.weight": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}},
                   {**header, "embed_tokens.weight": {**header["embed_tokens.weight"], "data_offsets": [9, 3]}}):
        bad = tmp_path / "bad-header.safetensors"
        blob = json.dumps(damage).encode()
        blob += b" " * (-len(blob) % 8)
        bad.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
        with pytest.raises(RGChatError):
            load_file(bad)


def test_failed_conversion_leaves_existing_output_untouched(tmp_path, sources, tokenizer_path):
    _, hf_dir, _ = sources
    out = convert(hf_dir, "int8", tmp_path / "out" / "model.safetensors")
    before = out.read_bytes()
    broken = write_hf_folder(tiny_model(CYCLES, seed=52), tmp_path / "broken", tokenizer_path, shards=2)
    shard = broken / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(RGChatError):
        convert(broken, "int8", out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.safetensors", "tokenizer.model"]  # no temp


@pytest.mark.parametrize("products", ["auto", "torch"])  # the native kernel where built, and torch's packing
def test_int4_file_loads_and_answers_like_in_memory_quantization(tmp_path, sources, monkeypatch, products):
    model, hf_dir, _ = sources
    from rgchat.quant import int4_runs_native, quantize_model

    monkeypatch.setenv("RGCHAT_GEMV", products)
    path = convert(hf_dir, "int4", tmp_path / "m.safetensors")
    loaded, mf = load_file(path)
    assert mf.precision == "int4"
    in_memory = quantize_model(tiny_model(CYCLES, seed=51), "int4")
    tokens = torch.arange(30) * 11 % CYCLES.vocab_size
    a = loaded.forward(tokens, loaded.new_state(), all_logits=True)
    b = in_memory.forward(tokens, in_memory.new_state(), all_logits=True)
    assert torch.equal(a, b)
    caches = [p for p in tmp_path.iterdir() if ".int4pack-torch-" in p.name and not p.name.endswith(".verified")]
    if int4_runs_native():
        assert caches == []  # the native kernel reads the file's own layout: nothing to build or cache
        return
    # the packed layout was cached beside the file; a second load runs from it and answers the same
    [cache] = caches
    again, _ = load_file(path)
    assert torch.equal(again.forward(tokens, again.new_state(), all_logits=True), a)
    cache.write_bytes(b"junk")  # a damaged cache is rebuilt, never trusted
    third, _ = load_file(path)
    assert torch.equal(third.forward(tokens, third.new_state(), all_logits=True), a)


def test_verification_is_remembered_until_the_file_changes(tmp_path, sources):
    import time

    _, hf_dir, _ = sources
    path = convert(hf_dir, "int8", tmp_path / "m.safetensors")
    load_file(path)
    stamp = path.with_name(path.name + ".verified")
    assert stamp.is_file()
    load_file(path)  # unchanged: the remembered pass is used
    time.sleep(0.02)
    with open(path, "r+b") as f:  # damage in place, as a disk error or an editor would
        f.seek(-3, 2)
        byte = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(RGChatError, match="checksum"):
        load_file(path)


def test_mutated_files_never_crash_the_loader_nor_pass_with_a_damaged_payload(tmp_path, sources):
    """Fuzz: any byte changed anywhere gives a clean refusal or a load; in the tensor data, always a refusal."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    _, hf_dir, _ = sources
    good = convert(hf_dir, "int8", tmp_path / "m.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", good[:8])
    data_start = 8 + header_len

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=DERANDOMIZE,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(1, 255)), min_size=1, max_size=4,
                    unique_by=lambda flip: flip[0]))
    def check(flips):
        raw = bytearray(good)
        for at, xor in flips:
            raw[at] ^= xor
        path = tmp_path / "fuzz" / "m.safetensors"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes(raw))
        path.with_name(path.name + ".verified").unlink(missing_ok=True)
        try:
            load_file(path)
        except RGChatError:
            return
        assert all(at < data_start for at, _ in flips), "a damaged payload was accepted"

    check()
