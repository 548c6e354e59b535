"""EasyNLP pai-painter checkpoints: strict import, generation with every sampler, export (fine-tuning: test_journeys.py).

The fixture folders are written here with EasyNLP's own key names, shapes, dtypes and file set
(`transformer.*` minGPT weights with a causal-mask buffer per block, `first_stage_model.*` taming
weights, config.json, vocab.txt), the storages tagged as saved from a GPU. Token-for-token
agreement with EasyNLP's own code (greedy codes, pixels, its strict load of an export) was checked
by running EasyNLP itself; see the README's pai-painter section.
"""

import contextlib
import copy
import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from t2i.adapters import LoraConfig, adapter_record, add_lora, save_adapter
from t2i.checkpoints import CheckpointError, GPTRecord, TokenizerRecord, load_gpt, load_vqgan, save_gpt, save_vqgan, vqgan_identity
from t2i.data.datamodule import DataConfig
from t2i.interop.__main__ import main as interop
from t2i.interop.paipainter import TAMING_KEYS, export_paipainter, import_paipainter
from t2i.models.gpt import GPT, GPTConfig
from t2i.models.vqgan import VQGANConfig, VQModel
from t2i.sampling import T2IPipeline, SamplingConfig
from lora_factors import move_from_zero

REPO = Path(__file__).parents[1]
VQGAN = VQGANConfig(resolution=32, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], z_channels=16,
                    embed_dim=8, n_embed=48)  # 32 px -> 8 x 8 codes
TEXT_LEN, N_LAYER, N_HEAD, N_EMBD = 12, 2, 2, 32
BERT_HEAD = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]

_gpu_tag = False


def _tag_as_gpu(obj):  # a storage tagger (torch's public serialization registry) for the fixtures' files
    return "cuda:0" if _gpu_tag else None


torch.serialization.register_package(0, _tag_as_gpu, lambda obj, location: None)


@contextlib.contextmanager
def saved_from_a_gpu():
    global _gpu_tag
    _gpu_tag = True
    try:
        yield
    finally:
        _gpu_tag = False


def bert_vocab(texts) -> list[str]:
    """BERT-Chinese's order: [PAD], [unused1..99], [UNK] [CLS] [SEP] [MASK], ASCII, pieces, CJK characters."""
    chars = sorted({c for t in texts for c in t.lower() if not c.isspace()})
    ascii_ = [chr(c) for c in range(33, 127) if chr(c).islower() or not chr(c).isalpha()]
    words = ["hello", "##llo", "he", "cat", "##s"]
    return BERT_HEAD + ascii_ + words + [c for c in chars if c not in ascii_]


def write_paipainter(folder: Path, vocab: list[str], seed: int = 0, **config_changes) -> Path:
    """A tiny pai-painter folder as EasyNLP writes one (key names spelled out, not taken from t2i's modules)."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    grid = VQGAN.resolution // 4
    n_image, n_text, e = VQGAN.n_embed, len(vocab), N_EMBD
    block = TEXT_LEN + grid * grid
    r = lambda *shape: torch.randn(*shape) * 0.3  # noqa: E731
    state = {"transformer.tok_emb.weight": r(n_image + n_text, e), "transformer.pos_emb": r(1, block, e)}
    for i in range(N_LAYER):
        p = f"transformer.blocks.{i}."
        for norm in ("ln1", "ln2"):
            state[p + norm + ".weight"], state[p + norm + ".bias"] = 1 + r(e), r(e)
        for linear in ("key", "query", "value", "proj"):
            state[p + f"attn.{linear}.weight"], state[p + f"attn.{linear}.bias"] = r(e, e), r(e)
        state[p + "attn.mask"] = torch.ones(block, block).tril().view(1, 1, block, block)
        state[p + "mlp.0.weight"], state[p + "mlp.0.bias"] = r(4 * e, e), r(4 * e)
        state[p + "mlp.2.weight"], state[p + "mlp.2.bias"] = r(e, 4 * e), r(e)
    state["transformer.ln_f.weight"], state["transformer.ln_f.bias"] = 1 + r(e), r(e)
    state["transformer.head.weight"] = r(n_image, e)
    vqgan = VQModel(VQGAN)  # taming's names, checked against taming's layout in test_vqgan.py
    vqgan.quantize.embedding.weight.data.normal_()
    state.update({f"first_stage_model.{k}": v for k, v in vqgan.state_dict().items()})
    with saved_from_a_gpu():
        torch.save(state, folder / "pytorch_model.bin")
    config = {"vocab_size": n_image + n_text, "img_vocab_size": n_image, "text_vocab_size": n_text,
              "block_size": block, "n_layer": N_LAYER, "n_head": N_HEAD, "n_embd": e, "embd_pdrop": 0.0,
              "resid_pdrop": 0.0, "attn_pdrop": 0.0, "n_unmasked": 0, "model_type": "artist",
              "vqgan_config": {k: v for k, v in asdict(VQGAN).items() if k in TAMING_KEYS},
              **config_changes}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (folder / "train_config.json").write_text("{}")  # other files EasyNLP leaves are ignored
    return folder


@pytest.fixture(scope="module")
def captions(codes_root):
    return list(DataConfig(name="shapes", root=str(codes_root.parent / "shapes")).captions("train"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory, captions):
    root = tmp_path_factory.mktemp("pai")
    src = write_paipainter(root / "pai-painter-tiny", bert_vocab(captions + ["一只戴帽子的猫"]))
    interop(["paipainter", "--src", str(src), "--out", str(root / "pai.ckpt")])
    return src, root / "pai.ckpt"


def test_the_fixture_is_gpu_tagged(imported):
    src, _ = imported
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(src / "pytorch_model.bin", weights_only=True)


def test_import_is_strict_and_complete(imported):
    src, ckpt = imported
    gpt, record = load_gpt(ckpt)
    state = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    for key, value in state.items():  # every tensor used: the GPT's, the VQGAN's (encoder included), or a mask
        if key.startswith("transformer.") and not key.endswith(".attn.mask"):
            assert torch.equal(gpt.state_dict()[key[len("transformer."):]], value), key
    vqgan = load_vqgan(record.vqgan.checkpoint)
    for key, value in vqgan.state_dict().items():
        assert torch.equal(state[f"first_stage_model.{key}"], value), key
    assert gpt.cfg.layout == "paipainter" and gpt.cfg.text_len == TEXT_LEN and gpt.cfg.image_len == 64
    assert record.tokenizer.kind == "wordpiece" and record.tokenizer.model == (src / "vocab.txt").read_bytes()
    assert record.training.origin.startswith("pai-painter import") and record.caption_prob == 0


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("transformer.blocks.1.mlp.2.bias"), "missing .1.: blocks.1.mlp.2.bias"),
    (lambda s: s.__setitem__("transformer.head.weight", torch.zeros(5, N_EMBD)), "head.weight: checkpoint"),
    (lambda s: s.__setitem__("transformer.extra.weight", torch.zeros(1)), "unexpected .1.: extra.weight"),
    (lambda s: s.pop("first_stage_model.encoder.conv_in.bias"), "encoder.conv_in.bias"),
    (lambda s: s.__setitem__("optimizer.step", torch.zeros(1)), "neither transformer"),
    (lambda s: s["transformer.blocks.0.attn.mask"].fill_(1), "not a causal mask"),
])
def test_a_bad_checkpoint_is_refused_naming_the_key(tmp_path, captions, change, message):
    src = write_paipainter(tmp_path / "bad", bert_vocab(captions))
    state = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    change(state)
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match=message):
        import_paipainter(src, tmp_path / "bad.ckpt")


def test_bad_config_and_vocabulary_are_refused(tmp_path, captions):
    vocab = bert_vocab(captions)
    with pytest.raises(ValueError, match="n_unmasked=32"):
        import_paipainter(write_paipainter(tmp_path / "a", vocab, n_unmasked=32), tmp_path / "a.ckpt")
    src = write_paipainter(tmp_path / "b", vocab)
    (src / "vocab.txt").write_text("\n".join(vocab[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="text_vocab_size"):
        import_paipainter(src, tmp_path / "b.ckpt")
    (src / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        import_paipainter(src, tmp_path / "b.ckpt")


def test_every_sampler_runs_on_an_imported_model(imported):
    _, ckpt = imported
    pipeline = T2IPipeline.from_checkpoint(ckpt)
    prompts = ["红色的小圆形", "一只戴帽子的猫 [MASK]", ""]
    text = pipeline.tokenizer(prompts)
    assert text[2].tolist() == [0] * TEXT_LEN and (text[1] == 103).any()  # [PAD] = 0, [MASK] kept whole
    greedy = pipeline.sample_codes(prompts, SamplingConfig(greedy=True))
    # greedy equals recomputing EasyNLP's way (the whole sequence every step, the head over image codes)
    tokens = pipeline.gpt.layout.prefix(text)
    for _ in range(64):
        tokens = torch.cat([tokens, pipeline.gpt(tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy.flatten(1), tokens[:, TEXT_LEN:])
    for options in (dict(top_k=100, seed=1), dict(top_p=0.9, temperature=0.7, seed=2),
                    dict(guidance_scale=3.0, samples_per_prompt=2, seed=3)):
        codes = pipeline.sample_codes(prompts, SamplingConfig(**options))
        assert codes.shape == (len(prompts) * options.get("samples_per_prompt", 1), 8, 8) and codes.max() < 48
    assert pipeline.decode(greedy).shape == (3, 3, 32, 32)


def test_export_round_trip_is_the_identity(imported, tmp_path):
    src, ckpt = imported
    out = export_paipainter(ckpt, tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "pytorch_model.bin", "vocab.txt"]
    original = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    exported = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert exported.keys() == original.keys()  # EasyNLP loads it with no missing or unexpected key
    assert all(torch.equal(exported[k], original[k]) and exported[k].dtype == original[k].dtype for k in original)
    config, exported_config = (json.loads((d / "config.json").read_text()) for d in (src, out))
    assert {k: exported_config[k] for k in config} == config
    again, _ = import_paipainter(out, tmp_path / "again.ckpt")
    first, second = load_gpt(ckpt)[0].state_dict(), load_gpt(again)[0].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # a t2i-layout model cannot go to EasyNLP
    cfg = GPTConfig(n_image_codes=8, n_text_tokens=10, text_len=2, image_len=4, n_layer=1, n_head=1, n_embd=8)
    save_gpt(tmp_path / "t2i.ckpt", GPT(cfg),
             GPTRecord(gpt=cfg, tokenizer=TokenizerRecord(kind="sentencepiece", model=b"unused", text_len=2),
                       vqgan=load_gpt(ckpt)[1].vqgan))
    with pytest.raises(ValueError, match="model.layout=t2i .EasyNLP: paipainter.*sentencepiece tokenizer"):
        export_paipainter(tmp_path / "t2i.ckpt", tmp_path / "no")


@pytest.fixture(scope="module")
def lora_adapter(imported):
    """A LoRA adapter of the import on every layer it can adapt (attention, MLP, head), its B drawn away from zero
    (a new adapter changes nothing), saved as a stage.lora run saves one."""
    _, ckpt = imported
    base, record = load_gpt(ckpt)
    config = LoraConfig(rank=4, targets=["attention", "mlp", "head"])
    adapted = move_from_zero(add_lora(copy.deepcopy(base), config), std=0.3, seed=1)
    path = ckpt.with_name("pai.adapter.ckpt")
    save_adapter(path, adapted, replace(record, adapter=adapter_record(config, base, ckpt)))
    return path


def test_a_lora_adapter_exports_merged_and_samples_as_base_plus_adapter(imported, lora_adapter, tmp_path, captions):
    src, ckpt = imported
    interop(["export-paipainter", "--ckpt", str(ckpt), "--adapter", str(lora_adapter), "--out", str(tmp_path / "out")])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "pytorch_model.bin", "vocab.txt"]
    original = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    exported = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert exported.keys() == original.keys() and all(exported[k].dtype == original[k].dtype for k in original)
    changed = {k for k in original if not torch.equal(exported[k], original[k])}
    assert "transformer.head.weight" in changed and "transformer.blocks.1.mlp.2.weight" in changed
    assert not any(k.startswith("first_stage_model.") or "ln" in k or "emb" in k for k in changed)
    config, exported_config = (json.loads((d / "config.json").read_text()) for d in (src, out))
    assert {k: exported_config[k] for k in config} == config
    # re-imported, the folder samples the base with the adapter beside its weights (not merged), code for code
    again, _ = import_paipainter(out, tmp_path / "again.ckpt")
    prompts, greedy = ["红色的小圆形", "一只戴帽子的猫", ""], SamplingConfig(greedy=True)
    codes = T2IPipeline.from_checkpoint(again).sample_codes(prompts, greedy)
    unmerged = T2IPipeline.from_checkpoint(ckpt, adapter=lora_adapter, merge=False)
    assert torch.equal(codes, unmerged.sample_codes(prompts, greedy))
    assert not torch.equal(codes, T2IPipeline.from_checkpoint(ckpt).sample_codes(prompts, greedy))  # it changed them
    # an adapter is refused on any other base, before anything is written
    other = write_paipainter(tmp_path / "other", bert_vocab(captions + ["一只戴帽子的猫"]), seed=1)
    other_ckpt, _ = import_paipainter(other, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match=r"pai.adapter.ckpt was trained on another base than .*other.ckpt"):
        export_paipainter(other_ckpt, tmp_path / "no", adapter=lora_adapter)
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("gpt_option, vqgan_option", [
    ({"pos": "rope"}, {}), ({"pos": "rope2d"}, {}), ({"mlp": "swiglu"}, {}), ({"norm_type": "rms"}, {}),
    ({"bias": False}, {}), ({"qk_norm": True}, {}), ({"norm": "sandwich"}, {}), ({"pb_relax": True}, {}),
    ({}, {"codebook": "simvq"}), ({}, {"l2_normalize": True}),
])
def test_export_refuses_what_easynlp_cannot_hold_naming_the_option(imported, tmp_path, gpt_option, vqgan_option):
    """EasyNLP loads with strict=False: a model it cannot hold would lose weights silently and sample garbage."""
    _, ckpt = imported
    gpt, record = load_gpt(ckpt)
    cfg = replace(gpt.cfg, **gpt_option)
    if vqgan_option:
        vqgan = VQModel(replace(VQGAN, **vqgan_option))
        save_vqgan(tmp_path / "vqgan.ckpt", vqgan)
        record.vqgan = vqgan_identity(vqgan, tmp_path / "vqgan.ckpt", record.grid)
    record.gpt = cfg
    save_gpt(tmp_path / "model.ckpt", GPT(cfg), record)
    (name, value), = (gpt_option or vqgan_option).items()
    prefix = "model" if gpt_option else "vqgan"
    with pytest.raises(ValueError, match=f"model.ckpt cannot run in EasyNLP.*{prefix}.{name}={value} .EasyNLP: "):
        export_paipainter(tmp_path / "model.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_compares_every_weight_with_easynlps_state_dict(imported, tmp_path, monkeypatch):
    """An architecture change no option check knows of still shows as weights EasyNLP has no place for."""
    from t2i.interop import paipainter

    _, ckpt = imported
    expected = paipainter.easynlp_shapes
    monkeypatch.setattr(paipainter, "easynlp_shapes",
                        lambda config, vqgan: {k: v for k, v in expected(config, vqgan).items() if "ln2" not in k})
    with pytest.raises(ValueError, match=r"weights EasyNLP has no place for \(4\): transformer.blocks.0.ln2.bias"):
        export_paipainter(ckpt, tmp_path / "out")
