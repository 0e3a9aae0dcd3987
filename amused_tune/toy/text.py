"""The toy's tokenizer: CLIP BPE over characters, with merges that make each word of the toy world one token.

A character-level tokenizer (`models.build_tiny_tokenizer`) makes every caption a long run of letters that a small
text encoder encodes almost alike; with one token per word, "red" and "blue" are different tokens and a caption
is a handful of them. Unknown words still tokenize, letter by letter. CLIP's pre-tokenizer splits punctuation,
so ``[v]`` is the three tokens ``[``, ``v``, ``]`` (none of them used in pretraining).
"""

from __future__ import annotations

from transformers import CLIPTokenizer

from amused_tune.toy import world

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789[].,'-!?")
MAX_LENGTH = 16  # "<bos> a red circle on a blue background in [ v ] style <eos>" is 14 tokens


def toy_words() -> list[str]:
    """Every word a toy caption uses (world, frames, held-out colours, the style's words)."""
    words = ["a", "on", "background", "with", "frame", "in", "style", *world.PALETTE, *world.SHAPES]
    return list(dict.fromkeys(words))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """What CLIP's BPE makes of one word's symbols: merge the lowest-ranked adjacent pair until none applies."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges under which BPE turns each of `words` into a single symbol (added until no word is left split)."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    changed = True
    while changed:
        changed = False
        for w in words:
            symbols = _bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)
            while len(symbols) > 1:  # stuck: the first two symbols become one, at the lowest priority
                pair = (symbols[0], symbols[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                changed = True
                symbols = _bpe(symbols, ranks)
    return merges


def build_toy_tokenizer() -> CLIPTokenizer:
    """The toy's word-level CLIP tokenizer (see the module docstring); captions padded to `MAX_LENGTH` tokens."""
    vocab: dict[str, int] = {}
    for c in CHARS:
        vocab[c] = len(vocab)
    for c in CHARS:
        vocab[c + "</w>"] = len(vocab)
    merges = word_merges(toy_words())
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=MAX_LENGTH, unk_token="<|endoftext|>",
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
