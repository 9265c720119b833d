"""Paragraph cleaning for the demo corpus (``cptrain.demo.cleaning``): the length minimum by
script, table-of-contents lines, language ID by stopwords and by script share, CJK line joins,
code kept whole, and exact de-duplication across documents."""

from __future__ import annotations

import pytest

from cptrain.demo import cleaning as dcl
from demo.test_corpus import EN_SENTENCE, FR_SENTENCE

JA_SENTENCE = (
    "このプログラムはコマンドラインで指定されたファイルを読み、"
    "それぞれの要約を標準出力に書き出します。"
)


ZH_SENTENCE = (
    "该程序读取命令行中指定的每个文件，"
    "并将每个文件的简短摘要写到标准输出。这是一个足够长的段落。"
)


def test_min_length_depends_on_script() -> None:
    short_fr = "Le fichier est lu puis il est écrit sur la sortie standard dans tous les cas."
    assert len(short_fr) < 80
    assert dcl.clean_paragraphs(short_fr, "fr") == []
    assert dcl.clean_paragraphs(short_fr + " Voilà tout.", "fr") == [short_fr + " Voilà tout."]
    ja_short = JA_SENTENCE[:39]
    assert dcl.clean_paragraphs(ja_short, "ja") == []
    assert dcl.clean_paragraphs(JA_SENTENCE[:40], "ja") == [JA_SENTENCE[:40]]


def test_paragraphs_are_split_and_whitespace_normalised() -> None:
    raw = f"  {FR_SENTENCE}  \n\n\n{FR_SENTENCE.replace(' ', '   ')}\n \n"
    assert dcl.clean_paragraphs(raw, "fr") == [FR_SENTENCE, FR_SENTENCE]


@pytest.mark.parametrize(
    "line",
    [
        "1.2. Installation du système ........................ 12",
        "Introduction . . . . . . . . . . . . 3",
        "3.1 4.2 5.7 6 7 8 Index",
        "1. Le projet Debian 1.1. Qu'est-ce que Debian ? 1.2. Les documents 1.3. Fonctionnement",
    ],
)
def test_toc_lines_are_detected(line: str) -> None:
    assert dcl.is_toc_line(line)


@pytest.mark.parametrize(
    "line", [FR_SENTENCE, "Debian 11 was released in 2021 with Linux 5.10 and 59551 packages.",
             "Copy 3 files, then 2 Folders."],
)
def test_prose_is_not_a_toc_line(line: str) -> None:
    assert not dcl.is_toc_line(line)


def test_toc_lines_are_dropped_inside_a_paragraph() -> None:
    raw = f"Sommaire .......................... 4\n{FR_SENTENCE}"
    assert dcl.clean_paragraphs(raw, "fr") == [FR_SENTENCE]


def test_deduplicator_keeps_first_copy_across_documents() -> None:
    dedup = dcl.Deduplicator()
    assert dedup.keep(["a", "b", "a"]) == ["a", "b"]
    assert dedup.keep(["b", "c"]) == ["c"]


def test_language_id_keeps_french_and_drops_english_in_fr() -> None:
    raw = f"{FR_SENTENCE}\n\n{EN_SENTENCE}"
    assert dcl.clean_paragraphs(raw, "fr") == [FR_SENTENCE]
    assert dcl.clean_paragraphs(raw, "en") == [EN_SENTENCE]


def test_language_id_for_spanish_and_german_against_english() -> None:
    es = ("El programa lee cada archivo que se nombra en la línea de órdenes y escribe un "
          "resumen breve de cada uno en la salida estándar.")
    de = ("Das Programm liest jede Datei, die auf der Befehlszeile genannt wird, und schreibt "
          "eine kurze Zusammenfassung auf die Standardausgabe.")
    assert dcl.is_language(es, "es") and not dcl.is_language(es, "en")
    assert dcl.is_language(de, "de") and not dcl.is_language(de, "en")
    assert not dcl.is_language(EN_SENTENCE, "es") and not dcl.is_language(EN_SENTENCE, "de")


def test_language_id_drops_code_without_function_words() -> None:
    code = "struct stat sb;\nint fd = open(path, O_RDONLY);\nfstat(fd, &sb);\nclose(fd);"
    assert not dcl.is_language(code, "en")


def test_script_share_for_japanese_chinese_and_arabic() -> None:
    assert dcl.script_share(JA_SENTENCE, "ja") > 0.9
    assert dcl.script_share(EN_SENTENCE, "ja") == 0.0
    # Chinese has no kana, so it is not Japanese; Japanese has kana, so it is not Chinese.
    assert dcl.script_share(ZH_SENTENCE, "ja") == 0.0
    assert dcl.script_share(JA_SENTENCE, "zh") == 0.0
    assert dcl.script_share(ZH_SENTENCE, "zh") > 0.9
    arabic = "يمكن إيقاف أو إعادة تشغيل الخدمة من سطر الأوامر باستخدام الأمر systemctl."
    assert dcl.script_share(arabic, "ar") > 0.8
    mixed = f"{JA_SENTENCE} apt-get install foo"
    assert 0.5 < dcl.script_share(mixed, "ja") < 1.0
    raw = f"{JA_SENTENCE}\n\n{EN_SENTENCE}"
    assert dcl.clean_paragraphs(raw, "ja") == [JA_SENTENCE]


def test_cjk_line_join_spaces_are_removed() -> None:
    assert dcl.normalize_paragraph("ファイルを 読み、 それぞれ", "ja") == "ファイルを読み、それぞれ"
    assert dcl.normalize_paragraph("read the file", "ja") == "read the file"


def test_code_is_kept_whole_above_min_bytes() -> None:
    big = "def f():\n\n    return 1\n" * 20
    assert dcl.clean_code(big) == [big]
    assert dcl.clean_code("x = 1\n") == []
