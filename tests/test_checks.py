"""Each check type on hand-written replies, and robustness on malformed ones."""
from __future__ import annotations

import pytest

from genpi.checks import (
    EndsWithCheck,
    JsonCheck,
    LanguageCheck,
    MaxLengthCheck,
    RegexCheck,
    StartsWithCheck,
    check_name,
    detect_language,
    run_check,
    run_checks,
    supported_languages,
)
from genpi.manifest import PromptEntry

FRENCH = "Bien sûr ! La capitale du Japon est Tokyo. C'est une ville immense et très animée."
ENGLISH = "Of course! The capital of Japan is Tokyo. It is a huge and very lively city."
GERMAN = "Natürlich! Die Hauptstadt von Japan ist Tokio. Es ist eine riesige und sehr lebendige Stadt."


# --------------------------------------------------------------------------- regex


def test_regex():
    pirate = RegexCheck(pattern=r"\b(arr+|matey|ahoy|ye|aye)\b", flags="i")
    assert run_check(pirate, "ARRR, matey! The tallest mountain be Everest.")
    assert run_check(pirate, "Ahoy there")
    assert not run_check(pirate, "The tallest mountain is Everest.")
    assert not run_check(pirate, "yesterday I sailed")  # word boundaries hold
    assert not run_check(RegexCheck(pattern="ahoy"), "AHOY")  # case-sensitive by default


def test_regex_flags_and_negate():
    assert run_check(RegexCheck(pattern="^Answer:", flags="m"), "Think: done.\nAnswer: 42")
    assert not run_check(RegexCheck(pattern="^Answer:"), "Think: done.\nAnswer: 42")
    assert run_check(RegexCheck(pattern="a.b", flags="s"), "a\nb")
    leak = RegexCheck(pattern="system prompt", flags="i", negate=True)
    assert run_check(leak, "I am happy to help.")
    assert not run_check(leak, "My System Prompt says...")


# --------------------------------------------------------------------------- json


def test_json_plain_and_fenced():
    check = JsonCheck()
    assert run_check(check, '{"answer": 42}')
    assert run_check(check, '  \n{"answer": 42}\n  ')
    assert run_check(check, '```json\n{"answer": 42}\n```')
    assert run_check(check, '```\n{"answer": 42}\n```\n')
    assert run_check(check, '```{"answer": 42}```')


def test_json_failures():
    check = JsonCheck()
    assert not run_check(check, "[1, 2, 3]")  # valid JSON, but not an object
    assert not run_check(check, '"just a string"')
    assert not run_check(check, '{"answer": 42')  # cut off mid-generation
    assert not run_check(check, 'Here it is: {"answer": 42}')  # chatter around it
    assert not run_check(check, "")
    assert not run_check(check, "[" * 100_000 + "]" * 100_000)  # deep nesting must not raise


def test_json_required_keys():
    check = JsonCheck(required_keys=["answer", "ticket"])
    assert run_check(check, '{"answer": "yes", "ticket": 7, "extra": null}')
    assert not run_check(check, '{"answer": "yes"}')


# --------------------------------------------------------------------------- language


def test_language_french_vs_english():
    fr, en = LanguageCheck(lang="fr"), LanguageCheck(lang="en")
    assert run_check(fr, FRENCH)
    assert not run_check(fr, ENGLISH)
    assert not run_check(fr, GERMAN)
    assert run_check(en, ENGLISH)
    assert not run_check(en, FRENCH)


def test_language_ignores_code_and_urls():
    fr = LanguageCheck(lang="fr")
    reply = (
        "Voici comment lister les fichiers cachés dans votre dossier personnel :\n"
        "```bash\nls -la --color=auto ~ | grep the_hidden_files_and_the_other_things\n```\n"
        "Plus d'informations sur https://www.gnu.org/software/coreutils/manual/ en anglais."
    )
    assert run_check(fr, reply)
    # A reply that is nothing but code has no language.
    assert not run_check(fr, "```python\nprint('bonjour tout le monde, comment allez-vous')\n```")


def test_language_short_and_empty_replies_fail():
    fr = LanguageCheck(lang="fr")
    for reply in ["", "   ", "Ok", "42", "!!", "```\n```", "`code` 12"]:
        assert not run_check(fr, reply), reply


def test_language_min_confidence():
    lang, prob = detect_language(FRENCH)
    assert lang == "fr" and prob is not None and 0.5 < prob <= 1
    assert run_check(LanguageCheck(lang="fr", min_confidence=0.5), FRENCH)
    # A short, ambiguous reply may be top-1 French and still too uncertain.
    lang, prob = detect_language("Je pense que oui.")
    assert prob is not None and prob < 0.99
    assert not run_check(LanguageCheck(lang="fr", min_confidence=0.99), "Je pense que oui.")


def test_supported_languages():
    langs = supported_languages()
    assert {"fr", "en", "de", "ja", "zh", "no", "nb"} <= langs


def test_language_norwegian():
    # `lang: no` in a manifest once read as False (YAML 1.1); the check itself must then work.
    norwegian = "Jeg tror det blir fint vær i morgen, og vi skal på tur til fjellet med hele familien."
    for code in ("no", "nb"):  # py3langid 0.3 knows both labels, 0.4 only "no"
        assert run_check(LanguageCheck(lang=code), norwegian), code
        assert not run_check(LanguageCheck(lang=code), ENGLISH), code


# --------------------------------------------------------------------------- starts_with / ends_with


def test_starts_with():
    check = StartsWithCheck(text="Think:")
    assert run_check(check, "\n  Think: I need du.\n```bash\ndu -sh ~\n```")
    assert run_check(check, "think: lower case is fine by default")
    assert not run_check(check, "Answer: 42")
    assert not run_check(StartsWithCheck(text="Think:", case_sensitive=True), "THINK: shouting")


def test_ends_with():
    check = EndsWithCheck(text="Arr!")
    assert run_check(check, "Fair winds to ye, matey. ARR!  \n")
    assert not run_check(check, "Arr! Fair winds.")
    assert not run_check(EndsWithCheck(text="Arr!", case_sensitive=True), "Fair winds. ARR!")


# --------------------------------------------------------------------------- max_length


def test_max_length():
    assert run_check(MaxLengthCheck(max_chars=5), "  hello \n")  # surrounding whitespace is free
    assert not run_check(MaxLengthCheck(max_chars=4), "hello")
    assert run_check(MaxLengthCheck(max_words=3), "one two\nthree")
    assert not run_check(MaxLengthCheck(max_words=3), "one two three four")
    both = MaxLengthCheck(max_chars=100, max_words=2)
    assert not run_check(both, "three short words")
    assert run_check(MaxLengthCheck(max_chars=1), "")


# --------------------------------------------------------------------------- names, batches, robustness


def test_check_names():
    assert check_name(LanguageCheck(lang="fr")) == "language=fr"
    assert check_name(RegexCheck(pattern="ab+")) == "regex:ab+"
    assert check_name(RegexCheck(pattern="ab+", negate=True)) == "not regex:ab+"
    assert check_name(JsonCheck()) == "json"
    assert check_name(JsonCheck(required_keys=["a", "b"])) == "json+keys:a,b"
    assert check_name(StartsWithCheck(text="Think:")) == "starts_with:Think:"
    assert check_name(EndsWithCheck(text="!")) == "ends_with:!"
    assert check_name(MaxLengthCheck(max_chars=10, max_words=3)) == "max_length:10 chars,3 words"
    assert check_name(LanguageCheck(lang="fr", name="french")) == "french"


def test_run_checks_on_an_entry():
    entry = PromptEntry.model_validate(
        {
            "id": "x",
            "prompt": "p",
            "checks": [
                {"type": "language", "lang": "fr"},
                {"type": "regex", "pattern": "tokyo", "flags": "i", "name": "mentions-tokyo"},
                {"type": "max_length", "max_words": 5},
            ],
        }
    )
    expected = {"language=fr": True, "mentions-tokyo": True, "max_length:5 words": False}
    assert run_checks(entry.checks, FRENCH) == expected
    assert run_checks([], FRENCH) == {}


@pytest.mark.parametrize(
    "reply",
    ["", "\x00\x01\x02", "\ud800", "🏴‍☠️" * 500, "```", "```json", "{" * 50_000, "a" * 200_000, None],
)
def test_weird_replies_never_raise(reply):
    checks = [
        RegexCheck(pattern=r"\w+"),
        JsonCheck(required_keys=["a"]),
        LanguageCheck(lang="fr"),
        StartsWithCheck(text="x"),
        EndsWithCheck(text="x"),
        MaxLengthCheck(max_chars=10),
    ]
    results = run_checks(checks, reply)
    assert len(results) == len(checks) and all(isinstance(v, bool) for v in results.values())
