"""Download public corpora into data/NAME/, verified by SHA-256. Standard library only.

    python data/fetch.py tinyshakespeare

Offline, it says so in one line; copy the file by hand to the path it names instead, or point
attnlm at your copy with --set data.source=PATH.
"""

import hashlib
import sys
import urllib.error
import urllib.request
from pathlib import Path

CORPORA = {
    "tinyshakespeare": {
        "url": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "file": "input.txt",
        "sha256": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "about": "40,000 lines of Shakespeare (1.1 MB), the char-rnn corpus",
    },
}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch(name):
    spec = CORPORA[name]
    target = Path(__file__).parent / name / spec["file"]
    if target.exists() and sha256(target) == spec["sha256"]:
        print(f"{target} is already here and verified")
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    try:
        with urllib.request.urlopen(spec["url"], timeout=60) as response, open(partial, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, OSError) as err:
        partial.unlink(missing_ok=True)
        print(f"cannot download {name} ({getattr(err, 'reason', err)}); offline? put a copy at "
              f"{target} or use --set data.source=PATH", file=sys.stderr)
        return 1
    if sha256(partial) != spec["sha256"]:
        partial.unlink()
        print(f"{name}: checksum mismatch, download discarded", file=sys.stderr)
        return 1
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
