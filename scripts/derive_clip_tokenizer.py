"""Derive the real CLIP tokenizer files (vocab.json, merges.txt) from OpenAI's BPE merges file.

Provenance: `bpe_simple_vocab_16e6.txt.gz` is OpenAI's CLIP BPE file (MIT licence), shipped inside the
`open_clip_torch` wheel. Fetch it without dependencies (they pull torchvision):

    pip download --no-deps open_clip_torch==3.3.0 -d /tmp/oc
    python scripts/derive_clip_tokenizer.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl

The vocabulary is built the way CLIP builds it: the 256 byte symbols, the same with `</w>`, each of the first
48,894 merges joined, then the two special tokens (49,408 ids in all).
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2
OUTPUT_DIR = Path(__file__).resolve().parent.parent / "personalization" / "assets" / "clip_tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def read_merges(source: Path) -> list[str]:
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            name = next(n for n in wheel.namelist() if n.endswith("bpe_simple_vocab_16e6.txt.gz"))
            raw = gzip.decompress(wheel.read(name))
    else:
        raw = gzip.decompress(source.read_bytes())
    lines = raw.decode("utf-8").split("\n")
    return lines[1 : NUM_MERGES + 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="open_clip_torch wheel or bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=OUTPUT_DIR)
    args = parser.parse_args()

    merges = read_merges(args.source)
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (args.out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (args.out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True, **special}
    (args.out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
