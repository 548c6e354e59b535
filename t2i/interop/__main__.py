"""python -m t2i.interop paipainter --src DIR --out FILE.ckpt
python -m t2i.interop export-paipainter --ckpt FILE.ckpt --out DIR [--adapter ADAPTER.ckpt] [--vqgan VQGAN.ckpt]"""

import argparse

from t2i.interop.paipainter import export_paipainter, import_paipainter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m t2i.interop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    into = commands.add_parser("paipainter", help="import an EasyNLP pai-painter checkpoint folder")
    into.add_argument("--src", required=True, help="the folder: pytorch_model.bin, config.json, vocab.txt")
    into.add_argument("--out", required=True, help="the t2i GPT checkpoint to write (its VQGAN goes beside it)")
    back = commands.add_parser("export-paipainter", help="write a pai-painter-layout t2i checkpoint as an EasyNLP folder")
    back.add_argument("--ckpt", required=True, help="a t2i GPT checkpoint in the paipainter layout")
    back.add_argument("--out", required=True, help="the folder to write")
    back.add_argument("--adapter", help="a LoRA adapter checkpoint of --ckpt (a run with stage.lora), merged into the "
                                        "weights; refused if trained on another base")
    back.add_argument("--vqgan", help="its VQGAN checkpoint (default: the one the checkpoint names)")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "paipainter":
        gpt, vqgan = import_paipainter(args.src, args.out)
        print(f"wrote {gpt} (GPT, WordPiece tokenizer, paipainter layout) and {vqgan} (its VQGAN)\n"
              f"generate: python eval.py task=generate ckpt={gpt} \"prompts=['...']\"\n"
              f"codes for fine-tuning: python -m t2i.pretokenize --data IMAGE_SHARDS --out CODE_SHARDS --vqgan {vqgan}")
    else:
        out = export_paipainter(args.ckpt, args.out, args.vqgan, args.adapter)
        merged = f" ({args.ckpt} with the adapter {args.adapter} merged in)" if args.adapter else ""
        print(f"wrote {out}{merged}: EasyNLP's predictor loads it as a pai-painter checkpoint folder")


if __name__ == "__main__":
    main()
