"""LoRA adapters (t2i/adapters.py): only the adapter trains, the adapter file holds the adapter and the record of
its base, merged and unmerged adapters sample alike, a wrong base is refused by hash; both block styles."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from t2i.adapters import (LoraConfig, adapter_record, adapter_weights, add_lora, apply_adapter, attach_adapters,
                          merge_lora, read_adapter, save_adapter, use_adapter)
from t2i.checkpoints import (CheckpointError, GPTRecord, TokenizerRecord, VQGANRecord, load_gpt, read_checkpoint,
                             save_gpt, weights_hash)
from t2i.models.gpt import GPT, GPTConfig
from t2i.models.vqgan import VQGANConfig
from t2i.sampling import SamplingConfig, T2IPipeline, generate_codes
from t2i.stages.configs import GPTStageConfig
from t2i.stages.scaling import weight_decay_groups
from lora_factors import move_from_zero

TINY = dict(n_image_codes=40, n_text_tokens=30, text_len=6, image_len=9, n_layer=2, n_head=2, n_embd=32)
BLOCKS = {"classic": {}, "llama": dict(norm_type="rms", mlp="swiglu", pos="rope2d", bias=False)}
EVERYWHERE = LoraConfig(rank=4, targets=["attention", "mlp", "head", "embedding"])


def base_gpt(style: str) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY, **BLOCKS[style])).eval()


def trained_adapter(gpt: GPT) -> GPT:
    """The GPT with an adapter on every target whose B is not zero (a new adapter changes nothing)."""
    add_lora(gpt, EVERYWHERE)
    return move_from_zero(gpt, std=0.2, seed=1).eval()


def record_of(gpt: GPT, adapter=None) -> GPTRecord:
    return GPTRecord(gpt=gpt.cfg, tokenizer=TokenizerRecord(kind="sentencepiece", model=b"unused", text_len=6),
                     vqgan=VQGANRecord(config=VQGANConfig(), checkpoint=None, sha256=None, grid=[3, 3]),
                     adapter=adapter)


TEXT = torch.tensor([[5, 6, 7, 0, 0, 0], [9, 3, 0, 0, 0, 0]])


@pytest.mark.parametrize("style", BLOCKS)
def test_only_the_adapter_trains(style):
    gpt = base_gpt(style)
    base = {k: v.clone() for k, v in gpt.state_dict().items()}
    base_params = [(p, p.detach().clone()) for p in gpt.parameters()]
    add_lora(gpt, EVERYWHERE)
    adapted = {name.split(".lora_")[0] for name in adapter_weights(gpt)}
    linears = {f"blocks.{i}.attn.{n}" for i in range(2) for n in ("key", "query", "value", "proj")}
    mlp = ("gate", "up", "down") if style == "llama" else ("0", "2")
    assert adapted == linears | {f"blocks.{i}.mlp.{n}" for i in range(2) for n in mlp} | {"head", "tok_emb"}
    trainable = [p for p in gpt.parameters() if p.requires_grad]
    groups = weight_decay_groups(gpt, 0.01)
    assert sum(len(g["params"]) for g in groups) == len(trainable) == len(adapter_weights(gpt))
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    gpt.train()
    tokens = torch.randint(0, 40, (4, 12))
    for _ in range(3):
        loss = F.cross_entropy(gpt(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # the base's parameters are still the GPT's (wrapped beside the adapter), bit for bit as they were
    in_model = {id(p) for p in gpt.parameters()}
    assert all(id(p) in in_model and torch.equal(p, value) for p, value in base_params)
    after = merge_lora(copy.deepcopy(gpt)).state_dict()
    assert any(not torch.equal(after[k], base[k]) for k in base), "the adapter did not learn"


@pytest.mark.parametrize("style", BLOCKS)
def test_merged_and_unmerged_adapters_sample_alike(style):
    unmerged = trained_adapter(base_gpt(style))
    merged = merge_lora(copy.deepcopy(unmerged))
    assert isinstance(merged.head, torch.nn.Linear) and not adapter_weights(merged)
    tokens = torch.randint(0, 40, (2, 12))
    torch.testing.assert_close(merged(tokens), unmerged(tokens), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged(tokens), base_gpt(style)(tokens), atol=1e-3)  # the adapter is in there
    cfg = SamplingConfig(greedy=True, guidance_scale=3.0)
    assert torch.equal(generate_codes(merged, TEXT, cfg), generate_codes(unmerged, TEXT, cfg))


def test_an_adapted_head_gives_its_rows_as_the_whole_head_does():
    gpt = trained_adapter(base_gpt("classic"))
    x = torch.randn(2, 3, 32)
    whole = gpt.head(x)
    image_rows = gpt.layout.n_image_codes
    torch.testing.assert_close(gpt.head_logits(x, slice(0, image_rows)), whole[..., :image_rows])
    torch.testing.assert_close(gpt.head_logits(x, slice(image_rows, None)), whole[..., image_rows:])
    merged = merge_lora(copy.deepcopy(gpt))
    torch.testing.assert_close(merged.head_logits(x, slice(0, image_rows)), whole[..., :image_rows],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", BLOCKS)
def test_the_adapter_file_holds_the_adapter_and_loads_on_its_base_only(style, tmp_path):
    base = base_gpt(style)
    save_gpt(tmp_path / "base.ckpt", base, record_of(base))
    adapted = trained_adapter(copy.deepcopy(base))
    record = record_of(base, adapter_record(EVERYWHERE, base, tmp_path / "base.ckpt"))
    save_adapter(tmp_path / "adapter.ckpt", adapted, record)
    saved = read_checkpoint(tmp_path / "adapter.ckpt")
    assert set(saved) == {"state_dict", "t2i"}
    assert {k.removeprefix("gpt.") for k in saved["state_dict"]} == set(adapter_weights(adapted))
    assert saved["t2i"]["adapter"]["base_sha256"] == weights_hash(base)

    for merge in (True, False):
        loaded, _ = load_gpt(tmp_path / "base.ckpt")
        assert apply_adapter(loaded, tmp_path / "base.ckpt", tmp_path / "adapter.ckpt", merge=merge).adapter.rank == 4
        tokens = torch.randint(0, 40, (2, 12))
        torch.testing.assert_close(loaded(tokens), adapted(tokens), rtol=1e-5, atol=1e-5)

    other = base_gpt(style)
    with torch.no_grad():
        other.head.weight[0, 0] += 1e-3
    save_gpt(tmp_path / "other.ckpt", other, record_of(other))
    with pytest.raises(CheckpointError, match=r"adapter\.ckpt was trained on another base than .*other\.ckpt.*base\.ckpt"):
        apply_adapter(load_gpt(tmp_path / "other.ckpt")[0], tmp_path / "other.ckpt", tmp_path / "adapter.ckpt")
    with pytest.raises(CheckpointError, match=r"is a LoRA adapter .* ckpt=BASE adapter="):
        load_gpt(tmp_path / "adapter.ckpt")
    with pytest.raises(CheckpointError, match="is a whole GPT checkpoint, not a LoRA adapter"):
        read_adapter(tmp_path / "base.ckpt")


@pytest.mark.parametrize("style", BLOCKS)
def test_several_adapters_on_one_gpt_switch_per_call(style, tmp_path):
    """attach_adapters puts two adapter files of one base (one adapting fewer layers) on its GPT, unmerged; each call
    runs the one use_adapter names as that adapter alone does, None the base as it was."""
    base = base_gpt(style)
    save_gpt(tmp_path / "base.ckpt", base, record_of(base))
    alone = {}
    for seed, (name, config) in enumerate([("ink", EVERYWHERE), ("pastel", LoraConfig(rank=2, targets=["mlp"]))]):
        adapted = move_from_zero(add_lora(copy.deepcopy(base), config), std=0.2, seed=seed)
        save_adapter(tmp_path / f"{name}.ckpt", adapted, record_of(base, adapter_record(config, base, None)))
        alone[name] = adapted.eval()
    gpt, _ = load_gpt(tmp_path / "base.ckpt")
    records = attach_adapters(gpt, tmp_path / "base.ckpt", {name: tmp_path / f"{name}.ckpt" for name in alone})
    assert records["pastel"].adapter.targets == ["mlp"]
    tokens = torch.randint(0, 40, (2, 12))
    assert torch.equal(gpt(tokens), base(tokens))  # attached: none runs until one is asked for
    for name in ["ink", None, "pastel", "ink", None]:
        use_adapter(gpt, name)
        assert torch.equal(gpt(tokens), (alone[name] if name else base)(tokens)), name
    assert not any(p.requires_grad for p in gpt.parameters())
    with pytest.raises(ValueError, match="no adapter named 'oil' is attached .*ink, pastel"):
        use_adapter(gpt, "oil")
    with pytest.raises(ValueError, match="may not be named 'base'"):
        attach_adapters(load_gpt(tmp_path / "base.ckpt")[0], tmp_path / "base.ckpt", {"base": tmp_path / "ink.ckpt"})


def test_lora_settings_are_checked_by_name():
    assert GPTStageConfig(lora={"rank": 2}).lora == LoraConfig(rank=2)
    assert GPTStageConfig().lora is None
    with pytest.raises(ValueError, match="stage.lora has unknown key.*ranks"):
        GPTStageConfig(lora={"ranks": 2})
    with pytest.raises(ValueError, match="stage.lora.targets must name some of attention, mlp, head, embedding"):
        LoraConfig(targets=["attn"])
    with pytest.raises(ValueError, match="stage.lora.rank"):
        LoraConfig(rank=0)
    tied = GPT(GPTConfig(**TINY, tie_head=True))
    for target in ("head", "embedding"):
        with pytest.raises(ValueError, match=f"targets has {target}, .*tie_head"):
            add_lora(tied, LoraConfig(targets=["attention", target]))


def test_a_lora_run_saves_its_adapter_resumes_and_is_evaluated(lora_run, gpt_run):
    base_path = gpt_run / "checkpoints" / "last.ckpt"
    adapter_path = lora_run / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(adapter_path)
    assert checkpoint["global_step"] == 3  # the resumed third step
    weights, record = read_adapter(adapter_path)
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    base, _ = load_gpt(base_path)
    assert record.adapter.base_sha256 == weights_hash(base) and record.adapter.targets == ["attention", "mlp", "head"]
    assert record.training.origin.startswith("a LoRA adapter on")
    assert any(lora_run.glob("**/images/samples-step*.png"))  # drawn by the unmerged adapter during training

    merged = T2IPipeline.from_checkpoint(base_path, adapter=adapter_path)
    unmerged = T2IPipeline.from_checkpoint(base_path, adapter=adapter_path, merge=False)
    cfg = SamplingConfig(greedy=True, guidance_scale=3.0)
    codes = merged.sample_codes(["红色的小圆形", "蓝色的大方块"], cfg)
    assert torch.equal(codes, unmerged.sample_codes(["红色的小圆形", "蓝色的大方块"], cfg))
    results = json.loads((lora_run / "eval" / "results.json").read_text())
    assert results["task"] == "t2i" and results["adapter"] == str(adapter_path)
