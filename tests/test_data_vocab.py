"""The tokenizer and the deterministic WordPiece vocabulary (metakd/data/vocab.py)."""

from __future__ import annotations

from metakd import data as D


def test_trained_tokenizer_pairs_token_types_and_determinism(tmp_path):
    texts = ["the cat sat on the mat", "a dog ate the cat food", "Hello World"] * 10
    tok = D.build_tokenizer(texts, None, vocab_size=120)
    assert tok.pad_token_id == 0 and tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == D.SPECIAL_TOKENS
    enc = tok("the cat", "a dog")
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == ["[CLS]", "the", "cat", "[SEP]", "a", "dog", "[SEP]"]
    assert enc["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    assert tok.tokenize("HELLO") == ["hello"]  # lowercased
    assert D.build_tokenizer(list(reversed(texts)), None, vocab_size=120).get_vocab() == tok.get_vocab()
    tok.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "tok")("the cat", "a dog") == enc


def test_wordpiece_vocab_merges_most_frequent_pair_first():
    vocab = D.train_wordpiece_vocab({"ab": 5, "abc": 3, "bc": 1}, vocab_size=100)
    merged = [t for t, i in sorted(vocab.items(), key=lambda x: x[1]) if i >= 5 and len(t.lstrip("#")) > 1]
    # a+##b occurs 8 times -> "ab"; then ab+##c (3) ; b+##c once < min_frequency 2.
    assert merged == ["ab", "abc"]
