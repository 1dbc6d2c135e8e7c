#!/usr/bin/env python3
"""Reference fixtures for spec/tokenizer_spm_spec.lua and spec/tokenizer_tiktoken_spec.lua.

    python3 tools/make_spm_fixtures.py      # -> spec/fixtures/spm/, spec/fixtures/tiktoken/

SentencePiece: trains small models with the `sentencepiece` package itself (BPE and Unigram, with and
without byte fallback, the nmt_nfkc / nmt_nfkc_cf / identity normalizers, user-defined and control
symbols, whitespace options) on Shakespeare plus multilingual lines, then writes, for a multilingual
test corpus, the ids and normalized text `sentencepiece` gives (cases.jsonl) and the text it
decodes the ids back to. The Llama cases follow transformers' sentencepiece-backed LlamaTokenizer
(`legacy` true and false: special tokens inside the text, leading spaces), written here over
`sentencepiece` (llama_reference).

tiktoken: derives a byte-level BPE ranks file in tiktoken's format (base64 token, space, rank) from
merges learnt here by the `tokenizers` trainer with Qwen 1's split regex, and writes the ids the
`tiktoken` package gives for it with Qwen 1's regex and special tokens (after NFC, as Qwen's
tokenizer does).
"""
import base64
import json
import os
import random
import re
import unicodedata

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, '..', 'shared')
SPM_OUT = os.path.join(ROOT, 'spec', 'fixtures', 'spm')
TIK_OUT = os.path.join(ROOT, 'spec', 'fixtures', 'tiktoken')

# Multilingual lines for training and testing (written for these fixtures).
MULTILINGUAL = [
    'The quick brown fox jumps over the lazy dog.',
    'Le cœur a ses raisons que la raison ne connaît point.',
    'Über den Wolken muss die Freiheit wohl grenzenlos sein, naïve Straße.',
    'El niño comió paella en la playa; ¿dónde está el baño?',
    'Привет, мир! Как дела? Всё хорошо, спасибо.',
    'Γειά σου κόσμε, καλημέρα σε όλους.',
    '你好，世界！今天天气很好，我们去公园散步吧。',
    '東京は日本の首都です。ひらがなとカタカナ、ｶﾀｶﾅも使います。',
    '안녕하세요, 세계! 한국어 문장입니다.',
    'مرحبا بالعالم، كيف حالك اليوم؟',
    'שלום עולם, מה שלומך?',
    'नमस्ते दुनिया, आप कैसे हैं?',
    'สวัสดีชาวโลก วันนี้อากาศดี',
    'Xin chào thế giới, hôm nay trời đẹp quá.',
    'Full-width ＡＢＣ１２３ and ligatures ﬁ ﬂ, circled ① ② and ㍿ ㌔.',
    'Emoji 😀🎉👍🏽 flags 🇨🇳🇺🇸 and the family 👨‍👩‍👧.',
    'Code: for (int i = 0; i < n; ++i) { sum += a[i]; } // done',
    'Numbers 3.14159 2,718 1e-9 0x7fffffff 42%',
    'tabs\tand  double  spaces   and\nnew lines\r\nhere',
    'Mixed 日本語 and English and Русский in one line.',
]

# Test texts beyond the shared multilingual cases: normalization, whitespace, symbols, unknowns.
EXTRA_TEXTS = [
    '', ' ', '   ', '\n', 'a', ' leading space', 'trailing space  ', '  both  ends  ',
    'multiple    inner     spaces', 'tab\tseparated\tvalues', 'line\nbreaks\n\nhere\n',
    '▁already▁escaped▁text', 'x▁ y', 'ＡＢＣ ｄｅｆ １２３ ｶﾀｶﾅ', 'ﬁnance ﬂow ① ㍿ ™ ½ ℃',
    'Ǆemo ǅ ǆ ß ẞ İstanbul', 'e\u0301 vs é, A\u030a vs Å', 'zero\u200bwidth\u200djoiner\ufeffbom',
    'soft\u00adhyphen and nbsp\u00a0here', 'ideographic\u3000space', 'control\x01char\x7f',
    '<tool> call <tool>x<tool>', 'user @@ symbol@@s', '<ctl> is control <s> </s> <unk>',
    '𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𝟙𝟚𝟛', 'rare: ꙮ ᚠᛇᚻ 𓀀 ⍆ 🜁', 'Ελληνικά and עברית and ไทย',
    '12345678901234567890', '3.14159265358979', 'UPPER lower MiXeD', "we've they're I'm",
]

SPM_MODELS = {
    # name: trainer options (nmt_nfkc is sentencepiece's default normalizer)
    'bpe_nfkc': dict(model_type='bpe', vocab_size=1000, user_defined_symbols=['<tool>', '@@'],
                     control_symbols=['<ctl>'], character_coverage=0.9995),
    'bpe_llama': dict(model_type='bpe', vocab_size=1200, byte_fallback=True, normalization_rule_name='identity',
                      remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
                      character_coverage=0.99),
    'unigram_nfkc_cf': dict(model_type='unigram', vocab_size=1000, normalization_rule_name='nmt_nfkc_cf',
                            user_defined_symbols=['<tool>'], control_symbols=['<ctl>'], character_coverage=0.9995),
    'unigram_bytes': dict(model_type='unigram', vocab_size=800, byte_fallback=True, normalization_rule_name='identity',
                          add_dummy_prefix=False, character_coverage=0.98),
}
# Variants made by editing a trained model's normalizer spec (no trainer flag sets these).
SPM_VARIANTS = {
    'unigram_noescape': ('unigram_bytes', dict(escape_whitespaces=False, add_dummy_prefix=True,
                                               remove_extra_whitespaces=False)),
}

QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN_SPECIAL_START = 151643
QWEN_SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>'] + ['<|extra_%d|>' % i for i in range(205)]


def training_lines():
    with open(os.path.join(SHARED, 'data', 'tinyshakespeare.txt'), encoding='utf-8') as f:
        shakespeare = [l for l in f.read().splitlines()[:6000] if l.strip()]
    rng = random.Random(7)
    lines = list(shakespeare)
    for _ in range(40):
        lines.extend(MULTILINGUAL)
    rng.shuffle(lines)
    return lines


def test_texts():
    seen, texts = set(), []
    with open(os.path.join(SHARED, 'tokenizers', 'cases.jsonl'), encoding='utf-8') as f:
        for line in f:
            row = json.loads(line)
            text = row.get('text')
            if isinstance(text, str) and text not in seen:
                seen.add(text)
                texts.append(text)
    texts = texts[:160]
    for t in MULTILINGUAL + EXTRA_TEXTS:
        if t not in seen:
            seen.add(t)
            texts.append(t)
    return texts


def write_jsonl(path, rows):
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + '\n')
    os.replace(path + '.tmp', path)


def train_spm(lines):
    os.makedirs(SPM_OUT, exist_ok=True)
    corpus = os.path.join(SPM_OUT, 'corpus.tmp')
    with open(corpus, 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines) + '\n')
    for name, opts in SPM_MODELS.items():
        spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(SPM_OUT, name + '.tmp'),
                                       hard_vocab_limit=False, num_threads=1, minloglevel=2,
                                       max_sentence_length=8192, **opts)
        os.replace(os.path.join(SPM_OUT, name + '.tmp.model'), os.path.join(SPM_OUT, name + '.model'))
        os.remove(os.path.join(SPM_OUT, name + '.tmp.vocab'))
    os.remove(corpus)
    for name, (base, changes) in SPM_VARIANTS.items():
        proto = pb.ModelProto()
        with open(os.path.join(SPM_OUT, base + '.model'), 'rb') as f:
            proto.ParseFromString(f.read())
        for key, value in changes.items():
            setattr(proto.normalizer_spec, key, value)
        with open(os.path.join(SPM_OUT, name + '.model'), 'wb') as f:
            f.write(proto.SerializeToString())


def spm_cases(texts):
    rows = []
    for name in list(SPM_MODELS) + list(SPM_VARIANTS):
        sp = spm.SentencePieceProcessor(model_file=os.path.join(SPM_OUT, name + '.model'))
        for text in texts:
            ids = sp.encode(text)
            rows.append({'model': name, 'text': text, 'ids': ids, 'normalized': sp.normalize(text),
                         'decoded': sp.decode(ids)})
        # decoding of ids sentencepiece would not produce: controls, unknowns, lone bytes
        rng = random.Random(name)
        n = sp.get_piece_size()
        for _ in range(20):
            ids = [rng.randrange(n) for _ in range(rng.randrange(1, 12))]
            rows.append({'model': name, 'decode_ids': ids, 'decoded': sp.decode(ids)})
    return rows


def llama_reference(sp, sp_no_dummy, text, legacy, add_special_tokens):
    """transformers' sentencepiece-backed LlamaTokenizer (the 4.x "slow" one; 5.x converts to `tokenizers`
    instead): text is cut at the special tokens, each other chunk goes to sentencepiece. legacy: every
    chunk gets the dummy prefix. Not legacy: only the text's start gets one (after U+2581 -> space), and a
    chunk that starts with a space is encoded after "<unk>", whose pieces are then dropped, so that the
    space is not taken as the text's start."""
    specials = ['<unk>', '<s>', '</s>']
    if not legacy and text:
        text = '\u2581' + text.replace('\u2581', ' ')
    chunks = [c for c in re.split('(' + '|'.join(re.escape(t) for t in specials) + ')', text) if c]
    pieces = []
    for chunk in chunks:
        if chunk in specials:
            pieces.append(chunk)
        elif legacy:
            pieces += sp.encode(chunk, out_type=str)
        elif not chunk.startswith(('\u2581', ' ')):
            pieces += sp_no_dummy.encode(chunk, out_type=str)
        else:
            unk_len = len(sp_no_dummy.encode('<unk>', out_type=str))
            pieces += sp_no_dummy.encode('<unk>' + chunk, out_type=str)[unk_len:]
    if not legacy and len(pieces) > 1 and pieces[0] == '\u2581' and pieces[1] in specials:
        pieces = pieces[1:]
    ids = [sp.piece_to_id(p) for p in pieces]
    return [sp.bos_id()] + ids if add_special_tokens else ids


def llama_cases(texts):
    path = os.path.join(SPM_OUT, 'bpe_llama.model')
    sp = spm.SentencePieceProcessor(model_file=path)
    proto = pb.ModelProto()
    with open(path, 'rb') as f:
        proto.ParseFromString(f.read())
    proto.normalizer_spec.add_dummy_prefix = False
    sp_no_dummy = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    specials = ['<s>hello</s>', 'a <s> b', ' <s> lead', '</s>\n<s> x', 'x</s>y', '<s>', ' ', '  two',
                'Hello world', ' Hello', '<unk> text', 'end </s>', '\u2581x <s>\u2581y', '<s> </s>']
    rows = []
    for legacy in (True, False):
        for text in texts[:60] + specials:
            for add in (True, False):
                rows.append({'legacy': legacy, 'text': text, 'add_special_tokens': add,
                             'ids': llama_reference(sp, sp_no_dummy, text, legacy, add)})
    return rows


def llama_config(legacy):
    return {'tokenizer_class': 'LlamaTokenizer', 'legacy': legacy, 'add_bos_token': True, 'add_eos_token': False,
            'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>'}


def make_ranks(lines):
    """Byte-level BPE ranks: the 256 bytes, then each merge's result in the order it was learnt."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=3000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(lines, trainer)
    # GPT-2's byte <-> character table, to turn the trained strings back into bytes
    printable = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    data = json.loads(tok.to_str())
    ranks = {bytes([b]): b for b in range(256)}
    for merge in data['model']['merges']:
        a, b = merge if isinstance(merge, list) else merge.split(' ')
        token = bytes(chars[c] for c in a + b)
        if token not in ranks:
            ranks[token] = len(ranks)
    return ranks


def tiktoken_cases(ranks, texts):
    import tiktoken
    specials = {t: QWEN_SPECIAL_START + i for i, t in enumerate(QWEN_SPECIALS)}
    enc = tiktoken.Encoding('qwen_small', pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    extra = ['<|im_start|>user\nhi<|im_end|>\n', 'a<|endoftext|>b', '<|extra_204|><|extra_0|>', '<|im_start',
             'x<|im_end|>', "I'LL DON'T it's", '\r\n\r\n  \n', '   x   ', 'a\u0301\u0323 e\u0301']
    rows = []
    for text in texts + extra:
        nfc = unicodedata.normalize('NFC', text)
        ids = enc.encode(nfc, allowed_special='all')
        rows.append({'text': text, 'ids': ids, 'ordinary': enc.encode_ordinary(nfc),
                     'decoded': enc.decode(ids, errors='replace')})
    return rows


def main():
    lines = training_lines()
    texts = test_texts()
    train_spm(lines)
    write_jsonl(os.path.join(SPM_OUT, 'cases.jsonl'), spm_cases(texts))
    write_jsonl(os.path.join(SPM_OUT, 'llama_cases.jsonl'), llama_cases(texts))
    with open(os.path.join(SPM_OUT, 'llama_tokenizer_config.json'), 'w') as f:
        json.dump(llama_config(False), f, indent=1)
    os.makedirs(TIK_OUT, exist_ok=True)
    ranks = make_ranks(lines)
    path = os.path.join(TIK_OUT, 'qwen.tiktoken')
    with open(path + '.tmp', 'wb') as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b' ' + str(rank).encode() + b'\n')
    os.replace(path + '.tmp', path)
    write_jsonl(os.path.join(TIK_OUT, 'cases.jsonl'), tiktoken_cases(ranks, texts))


if __name__ == '__main__':
    main()
