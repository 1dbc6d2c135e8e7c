#!/usr/bin/env python3
"""Reference tokenizer cases from the Python `tokenizers` package, for spec/tokenizer_spec.lua.

    pip install tokenizers
    python3 tools/make_tokenizer_cases.py                      # -> spec/fixtures/tokenizer_cases.jsonl
    python3 tools/make_tokenizer_cases.py --random 2000 --out /tmp/fuzz.jsonl   # a bigger fuzz set

For each tokenizer under ../shared/tokenizers (qwen3, llama3, deepseek_v3, sp32k) it writes
  {"tokenizer", "text", "add_special_tokens", "ids"}                     encode cases
  {"tokenizer", "ids", "skip_special_tokens", "decoded"}                 decode cases
  {"tokenizer", "batch", "add_special_tokens", "ids"}                    encode_batch cases
covering Unicode scripts, emoji, CJK, numbers, whitespace runs, special tokens inside text and code,
plus seeded random mixes of all of those. Small synthetic tokenizers, trained here by the package
and stored inline as {"tokenizer_name", "tokenizer_json"} lines, cover what the four real files do
not use (single_word/lstrip/rstrip, normalized added tokens, subword prefix/suffix, Metaspace
"first", split behaviours, other normalizers, decoders and post-processors). It also re-checks ../shared/tokenizers/cases.jsonl and
prints any case the package disagrees with.
"""
import argparse
import json
import os
import random
import sys

from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors, trainers)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, '..', 'shared', 'tokenizers')
NAMES = ['qwen3', 'llama3', 'deepseek_v3', 'sp32k']

FIXED = [
    # Unicode scripts and normalization
    'naïve café résumé Ångström', 'e\u0301 vs \u00e9, A\u030a vs \u00c5', 'ﬁ ﬂ ＡＢＣ ① ²³ ㎏',
    'Привет, мир! Ελληνικά γλώσσα', 'مرحبا بالعالم', 'עברית ועוד', 'हिन्दी भाषा', 'ภาษาไทย ดี',
    'İstanbul ıi ß ẞ Σίσυφος', 'ǅ ǈ ǋ', 'Z\u0351\u0354a\u0315l\u0360go',
    # emoji
    '😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇨🇳🇺🇸 ❤️ 🏳️‍🌈', 'I ❤ 🍕!', '🤖🦾  🧠',
    # CJK
    '你好，世界！今天天气很好。', '日本語のテキスト、カタカナとひらがな。', '한국어 텍스트입니다', '中文English混合123',
    # numbers
    '1234567890', '3.14159 2.71828 -42 +7 1e-5 0x7fffffff', '١٢٣ ٤٥٦ ௧௨௩ 𝟙𝟚𝟛', '12,345,678.90 $100 50%',
    # whitespace runs
    '   leading', 'trailing   ', 'a  b   c    d', '\t\ttabs\t', 'line1\nline2\r\nline3\n\n\n',
    '\u00a0nbsp\u2003em\u3000ideo', ' \n \n ', '\u2028\u2029\u0085x', 'a\u180eb', '', ' ', '\n',
    # contractions and case
    "I'm you're he's we've they'll I'd it's", "DON'T WON'T I'M", "'s 'S 'LL 'Ll",
    # code
    'def f(x):\n    return x * 2  # double\n', 'for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}',
    '<html><body class="x">hi</body></html>', 'SELECT * FROM t WHERE id = 42;', '{"key": [1, 2, {"a": null}]}',
    'snake_case camelCase PascalCase kebab-case SCREAMING_CASE', 'https://example.com/path?q=1&r=2#frag',
]

RANGES = [
    (0x20, 0x7E), (0xA0, 0x17F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x5FF), (0x600, 0x6FF),
    (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF), (0x2000, 0x206F), (0x2190, 0x23FF),
    (0x2500, 0x27BF), (0x3000, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xF900, 0xFAFF),
    (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF), (0x20000, 0x2A6DF), (0x300, 0x36F),
]
WORDS = ['the', 'The', 'THE', 'hello', 'world', 'tokenizer', 'don\'t', "it's", 'naïve', 'Zürich', 'données',
         'München', '東京', '北京', 'Москва', 'αβγ', 'x', 'foo_bar', 'fooBar', 'antidisestablishmentarianism']
SPACES = [' ', '  ', '   ', '\t', '\n', '\r\n', '\n\n', ' \n', '\u00a0', '\u3000', '\u2009', '        ']
PUNCT = ['.', ',', '!', '?', '...', '!!!', '—', '–', '-', '"', "'", '(', ')', '[', ']', '{', '}', '«', '»', '“', '”',
         '::', '->', '=>', '==', '+=', '//', '/*', '*/', '#', '@', '$', '%', '^', '&', '*', '~', '`', '|', '\\']


def random_char(rng):
    lo, hi = rng.choice(RANGES)
    while True:
        cp = rng.randint(lo, hi)
        if not 0xD800 <= cp <= 0xDFFF:
            return chr(cp)


def random_text(rng, specials):
    parts = []
    for _ in range(rng.randint(1, 12)):
        r = rng.random()
        if r < 0.25:
            parts.append(rng.choice(WORDS))
        elif r < 0.4:
            parts.append(rng.choice(SPACES))
        elif r < 0.5:
            parts.append(rng.choice(PUNCT))
        elif r < 0.6:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 12))))
        elif r < 0.7 and specials:
            s = rng.choice(specials)
            parts.append(s if rng.random() < 0.8 else s[:rng.randint(1, max(1, len(s) - 1))])
        else:
            parts.append(''.join(random_char(rng) for _ in range(rng.randint(1, 6))))
    return ''.join(parts)


CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello WORLD!", "naïve café résumé 12345 67.89",
          "don't stop-believing; it's 2024-01-01", "tokenizers are fun   and   fast", "Ünïcödé çharacters ärë fün",
          "mask the [MASK] token", "x-y-z 1-2-3 a--b"] * 10


def synthetic():
    """(name, tokenizer) pairs built with the package's own classes and trainer."""
    out = []
    # 1: WordPiece-like BPE with prefix and suffix, lowercasing + accent stripping, punctuation/digit
    # splits, word-bounded / stripping added tokens, a normalized added token, [CLS] A [SEP]
    t = Tokenizer(models.BPE(unk_token='[UNK]', continuing_subword_prefix='##', end_of_word_suffix='</w>'))
    t.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                               pre_tokenizers.Digits(individual_digits=True)])
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=['[UNK]', '[CLS]', '[SEP]'],
                                                      continuing_subword_prefix='##', end_of_word_suffix='</w>'))
    t.add_special_tokens([AddedToken('[MASK]', lstrip=True, rstrip=True, single_word=False, normalized=False),
                          AddedToken('<w>', single_word=True, normalized=False)])
    t.add_tokens([AddedToken('Hello World', normalized=True), AddedToken('brown', single_word=True, normalized=False)])
    t.post_processor = processors.TemplateProcessing(single='[CLS] $A [SEP]', special_tokens=[('[CLS]', 1), ('[SEP]', 2)])
    t.decoder = decoders.BPEDecoder(suffix='</w>')
    out.append(('syn_prefix_suffix', t))
    # 2: SentencePiece-like: Metaspace (prepend first), byte fallback without unk fusing, regex Replace
    t = Tokenizer(models.BPE(unk_token='<unk>', byte_fallback=True, fuse_unk=False))
    t.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r'\s+'), ' '), normalizers.NFKC()])
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement='\u2581', prepend_scheme='first', split=True)
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=160, special_tokens=['<unk>', '<s>', '</s>'],
                                                      limit_alphabet=40))
    spec = json.loads(t.to_str())   # give the model its <0xNN> byte tokens (plain vocabulary entries)
    vocab = spec['model']['vocab']
    for b in range(256):
        vocab.setdefault('<0x%02X>' % b, len(vocab))
    t = Tokenizer.from_str(json.dumps(spec))
    t.add_special_tokens([AddedToken('<sep>', rstrip=True, normalized=False), AddedToken('<s>', normalized=False)])
    t.post_processor = processors.BertProcessing(('</s>', 2), ('<s>', 1))
    t.decoder = decoders.Sequence([decoders.Metaspace(replacement='\u2581', prepend_scheme='first'),
                                   decoders.ByteFallback(), decoders.Fuse()])
    out.append(('syn_metaspace', t))
    # 3: GPT-2 byte level with prefix space and its own regex, after splits with every behaviour
    t = Tokenizer(models.BPE())
    t.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Strip(left=False, right=True)])
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r'\d+'), 'merged_with_next'),
        pre_tokenizers.Split('-', 'contiguous'),
        pre_tokenizers.Split(Regex(r'[,;]'), 'merged_with_previous'),
        pre_tokenizers.Split(Regex(r'\p{Lu}'), 'isolated', invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)])
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.add_special_tokens(['<|end|>'])
    t.post_processor = processors.ByteLevel(trim_offsets=False)
    t.decoder = decoders.ByteLevel()
    out.append(('syn_byte_level', t))
    # 4: the same with truncation (from the left) and padding (to a multiple of 4, on the left) in the file
    t = Tokenizer.from_str(t.to_str())
    t.post_processor = processors.TemplateProcessing(single='<|end|> $A <|end|>', special_tokens=[('<|end|>', 300)])
    t.enable_truncation(max_length=9, direction='left')
    t.enable_padding(direction='left', pad_id=7, pad_token='<pad>', pad_to_multiple_of=4)
    out.append(('syn_trunc_pad', t))
    return out


SYN_TEXTS = ['Hello World, hello world!', 'The [MASK] token   [MASK]  here', 'a<w>b <w> c', 'brownie brown  brown.',
             'naïve CAFÉ 2024-01-01 x--y,z;', 'unknown ☃ snowman ⛄ 𝄞', '  spaced   out  text  ', '<sep>  a<sep>b <s>c',
             'Hello  World', 'ｆｕｌｌｗｉｄｔｈ ①②', 'dash-dash--dash---x', 'CamelCaseWordsHere', '', '<|end|>x<|end|>']


def load(name):
    return Tokenizer.from_file(os.path.join(SHARED, name, 'tokenizer.json'))


def check_shared_cases(toks):
    path = os.path.join(SHARED, 'cases.jsonl')
    bad = 0
    with open(path, encoding='utf-8') as f:
        for line in f:
            c = json.loads(line)
            ids = toks[c['tokenizer']].encode(c['text'], add_special_tokens=c['add_special_tokens']).ids
            if ids != c['ids']:
                bad += 1
                print('disagrees with cases.jsonl:', c['tokenizer'], repr(c['text']), ids, c['ids'])
    print(f'{path}: the package disagrees with {bad} case(s)', file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default=os.path.join(ROOT, 'spec', 'fixtures', 'tokenizer_cases.jsonl'))
    ap.add_argument('--random', type=int, default=8, help='random texts per tokenizer')
    ap.add_argument('--fixed', type=int, default=len(FIXED), help='fixed texts per tokenizer (a sample)')
    ap.add_argument('--decode', type=int, default=4, help='decode cases per tokenizer')
    ap.add_argument('--seed', type=int, default=1234)
    args = ap.parse_args()

    toks = {name: load(name) for name in NAMES}
    check_shared_cases(toks)
    rng = random.Random(args.seed)
    out = []
    for name in NAMES:
        tok = toks[name]
        added = tok.get_added_tokens_decoder()
        specials = sorted({t.content for t in added.values()})
        common = ['<|im_start|>', '<|im_end|>', '<|endoftext|>', '<|begin_of_text|>', '<|eot_id|>', '<s>', '</s>',
                  '<unk>', '<｜begin▁of▁sentence｜>', '<｜end▁of▁sentence｜>']
        pick = [s for s in common if s in specials] + rng.sample(specials, min(4, len(specials)))
        texts = list(FIXED[:args.fixed])
        texts += [f'{pick[0]}system\nYou are {pick[-1]} helpful.{pick[0]}\n user{pick[0]}{pick[0]}x',
                  f'  {pick[-1]}  trailing {pick[0]}', f'no{pick[0]}space{pick[-1]}end']
        texts += [random_text(rng, pick) for _ in range(args.random)]
        for i, text in enumerate(texts):
            add = (i % 3 != 1)
            out.append({'tokenizer': name, 'text': text, 'add_special_tokens': add,
                        'ids': tok.encode(text, add_special_tokens=add).ids})
        vocab_size = tok.get_vocab_size()
        for k in range(args.decode):
            if k % 2 == 0:
                ids = tok.encode(rng.choice(texts), add_special_tokens=True).ids
            else:
                ids = [rng.randrange(vocab_size) for _ in range(rng.randint(1, 12))]
                ids += [next(iter(added))] if added else []
            skip = k % 3 == 0
            out.append({'tokenizer': name, 'ids': ids, 'skip_special_tokens': skip,
                        'decoded': tok.decode(ids, skip_special_tokens=skip)})
    for name, tok in synthetic():
        out.append({'tokenizer_name': name, 'tokenizer_json': tok.to_str()})
        texts = SYN_TEXTS + [random_text(rng, ['[MASK]', '<w>', '<sep>', '<s>', '<|end|>', 'Hello World'])
                             for _ in range(args.random)]
        for i, text in enumerate(texts):
            add = (i % 3 != 1)
            out.append({'tokenizer': name, 'text': text, 'add_special_tokens': add,
                        'ids': tok.encode(text, add_special_tokens=add).ids})
        for k in range(2):
            batch = rng.sample(texts, 3)
            out.append({'tokenizer': name, 'batch': batch, 'add_special_tokens': k == 0,
                        'ids': [e.ids for e in tok.encode_batch(batch, add_special_tokens=k == 0)]})
        for k in range(args.decode):
            ids = tok.encode(rng.choice(texts), add_special_tokens=True).ids
            skip = k % 2 == 0
            out.append({'tokenizer': name, 'ids': ids, 'skip_special_tokens': skip,
                        'decoded': tok.decode(ids, skip_special_tokens=skip)})
    with open(args.out, 'w', encoding='utf-8') as f:
        for case in out:
            f.write(json.dumps(case, ensure_ascii=False) + '\n')
    print(f'wrote {len(out)} cases to {args.out} ({os.path.getsize(args.out)} bytes)', file=sys.stderr)


if __name__ == '__main__':
    main()
