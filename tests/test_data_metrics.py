import math

import pytest
import torch

from sharedllm.data import eval_windows, load_user, read_user_text, split_by_position
from sharedllm.errors import SharedLLMError
from sharedllm.metrics import bits_per_byte, perplexity
from sharedllm.tokenizer import ByteTokenizer


def test_split_is_by_position():
    train, held = split_by_position("a" * 80 + "b" * 20)
    assert train == "a" * 80 and held == "b" * 20


def test_folder_reads_files_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    assert read_user_text(tmp_path) == "first\n\nsecond"


@pytest.mark.parametrize("content, needle", [
    (None, "no such file"), (b"", "empty"), (b"   \n\n", "empty"), (b"abc\x00def", "binary"),
    (b"caf\xe9 au lait", "not valid UTF-8"),
])
def test_bad_text_is_refused_naming_the_file(tmp_path, content, needle):
    p = tmp_path / "user.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(SharedLLMError, match=needle) as e:
        read_user_text(p)
    assert "user.txt" in str(e.value)


def test_too_short_for_a_window_is_refused(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("hello world, this is short")
    user = load_user(p, ByteTokenizer())
    with pytest.raises(SharedLLMError, match="fewer than one training window"):
        user.check(seq=256, window=8)
    with pytest.raises(SharedLLMError, match="fewer than one evaluation window"):
        user.check(seq=4, window=256)


def test_eval_windows_predict_every_token_once():
    tokens = torch.arange(1 + 3 * 10)
    w = eval_windows(tokens, 10)
    assert w.shape == (3, 11)
    assert torch.equal(w[:, 1:].reshape(-1), tokens[1:])
    assert eval_windows(tokens, 10, max_tokens=20).shape == (2, 11)


def test_metric_formulas():
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(10 * math.log(5), 10) == pytest.approx(5.0)
    assert bits_per_byte(8 * math.log(2), 8) == pytest.approx(1.0)


def test_train_eval_and_dev_are_disjoint():
    """The bets' three slices never share a token position: train pool (first 80 %), eval texts, dev slice."""
    from sharedllm.data import dev_slice, disjoint_slices

    n, count, length = 20_000, 3, 512
    positions = torch.arange(n)
    cut = int(n * 0.8)
    train, heldout = positions[:cut], positions[cut:]
    evals = disjoint_slices(heldout, count, length)
    dev = dev_slice(heldout, count, length)
    eval_pos = set(torch.cat(evals).tolist())
    assert len(dev) == length + 1 and len(eval_pos) == count * length + 1
    assert not eval_pos & set(dev.tolist()) and not eval_pos & set(train.tolist())
    assert not set(dev.tolist()) & set(train.tolist())
    assert int(dev[0]) == max(eval_pos) + 1  # the dev text starts right after the eval texts


def test_dev_slice_refuses_a_short_heldout():
    from sharedllm.data import dev_slice

    with pytest.raises(SharedLLMError, match="dev text"):
        dev_slice(torch.arange(3 * 64 + 10), 3, 64)
