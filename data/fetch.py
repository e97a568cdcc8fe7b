"""Download public corpora into data/NAME/, verified by size and SHA-256. Standard library only.

    python data/fetch.py tinyshakespeare enwik8

Offline, it says so in one line; copy the file by hand to the path it names instead, or point
attnlm at your copy with --set data.source=PATH.
"""

import hashlib
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).parent

# size and sha256 are those of the download (for enwik8, the zip archive); see data/README.md
# for where each checksum comes from. "member" names the file to take out of an archive.
CORPORA = {
    "tinyshakespeare": {
        "url": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "size": 1_115_394,
        "sha256": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "file": "input.txt",
    },
    "enwik8": {
        "url": "http://mattmahoney.net/dc/enwik8.zip",
        "size": 36_445_475,
        "sha256": "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
        "member": "enwik8",
        "file": "enwik8.txt",
        "file_size": 100_000_000,
    },
}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download(url, path):
    with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)


def fetch(name, root=ROOT):
    spec = CORPORA[name]
    target = root / name / spec["file"]
    # An archive's own checksum cannot be checked once it is unpacked; its size can.
    if target.exists() and target.stat().st_size == spec.get("file_size", spec["size"]) and (
            "member" in spec or sha256(target) == spec["sha256"]):
        print(f"{target} is already here")
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        download(spec["url"], partial)
    except (urllib.error.URLError, OSError) as err:
        partial.unlink(missing_ok=True)
        print(f"cannot download {name} ({getattr(err, 'reason', err)}); offline? put a copy at "
              f"{target} or point attnlm at yours with --set data.source=PATH", file=sys.stderr)
        return 1
    size = partial.stat().st_size
    if size != spec["size"] or sha256(partial) != spec["sha256"]:
        partial.unlink()
        print(f"{name}: the download ({size:,} bytes) does not match the expected size and "
              "SHA-256; discarded", file=sys.stderr)
        return 1
    if "member" in spec:
        unpacked = target.with_name(target.name + ".unpacking")
        with zipfile.ZipFile(partial) as archive, archive.open(spec["member"]) as src, \
                open(unpacked, "wb") as dst:
            while chunk := src.read(1 << 20):  # zipfile checks the member's CRC-32 at its end
                dst.write(chunk)
        partial.unlink()
        partial = unpacked
    partial.replace(target)
    print(f"{target}: verified")
    return 0


def main(argv):
    names = argv or ["tinyshakespeare"]
    unknown = [n for n in names if n not in CORPORA]
    if unknown:
        print(f"unknown corpus {unknown[0]!r}; available: {', '.join(CORPORA)}", file=sys.stderr)
        return 2
    return max(fetch(n) for n in names)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
