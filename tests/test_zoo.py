"""Model zoo: the six real families on meta (full-size counts) and tiny (offline, end to end) weights.

Full-size numbers checked on the meta device (no memory): Conv/Linear modules, quantized layers,
denoiser parameters, and the fp16 bytes of the quantized layers, which equal the reference's
FP_SIZE constants (docs/method.md §1.1, §1.3) for every model.
"""

import json

import numpy as np
import pytest
import torch

from sensitivity.errors import SensitivityError
from sensitivity.layers import LAYER_TYPES, check_ties, layer_weight, weights_hash
from sensitivity.multiquantizer import apply, build_multiquantizer, restore
from sensitivity.zoo import GenerationSettings, get_family, list_families
from sensitivity.zoo.common import char_tokenizer, clip_tokenizer, weights_of

REAL = ["sd15", "sdxl", "pixart-alpha", "pixart-sigma", "dit-xl-2", "hunyuan-dit"]

# modules, layers, denoiser params, fp16 bytes of the layers (+ tied copies), splits, exclusions, tied copies
FULL = {
    "sd15": (282, 294, 859_520_964, 1_718_154_240, 12, 0, 0),
    "sdxl": (794, 803, 2_567_463_684, 5_131_760_640, 9, 0, 0),
    "pixart-alpha": (287, 287, 610_856_096, 1_220_456_448, 0, 0, 0),
    "pixart-sigma": (287, 287, 610_856_096, 1_220_456_448, 0, 0, 0),
    "dit-xl-2": (255, 201, 749_826_464, 1_346_383_872, 0, 0, 54),
    "hunyuan-dit": (472, 487, 1_516_534_048, 2_999_291_904, 19, 4, 0),
}
# FP_SIZE (bytes) of the reference's *_eval_random.py; SD1.5 is counted in fp32 there
REFERENCE_FP_SIZE = {"sd15": 3_436_308_480 // 2, "sdxl": 5_131_760_640, "pixart-alpha": 1_220_456_448,
                     "pixart-sigma": 1_220_456_448, "dit-xl-2": 1_433_972_736, "hunyuan-dit": 2_999_291_904}
CONDS = {"dit-xl-2": [3, 7]}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run far faster single-threaded on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_META, _TINY = {}, {}


def meta(name):
    if name not in _META:
        _META[name] = get_family(name).load_denoiser("meta")
    return _META[name]


def tiny(name):
    if name not in _TINY:
        _TINY[name] = get_family(name).load_pipeline("tiny", seed=0)
    return _TINY[name]


def conds(name, n=2):
    return CONDS.get(name, ["a red bus", "a cat on a mat"])[:n]


# ------------------------------------------------------------------------------------ registry
def test_registry_lists_the_real_families():
    names = list_families()
    assert names[:6] == REAL
    for n in REAL:
        fam = get_family(n)
        assert fam.name == n and fam.hub_id and fam.conditioning in ("text", "class")
        assert get_family(n.upper()) is fam
    assert get_family("dit-xl-2").num_classes == 1000


def test_unknown_family_is_one_clear_line():
    with pytest.raises(SensitivityError, match=r"unknown model 'sd99'; known models: sd15, sdxl") as e:
        get_family("sd99")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------- full size (meta)
@pytest.mark.parametrize("name", REAL)
def test_meta_full_size_counts(name):
    fam = get_family(name)
    den = meta(name)
    assert all(p.is_meta for p in den.parameters()) and all(b.is_meta for b in den.buffers())
    modules, n_layers, params, fp16, n_split, n_excl, n_tied = FULL[name]
    layers = fam.find_layers(den)
    rules = fam.layer_rules(den)
    assert sum(isinstance(m, LAYER_TYPES) for m in den.modules()) == modules
    assert len(layers) == n_layers
    assert len({s.name for s in layers}) == n_layers
    assert sum(p.numel() for p in den.parameters()) == params
    assert sum(s.fp16_bytes for s in layers) == fp16
    assert len(rules.splits) == n_split and sum(s.in_slice is not None for s in layers) == 2 * n_split
    excluded = [p for p, m in den.named_modules() if isinstance(m, LAYER_TYPES)
                and p not in {s.module_path for s in layers} and not any(p in s.tied for s in layers)]
    assert len(excluded) == n_excl
    tied_bytes = sum(2 * den.get_submodule(c).weight.numel() for s in layers for c in s.tied)
    assert sum(len(s.tied) for s in layers) == n_tied
    assert fp16 + tied_bytes == REFERENCE_FP_SIZE[name]
    assert fam.model_id("meta") == f"{name}:meta"


def test_reference_counts_explained():
    """Each family's count vs the reference's weight-node count (docs/method.md §1.1), difference by difference."""
    sd15, sdxl, dit, hy = (get_family(n) for n in ("sd15", "sdxl", "dit-xl-2", "hunyuan-dit"))
    # SD1.5: 282 layers + 12 split conv_shortcut halves (ldm's output-block skip_connection) = 294
    l15 = sd15.find_layers(meta("sd15"))
    halves = [s.module_path for s in l15 if s.name.endswith("#skip")]
    assert len(l15) == 282 + 12 == sd15.reference_layer_count
    assert len(halves) == 12 and all(p.startswith("up_blocks.") and p.endswith(".conv_shortcut") for p in halves)
    # SDXL: 794 + 9 split conv1 = 803; split points = true concat point, which differs from the
    # reference's out_channels in exactly two layers
    den = meta("sdxl")
    splits = sdxl.layer_rules(den).splits
    assert len(sdxl.find_layers(den)) == 794 + 9 == sdxl.reference_layer_count
    differ = {p: (v, den.get_submodule(p.rsplit(".", 1)[0]).out_channels) for p, v in splits.items()
              if v != den.get_submodule(p.rsplit(".", 1)[0]).out_channels}
    assert differ == {"up_blocks.1.resnets.0.conv1": (1280, 640), "up_blocks.2.resnets.0.conv1": (640, 320)}
    # DiT: 255 - 2 x 27 tied timestep-embedder copies = 201
    ld = dit.find_layers(meta("dit-xl-2"))
    assert len(ld) == 255 - 54 == dit.reference_layer_count
    assert [len(s.tied) for s in ld if s.tied] == [27, 27]
    # Hunyuan: 472 - 4 pooler + 19 split halves = 487; the reference's 474 is its graph, which
    # builds blocks 0..38 only: block 39 has 11 layers + 2 skip halves = 13
    lh = hy.find_layers(meta("hunyuan-dit"))
    assert len(lh) == 472 - 4 + 19 == 487
    assert not any(s.module_path.startswith("time_extra_emb.pooler.") for s in lh)
    assert len(lh) - sum(s.module_path.startswith("blocks.39.") for s in lh) == hy.reference_layer_count == 474


def test_pixart_alpha_1024_config_adds_micro_conditions():
    from sensitivity.zoo.pixart import PixArtFamily

    fam = PixArtFamily("pixart-alpha-1024", "PixArt-alpha/PixArt-XL-2-1024-MS", "pixart_alpha/PixArt-XL-2-1024-MS",
                       "PixArtAlphaPipeline", 1024, 120, "α 1024")
    den = fam.load_denoiser("meta")
    layers = fam.find_layers(den)
    alpha_512 = {s.name for s in get_family("pixart-alpha").find_layers(meta("pixart-alpha"))}
    extra = sorted({s.name for s in layers} - alpha_512)
    assert len(layers) == 291 and len(extra) == 4
    assert all("resolution_embedder" in n or "aspect_ratio_embedder" in n for n in extra)


# ------------------------------------------------------------------------------------ tiny
@pytest.mark.parametrize("name", REAL)
def test_tiny_has_the_real_layer_names(name):
    fam = get_family(name)
    pipe = tiny(name)
    den = fam.denoiser(pipe)
    assert weights_of(pipe) == "tiny"
    real, small = fam.find_layers(meta(name)), fam.find_layers(den)
    assert [s.name for s in small] == [s.name for s in real]
    assert [(s.kind, s.in_slice is None, len(s.tied)) for s in small] == \
           [(s.kind, s.in_slice is None, len(s.tied)) for s in real]
    n_params = sum(p.numel() for p in den.parameters())
    assert 200_000 <= n_params <= 6_000_000, n_params
    check_ties(den, small)
    # the denoiser alone equals the pipeline's (same seed): a multiquantizer built on one fits the other
    alone = fam.load_denoiser("tiny", seed=0)
    assert weights_hash(alone, small) == weights_hash(den, small)
    assert weights_hash(fam.load_denoiser("tiny", seed=1), small) != weights_hash(den, small)


def test_dit_random_embedder_copies_are_identical():
    den = get_family("dit-xl-2").denoiser(tiny("dit-xl-2"))
    b0 = den.transformer_blocks[0].norm1.emb.state_dict()
    for block in den.transformer_blocks[1:]:
        for k, v in block.norm1.emb.state_dict().items():
            assert torch.equal(v, b0[k]), k
    layers = get_family("dit-xl-2").find_layers(den)
    assert layers[1].name == "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"
    assert len(layers[1].tied) == 27


def _capture_inputs(den, paths):
    seen, handles = {}, []

    def hook(path):
        def fn(module, args):
            seen.setdefault(path, args[0].detach().clone())  # returns None: inputs unchanged
        return fn

    for p in paths:
        handles.append(den.get_submodule(p).register_forward_pre_hook(hook(p)))
    return seen, handles


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_unet_split_point_is_the_skip_concat(name):
    """The ``#skip`` half of every split layer reads exactly a skip tensor of the down path."""
    fam = get_family(name)
    den = fam.denoiser(tiny(name))
    splits = fam.layer_rules(den).splits
    resnets = {p.rsplit(".", 1)[0]: v for p, v in splits.items()}
    seen, handles = _capture_inputs(den, resnets)  # resnet input = cat([main, skip])
    skips = []
    handles.append(den.conv_in.register_forward_hook(lambda m, a, o: skips.append(o.detach().clone())))
    for blk in den.down_blocks:
        handles.append(blk.register_forward_hook(lambda m, a, o: skips.extend(t.detach().clone() for t in o[1])))
    cfg = den.config
    x = torch.randn(1, cfg.in_channels, 8, 8)
    ehs = torch.randn(1, 7, cfg.cross_attention_dim)
    kw = {}
    if cfg.addition_embed_type == "text_time":
        te_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, te_dim), "time_ids": torch.randn(1, 6)}
    with torch.no_grad():
        den(x, 10, ehs, **kw)
    for h in handles:
        h.remove()
    assert len(seen) == len(resnets)
    for path, split in resnets.items():
        cat = seen[path]
        tail = cat[:, split:]
        assert any(t.shape == tail.shape and torch.equal(t, tail) for t in skips), path


def test_hunyuan_skip_linear_split_is_the_block_input():
    fam = get_family("hunyuan-dit")
    den = fam.denoiser(tiny("hunyuan-dit"))
    splits = fam.layer_rules(den).splits
    assert sorted(splits, key=lambda p: int(p.split(".")[1])) == [f"blocks.{i}.skip_linear" for i in range(21, 40)]
    widths = {}
    def hook(i):
        def fn(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            widths.setdefault(i, (hidden.shape[-1], kwargs["skip"].shape[-1]))
        return fn

    handles = [den.blocks[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in range(21, 40)]
    fam.generate(tiny("hunyuan-dit"), ["a cat"], [0], steps=1)
    for h in handles:
        h.remove()
    for i in range(21, 40):
        main, skip = widths[i]
        assert splits[f"blocks.{i}.skip_linear"] == main
        assert den.blocks[i].skip_linear.in_features == main + skip


# ------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("name", REAL)
def test_generation_and_apply_restore(name, tmp_path):
    """One batched generation offline; a config changes it; restore brings it back bit-exactly."""
    fam = get_family(name)
    pipe = tiny(name)
    den = fam.denoiser(pipe)
    c = conds(name)
    base = fam.generate(pipe, c, [11, 12], batch_size=2)
    assert base.dtype == np.uint8 and base.shape == (2, 64, 64, 3)
    assert base.std() > 0
    # a multiquantizer over a subset of layers: the first few, a split pair and a tied layer if any
    layers = fam.find_layers(den)
    pick = layers[:4] + [s for s in layers if s.in_slice is not None][:2] + [s for s in layers if s.tied][:1]
    pick = list({s.name: s for s in pick}.values())  # a tied layer may be among the first four
    before = {k: v.clone() for k, v in den.state_dict().items()}
    mq = build_multiquantizer(den, tmp_path / "mq.safetensors", pick, model_id=fam.model_id("tiny"),
                              options=("uaq-3",), progress=False)
    # numba's parallel UAQ kernel resets the shared OpenMP thread count (torch's too); the float
    # results of a generation depend on it, so put it back before comparing images
    torch.set_num_threads(1)
    apply(den, mq, {s.name: "uaq-3" for s in pick})
    for s in pick:
        assert not torch.equal(layer_weight(den, s), before[s.module_path + ".weight"][
            (slice(None), slice(*s.in_slice)) if s.in_slice else slice(None)])
    quant = fam.generate(pipe, c, [11, 12], batch_size=2)
    assert not np.array_equal(quant, base)
    restore(den)
    after = den.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert np.array_equal(fam.generate(pipe, c, [11, 12], batch_size=2), base)


def test_image_depends_on_its_seed_not_on_the_batch():
    fam = get_family("dit-xl-2")
    pipe = tiny("dit-xl-2")
    three = fam.generate(pipe, [1, 2, 3], [5, 6, 7], batch_size=3)
    one = fam.generate(pipe, [2], [6], batch_size=1)
    assert np.abs(three[1].astype(int) - one[0].astype(int)).max() <= 2
    assert not np.array_equal(three[0], three[1])
    two = fam.generate(pipe, [1, 2, 3], [5, 6, 7], batch_size=2)
    assert np.abs(two.astype(int) - three.astype(int)).max() <= 2


def test_settings_defaults_and_overrides():
    sd15, dit, sdxl = get_family("sd15"), get_family("dit-xl-2"), get_family("sdxl")
    assert (sd15.defaults.steps, sd15.defaults.guidance, sd15.defaults.height) == (50, 7.5, 512)
    assert (dit.defaults.steps, dit.defaults.scheduler, dit.defaults.batch_size) == \
        (250, "DPMSolverMultistepScheduler", 25)
    assert sdxl.defaults.extra["denoising_end"] == 0.8
    assert get_family("pixart-sigma").defaults.height == 1024 and get_family("hunyuan-dit").defaults.steps == 50
    s = sd15.defaults.replace(steps=3, eta=0.5, height=None)
    assert (s.steps, s.extra["eta"], s.height) == (3, 0.5, 512)
    assert sdxl.defaults.replace(refiner=None).extra["refiner"] is None
    with pytest.raises(SensitivityError, match="unknown generation setting 'stepz'"):
        sd15.defaults.replace(stepz=3)
    # tiny pipelines default to small images and few steps; real ones to the reference settings
    assert sd15.settings(tiny("sd15")).steps == 2 and sd15.settings(None).steps == 50


def test_scheduler_override_and_errors():
    fam = get_family("dit-xl-2")
    pipe = tiny("dit-xl-2")
    a = fam.generate(pipe, [1], [0], scheduler="DDIMScheduler")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    b = fam.generate(pipe, [1], [0])
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert a.shape == b.shape
    with pytest.raises(SensitivityError, match="unknown scheduler 'NoSuchScheduler'"):
        fam.generate(pipe, [1], [0], scheduler="NoSuchScheduler")
    with pytest.raises(SensitivityError, match="native 64 px"):
        fam.generate(pipe, [1], [0], height=128)
    with pytest.raises(SensitivityError, match="class id 1000 outside"):
        fam.generate(pipe, [1000], [0])
    with pytest.raises(SensitivityError, match="takes class ids"):
        fam.generate(pipe, ["a cat"], [0])
    with pytest.raises(SensitivityError, match="2 conditions but 1 seeds"):
        fam.generate(pipe, [1, 2], [0])
    with pytest.raises(SensitivityError, match="takes text prompts"):
        get_family("sd15").generate(tiny("sd15"), [3], [0])
    with pytest.raises(SensitivityError, match="needs at least 2 steps"):
        get_family("pixart-alpha").generate(tiny("pixart-alpha"), ["a"], [0], steps=1)


# ------------------------------------------------------------------------------------ real path
def test_real_path_from_a_local_diffusers_folder(tmp_path):
    """save_pretrained -> --weights FOLDER (from_pretrained, offline) gives the same model and images."""
    fam = get_family("sd15")
    pipe = tiny("sd15")
    pipe.save_pretrained(tmp_path / "sd")
    loaded = fam.load_pipeline(str(tmp_path / "sd"))
    assert weights_of(loaded) == str(tmp_path / "sd")
    den = fam.denoiser(pipe)
    layers = fam.find_layers(den)
    assert weights_hash(fam.denoiser(loaded), layers) == weights_hash(den, layers)
    assert len(loaded.tokenizer) == 49408
    # a folder is real weights: the reference settings (50 steps, 512 px) unless overridden
    assert fam.settings(loaded).steps == 50
    small = {"steps": 2, "height": 64, "width": 64}
    a, b = fam.generate(loaded, ["a cat"], [3], **small), fam.generate(pipe, ["a cat"], [3], **small)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # same weights; reloaded tensors may round apart
    # the denoiser alone, from the pipeline folder or from the unet folder
    for src in (tmp_path / "sd", tmp_path / "sd" / "unet"):
        alone = fam.load_denoiser(str(src))
        assert weights_hash(alone, layers) == weights_hash(den, layers)
    assert fam.model_id(str(tmp_path / "sd")) == "sd15:sd"
    # a folder whose tokenizer lost its vocabulary loads "fine" offline as a 3-token tokenizer: refused
    (tmp_path / "sd" / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(SensitivityError, match=r"tokenizer has only \d tokens"):
        fam.load_pipeline(str(tmp_path / "sd"))


def test_bad_weights_are_one_clear_line(tmp_path):
    fam = get_family("pixart-sigma")
    (tmp_path / "empty").mkdir()
    cases = [
        (str(tmp_path / "empty"), "is not a diffusers model"),
        ("no such/place/x", "no such folder, and not a hub id"),
        ("example-org/not-a-model", "cannot load 'example-org/not-a-model'"),
    ]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    cases.append((str(tmp_path / "other"), "holds a StableDiffusionPipeline, not a PixArtSigmaPipeline"))
    (tmp_path / "file.bin").write_bytes(b"x")
    cases.append((str(tmp_path / "file.bin"), "is a file"))
    for weights, msg in cases:
        with pytest.raises(SensitivityError, match=msg) as e:
            fam.load_pipeline(weights)
        assert "\n" not in str(e.value)
    with pytest.raises(SensitivityError, match="meta weights hold no values"):
        fam.generate(fam.load_pipeline("meta"), ["a"], [0])


def test_offline_tokenizers_have_their_full_size():
    assert len(clip_tokenizer("sd15/tokenizer")) == 49408
    t2 = clip_tokenizer("sdxl/tokenizer_2")
    assert t2.pad_token == "!" and len(t2) == 49408
    assert clip_tokenizer("sd15/tokenizer")("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    t5 = char_tokenizer("t5", 16)
    ids = t5("Cat!", padding="max_length", max_length=8).input_ids
    assert ids[:5] == [t5.convert_tokens_to_ids(t) for t in ("c", "##a", "##t", "!")] + [1] and ids[5:] == [0, 0, 0]
    bert = char_tokenizer("bert", 77)
    assert bert("ab").input_ids == [2, bert.convert_tokens_to_ids("a"), bert.convert_tokens_to_ids("##b"), 3]


def test_generation_settings_dataclass_roundtrip():
    s = GenerationSettings(steps=4, guidance=2.0, extra={"eta": 0.0})
    d = s.to_dict()
    assert d["steps"] == 4 and d["extra"] == {"eta": 0.0}
    assert GenerationSettings(**d) == s


def test_random_path_seeds_ties_and_leaves_the_global_rng(monkeypatch):
    """``random`` = the official config, seeded; run here on the tiny config to stay fast."""
    from sensitivity.zoo.common import DiffusersFamily

    fam = get_family("dit-xl-2")
    monkeypatch.setattr(fam, "denoiser_config", lambda kind="random": DiffusersFamily.denoiser_config(fam, "tiny"))
    state = torch.random.get_rng_state()
    a = fam.load_denoiser("random", seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    layers = fam.find_layers(a)
    check_ties(a, layers)  # the 28 embedder copies are identical, as in the hub checkpoint
    assert weights_hash(fam.load_denoiser("random", seed=5), layers) == weights_hash(a, layers)
    assert weights_hash(fam.load_denoiser("random", seed=6), layers) != weights_hash(a, layers)
    assert weights_of(a) == "random" and fam.model_id("random") == "dit-xl-2:random"
