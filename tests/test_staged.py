"""encode -> denoise -> decode: same pixels as the one-shot call, one encoding for many images."""

import dataclasses
import gc

import numpy as np
import pytest

from sdcpp_py import Conditioning, IncompatibleModelError, InvalidArgumentError, Latent, Pipeline, SdcppError

PROMPT = "a lighthouse on a cliff at dusk"


def _staged(pipe, cond, **kw):
    return pipe.decode(pipe.denoise(cond, **kw), output_type="np")


@pytest.mark.parametrize("sampler, cfg", [("euler", 1.0), ("dpm++2m", 1.0), ("euler_a", 1.0), ("euler", 4.0)])
def test_staged_equals_one_shot(pipe, sampler, cfg):
    kw = dict(width=80, height=48, steps=3, seed=99, sampler=sampler, cfg_scale=cfg)
    one_shot = pipe.generate(PROMPT, negative_prompt="", **kw).arrays[0]
    cond = pipe.encode(PROMPT, "" if cfg != 1.0 else None)
    staged = _staged(pipe, cond, **kw)
    assert staged.shape == (48, 80, 3)
    assert np.array_equal(one_shot, staged)


def test_one_encoding_serves_seeds_sizes_steps(pipe):
    cond = pipe.encode(PROMPT)
    for seed, (w, h), steps in [(1, (64, 64), 1), (2, (96, 48), 2), (3, (48, 112), 4)]:
        staged = _staged(pipe, cond, width=w, height=h, steps=steps, seed=seed)
        one_shot = pipe.generate(PROMPT, width=w, height=h, steps=steps, seed=seed).arrays[0]
        assert np.array_equal(staged, one_shot), (seed, w, h, steps)


def test_batch_item_equals_single_staged_image(pipe):
    batch = pipe.generate(PROMPT, width=64, height=64, steps=2, seed=500, batch_count=2)
    cond = pipe.encode(PROMPT)
    assert np.array_equal(batch.arrays[1], _staged(pipe, cond, width=64, height=64, steps=2, seed=501))


def test_img2img_staged_equals_one_shot(pipe):
    init = pipe.generate("a green field", width=64, height=64, steps=2, seed=3).image
    kw = dict(width=64, height=64, steps=4, seed=21, strength=0.5)
    one_shot = pipe.generate(PROMPT, init_image=init, **kw).arrays[0]
    latent = pipe.encode_image(init, seed=21)
    assert (latent.width, latent.height) == (64, 64)
    staged = _staged(pipe, pipe.encode(PROMPT), init_latent=latent, **kw)
    assert np.array_equal(one_shot, staged)
    txt2img = pipe.generate(PROMPT, width=64, height=64, steps=4, seed=21).arrays[0]
    assert not np.array_equal(one_shot, txt2img)


def test_latent_shape_and_given_noise(pipe):
    cond = pipe.encode(PROMPT)
    lat = pipe.denoise(cond, width=64, height=32, steps=2, seed=4)
    scale = 8 if pipe.family == "z-image" else 16
    channels = 16 if pipe.family == "z-image" else 128
    assert lat.data.shape == (1, channels, 32 // scale, 64 // scale) and lat.data.dtype == np.float32
    assert (lat.width, lat.height, lat.channels, lat.seed) == (64, 32, channels, 4)
    noise = np.random.default_rng(0).standard_normal(lat.data.shape).astype(np.float32)
    a = pipe.denoise(cond, width=64, height=32, steps=2, seed=4, noise=noise).data
    b = pipe.denoise(cond, width=64, height=32, steps=2, seed=77, noise=noise).data
    assert np.array_equal(a, b)            # the noise, not the seed, decides
    assert not np.array_equal(a, lat.data)
    with pytest.raises(SdcppError, match="noise shape"):
        pipe.denoise(cond, width=64, height=64, steps=1, noise=noise)
    assert pipe.denoise(cond, width=64, height=32, steps=1, seed=4).data.shape == lat.data.shape


def test_conditioning_cache_counts(pipe):
    before = pipe.encodings.info()
    a = pipe.encode("cache me " + pipe.family)
    b = pipe.encode("cache me " + pipe.family)
    c = pipe.encode("cache me too " + pipe.family)
    after = pipe.encodings.info()
    assert a is b and a is not c
    assert after.hits - before.hits == 1 and after.misses - before.misses == 2
    fresh = pipe.encode("cache me " + pipe.family, use_cache=False)
    assert fresh is not a and np.array_equal(fresh.context, a.context)


def test_conditioning_save_load(pipe, tmp_path):
    cond = pipe.encode(PROMPT, "blurry")
    path = cond.save(tmp_path / "c.npz")
    back = Conditioning.load(path)
    assert (back.family, back.prompt, back.negative_prompt, back.encoder) == (
        cond.family, cond.prompt, cond.negative_prompt, cond.encoder)
    assert back.parts.keys() == cond.parts.keys()
    kw = dict(width=64, height=64, steps=2, seed=8, cfg_scale=2.0)
    assert np.array_equal(_staged(pipe, cond, **kw), _staged(pipe, back, **kw))


def test_sweep_encodes_once(pipe):
    before = pipe.encodings.info().misses
    result = pipe.sweep("a sweep of " + pipe.family, seeds=[1, 2], steps=[1, 2], sizes=[(64, 48)])
    assert pipe.encodings.info().misses - before == 1
    assert len(result.items) == 4 and result.timings["encode_s"] > 0
    seeds_steps = [(i.settings.seed, i.settings.steps) for i in result.items]
    assert seeds_steps == [(1, 1), (2, 1), (1, 2), (2, 2)]
    assert all(i.image.size == (64, 48) for i in result.items)
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(result.images[1]))
    one_shot = pipe.generate("a sweep of " + pipe.family, width=64, height=48, steps=2, seed=2).arrays[0]
    assert np.array_equal(np.asarray(result.images[3]), one_shot)


def test_denoise_progress_and_callback_errors(pipe):
    cond = pipe.encode(PROMPT)
    seen = []
    pipe.denoise(cond, width=64, height=64, steps=3, seed=1, progress=lambda s, n, t: seen.append(s))
    assert max(seen) == 3

    def boom(step, steps, t):
        raise KeyError("stop")

    with pytest.raises(KeyError):
        pipe.denoise(cond, width=64, height=64, steps=2, seed=1, progress=boom)
    assert pipe.denoise(cond, width=64, height=64, steps=1, seed=1).data.size > 0


def test_staged_bad_input(pipelines, family):
    pipe = pipelines[family]
    other = pipelines["flux2-klein" if family == "z-image-turbo" else "z-image-turbo"]
    cond, foreign = pipe.encode(PROMPT), other.encode(PROMPT)
    with pytest.raises(IncompatibleModelError, match="conditioning was made for"):
        pipe.denoise(foreign, width=64, height=64, steps=1)
    with pytest.raises(InvalidArgumentError, match="negative encoding"):
        pipe.denoise(cond, width=64, height=64, steps=1, cfg_scale=3.0)
    with pytest.raises(InvalidArgumentError, match="multiple of 16"):
        pipe.denoise(cond, width=60, height=64, steps=1)
    with pytest.raises(TypeError):
        pipe.denoise("a prompt", width=64, height=64, steps=1)
    lat = pipe.denoise(cond, width=64, height=64, steps=1, seed=1)
    with pytest.raises(IncompatibleModelError, match="belongs to"):
        other.decode(lat)
    wrong = Latent(np.zeros((1, 3, 8, 8), np.float32), lat.family, lat.scale)
    with pytest.raises(InvalidArgumentError, match="channels"):   # the shim's argument errors
        pipe.decode(wrong)
    with pytest.raises(InvalidArgumentError, match="init latent shape"):
        pipe.denoise(cond, width=128, height=64, steps=2, init_latent=lat, strength=0.5)
    with pytest.raises(InvalidArgumentError, match="output_type"):
        pipe.decode(lat, output_type="tensor")
    with pytest.raises(InvalidArgumentError, match="noise shape"):
        pipe.denoise(cond, width=64, height=64, steps=1, noise=np.zeros((1, lat.channels, 2, 2), np.float32))
    # NaN / inf anywhere the caller hands arrays in: refused before the engine runs
    for bad in (np.nan, np.inf, -np.inf):
        poisoned = lat.data.copy()
        poisoned[0, 0, 1, 1] = bad
        with pytest.raises(InvalidArgumentError, match="NaN or infinite"):
            pipe.decode(Latent(poisoned, lat.family, lat.scale))
        with pytest.raises(InvalidArgumentError, match="NaN or infinite"):
            pipe.denoise(cond, width=64, height=64, steps=2, init_latent=Latent(poisoned, lat.family, lat.scale))
        with pytest.raises(InvalidArgumentError, match="NaN or infinite"):
            pipe.denoise(cond, width=64, height=64, steps=1, noise=poisoned)
        parts = dict(cond.parts)
        key = next(iter(parts))
        parts[key] = parts[key].copy()
        parts[key].flat[3] = bad
        with pytest.raises(InvalidArgumentError, match="NaN or infinite"):
            pipe.denoise(dataclasses.replace(cond, parts=parts), width=64, height=64, steps=1)
    with pytest.raises(InvalidArgumentError, match="NUL"):
        pipe.encode("a lighthouse\0 and a cat")
    with pytest.raises(InvalidArgumentError, match="NUL"):
        pipe.generate("a lighthouse", negative_prompt="blur\0", width=64, height=64, steps=1)
    assert pipe.decode(lat).size == (64, 64)


def test_every_public_exception_is_exported():
    import sdcpp_py
    from sdcpp_py import errors
    public = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    public.add("BackendError")
    assert public <= set(sdcpp_py.__all__) and all(hasattr(sdcpp_py, n) for n in public)
    assert issubclass(sdcpp_py.BackendError, sdcpp_py.SdcppError)


def test_release_encoder_reloads_on_demand(tiny, pipelines, family):
    ref = pipelines[family]
    with Pipeline(diffusion_model=tiny.diffusion_model, llm=tiny.llm, vae=tiny.vae, n_threads=2,
                  release_encoder=True) as pipe:
        assert not pipe.encoder_loaded and pipe.diffusion_loaded   # never loaded at creation
        a = pipe.encode(PROMPT)
        assert not pipe.encoder_loaded
        b = pipe.encode(PROMPT + ", again")     # reloads the encoder from its file
        assert not pipe.encoder_loaded
        assert np.array_equal(a.context, ref.encode(PROMPT).context)
        assert np.array_equal(b.context, ref.encode(PROMPT + ", again").context)
        kw = dict(width=64, height=64, steps=2, seed=12)
        assert np.array_equal(_staged(pipe, b, **kw), _staged(ref, ref.encode(PROMPT + ", again"), **kw))
        assert np.array_equal(pipe.generate(PROMPT, **kw).arrays[0], ref.generate(PROMPT, **kw).arrays[0])
        assert not pipe.encoder_loaded


def test_encoder_and_diffusion_model_never_resident_together(tiny, pipelines, family):
    ref = pipelines[family]
    kw = dict(width=64, height=48, steps=2, seed=13)
    with Pipeline(diffusion_model=tiny.diffusion_model, llm=tiny.llm, vae=tiny.vae, n_threads=2,
                  release_encoder=True, release_diffusion=True) as pipe:
        assert not pipe.encoder_loaded and not pipe.diffusion_loaded
        cond = pipe.encode(PROMPT)
        assert not pipe.encoder_loaded and not pipe.diffusion_loaded
        latent = pipe.denoise(cond, **kw)
        assert pipe.diffusion_loaded and not pipe.encoder_loaded
        pipe.encode(PROMPT + " twice")
        assert not pipe.diffusion_loaded
        assert np.array_equal(pipe.decode(latent, output_type="np"), _staged(ref, ref.encode(PROMPT), **kw))
        assert np.array_equal(pipe.generate(PROMPT, **kw).arrays[0], ref.generate(PROMPT, **kw).arrays[0])


def test_release_needs_split_files(tiny):
    with pytest.raises(InvalidArgumentError, match="file of its own"):
        Pipeline(model=tiny.diffusion_model, llm=tiny.llm, vae=tiny.vae, release_diffusion=True)


def test_two_models_share_one_encoder(tiny_sets, pipelines):
    z, k = tiny_sets["z-image-turbo"], tiny_sets["flux2-klein"]
    assert z.llm == k.llm
    kw = dict(width=64, height=64, steps=2, seed=31)
    with Pipeline(diffusion_model=z.diffusion_model, llm=z.llm, vae=z.vae, n_threads=2) as zp:
        with Pipeline(diffusion_model=k.diffusion_model, llm=k.llm, vae=k.vae, n_threads=2,
                      share_encoder_with=zp) as kp:
            assert zp.shares_encoder and kp.shares_encoder
            # one set of weights: the borrower was never given its own, and freeing the
            # owner's frees what the borrower uses
            assert zp.encoder_loaded and kp.encoder_loaded
            assert kp.weight_bytes["encoder"] == zp.weight_bytes["encoder"] > 0
            zp.release_encoder()
            assert not kp.encoder_loaded
            for p, ref in ((zp, pipelines["z-image-turbo"]), (kp, pipelines["flux2-klein"])):
                assert np.array_equal(p.generate(PROMPT, **kw).arrays[0], ref.generate(PROMPT, **kw).arrays[0])
                assert np.array_equal(p.encode("shared").context, ref.encode("shared").context)
        assert not zp.shares_encoder
        assert np.array_equal(zp.generate(PROMPT, **kw).arrays[0],
                              pipelines["z-image-turbo"].generate(PROMPT, **kw).arrays[0])
    # the other order: the first pipeline closes while the second keeps using the encoder
    zp = Pipeline(diffusion_model=z.diffusion_model, llm=z.llm, vae=z.vae, n_threads=2)
    kp = Pipeline(diffusion_model=k.diffusion_model, llm=k.llm, vae=k.vae, n_threads=2, share_encoder_with=zp)
    zp.close()
    assert not kp.shares_encoder
    assert np.array_equal(kp.encode("after close", use_cache=False).context,
                          pipelines["flux2-klein"].encode("after close").context)
    kp.close()
    # the owner dropped without close(): its finalizer moves the encoder to the borrower first
    zp = Pipeline(diffusion_model=z.diffusion_model, llm=z.llm, vae=z.vae, n_threads=2)
    kp = Pipeline(diffusion_model=k.diffusion_model, llm=k.llm, vae=k.vae, n_threads=2, share_encoder_with=zp)
    del zp
    gc.collect()
    assert not kp.shares_encoder
    assert np.array_equal(kp.encode("after gc", use_cache=False).context,
                          pipelines["flux2-klein"].encode("after gc").context)
    kp.close()


def test_sharing_needs_the_same_encoder_file(tiny_sets, tmp_path):
    z, k = tiny_sets["z-image-turbo"], tiny_sets["flux2-klein"]
    copy, other = tmp_path / "same-llm.gguf", tmp_path / "other-llm.gguf"
    data = bytearray(z.llm.read_bytes())
    copy.write_bytes(data)                      # the same weights under another name: one encoder
    data[-1] ^= 1
    other.write_bytes(data)                     # other weights (one byte), the same header
    with Pipeline(diffusion_model=z.diffusion_model, llm=z.llm, vae=z.vae) as zp:
        with pytest.raises(IncompatibleModelError, match="same text encoder"):
            Pipeline(diffusion_model=k.diffusion_model, llm=other, vae=k.vae, share_encoder_with=zp)
        assert zp.encoder_loaded
        with Pipeline(diffusion_model=k.diffusion_model, llm=copy, vae=k.vae, share_encoder_with=zp) as kp:
            assert kp.shares_encoder and zp.shares_encoder


def test_sharing_needs_the_same_placement(tiny_sets):
    z, k = tiny_sets["z-image-turbo"], tiny_sets["flux2-klein"]
    with Pipeline(diffusion_model=z.diffusion_model, llm=z.llm, vae=z.vae, n_threads=2) as zp:
        with pytest.raises(IncompatibleModelError, match="same keep_clip_on_cpu"):
            Pipeline(diffusion_model=k.diffusion_model, llm=k.llm, vae=k.vae, keep_clip_on_cpu=True,
                     share_encoder_with=zp)
        assert zp.encoder_loaded
