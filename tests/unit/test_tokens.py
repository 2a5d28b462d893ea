"""The worker's token estimate is conservative for natural text; truncation is a fitting prefix."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fakeapi import count_tokens
from worker.tokens import estimate_tokens, truncate_to_tokens

SENTENCES = {
    "english": [
        "The quick brown fox jumps over the lazy dog.",
        "I went to the shop, bought 3 apples and a loaf of bread, then walked home.",
        "Is this the real life? Is this just fantasy?",
        "A cat sat on a mat.",
    ],
    "german": [
        "Der schnelle braune Fuchs springt über den faulen Hund.",
        "Können Sie mir bitte sagen, wie ich zum Bahnhof komme?",
        "Die Straßenbahn fährt alle zehn Minuten, außer am Sonntag.",
    ],
    "japanese": [
        "吾輩は猫である。名前はまだ無い。",
        "今日はとても良い天気ですね。公園に散歩に行きましょう。",
        "東京駅から新幹線で大阪まで約二時間半かかります。",
    ],
    "chinese": [
        "今天天气很好，我们去公园散步吧。",
        "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？",
        "这家餐厅的菜很好吃，价格也不贵。",
    ],
    "russian": [
        "Съешь же ещё этих мягких французских булок, да выпей чаю.",
        "Я помню чудное мгновенье: передо мной явилась ты.",
        "Москва — столица России и крупнейший город страны.",
    ],
    "arabic": [
        "الطقس جميل اليوم في المدينة.",
        "أين تقع أقرب محطة قطار من هنا؟",
        "اللغة العربية من أكثر اللغات انتشارا في العالم.",
    ],
}
ALL = [s for group in SENTENCES.values() for s in group]


@pytest.mark.parametrize("language", sorted(SENTENCES))
def test_estimate_is_at_least_the_providers_count(language: str) -> None:
    for sentence in SENTENCES[language]:
        assert estimate_tokens(sentence) >= count_tokens(sentence) > 0, sentence
    # Also for a long paragraph made of them.
    paragraph = " ".join(SENTENCES[language] * 20)
    assert estimate_tokens(paragraph) >= count_tokens(paragraph)


def test_estimate_is_not_absurdly_loose_for_cjk() -> None:
    # CJK: one 3-byte character is one token for the fake, and one for the estimate.
    for sentence in SENTENCES["chinese"] + SENTENCES["japanese"]:
        assert estimate_tokens(sentence) <= 1.5 * count_tokens(sentence), sentence


def test_estimate_basics() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("a") == 1
    assert estimate_tokens("abc") == 2  # 3 bytes: 9/8
    assert estimate_tokens("abcdefgh") == 3  # 0.375 per byte
    assert estimate_tokens("猫") == 2  # 3 bytes
    assert estimate_tokens("🙂") == 2  # 4 bytes
    assert estimate_tokens("12345678") == 9  # and 0.75 more per digit


# Counted with the Qwen tokenizer that the dashscope SDK ships (docs/architecture.md):
# digits are a token each, which ``bytes / 3`` (the former estimate: 46 and 20) missed.
QWEN_COUNTED = {
    "2005-06-03-15.42.50.675872 R02-M1-N0-C:J12-U11 RAS KERNEL INFO instruction cache parity "
    "error corrected 0x00544eb8 1117838570 2005.06.03": 82,
    "Hey!! r u coming 2nite? call me on 07781482378 b4 9pm, ta xx": 32,
    "The quick brown fox jumps over the lazy dog, then naps under the old oak tree until "
    "sunset.": 21,
}


@pytest.mark.parametrize("text", sorted(QWEN_COUNTED))
def test_estimate_covers_digit_heavy_text(text: str) -> None:
    assert QWEN_COUNTED[text] <= estimate_tokens(text) <= 2 * QWEN_COUNTED[text]


@pytest.mark.parametrize("sentence", ALL[::3])
@pytest.mark.parametrize("limit", [0, 1, 2, 5, 10])
def test_truncate_natural_text(sentence: str, limit: int) -> None:
    cut = truncate_to_tokens(sentence, limit)
    assert sentence.startswith(cut)
    assert estimate_tokens(cut) <= limit
    if estimate_tokens(sentence) <= limit:
        assert cut == sentence


@given(text=st.text(max_size=200), limit=st.integers(0, 80))
def test_truncate_is_the_longest_fitting_prefix(text: str, limit: int) -> None:
    cut = truncate_to_tokens(text, limit)
    assert text.startswith(cut)
    assert estimate_tokens(cut) <= limit
    if cut != text:
        assert estimate_tokens(text[: len(cut) + 1]) > limit
    else:
        assert estimate_tokens(text) <= limit
