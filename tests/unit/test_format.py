"""The shard/manifest format: names, deterministic tars, key-joined samples, ADM crop, PNG, moments."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from repa.data import format as fmt
from tests.support.golden import golden

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _png(seed: int, res: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    return fmt.encode_png(rng.integers(0, 256, size=(res, res, 3), dtype=np.uint8))


def _samples(n: int = 4, moments: bool = False, start: int = 0) -> list[fmt.Sample]:
    out = []
    for i in range(start, start + n):
        m = np.full((2, 2, 2), i, dtype=np.float32) if moments else None
        out.append(fmt.Sample(key=fmt.sample_key(i), png=_png(i), label=i % 3, moments=m))
    return out


def _rewrite(data: bytes, drop: set[str] = frozenset(), replace: dict[str, bytes] | None = None) -> bytes:
    """Copy a tar, dropping and/or replacing members by name (simulates damage)."""
    replace = replace or {}
    buf = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(data), mode="r:") as src,
        tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as dst,
    ):
        for m in src.getmembers():
            if m.name in drop:
                continue
            payload = replace.get(m.name, src.extractfile(m).read())
            info = tarfile.TarInfo(m.name)
            info.size = len(payload)
            dst.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _manifest(**overrides) -> fmt.Manifest:
    shards = (
        fmt.ShardInfo(
            "shard-000000.tar", 0, 3, 100, "a" * 64, (fmt.SkippedFile("00000001", "a/y.JPEG", "bad"),)
        ),
        fmt.ShardInfo("shard-000001.tar", 4, 2, 200, "b" * 64),
    )
    kw = dict(resolution=8, class_names=("a", "b", "c"), shards=shards, created_by="repa test")
    kw.update(overrides)
    return fmt.Manifest(**kw)


# ----------------------------------------------------------------------------------------------
# names and keys
# ----------------------------------------------------------------------------------------------


def test_shard_and_key_names_are_zero_padded_and_sort_in_order():
    assert fmt.shard_name(7) == "shard-000007.tar"
    assert fmt.sidecar_name(7) == "shard-000007.json"
    assert fmt.parse_shard_index("s3://b/x/shard-000123.tar") == 123
    keys = [fmt.sample_key(i) for i in (0, 9, 10, 99_999, 1_281_166)]
    assert keys == sorted(keys) and fmt.sample_key(42) == "00000042"
    with pytest.raises(ValueError, match="not a shard name"):
        fmt.parse_shard_index("shard-1.tar")
    with pytest.raises(ValueError, match="out of range"):
        fmt.sample_key(10**8)


# ----------------------------------------------------------------------------------------------
# shards
# ----------------------------------------------------------------------------------------------


def test_write_shard_is_byte_identical_across_calls_with_fixed_headers():
    a, b = fmt.write_shard(_samples(moments=True)), fmt.write_shard(_samples(moments=True))
    assert fmt.write_shard(_samples(moments=True), moments_dtype="float16") != a  # float32 kept by default
    assert a == b
    with tarfile.open(fileobj=io.BytesIO(a)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["00000000.cls", "00000000.moments.npy", "00000000.png"]
    assert {(m.mtime, m.uid, m.gid, m.mode, m.uname, m.gname) for m in members} == {(0, 0, 0, 0o644, "", "")}


def test_iter_shard_round_trips_samples_by_key():
    samples = _samples(5, moments=True)
    data = fmt.write_shard(samples, moments_dtype="float16")
    keys = [s["key"] for s in samples]
    back = list(fmt.iter_shard(io.BytesIO(data), name="x.tar", expected_keys=keys, require_moments=True))
    assert [s["key"] for s in back] == keys
    for s, r in zip(samples, back):
        assert r["png"] == s["png"] and r["label"] == s["label"]
        assert r["moments"].dtype == np.float16 and np.array_equal(
            r["moments"], s["moments"].astype(np.float16)
        )


def test_shard_is_readable_by_webdataset():
    wds = pytest.importorskip("webdataset")
    data = fmt.write_shard(_samples(3, moments=True))
    samples = list(wds.tariterators.tar_file_expander([{"stream": io.BytesIO(data), "url": "x.tar"}]))
    grouped = list(wds.tariterators.group_by_keys(iter(samples)))
    assert [g["__key__"] for g in grouped] == ["00000000", "00000001", "00000002"]
    assert (
        grouped[1]["cls"] == b"1" and "moments.npy" in grouped[1] and grouped[1]["png"].startswith(b"\x89PNG")
    )


def test_write_shard_rejects_duplicate_keys_and_bad_members():
    s = _samples(2)
    with pytest.raises(ValueError, match="duplicate"):
        fmt.write_shard([s[0], s[0]])
    with pytest.raises(ValueError, match="must be non-empty without"):
        fmt.write_shard([{**s[0], "key": "a.b"}])
    with pytest.raises(ValueError, match="png must be PNG"):
        fmt.write_shard([{**s[0], "png": b"jpeg?"}])
    with pytest.raises(ValueError, match="label"):
        fmt.write_shard([{**s[0], "label": -1}])


def test_missing_member_is_reported_naming_shard_and_key_not_misaligned():
    samples = _samples(4, moments=True)
    data = _rewrite(fmt.write_shard(samples), drop={"00000001.moments.npy"})
    keys = [s["key"] for s in samples]
    with pytest.raises(
        fmt.ShardError, match=r"shard-000003\.tar: sample 00000001: missing member '00000001\.moments"
    ):
        list(
            fmt.iter_shard(
                io.BytesIO(data), name="shard-000003.tar", expected_keys=keys, require_moments=True
            )
        )
    errors: list[fmt.ShardError] = []
    back = list(
        fmt.iter_shard(
            io.BytesIO(data), name="s", expected_keys=keys, require_moments=True, on_error=errors.append
        )
    )
    assert [b["key"] for b in back] == ["00000000", "00000002", "00000003"] and len(errors) == 1
    for b in back:  # every surviving sample keeps its own moments (the reference would shift them)
        assert float(b["moments"][0, 0, 0]) == int(b["key"])


def test_missing_whole_sample_and_unexpected_keys_are_reported():
    samples = _samples(4)
    keys = [s["key"] for s in samples]
    data = fmt.write_shard([samples[0], samples[2], samples[3]])
    with pytest.raises(fmt.ShardError, match="sample 00000001: missing from the shard"):
        list(fmt.iter_shard(io.BytesIO(data), name="s", expected_keys=keys))
    data = fmt.write_shard(samples[:3])
    with pytest.raises(fmt.ShardError, match="sample 00000003: missing from the shard"):
        list(fmt.iter_shard(io.BytesIO(data), name="s", expected_keys=keys))
    with pytest.raises(fmt.ShardError, match="sample 00000002: unexpected key"):
        list(fmt.iter_shard(io.BytesIO(data), name="s", expected_keys=keys[:2]))


def test_corrupt_members_and_truncated_tar_are_reported():
    data = fmt.write_shard(_samples(2))
    bad_cls = _rewrite(data, replace={"00000001.cls": b"one"})
    with pytest.raises(fmt.ShardError, match=r"sample 00000001: corrupt member '00000001\.cls'"):
        list(fmt.iter_shard(io.BytesIO(bad_cls), name="s"))
    bad_png = _rewrite(data, replace={"00000000.png": b"GIF89a...."})
    with pytest.raises(fmt.ShardError, match=r"sample 00000000: corrupt member '00000000\.png'"):
        list(fmt.iter_shard(io.BytesIO(bad_png), name="s"))
    with pytest.raises(fmt.ShardError, match=r"shard-000009\.tar: .*(truncated|corrupt)"):
        list(fmt.iter_shard(io.BytesIO(data[: 3 * 512 + 100]), name="shard-000009.tar"))  # inside a png


def test_non_contiguous_key_is_reported():
    s = _samples(2)
    data = fmt.write_shard(s)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    members = members[:1] + members[2:4] + members[1:2] + members[4:]  # 0.cls, 1.cls, 1.png, 0.png ...
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(fmt.ShardError, match="sample 00000000"):
        list(fmt.iter_shard(io.BytesIO(buf.getvalue()), name="s"))


def test_indexed_shard_decodes_the_same_samples_as_iter_shard():
    samples = _samples(5, moments=True)
    data = fmt.write_shard(samples, moments_dtype="float16")
    keys = [s["key"] for s in samples]
    streamed = list(fmt.iter_shard(io.BytesIO(data), name="s", expected_keys=keys, require_moments=True))
    shard = fmt.IndexedShard("s", data, keys)
    decode = fmt.SampleDecoder(require_moments=True)
    for i, ref in enumerate(streamed):
        got = shard.sample(i, decode)  # from the second sample on, the cached .npy header is used
        assert (got["key"], got["png"], got["label"]) == (ref["key"], ref["png"], ref["label"])
        assert got["moments"].dtype == ref["moments"].dtype and np.array_equal(got["moments"], ref["moments"])
    bad = _rewrite(data, replace={"00000002.cls": b"-1"})
    with pytest.raises(fmt.SampleError, match=r"^corrupt member '00000002\.cls'"):
        fmt.IndexedShard("s", bad, keys).sample(2, decode)
    with pytest.raises(fmt.ShardError, match=r"^s: holds 5 samples but manifest\.json lists 4"):
        fmt.IndexedShard("s", data, keys[:4])


def test_sample_decoder_refuses_npy_of_the_wrong_length_whatever_it_decoded_before():
    good = fmt.encode_moments(np.zeros((2, 2, 2), np.float32), "float16")
    members = {fmt.PNG: _png(0), fmt.CLS: b"1"}
    for warm in (False, True):  # the answer must not depend on the header cache
        decode = fmt.SampleDecoder()
        if warm:
            decode("00000000", {**members, fmt.MOMENTS: good})
        for bad in (good + b"\0\0", good[:-2]):
            with pytest.raises(fmt.SampleError, match=r"corrupt member '00000001\.moments\.npy'"):
                decode("00000001", {**members, fmt.MOMENTS: bad})
    with pytest.raises(fmt.SampleError, match=r"^missing member '00000001\.moments\.npy'"):
        fmt.SampleDecoder(require_moments=True)("00000001", members)
    assert fmt.SampleDecoder()("00000001", members)["moments"] is None
    assert fmt.parse_label(b" 417\n") == 417
    for text in (b"", b"-1", b"+1", b"4.0", b"\xff"):
        with pytest.raises(ValueError):
            fmt.parse_label(text)


def test_check_shard_bytes_names_the_shard_on_size_or_checksum_mismatch():
    data = fmt.write_shard(_samples(2))
    info = fmt.ShardInfo("shard-000004.tar", 0, 2, len(data), fmt.sha256_hex(data))
    fmt.check_shard_bytes(data, info)
    with pytest.raises(fmt.ShardError, match=r"shard-000004\.tar: .* bytes but the manifest says"):
        fmt.check_shard_bytes(data[:-512], info)
    flipped = bytearray(data)
    flipped[700] ^= 1
    with pytest.raises(fmt.ShardError, match=r"shard-000004\.tar: sha256 .* but the manifest says"):
        fmt.check_shard_bytes(bytes(flipped), info)


# ----------------------------------------------------------------------------------------------
# manifest
# ----------------------------------------------------------------------------------------------


def test_manifest_round_trips_through_json_and_derives_counts_and_keys():
    m = _manifest()
    back = fmt.Manifest.from_json(m.to_json())
    assert back == m
    d = json.loads(m.to_json())
    assert d["num_samples"] == 5 and d["num_classes"] == 3 and d["total_bytes"] == 300
    assert m.shards[0].keys() == ["00000000", "00000002", "00000003"]  # 00000001 was skipped
    assert m.shards[1].keys() == ["00000004", "00000005"]
    with_vae = _manifest(vae="sd-vae-ft-mse", moments_dtype="float16", moments_shape=(8, 1, 1))
    assert fmt.Manifest.from_json(with_vae.to_json()) == with_vae


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("resolution"), r"resolution: missing"),
        (lambda d: d.update(format_version=99), r"format_version 99 is not supported"),
        (lambda d: d.update(colour="red"), r"unknown field\(s\) \['colour'\]"),
        (lambda d: d["shards"][1].update(sha256="xyz"), r"shards\[1\]\.sha256: expected 64 lowercase hex"),
        (lambda d: d["shards"][1].update(first_index=3), r"shards\[1\]\.first_index: expected 4"),
        (lambda d: d["shards"][0].update(bytes="100"), r"shards\[0\]\.bytes: expected int"),
        (
            lambda d: d["shards"][1].update(name="shard-000005.tar"),
            r"shards\[1\]\.name: expected 'shard-000001",
        ),
        (lambda d: d.update(class_names=["b", "a"]), r"class_names: must be sorted"),
        (lambda d: d.update(num_samples=6), r"num_samples: says 6 but the shards/classes give 5"),
        (lambda d: d.update(moments_dtype="float16"), r"moments_dtype/moments_shape set but vae is null"),
        (lambda d: d.update(vae="none", moments_dtype="int8", moments_shape=[6, 8, 8]), r"moments_dtype"),
        (lambda d: d.update(vae="none", moments_dtype="float16", moments_shape=[5, 8, 8]), r"moments_shape"),
    ],
)
def test_bad_manifest_fields_raise_naming_file_and_field(edit, message):
    d = json.loads(_manifest().to_json())
    edit(d)
    with pytest.raises(fmt.ManifestError, match=message) as info:
        fmt.Manifest.from_json(json.dumps(d), where="s3://b/data/manifest.json")
    assert "s3://b/data/manifest.json" in str(info.value)


def test_manifest_that_is_not_json_names_the_file():
    with pytest.raises(fmt.ManifestError, match=r"m\.json: not valid JSON"):
        fmt.Manifest.from_json("{", where="m.json")


# ----------------------------------------------------------------------------------------------
# pixels
# ----------------------------------------------------------------------------------------------


def test_adm_center_crop_matches_a_hand_computed_case():
    # 8x4 image of 2x2 blocks: BOX halves it (8x4 >= 2*2) to 4x2 block means, the bicubic step is the
    # identity (short side already 2), and the crop keeps columns 1..2 of the 4x2 result.
    blocks = np.array([[10, 20], [30, 40]], dtype=np.uint8)  # mean 25
    img = np.zeros((4, 8, 3), dtype=np.uint8)
    means = np.zeros((2, 4), dtype=np.uint8)
    for by in range(2):
        for bx in range(4):
            offset = np.uint8(40 * bx + 100 * by)
            img[2 * by : 2 * by + 2, 2 * bx : 2 * bx + 2, :] = (blocks + offset)[:, :, None]
            means[by, bx] = 25 + offset
    out = fmt.adm_center_crop(Image.fromarray(img), 2)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :, 0], means[:, 1:3])


def test_adm_center_crop_takes_the_centre_and_returns_square_rgb():
    # A wide image, left half red / right half blue: the crop is centred, so the boundary is central.
    img = np.zeros((200, 600, 3), dtype=np.uint8)
    img[:, :300, 0] = 255
    img[:, 300:, 2] = 255
    out = fmt.adm_center_crop(Image.fromarray(img), 64)
    assert out.shape == (64, 64, 3)
    assert (out[:, :30, 0] > 250).all() and (out[:, 34:, 2] > 250).all()
    for size, mode in [((20, 24), "RGB"), ((300, 1000), "L"), ((90, 72), "CMYK"), ((64, 64), "RGBA")]:
        got = fmt.adm_center_crop(Image.new(mode, size), 32)
        assert got.shape == (32, 32, 3), (size, mode)


def test_png_round_trip_is_lossless_and_chw():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    for level in (0, 6):
        chw = fmt.decode_png(fmt.encode_png(hwc, level))
        assert chw.shape == (3, 5, 7) and np.array_equal(chw, hwc.transpose(2, 0, 1))
    with pytest.raises(ValueError, match="not a PNG"):
        fmt.decode_png(b"\xff\xd8\xff\xe0jpeg")
    with pytest.raises(ValueError, match="uint8 \\(H, W, 3\\)"):
        fmt.encode_png(hwc.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# moments
# ----------------------------------------------------------------------------------------------


def test_moments_encode_in_the_requested_dtype_and_refuse_float16_overflow():
    m = np.arange(8 * 2 * 2, dtype=np.float32).reshape(8, 2, 2)
    for dtype in fmt.MOMENTS_DTYPES:
        back = fmt.decode_moments(fmt.encode_moments(m, dtype))
        assert back.dtype == np.dtype(dtype) and np.array_equal(back, m.astype(dtype))
    with pytest.raises(ValueError, match="overflows float16"):
        fmt.encode_moments(m * 1e4, "float16")
    with pytest.raises(ValueError, match="expected an array \\(2C, h, w\\)"):
        fmt.encode_moments(m[:3], "float16")


def _sd_vae_like_moments(rng: np.random.Generator, std_range: tuple[float, float]) -> np.ndarray:
    """(64, 8, 32, 32) moments with SD-VAE's scale: mean spatially smooth, heavy-tailed (Student t),
    std 1/0.18215 = 5.49 (what the 0.18215 scale normalises); posterior std log-uniform in range."""
    b, c, h = 64, 4, 32
    low = rng.standard_t(5, size=(b, c, 8, 8))
    mean = np.kron(low, np.ones((1, 1, 4, 4))) + 0.3 * rng.standard_normal((b, c, h, h))
    mean = mean / mean.std() / 0.18215 + rng.normal(0, 1, size=(1, c, 1, 1))
    std = np.exp(rng.uniform(np.log(std_range[0]), np.log(std_range[1]), size=(b, c, h, h)))
    return np.concatenate([mean, std], 1).astype(np.float32)


def test_float16_moments_change_posterior_latents_less_than_bf16_training_rounding():
    """The figure quoted in docs/data.md: float16 storage moves the latents by ~2e-4 (relative L2),
    8x less than rounding the same latents to bfloat16 (what mixed-precision training does)."""
    rng = np.random.default_rng(0)
    results = {}
    for std_range in [(1e-4, 1e-3), (1e-3, 1e-2), (1e-2, 1.0)]:
        results[std_range] = fmt.moments_float16_error(_sd_vae_like_moments(rng, std_range))
    # The reference's own golden test moments (mean = 4 randn, std = exp(0.5 randn - 2)).
    results["golden"] = fmt.moments_float16_error(golden()["prep.moments"])
    for name, r in results.items():
        assert r["rel_l2"] < 3e-4, (name, r)  # float16 rounds to 2**-11 relative: ~2e-4 RMS
        assert r["rel_l2"] < r["bf16_input_rel_l2"] / 5, (name, r)
    assert results[(1e-2, 1.0)]["max_abs_over_std"] < 2.0


def test_float16_error_is_zero_for_exactly_representable_moments():
    m = np.concatenate([np.full((4, 2, 2), 0.5), np.full((4, 2, 2), 0.25)]).astype(np.float32)
    r = fmt.moments_float16_error(m[None])
    assert r["rel_l2"] == 0.0 and r["max_abs"] == 0.0


def test_manifest_dataclass_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _manifest().resolution = 3  # type: ignore[misc]
