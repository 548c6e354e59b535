"""EasyNLP's pai-painter checkpoints in and out. Only this module knows EasyNLP's names.

A pai-painter folder (what EasyNLP's `TextImageGeneration` saves and its predictor loads):

    pytorch_model.bin  the whole model's state dict: `transformer.*` (a minGPT: pre-LN blocks,
                       separate key/query/value/proj, a causal-mask buffer per block, a head over the
                       image codes only) and `first_stage_model.*` (taming's VQModel, encoder included)
    config.json        ARTISTConfig: vocab_size, img_vocab_size, text_vocab_size, block_size, n_layer,
                       n_head, n_embd, embd/resid/attn_pdrop, n_unmasked (no VQGAN settings: EasyNLP
                       hard-codes taming's f16_16384)
    vocab.txt          BERT-Chinese's WordPiece vocabulary

Importing gives a t2i GPT checkpoint in the `paipainter` token layout (text then codes, no special
tokens) with the WordPiece tokenizer inside and the VQGAN written beside it, so every t2i sampler,
eval.py and fine-tuning (full or LoRA) take it; exporting writes such a folder back (a LoRA adapter
merged into the weights). The GPT's parameter names are minGPT's in both systems, so the mapping is
the prefix.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import torch

from t2i.adapters import load_adapted_gpt
from t2i.checkpoints import (
    CheckpointError,
    GPTRecord,
    TokenizerRecord,
    TrainingRecord,
    load_record_vqgan,
    load_weights,
    read_checkpoint,
    save_gpt,
    save_vqgan,
    vqgan_identity,
)
from t2i.data.tokenizer import WordPieceTokenizer
from t2i.models.gpt import GPT, GPTConfig
from t2i.models.vqgan import VQGANConfig, VQModel
from t2i.sampling import SamplingConfig

GPT_PREFIX, VQGAN_PREFIX = "transformer.", "first_stage_model."
WEIGHTS, CONFIG, VOCAB = "pytorch_model.bin", "config.json", "vocab.txt"
# taming's ddconfig keys and the quantizer's sizes: what config.json's vqgan_config holds
TAMING_KEYS = ("resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
               "z_channels", "embed_dim", "n_embed")
MASK_SUFFIX = ".attn.mask"  # minGPT's causal mask, a buffer of every block: rebuilt, not learned
# what EasyNLP's predictor does: top-k 100 at temperature 1, one image per prompt, no guidance
EASYNLP_SAMPLING = SamplingConfig(temperature=1.0, top_k=100, top_p=1.0, guidance_scale=1.0, samples_per_prompt=1,
                                  seed=0)


def read_folder(src: str | Path) -> tuple[dict, dict, bytes]:
    """(config.json, the state dict on the CPU, vocab.txt bytes) of a pai-painter folder."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} is not a folder: point it at the pai-painter checkpoint folder "
                                f"({WEIGHTS}, {CONFIG}, {VOCAB})")
    missing = [name for name in (WEIGHTS, CONFIG, VOCAB) if not (src / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{src} lacks {', '.join(missing)}: not a pai-painter checkpoint folder")
    config = json.loads((src / CONFIG).read_text(encoding="utf-8"))
    # on the CPU (GPU-saved storages load anywhere), tensors only: EasyNLP saves a plain state dict
    state = read_checkpoint(src / WEIGHTS, foreign_objects=False)
    state = state.get("state_dict", state)
    return config, state, (src / VOCAB).read_bytes()


def vqgan_config(config: dict, vqgan_state: dict) -> VQGANConfig:
    """taming's f16_16384, or config.json's `vqgan_config`, with the sizes read off the weights."""
    if "vqgan_config" in config:
        known = {f.name for f in fields(VQGANConfig)}
        unknown = sorted(set(config["vqgan_config"]) - known - {"double_z"})
        if unknown:
            raise ValueError(f"config.json vqgan_config has keys t2i's VQGAN does not know: {', '.join(unknown)}")
        if config["vqgan_config"].get("double_z"):
            raise ValueError("config.json vqgan_config has double_z=true: a VQGAN's encoder has double_z=false")
        return VQGANConfig(**{k: v for k, v in config["vqgan_config"].items() if k in known})
    # the shapes the checkpoint's weights have (the resolution and attention levels cannot be read off them)
    codebook = vqgan_state.get("quantize.embedding.weight")
    conv_in = vqgan_state.get("encoder.conv_in.weight")
    if codebook is None or conv_in is None:
        return VQGANConfig()
    levels = sorted({int(k.split(".")[2]) for k in vqgan_state if k.startswith("encoder.down.")})
    ch = conv_in.shape[0]
    ch_mult = [vqgan_state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels]
    blocks = {int(k.split(".")[4]) for k in vqgan_state if k.startswith("encoder.down.0.block.")}
    return VQGANConfig(ch=ch, ch_mult=ch_mult, num_res_blocks=len(blocks),
                       z_channels=vqgan_state["quant_conv.weight"].shape[1],
                       embed_dim=codebook.shape[1], n_embed=codebook.shape[0])


def gpt_config(config: dict, image_len: int) -> GPTConfig:
    required = ("vocab_size", "img_vocab_size", "text_vocab_size", "block_size", "n_layer", "n_head", "n_embd")
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}: not an EasyNLP ARTIST config")
    if config["vocab_size"] != config["img_vocab_size"] + config["text_vocab_size"]:
        raise ValueError(f"config.json: vocab_size {config['vocab_size']} is not img_vocab_size "
                         f"{config['img_vocab_size']} + text_vocab_size {config['text_vocab_size']}")
    if config.get("n_unmasked", 0):
        raise ValueError(f"config.json: n_unmasked={config['n_unmasked']} (a bidirectional prefix): t2i's GPT is "
                         "causal over the whole sequence, as pai-painter's released models (n_unmasked=0)")
    text_len = config["block_size"] - image_len
    if text_len < 1:
        raise ValueError(f"config.json: block_size {config['block_size']} leaves no text before the VQGAN's "
                         f"{image_len} image codes")
    drops = {config.get(k, 0.0) for k in ("embd_pdrop", "resid_pdrop", "attn_pdrop")}
    if len(drops) > 1:
        warnings.warn(f"config.json has different dropout rates {sorted(drops)}: t2i has one, taking the largest")
    return GPTConfig(n_image_codes=config["img_vocab_size"], n_text_tokens=config["text_vocab_size"],
                     text_len=text_len, image_len=image_len, n_layer=config["n_layer"], n_head=config["n_head"],
                     n_embd=config["n_embd"], dropout=max(drops), norm="pre", pb_relax=False, tie_head=False,
                     layout="paipainter")


def split_state(state: dict, source: str) -> tuple[dict, dict]:
    """(GPT weights, VQGAN weights); the causal masks are checked and dropped; anything else is an error."""
    gpt, vqgan, unknown = {}, {}, []
    for key, value in state.items():
        if key.startswith(GPT_PREFIX):
            name = key[len(GPT_PREFIX):]
            if name.endswith(MASK_SUFFIX):
                size = value.shape[-1]
                if not torch.equal(value.reshape(size, size).bool(), torch.ones(size, size).tril().bool()):
                    raise CheckpointError(f"{source}: {key} is not a causal mask (n_unmasked > 0?): "
                                          "t2i's GPT is causal")
                continue
            gpt[name] = value
        elif key.startswith(VQGAN_PREFIX):
            vqgan[key[len(VQGAN_PREFIX):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: keys that are neither {GPT_PREFIX}* nor {VQGAN_PREFIX}*: "
                              f"{', '.join(unknown[:20])}{' ...' if len(unknown) > 20 else ''}")
    if not gpt or not vqgan:
        raise CheckpointError(f"{source}: no {GPT_PREFIX if not gpt else VQGAN_PREFIX}* weights: not a whole "
                              "pai-painter model (EasyNLP saves the GPT and the VQGAN together)")
    return gpt, vqgan


def import_paipainter(src: str | Path, out: str | Path) -> tuple[Path, Path]:
    """A pai-painter folder -> a t2i GPT checkpoint `out` and its VQGAN beside it (`<out stem>.vqgan.ckpt`)."""
    src, out = Path(src), Path(out)
    config, state, vocab = read_folder(src)
    gpt_state, vqgan_state = split_state(state, str(src / WEIGHTS))
    vqgan = VQModel(vqgan_config(config, vqgan_state))
    load_weights(vqgan, {k: v.float() for k, v in vqgan_state.items()}, f"{src / WEIGHTS} ({VQGAN_PREFIX}*)")
    grid = vqgan.cfg.grid
    model = gpt_config(config, grid * grid)
    tokenizer = WordPieceTokenizer(vocab, model.text_len)
    if tokenizer.vocab_size != model.n_text_tokens:
        raise ValueError(f"{src / VOCAB} has {tokenizer.vocab_size} tokens, config.json's text_vocab_size is "
                         f"{model.n_text_tokens}")
    gpt = GPT(model)
    load_weights(gpt, {k: v.float() for k, v in gpt_state.items()}, f"{src / WEIGHTS} ({GPT_PREFIX}*)", what="GPT")
    vqgan_path = out.with_name(out.stem + ".vqgan.ckpt")
    save_vqgan(vqgan_path, vqgan)
    record = GPTRecord(gpt=model, tokenizer=TokenizerRecord(kind=tokenizer.kind, model=vocab, text_len=model.text_len),
                       vqgan=vqgan_identity(vqgan, vqgan_path, (grid, grid)),
                       training=TrainingRecord(caption_prob=0.0, txt_loss_scale=0.0, cond_drop=0.0,
                                               origin=f"pai-painter import of {src.resolve()}"),
                       sampling=asdict(EASYNLP_SAMPLING))
    save_gpt(out, gpt, record)
    return out, vqgan_path


def easynlp_shapes(config: dict, vqgan: VQGANConfig) -> dict[str, tuple[int, ...]]:
    """The state dict EasyNLP's TextImageGeneration holds for an ARTIST config.json and a taming VQGAN:
    every name and shape, spelled out from EasyNLP's minGPT (what its strict load expects of a folder)."""
    e, block, hidden = config["n_embd"], config["block_size"], 4 * config["n_embd"]
    gpt = {"tok_emb.weight": (config["vocab_size"], e), "pos_emb": (1, block, e), "ln_f.weight": (e,),
           "ln_f.bias": (e,), "head.weight": (config["img_vocab_size"], e)}
    for i in range(config["n_layer"]):
        p = f"blocks.{i}."
        gpt.update({p + "ln1.weight": (e,), p + "ln1.bias": (e,), p + "ln2.weight": (e,), p + "ln2.bias": (e,),
                    p + "attn.mask": (1, 1, block, block), p + "mlp.0.weight": (hidden, e), p + "mlp.0.bias": (hidden,),
                    p + "mlp.2.weight": (e, hidden), p + "mlp.2.bias": (e,)})
        for linear in ("key", "query", "value", "proj"):
            gpt.update({p + f"attn.{linear}.weight": (e, e), p + f"attn.{linear}.bias": (e,)})
    # taming's VQModel of these sizes: t2i's plain VQGAN carries taming's names (checked in test_vqgan.py)
    with torch.device("meta"):
        taming = VQModel(VQGANConfig(**{k: v for k, v in asdict(vqgan).items() if k in TAMING_KEYS}))
    return {**{GPT_PREFIX + k: v for k, v in gpt.items()},
            **{VQGAN_PREFIX + k: tuple(v.shape) for k, v in taming.state_dict().items()}}


# options that change no weight and nothing EasyNLP computes at inference (dropout is config.json's own)
UNUSED_BY_EASYNLP = {"dropout", "pb_relax_alpha", "rope_base", "beta", "legacy_beta", "entropy_weight",
                     "entropy_temperature"}


def _easynlp_mismatches(ckpt, record: GPTRecord, cfg: GPTConfig, vqgan: VQModel, state: dict, config: dict) -> str:
    """What keeps a model from running in EasyNLP, in words ("" when nothing does): the options whose value
    EasyNLP's modules cannot hold, and the weights that do not map key for key onto its state dict."""
    # the model EasyNLP would build for these sizes: text ids after the image codes, nothing else
    config = {**config, "vocab_size": cfg.n_image_codes + cfg.n_text_tokens, "block_size": cfg.text_len + cfg.image_len}
    easynlp_gpt = gpt_config(config, cfg.image_len)
    easynlp_vqgan = VQGANConfig(**{k: v for k, v in asdict(vqgan.cfg).items() if k in TAMING_KEYS})
    options = [f"model.{name}={value} (EasyNLP: {getattr(easynlp_gpt, name)})" for name, value in asdict(cfg).items()
               if name not in UNUSED_BY_EASYNLP and value != getattr(easynlp_gpt, name)]
    options += [f"vqgan.{name}={value} (EasyNLP: {getattr(easynlp_vqgan, name)})"
                for name, value in asdict(vqgan.cfg).items()
                if name not in UNUSED_BY_EASYNLP and value != getattr(easynlp_vqgan, name)]
    if record.tokenizer.kind != "wordpiece":
        options.append(f"a {record.tokenizer.kind} tokenizer (EasyNLP: BERT's WordPiece vocab.txt)")
    expected = easynlp_shapes(config, vqgan.cfg)
    ours = {k: tuple(v.shape) for k, v in state.items()}
    extra, absent = sorted(set(ours) - set(expected)), sorted(set(expected) - set(ours))
    misshaped = [f"{k} {ours[k]} (EasyNLP: {expected[k]})" for k in sorted(set(ours) & set(expected))
                 if ours[k] != expected[k]]
    keys = [f"{what} ({len(names)}): {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
            for what, names in (("weights EasyNLP has no place for", extra), ("weights EasyNLP needs", absent),
                                ("mis-shaped", misshaped)) if names]
    if not options and not keys:
        return ""
    return (f"{ckpt} cannot run in EasyNLP, whose pai-painter is a minGPT (learned positions, pre-LayerNorm with "
            "biases, GELU MLP) over taming's VQGAN: " + "; ".join(options + keys) + ". Export a model trained with "
            "the pai-painter architecture (e.g. one imported with `python -m t2i.interop paipainter` and fine-tuned)")


def export_paipainter(ckpt: str | Path, out: str | Path, vqgan_ckpt: str | Path | None = None,
                      adapter: str | Path | None = None) -> Path:
    """A pai-painter-architecture t2i GPT checkpoint -> a folder EasyNLP's predictor loads (strictly).

    With `adapter` (a LoRA adapter checkpoint of `ckpt`, refused on any other base by hash), the adapter is
    merged into the weights first: EasyNLP's minGPT holds plain linear layers only.
    Refused, naming the options, when the model or its VQGAN does not map key for key onto EasyNLP's
    modules (EasyNLP loads with strict=False: it would drop those weights and sample garbage).
    """
    gpt, record = load_adapted_gpt(ckpt, adapter, merge=True)
    cfg = gpt.cfg
    vqgan = load_record_vqgan(record, str(adapter or ckpt), vqgan_ckpt)
    mask = torch.ones(cfg.block_size, cfg.block_size).tril().view(1, 1, cfg.block_size, cfg.block_size)
    state = {GPT_PREFIX + k: v.detach().cpu().contiguous() for k, v in gpt.state_dict().items()}
    state.update({f"{GPT_PREFIX}blocks.{i}{MASK_SUFFIX}": mask.clone() for i in range(cfg.n_layer)})
    state.update({VQGAN_PREFIX + k: v.detach().cpu().contiguous() for k, v in vqgan.state_dict().items()})
    config = {"vocab_size": cfg.vocab_size, "img_vocab_size": cfg.n_image_codes, "text_vocab_size": cfg.n_text_tokens,
              "block_size": cfg.block_size, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
              "embd_pdrop": cfg.dropout, "resid_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "n_unmasked": 0,
              "model_type": "artist"}
    problems = _easynlp_mismatches(ckpt, record, cfg, vqgan, state, config)
    if problems:
        raise ValueError(problems)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / WEIGHTS)
    if asdict(vqgan.cfg) != asdict(VQGANConfig()):  # EasyNLP builds f16_16384 only; t2i reads this back
        warnings.warn("the VQGAN is not taming's f16_16384, which EasyNLP hard-codes: config.json records it as "
                      "vqgan_config, but EasyNLP itself will not build it")
        config["vqgan_config"] = {k: v for k, v in asdict(vqgan.cfg).items() if k in TAMING_KEYS}
    (out / CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / VOCAB).write_bytes(record.tokenizer.model)
    return out
