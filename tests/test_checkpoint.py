"""Checkpoint files: atomic, verified, never executing code, own error messages."""

import pytest
import torch

from attnlm import checkpoint
from attnlm.errors import AttnlmError

TORCH_ADVICE = "weights_only"  # torch's own text advises unsafe loading: never repeated


def weights():
    return {"tok_emb.weight": torch.arange(64, dtype=torch.float32).reshape(16, 4)}


def test_atomic_save_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save({"step": 1, "w": torch.ones(3)}, path)
    checkpoint.save({"step": 2, "w": torch.zeros(3)}, path)
    assert checkpoint.load(path)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_flipped_byte_in_the_weights_is_found(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save({"model": weights(), "step": 3}, path)
    data = bytearray(path.read_bytes())
    at = data.find(weights()["tok_emb.weight"].numpy().tobytes()) + 100  # inside the tensor
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(AttnlmError, match="corrupt: its contents do not match its checksum"):
        checkpoint.load(path)


def test_the_checksum_covers_every_value(tmp_path):
    payload = {"model": weights(), "step": 3, "config": {"train": {"lr": 0.1}}}
    base = checkpoint.checksum(payload)
    assert checkpoint.checksum({**payload, "step": 4}) != base
    assert checkpoint.checksum({**payload, "config": {"train": {"lr": 0.2}}}) != base
    assert checkpoint.checksum({**payload, "model": {"tok_emb.weight": weights()["tok_emb.weight"].double()}}) != base
    # The same bytes under another name, or in another shape or dtype, are another checkpoint.
    tensor = weights()["tok_emb.weight"]
    one = checkpoint.checksum({"model": {"tok_emb.weight": tensor}})
    assert checkpoint.checksum({"model": {"head.weight": tensor}}) != one
    assert checkpoint.checksum({"model": {"tok_emb.weight": tensor.reshape(-1)}}) != one
    assert checkpoint.checksum({"model": {"tok_emb.weight": tensor.view(torch.int32)}}) != one


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_neither_saved_nor_loaded(tmp_path, bad):
    w = weights()
    w["tok_emb.weight"][3, 1] = bad
    with pytest.raises(AttnlmError, match="not finite.*tok_emb.weight"):
        checkpoint.save({"model": w}, tmp_path / "a.pt")
    assert not list(tmp_path.iterdir())
    # Written by something else (an old attnlm, another tool): refused at load.
    torch.save({"format": 1, "model": w}, tmp_path / "b.pt")
    with pytest.raises(AttnlmError, match="non-finite weights"):
        checkpoint.load(tmp_path / "b.pt")


def test_format_1_without_checksum_still_loads(tmp_path):
    torch.save({"format": 1, "model": weights(), "step": 5}, tmp_path / "old.pt")
    assert checkpoint.load(tmp_path / "old.pt")["step"] == 5


@pytest.mark.parametrize("content", [b"", b"not a zip file at all"])
def test_unreadable_files_are_our_own_one_line(tmp_path, content):
    (tmp_path / "checkpoint.pt").write_bytes(content)
    with pytest.raises(AttnlmError, match="not a readable attnlm checkpoint") as err:
        checkpoint.load(tmp_path / "checkpoint.pt")
    assert TORCH_ADVICE not in str(err.value) and "\n" not in str(err.value)


def test_a_truncated_checkpoint_is_our_own_one_line(tmp_path):
    checkpoint.save({"model": weights()}, tmp_path / "c.pt")
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(AttnlmError, match="not a readable attnlm checkpoint") as err:
        checkpoint.load(tmp_path / "c.pt")
    assert "miniz" not in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_format_and_foreign_files(tmp_path):
    torch.save({"format": 99}, tmp_path / "future.pt")
    with pytest.raises(AttnlmError, match="format 99"):
        checkpoint.load(tmp_path / "future.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(AttnlmError, match="not an attnlm checkpoint"):
        checkpoint.load(tmp_path / "list.pt")


def test_loading_never_executes_code(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('ran')" % str(tmp_path / "pwned"),))

    torch.save({"format": 1, "payload": Boom()}, tmp_path / "evil.pt")
    with pytest.raises(AttnlmError, match="could run code when loaded; refused") as err:
        checkpoint.load(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    assert TORCH_ADVICE not in str(err.value)


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4160 vs 4058"),
    OSError(28, "No space left on device"),
])
def test_a_full_disk_keeps_the_old_checkpoint(tmp_path, monkeypatch, failure):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save({"step": 1}, path)
    good = path.read_bytes()

    def write_fails(obj, f):
        f.write(b"partial")
        raise failure

    monkeypatch.setattr(torch, "save", write_fails)
    with pytest.raises(AttnlmError, match="no space left on the device") as err:
        checkpoint.save({"step": 2}, path)
    assert "unexpected pos" not in str(err.value)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
