"""The demo's sample corpus: Japanese text in three classes, written by seeded templates.

Classes (the CSV `fileid`): 0 weather reports, 1 recipes, 2 sports results. Each class has its own
vocabulary, so a keyword classifier (`classify`) can tell generated texts apart.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

CLASS_NAMES = ("weather", "recipe", "sports")

_CITIES = ["東京", "大阪", "札幌", "福岡", "名古屋", "仙台", "広島", "那覇", "京都", "横浜", "神戸", "金沢"]
_SKIES = ["晴れ", "くもり", "雨", "雪", "晴れ時々くもり", "くもり一時雨", "雷雨"]
_WINDS = ["北の風", "南の風", "東の風", "西の風", "北西の風", "南東の風"]
_DAYS = ["今日", "明日", "あさって", "週末"]

_DISHES = ["カレー", "肉じゃが", "親子丼", "味噌汁", "オムライス", "焼きそば", "ハンバーグ", "天ぷら", "野菜炒め"]
_INGREDIENTS = ["玉ねぎ", "にんじん", "じゃがいも", "鶏肉", "豚肉", "卵", "豆腐", "キャベツ", "しょうゆ", "砂糖"]
_ACTIONS = ["切ります", "炒めます", "煮ます", "混ぜます", "焼きます", "ゆでます"]
_AMOUNTS = ["大さじ一杯", "小さじ二杯", "百グラム", "二個", "半分", "少々"]

_TEAMS = ["タイガース", "ジャイアンツ", "ホークス", "カープ", "ライオンズ", "ドラゴンズ", "マリーンズ", "イーグルス"]
_SPORT_EVENTS = ["試合", "決勝戦", "開幕戦", "練習試合"]
_PLAYS = ["本塁打", "先制点", "逆転打", "好投", "三振", "盗塁"]
_PLAYERS = ["田中", "佐藤", "鈴木", "高橋", "山本", "中村", "小林", "加藤"]


def _weather(rng: random.Random) -> str:
    city, day = rng.choice(_CITIES), rng.choice(_DAYS)
    lines = [f"{day}の{city}の天気は{rng.choice(_SKIES)}です。"]
    lines.append(f"最高気温は{rng.randint(-5, 35)}度、最低気温は{rng.randint(-10, 25)}度の予想です。")
    lines.append(f"{rng.choice(_WINDS)}がやや強く、降水確率は{rng.choice(range(0, 101, 10))}パーセントです。")
    if rng.random() < 0.5:
        lines.append(f"夜には{rng.choice(_SKIES)}となるでしょう。傘を持ってお出かけください。")
    return "\n".join(lines)


def _recipe(rng: random.Random) -> str:
    dish = rng.choice(_DISHES)
    first, second = rng.sample(_INGREDIENTS, 2)
    lines = [f"{dish}の作り方を紹介します。"]
    lines.append(f"まず{first}を{rng.choice(_AMOUNTS)}用意して{rng.choice(_ACTIONS)}。")
    lines.append(f"次に{second}を加えて{rng.randint(2, 20)}分ほど{rng.choice(_ACTIONS)}。")
    if rng.random() < 0.5:
        lines.append(f"最後に{rng.choice(_INGREDIENTS)}で味をととのえれば完成です。")
    return "\n".join(lines)


def _sports(rng: random.Random) -> str:
    home, away = rng.sample(_TEAMS, 2)
    a, b = rng.randint(0, 12), rng.randint(0, 12)
    lines = [f"{home}対{away}の{rng.choice(_SPORT_EVENTS)}は{a}対{b}で終わりました。"]
    lines.append(f"{rng.choice(_PLAYERS)}選手の{rng.choice(_PLAYS)}で{home}が流れをつかみました。")
    lines.append(f"{away}は{rng.randint(1, 9)}回に{rng.choice(_PLAYERS)}選手が{rng.choice(_PLAYS)}を決めました。")
    if rng.random() < 0.5:
        lines.append(f"次の{rng.choice(_SPORT_EVENTS)}は{rng.randint(1, 28)}日に行われます。")
    return "\n".join(lines)


_WRITERS = (_weather, _recipe, _sports)

# Keywords that only one class's templates use.
_KEYWORDS = (
    ("天気", "気温", "降水", "風", "予想", "傘", "晴れ", "くもり", "雨", "雪"),
    ("作り方", "用意", "加え", "味", "完成", "ます", "グラム", "大さじ", "小さじ") + tuple(_DISHES),
    ("対", "試合", "選手", "回", "点", "打", "決勝", "戦") + tuple(_TEAMS),
)


def write_corpus(out_dir: str | Path, docs_per_class: int = 200, seed: int = 0) -> Path:
    """Write one text file per document and `corpus.csv` (`filename,fileid`); return the CSV path."""
    out = Path(out_dir)
    (out / "texts").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for class_id, writer in enumerate(_WRITERS):
        for n in range(docs_per_class):
            path = out / "texts" / f"{CLASS_NAMES[class_id]}_{n:04d}.txt"
            path.write_text(writer(rng) + "\n", encoding="utf-8")
            rows.append((str(path.resolve()), class_id))
    csv_path = out / "corpus.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "fileid"])
        writer.writerows(rows)
    return csv_path


def classify(text: str) -> int:
    """The class whose keywords occur most often in `text` (ties: the lowest class id); -1 if none occur."""
    counts = [sum(text.count(word) for word in words) for words in _KEYWORDS]
    best = max(counts)
    return counts.index(best) if best > 0 else -1
