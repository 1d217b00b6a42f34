"""The input filter on scripts that do not put spaces between words (issue 16): Chinese and
Japanese inputs were all rejected as too_few_words, and Thai words were cut apart at every
vowel sign. English (any space-separated text) must be filtered exactly as before."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from genpi.config import SynthConfig
from genpi.synth.inputs import InputPool, degenerate_reason, normalise, shingles, tokens, words

CFG = SynthConfig()

ACCEPTED = [
    "今天天气怎么样？",  # "how is the weather today?": 8 characters, 4 pseudo-words
    "我想学习游泳，成年人应该怎么开始？",
    "東京から京都まで新幹線でどのくらいかかりますか？",
    "雨の日に子どもと家でできる遊びを教えてください。",
    "ช่วยแนะนำร้านอาหารไทยอร่อยๆ ในกรุงเทพหน่อย",  # Thai: recommend a tasty Thai restaurant in Bangkok
    "พรุ่งนี้ฝนจะตกไหม",  # Thai: will it rain tomorrow?
    "我想学Python编程，有什么好书推荐吗？",  # mixed Chinese and English
    "Can you translate 谢谢你的帮助 into English?",  # mixed, English frame
    "ラーメンのおいしい作り方を教えて",
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_everyday_inputs_in_scripts_without_spaces_are_kept(text):
    assert degenerate_reason(text, CFG) is None


def test_words_count_characters_of_scripts_without_spaces_in_pairs_or_threes():
    assert words("今天天气怎么样？") == ["今天", "天气", "怎么", "样"]
    assert words("東京へ行く") == ["東京", "へ行", "く"]
    # Thai: a letter keeps its combining vowel and tone marks; three letters count as a word.
    assert words("สวัสดีครับ") == ["สวัส", "ดีครั", "บ"]
    # Runs never cross a space, punctuation or another script.
    assert words("我想学Python编程，有什么") == ["我想", "学", "python", "编程", "有什", "么"]
    assert tokens("你好，世界 hello") == ["你", "好", "世", "界", "hello"]


def test_thai_words_are_not_cut_at_vowel_signs():
    # Before: `[^\w]+` -> " " split "สวัสดีครับ" at each combining vowel (ั, ี, ั): "สว สด คร บ".
    assert normalise("สวัสดีครับ") == "สวัสดีครับ"
    assert normalise("ภาษาไทย  ง่ายไหม?") == "ภาษาไทย ง่ายไหม"


def test_short_or_repetitive_cjk_inputs_are_still_rejected_for_the_right_reason():
    assert degenerate_reason("你好", CFG) == "too_short"  # 2 wide characters: width 4 < 12
    assert degenerate_reason("谢谢！！！！！！！！", CFG) == "not_text"
    assert degenerate_reason("哈哈哈哈哈哈哈哈哈哈哈哈", CFG) == "repetitive"  # six times "哈哈"
    assert degenerate_reason("好的好的", CFG) == "too_short"
    assert degenerate_reason("什么什么", CFG.model_copy(update={"min_input_chars": 1})) == "too_few_words"
    long_zh = "请" * 151  # width 302 > 300
    assert degenerate_reason(long_zh, CFG) == "too_long"


def test_cjk_near_duplicates_are_caught_on_character_shingles():
    pool = InputPool(CFG, [])
    assert pool.add("今天天气怎么样？我想去公园。", "gen")
    assert not pool.add("今天天气怎么样啊？我想去公园。", "gen")
    assert pool.add("明天要下雨吗？需要带伞吗？", "gen")
    assert pool.dropped == Counter({"near_duplicate": 1})
    assert "今 天" in shingles(normalise("今天天气"))


# ------------------------------------------------------------------------------------------
# English: exactly the old filter (the code before issue 16, copied here as the reference).

def _old_normalise(s: str) -> str:
    return re.sub(r"[^\w]+", " ", s.lower()).strip()


def _old_reason(s: str, cfg: SynthConfig) -> str | None:
    if len(s) < cfg.min_input_chars:
        return "too_short"
    if len(s) > cfg.max_input_chars:
        return "too_long"
    if sum(ch.isalpha() for ch in s) < 0.5 * len(s):
        return "not_text"
    ws = _old_normalise(s).split()
    if len(ws) < 3:
        return "too_few_words"
    if len(ws) >= 6 and Counter(ws).most_common(1)[0][1] / len(ws) > 0.4:
        return "repetitive"
    if any(tok in s for tok in ("<|", "|>", "[END")):
        return "special_tokens"
    return None


def _old_shingles(key: str) -> set[str]:
    ws = key.split()
    return set(ws) | {f"{a} {b}" for a, b in zip(ws, ws[1:])}


def _english_inputs() -> list[str]:
    examples = Path(__file__).resolve().parents[1] / "examples" / "prompts"
    seeds = []
    for path in sorted(examples.glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        for entry in data if isinstance(data, list) else [data]:
            seeds += [s for s in entry.get("seed_inputs") or [] if isinstance(s, str)]
    edge = ["hi there", "ok", "12345 67890 !!!", "buy buy buy buy buy now", "Café au lait, s'il vous plaît?",
            "Naïve question: what's 2+2?", "<|im_start|> hello there friend", "x" * 400, "Under_score words_here ok",
            "Tell me   a joke\n\nabout cats", "Ça va? Très bien, merci beaucoup!", "Straße in München finden",
            "I I I I I like it", "What's the ETA for order #A-1234?"]
    from genpi.data import human_inputs

    spaced = [r["text"] for r in human_inputs() if r["lang"] not in ("zh", "ja")]
    return seeds + edge + spaced


def test_english_and_other_spaced_text_is_filtered_exactly_as_before():
    inputs = _english_inputs()
    assert len(inputs) > 70
    for s in inputs:
        assert degenerate_reason(s, CFG) == _old_reason(s, CFG), s
        assert normalise(s) == _old_normalise(s), s
        assert words(s) == tokens(s) == _old_normalise(s).split(), s
        assert shingles(normalise(s)) == _old_shingles(_old_normalise(s)), s
