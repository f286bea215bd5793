#!/usr/bin/env python3
"""Build the small real-text corpus in data/corpus/ (stdlib only, deterministic).

    python data/build_corpus.py            # rewrites data/corpus/*.jsonl and SOURCES.md

Sources (all present on the build machine, nothing is downloaded):
  * prose_code   - ``pydoc_data.topics`` (Python's own reference text, English prose with
                   code) and a fixed list of CPython standard-library ``.py`` files.
  * multilingual - gettext message catalogues ``/usr/share/locale/<lang>/LC_MESSAGES/*.mo``
                   installed by Debian packages (coreutils, grep, glib, gtk, apt, dpkg, ...);
                   several translated messages of one catalogue+language form one document.
                   A few accented-Latin documents are stored NFD-decomposed (``"nfc": false``).
  * numeric      - generated with a seeded ``random.Random`` in realistic formats (invoices,
                   tables, exact arithmetic, long digit runs, dates, phone-like numbers,
                   scientific notation, digits of pi / e / sqrt(2) computed with ``decimal``).
  * chat         - chat conversations assembled from the same real text (Python questions
                   answered with pydoc topic text, translation Q/A from the catalogues, exact
                   arithmetic); also flattened to plain text as category ``chat``.

The outputs depend only on the Python version (3.11.7 here: pydoc topics + stdlib files)
and on the installed .mo files; the committed corpus files are the reference copy.
The train/heldout split is by SHA-256 of the text (about 10% heldout).
"""
from __future__ import annotations

import decimal
import gettext
import hashlib
import json
import random
import re
import subprocess
import sys
import sysconfig
import unicodedata
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "corpus"
LOCALE_DIR = Path("/usr/share/locale")

# --------------------------------------------------------------------------- helpers


def chunk_paragraphs(text: str, lo: int = 400, hi: int = 3000) -> list[str]:
    """Split text at blank lines into pieces of about lo..hi characters."""
    paras = re.split(r"\n\s*\n", text.strip())
    out, cur = [], ""
    for p in paras:
        p = p.rstrip()
        if not p:
            continue
        if cur and len(cur) + len(p) + 2 > hi:
            out.append(cur)
            cur = ""
        if len(p) > hi:  # very long paragraph: hard split on lines
            for line in p.split("\n"):
                if cur and len(cur) + len(line) + 1 > hi:
                    out.append(cur)
                    cur = ""
                cur = f"{cur}\n{line}" if cur else line
            continue
        cur = f"{cur}\n\n{p}" if cur else p
    if cur:
        out.append(cur)
    # merge a too-short tail into its predecessor
    if len(out) > 1 and len(out[-1]) < lo:
        tail = out.pop()
        out[-1] = out[-1] + "\n\n" + tail
    return [c for c in out if len(c) >= min(lo, 200)]


def sha(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def is_heldout(key: str) -> bool:
    return int(sha(key)[:8], 16) % 10 == 0


def record(text: str, source: str, category: str, **extra) -> dict:
    text.encode("utf-8")  # must be valid UTF-8 (no lone surrogates)
    rec = {"text": text, "source": source, "category": category}
    if not unicodedata.is_normalized("NFC", text):
        rec["nfc"] = False
    rec.update(extra)
    return rec


def dpkg_owner(path: Path) -> str:
    try:
        out = subprocess.run(["dpkg", "-S", str(path)], capture_output=True, text=True, check=False)
        if out.returncode == 0 and ":" in out.stdout:
            return out.stdout.split(":", 1)[0].strip()
    except OSError:
        pass
    return "unknown"


def dpkg_version(pkg: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg],
                             capture_output=True, text=True, check=False)
        if out.returncode == 0:
            return out.stdout.strip()
    except OSError:
        pass
    return "unknown"


def debian_license(pkg: str) -> str:
    p = Path("/usr/share/doc") / pkg / "copyright"
    try:
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("License:"):
                return line.split(":", 1)[1].strip() or "see " + str(p)
    except OSError:
        return "unknown"
    return "see " + str(p)


# --------------------------------------------------------------------------- prose + code

PYDOC_MAX_CHARS = 600_000
STDLIB_FILES = [
    "json/decoder.py", "json/encoder.py", "textwrap.py", "heapq.py", "bisect.py",
    "fractions.py", "statistics.py", "string.py", "shlex.py", "difflib.py",
    "functools.py", "dataclasses.py", "csv.py", "base64.py", "colorsys.py",
    "calendar.py", "pprint.py", "queue.py", "glob.py", "fnmatch.py",
]
STDLIB_MAX_CHARS_PER_FILE = 14_000


def build_prose_code() -> list[dict]:
    from pydoc_data import topics as pydoc_topics

    recs = []
    total = 0
    for name in sorted(pydoc_topics.topics):
        for i, chunk in enumerate(chunk_paragraphs(pydoc_topics.topics[name], 400, 3000)):
            if total >= PYDOC_MAX_CHARS:
                break
            recs.append(record(chunk, f"pydoc_data.topics:{name}#{i}", "prose_code"))
            total += len(chunk)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for rel in STDLIB_FILES:
        src = (stdlib / rel).read_text(encoding="utf-8")[:STDLIB_MAX_CHARS_PER_FILE]
        for i, chunk in enumerate(chunk_paragraphs(src, 400, 2500)):
            recs.append(record(chunk, f"cpython-{sys.version.split()[0]}:Lib/{rel}#{i}", "prose_code"))
    return recs


# --------------------------------------------------------------------------- multilingual

LANGS = ["zh_CN", "zh_TW", "ja", "ko", "ru", "uk", "ar", "he", "el", "hi", "th",
         "fr", "de", "es", "pt_BR", "vi", "pl", "tr"]
LANG_NAMES = {
    "zh_CN": "Simplified Chinese", "zh_TW": "Traditional Chinese", "ja": "Japanese",
    "ko": "Korean", "ru": "Russian", "uk": "Ukrainian", "ar": "Arabic", "he": "Hebrew",
    "el": "Greek", "hi": "Hindi", "th": "Thai", "fr": "French", "de": "German",
    "es": "Spanish", "pt_BR": "Brazilian Portuguese", "vi": "Vietnamese", "pl": "Polish",
    "tr": "Turkish",
}
DOMAIN_PREF = ["coreutils", "grep", "glib20", "gtk20", "apt", "dpkg", "bash", "gettext-tools",
               "findutils", "diffutils", "PackageKit", "Linux-PAM", "at-spi2-core",
               "gdk-pixbuf", "shared-mime-info", "software-properties", "gsettings-desktop-schemas",
               "iso_3166-1", "iso_639-2"]
DOMAINS_PER_LANG = 4
LANG_BYTES = 36_000           # UTF-8 bytes of multilingual text per language
NFD_LANGS = {"fr", "de", "vi", "pt_BR"}   # first document of these is stored NFD
MIN_MSG_CHARS = 12


def read_catalog(path: Path) -> list[tuple[str, str]]:
    """(msgid, msgstr) pairs of a .mo file, header and untranslated entries dropped."""
    with open(path, "rb") as fh:
        cat = gettext.GNUTranslations(fh)._catalog  # noqa: SLF001 - stdlib parser
    pairs = {}
    for key, val in cat.items():
        if isinstance(key, tuple):  # plural: (msgid, index); keep form 0
            if key[1] != 0:
                continue
            key = key[0]
        if not key or not val or val == key:
            continue
        msgid = key.split("\x00")[-1]  # drop gettext plural tail / keep singular
        msgid = msgid.split("\x04")[-1]  # drop msgctxt
        pairs[msgid] = val
    return sorted(pairs.items())


def usable(msgid: str, msgstr: str) -> bool:
    s = msgstr.strip()
    return (len(s) >= MIN_MSG_CHARS and "\ufffd" not in s and not s.startswith("Content-Type")
            and len(s) <= 1500)


def build_multilingual() -> tuple[list[dict], dict, dict]:
    recs, pairs_by_lang, files_used = [], {}, {}
    for lang in LANGS:
        d = LOCALE_DIR / lang / "LC_MESSAGES"
        if not d.is_dir():
            continue
        domains = [x for x in DOMAIN_PREF if (d / f"{x}.mo").is_file()][:DOMAINS_PER_LANG]
        if not domains:
            continue
        per_domain = LANG_BYTES // len(domains)
        lang_pairs = []
        nfd_done = lang not in NFD_LANGS
        for dom in domains:
            path = d / f"{dom}.mo"
            pairs = [(i, s.strip()) for i, s in read_catalog(path) if usable(i, s)]
            random.Random(f"{lang}/{dom}").shuffle(pairs)
            used, budget, doc, docs = 0, per_domain, [], []
            for msgid, msgstr in pairs:
                if used >= budget:
                    break
                doc.append(msgstr)
                lang_pairs.append((msgid, msgstr, str(path)))
                used += len(msgstr.encode("utf-8")) + 1
                if sum(len(x) + 1 for x in doc) >= (600 if lang in ("zh_CN", "zh_TW", "ja", "ko") else 1500):
                    docs.append("\n".join(doc))
                    doc = []
            if doc and sum(len(x) for x in doc) >= 200:
                docs.append("\n".join(doc))
            for i, text in enumerate(docs):
                if not nfd_done and any(unicodedata.decomposition(c) for c in text):
                    text = unicodedata.normalize("NFD", text)
                    nfd_done = True
                recs.append(record(text, f"{path}#{i}", "multilingual", lang=lang))
            files_used[str(path)] = len(docs)
        pairs_by_lang[lang] = lang_pairs
    return recs, pairs_by_lang, files_used


# --------------------------------------------------------------------------- numeric


def pi_digits(n: int) -> str:
    decimal.getcontext().prec = n + 10
    D = decimal.Decimal

    def arctan_inv(x: int) -> decimal.Decimal:
        x2, term, total, k, sign = x * x, D(1) / x, D(0), 1, 1
        while term != 0:
            total += sign * term / k
            term /= x2
            k += 2
            sign = -sign
        return total

    pi = 4 * (4 * arctan_inv(5) - arctan_inv(239))
    return str(pi)[: n + 2]


def e_digits(n: int) -> str:
    decimal.getcontext().prec = n + 10
    e, term, k = decimal.Decimal(1), decimal.Decimal(1), 1
    while term > decimal.Decimal(10) ** -(n + 5):
        term /= k
        e += term
        k += 1
    return str(e)[: n + 2]


def sqrt2_digits(n: int) -> str:
    decimal.getcontext().prec = n + 10
    return str(decimal.Decimal(2).sqrt())[: n + 2]


def fmt_money(x: int) -> str:  # x in cents
    return f"{x // 100:,}.{x % 100:02d}"


def gen_invoice(r: random.Random, i: int) -> str:
    items = ["Steel bolts M8x40", "Copper wire 2.5 mm2", "LED panel 60x60", "Thermal paste 5 g",
             "USB-C cable 2 m", "Server rack 42U", "SSD 1.92 TB", "Cat6 patch cord 3 m",
             "Power supply 750 W", "Label printer ribbon", "Office chair", "A4 paper (500 sheets)"]
    lines = [f"INVOICE No. {r.randint(2019, 2025)}-{r.randint(1, 99999):05d}",
             f"Date: {r.randint(2019, 2025)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
             f"Customer ID: {r.randint(10**7, 10**8 - 1)}    VAT ID: DE{r.randint(10**8, 10**9 - 1)}", "",
             f"{'Qty':>5}  {'Item':<26}{'Unit price':>14}{'Amount':>16}"]
    subtotal = 0
    for _ in range(r.randint(4, 9)):
        q = r.randint(1, 250)
        unit = r.randint(15, 250_000)
        amt = q * unit
        subtotal += amt
        lines.append(f"{q:>5}  {r.choice(items):<26}{fmt_money(unit):>14}{fmt_money(amt):>16}")
    rate = r.choice([7, 10, 19, 20, 21])
    tax = (subtotal * rate + 50) // 100
    lines += ["", f"{'Subtotal':>45}{fmt_money(subtotal):>16}",
              f"{f'VAT {rate}%':>45}{fmt_money(tax):>16}",
              f"{'TOTAL':>45}{fmt_money(subtotal + tax):>16}",
              f"IBAN: DE{r.randint(10, 99)} {r.randint(1000, 9999)} {r.randint(1000, 9999)} "
              f"{r.randint(1000, 9999)} {r.randint(1000, 9999)} {r.randint(10, 99)}",
              f"Payment due within {r.choice([14, 30, 60])} days."]
    return "\n".join(lines)


def gen_table(r: random.Random, i: int) -> str:
    kind = r.choice(["population", "revenue", "measurements"])
    if kind == "population":
        head = "Year | Population | Change | Growth (%)"
        pop = r.randint(100_000, 90_000_000)
        rows = [head, "-----|------------|--------|-----------"]
        for y in range(r.randint(1990, 2005), r.randint(2015, 2024)):
            ch = int(pop * r.uniform(-0.01, 0.03))
            rows.append(f"{y} | {pop + ch:,} | {ch:+,} | {100 * ch / pop:.2f}")
            pop += ch
        return "\n".join(rows)
    if kind == "revenue":
        rows = ["Quarter,Revenue (USD),Cost (USD),Margin,Units"]
        for y in range(r.randint(2016, 2020), 2025):
            for q in range(1, 5):
                rev = r.randint(10**6, 10**9)
                cost = int(rev * r.uniform(0.4, 0.95))
                rows.append(f"{y}-Q{q},{rev},{cost},{(rev - cost) / rev:.4f},{r.randint(100, 10**6)}")
        return "\n".join(rows)
    rows = ["sample_id\ttemp_C\tpressure_hPa\tvoltage_V\tcurrent_mA"]
    for k in range(r.randint(20, 45)):
        rows.append(f"S{i:03d}-{k:04d}\t{r.gauss(21.5, 4):.3f}\t{r.gauss(1013.25, 8):.2f}\t"
                    f"{r.uniform(3.1, 3.5):.4f}\t{r.expovariate(1 / 120):.1f}")
    return "\n".join(rows)


def gen_arith(r: random.Random, i: int) -> str:
    out = []
    for _ in range(r.randint(12, 25)):
        op = r.choice("+-*/^%")
        a, b = r.randint(0, 10 ** r.randint(1, 18)), r.randint(1, 10 ** r.randint(1, 12))
        if op == "+":
            out.append(f"{a} + {b} = {a + b}")
        elif op == "-":
            out.append(f"{a} - {b} = {a - b}")
        elif op == "*":
            out.append(f"{a} * {b} = {a * b}")
        elif op == "/":
            q, rem = divmod(a, b)
            out.append(f"{a} / {b} = {q} remainder {rem}")
        elif op == "^":
            base, ex = r.randint(2, 99), r.randint(2, 30)
            out.append(f"{base}^{ex} = {base ** ex}")
        else:
            x, y = r.randint(1, 9999) / 100, r.randint(1, 9999) / 100
            out.append(f"{x:.2f} * {y:.2f} = {decimal.Decimal(str(x)) * decimal.Decimal(str(y))}")
    return "\n".join(out)


def gen_misc(r: random.Random, i: int) -> str:
    months = ["January", "February", "March", "April", "May", "June", "July", "August",
              "September", "October", "November", "December"]
    out = []
    for _ in range(r.randint(15, 30)):
        k = r.randrange(7)
        if k == 0:
            y, m, d = r.randint(1900, 2099), r.randint(1, 12), r.randint(1, 28)
            out.append(f"{y}-{m:02d}-{d:02d} | {d:02d}/{m:02d}/{y} | {months[m - 1]} {d}, {y} | "
                       f"{y}{m:02d}{d:02d}T{r.randint(0, 23):02d}{r.randint(0, 59):02d}{r.randint(0, 59):02d}Z")
        elif k == 1:
            out.append(f"+{r.randint(1, 99)} ({r.randint(100, 999)}) {r.randint(100, 999)}-{r.randint(1000, 9999)}"
                       f"   ext. {r.randint(10, 9999)}")
        elif k == 2:
            out.append("".join(str(r.randint(0, 9)) for _ in range(r.randint(16, 64))))
        elif k == 3:
            out.append(f"{r.uniform(1, 10):.6e}  {r.uniform(-10, 10):.3E}  {r.uniform(1, 10):.4f}e-{r.randint(1, 300)}")
        elif k == 4:
            out.append(f"order #{r.randint(10**9, 10**12)} shipped {r.randint(1, 999)} units @ "
                       f"${r.randint(1, 9999)}.{r.randint(0, 99):02d} (lot {r.randint(1000, 9999)}-{r.randint(10, 99)})")
        elif k == 5:
            ip = ".".join(str(r.randint(0, 255)) for _ in range(4))
            out.append(f"{ip}:{r.randint(1024, 65535)} latency={r.uniform(0.1, 900):.3f}ms bytes={r.randint(0, 10**10)}")
        else:
            n = r.randint(2, 10**9)
            out.append(f"{n:,} = {n:_} = 0x{n:X} = 0o{n:o} = {n:.3e}")
    return "\n".join(out)


def build_numeric() -> list[dict]:
    r = random.Random(20240917)
    recs = [
        record("The first 2000 decimal digits of pi (Machin's formula):\n" + pi_digits(2000),
               "generated:numeric:pi_digits", "numeric"),
        record("Euler's number e to 1500 digits:\n" + e_digits(1500), "generated:numeric:e_digits", "numeric"),
        record("The square root of 2 to 1500 digits:\n" + sqrt2_digits(1500), "generated:numeric:sqrt2_digits", "numeric"),
        record("Powers of two:\n" + "\n".join(f"2^{k} = {2 ** k}" for k in range(0, 200, 3)),
               "generated:numeric:powers_of_two", "numeric"),
        record("Factorials:\n" + "\n".join(f"{k}! = {__import__('math').factorial(k)}" for k in range(1, 61)),
               "generated:numeric:factorials", "numeric"),
        record("Counting: " + " ".join(str(k) for k in range(1, 400)) + "\n12345678901234567890 "
               "98765432109876543210 11111111111111111111 10000000000000000000000",
               "generated:numeric:counting", "numeric"),
    ]
    gens = [("invoice", gen_invoice), ("table", gen_table), ("arithmetic", gen_arith), ("mixed", gen_misc)]
    for i in range(140):
        name, g = gens[i % len(gens)]
        recs.append(record(g(r, i), f"generated:numeric:{name}#{i}", "numeric"))
    return recs


# --------------------------------------------------------------------------- chat

PY_QUESTIONS = [
    "Can you explain how {t} works in Python?",
    "What does the Python reference say about {t}?",
    "I'm confused by {t} in Python. Could you walk me through it?",
    "Explain {t} (Python language reference), please.",
    "How do I use {t} in Python?",
]
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a precise Python tutor. Quote the official documentation when you can.",
    "You are a translation assistant for software user interfaces.",
    None,
]
EMOJI_TURNS = [
    ("Thanks, that helps a lot! 🙏", "You're welcome! 😊 Happy coding 🐍"),
    ("Great 👍 one more question 🤔", "Sure 🙂 go ahead!"),
    ("🎉 It finally works!", "Nice! 🚀 Glad to hear it."),
]


def first_part(text: str, limit: int) -> str:
    parts = chunk_paragraphs(text, 200, limit)
    return parts[0] if parts else text[:limit]


def build_chat(pairs_by_lang: dict) -> list[dict]:
    from pydoc_data import topics as pydoc_topics

    r = random.Random(7)
    chats = []
    names = sorted(pydoc_topics.topics)
    for n, name in enumerate(names):
        text = pydoc_topics.topics[name]
        parts = chunk_paragraphs(text, 200, 1500)
        if not parts:
            continue
        sys_p = SYSTEM_PROMPTS[n % 2]
        msgs = [{"role": "system", "content": sys_p}] if n % 3 else []
        topic = name.replace("-", " ")
        msgs += [{"role": "user", "content": PY_QUESTIONS[n % len(PY_QUESTIONS)].format(t=f"'{topic}'")},
                 {"role": "assistant", "content": parts[0]}]
        if len(parts) > 1 and n % 2 == 0:
            msgs += [{"role": "user", "content": "Please continue."},
                     {"role": "assistant", "content": parts[1]}]
        if n % 25 == 0 and len(msgs) <= 4:
            u, a = EMOJI_TURNS[(n // 25) % len(EMOJI_TURNS)]
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        chats.append({"messages": msgs, "source": f"pydoc_data.topics:{name}"})

    # translation Q/A from the gettext catalogues
    nfd_left = 2
    for lang in sorted(pairs_by_lang):
        pairs = pairs_by_lang[lang]
        lname = LANG_NAMES[lang]
        rr = random.Random(f"chat/{lang}")
        idx = list(range(len(pairs)))
        rr.shuffle(idx)
        for c in range(min(10, len(idx) // 3)):
            trio = [pairs[j] for j in idx[3 * c: 3 * c + 3]]
            msgs = [{"role": "system", "content": SYSTEM_PROMPTS[2]}] if c % 2 == 0 else []
            for k, (msgid, msgstr, _path) in enumerate(trio[:2]):
                if (c + k) % 2 == 0:
                    msgs += [{"role": "user", "content": f"How is this message translated into {lname}?\n\n{msgid}"},
                             {"role": "assistant", "content": msgstr}]
                else:
                    msgs += [{"role": "user", "content": f"What does this {lname} message mean in English?\n\n{msgstr}"},
                             {"role": "assistant", "content": msgid}]
            if lang in NFD_LANGS and nfd_left and c == 1:
                msgs = [dict(m, content=unicodedata.normalize("NFD", m["content"])) for m in msgs]
                nfd_left -= 1
            chats.append({"messages": msgs, "source": "; ".join(sorted({p for _, _, p in trio[:2]}))})
        if lang in ("ja", "fr", "ru"):
            u, a = EMOJI_TURNS[("ja", "fr", "ru").index(lang)]
            chats[-1]["messages"] += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]

    # exact arithmetic
    for c in range(40):
        a, b = r.randint(10**5, 10**15), r.randint(10**3, 10**12)
        op = c % 4
        if op == 0:
            q, ans = f"What is {a} × {b}?", f"{a} × {b} = {a * b}"
        elif op == 1:
            q, ans = f"Compute {a} + {b} - {b // 7}.", f"{a} + {b} = {a + b}; {a + b} - {b // 7} = {a + b - b // 7}"
        elif op == 2:
            qq, rem = divmod(a, b)
            q, ans = f"Divide {a} by {b} with remainder.", f"{a} = {b} × {qq} + {rem}, so the quotient is {qq} and the remainder is {rem}."
        else:
            x = decimal.Decimal(r.randint(1, 10**6)) / 1000
            q, ans = f"What is {x} squared, exactly?", f"{x}² = {x * x}"
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
        if c % 5 == 0:
            msgs = [{"role": "system", "content": "You are a calculator. Answer exactly."}] + msgs
        chats.append({"messages": msgs, "source": "generated:chat:arithmetic"})

    for ch in chats:
        for m in ch["messages"]:
            m["content"].encode("utf-8")
        if any(not unicodedata.is_normalized("NFC", m["content"]) for m in ch["messages"]):
            ch["nfc"] = False
        assert 2 <= len(ch["messages"]) <= 6 and ch["messages"][-1]["role"] == "assistant", ch
    return chats


def flatten_chat(ch: dict) -> str:
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in ch["messages"])


# --------------------------------------------------------------------------- main


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    prose = build_prose_code()
    multi, pairs_by_lang, mo_files = build_multilingual()
    numeric = build_numeric()
    chats = build_chat(pairs_by_lang)
    chat_text = [record(flatten_chat(c), c["source"], "chat") for c in chats]

    texts = prose + multi + numeric + chat_text
    seen, dedup = set(), []
    for rec in texts:
        if rec["text"] not in seen:
            seen.add(rec["text"])
            dedup.append(rec)
    train = [x for x in dedup if not is_heldout(x["text"])]
    held = [x for x in dedup if is_heldout(x["text"])]
    ctrain = [c for c in chats if not is_heldout(json.dumps(c["messages"], ensure_ascii=False))]
    cheld = [c for c in chats if is_heldout(json.dumps(c["messages"], ensure_ascii=False))]
    write_jsonl(OUT / "train.jsonl", train)
    write_jsonl(OUT / "heldout.jsonl", held)
    write_jsonl(OUT / "chat_train.jsonl", ctrain)
    write_jsonl(OUT / "chat_heldout.jsonl", cheld)
    write_sources(train, held, ctrain, cheld, mo_files)
    for name in ("train.jsonl", "heldout.jsonl", "chat_train.jsonl", "chat_heldout.jsonl"):
        print(f"{name}: {(OUT / name).stat().st_size:,} bytes")
    return 0


def write_sources(train, held, ctrain, cheld, mo_files) -> None:
    def stats(rows):
        c, b = Counter(), Counter()
        for x in rows:
            c[x["category"]] += 1
            b[x["category"]] += len(x["text"].encode("utf-8"))
        return c, b

    ct, bt = stats(train)
    ch, bh = stats(held)
    lines = [
        "# data/corpus: sources",
        "",
        "Generated by `python data/build_corpus.py` (stdlib only, deterministic; rewrites every file",
        "here, including this one). The committed files are the reference copy: a rebuild on another",
        "machine reproduces them only with the same Python version and the same installed `.mo` files.",
        f"Built with Python {sys.version.split()[0]} (`{sysconfig.get_paths()['stdlib']}`).",
        "",
        "## Files",
        "",
        "* `train.jsonl`, `heldout.jsonl`: one `{\"text\", \"source\", \"category\"}` object per line;",
        "  multilingual records also carry `lang`; records whose text is not NFC carry `\"nfc\": false`.",
        "* `chat_train.jsonl`, `chat_heldout.jsonl`: `{\"messages\": [{\"role\", \"content\"}, ...], \"source\"}`",
        "  with 2-6 messages (`nfc: false` where some content is NFD).",
        "* Split: SHA-256 of the text (of the JSON-dumped messages for chats); first 32 bits mod 10 == 0",
        "  goes to heldout. Exact duplicate texts are dropped.",
        "",
        "## Counts (records / UTF-8 bytes of text)",
        "",
        "| category | train | train bytes | heldout | heldout bytes |",
        "|---|---|---|---|---|",
    ]
    for cat in ("prose_code", "multilingual", "numeric", "chat"):
        lines.append(f"| {cat} | {ct[cat]} | {bt[cat]:,} | {ch[cat]} | {bh[cat]:,} |")
    lines.append(f"| **total** | {sum(ct.values())} | {sum(bt.values()):,} | {sum(ch.values())} | {sum(bh.values()):,} |")
    nfd = sum(1 for x in train + held if x.get("nfc") is False)
    emoji = sum(1 for x in train + held if re.search("[\U0001F300-\U0001FAFF]", x["text"]))
    lines += [
        "",
        f"Chat conversations: {len(ctrain)} train, {len(cheld)} heldout "
        f"({sum(1 for c in ctrain + cheld if c.get('nfc') is False)} with NFD content).",
        f"Text records with `nfc: false`: {nfd}; text records containing emoji: {emoji}.",
        "",
        "## prose_code",
        "",
        "* `pydoc_data.topics` of CPython " + sys.version.split()[0] + " (the text behind `help('topic')`,",
        "  generated from the Python documentation): topics split at blank lines into 400-3000 character",
        f"  pieces, up to {PYDOC_MAX_CHARS:,} characters in total. Licence: PSF License Version 2",
        "  (Python documentation).",
        "* CPython standard-library source files (first "
        f"{STDLIB_MAX_CHARS_PER_FILE:,} characters of each, split at blank lines): "
        + ", ".join(f"`Lib/{f}`" for f in STDLIB_FILES) + ". Licence: PSF License Version 2.",
        "",
        "## multilingual",
        "",
        "Real translations from gettext message catalogues installed on the build machine",
        "(Debian 12 packages), parsed with `gettext.GNUTranslations`. For each language up to",
        f"{DOMAINS_PER_LANG} catalogues (in the preference order {', '.join(DOMAIN_PREF[:8])}, ...);",
        f"about {LANG_BYTES:,} bytes of translated messages (msgstr, at least {MIN_MSG_CHARS} characters,",
        "seeded shuffle) per language; consecutive messages of one catalogue are joined with newlines",
        "into one document (~600 characters for CJK, ~1500 otherwise). The first document with",
        "decomposable characters of " + ", ".join(sorted(NFD_LANGS)) + " is stored NFD-normalised",
        "(`\"nfc\": false`) to exercise Qwen's NFC normaliser.",
        "",
        "| .mo file | Debian package | version | licence (from /usr/share/doc/<pkg>/copyright) | documents |",
        "|---|---|---|---|---|",
    ]
    owners = {}
    for path in sorted(p for p in mo_files if mo_files[p]):
        pkg = dpkg_owner(Path(path))
        owners.setdefault(pkg, (dpkg_version(pkg), debian_license(pkg)))
        ver, lic = owners[pkg]
        lines.append(f"| `{path}` | {pkg} | {ver} | {lic} | {mo_files[path]} |")
    lines += [
        "",
        "## numeric",
        "",
        "Generated by `build_numeric()` with `random.Random(20240917)`: invoices (exact cent arithmetic,",
        "VAT, IBAN-like numbers), tables (population, quarterly revenue CSV, TSV measurements), exact",
        "integer/decimal arithmetic (`a * b = ...`, powers, division with remainder), mixed lines",
        "(ISO/US/long dates, phone-like numbers, long digit runs, scientific notation, IP:port, hex/octal),",
        "plus pi (2000 digits, Machin's formula with `decimal`), e and sqrt(2) (1500 digits each),",
        "powers of two, factorials and a counting run. No licence restrictions (generated).",
        "",
        "## chat",
        "",
        "* Python Q/A: the user asks about a `pydoc_data.topics` topic (templated question); the",
        "  assistant answers with the first 200-1500 character piece of the topic text, and for every",
        "  second topic a \"Please continue.\" turn with the next piece. Optional system prompts.",
        "* Translation Q/A: per language up to 10 conversations of 2 question/answer pairs built from",
        "  real (msgid, msgstr) pairs of the catalogues above (English -> language or language -> English).",
        "* Exact arithmetic Q/A (seeded `random.Random(7)`), answers computed with Python integers/`decimal`.",
        "* A few conversations carry short emoji-bearing turns (written for this corpus, not real text)",
        "  and two translation conversations are NFD-normalised.",
        "* The `chat` category in `train.jsonl`/`heldout.jsonl` is the same conversations flattened as",
        "  `role: content` paragraphs.",
        "",
    ]
    (OUT / "SOURCES.md").write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
