#!/usr/bin/env python3
"""Generates core/tokenizer/tokenizer_unicode.c: how the reference's regex classes differ from PCRE2's.

    pip install tokenizers && python3 tools/make_tokenizer_unicode.py

The `tokenizers` package runs pre-tokenizer regexes with Oniguruma, whose Unicode tables are newer
than those of the PCRE2 that pmp links (Debian 12: PCRE2 10.42, Unicode 14), so e.g. letters added
in Unicode 15/16 are \\p{L} for the reference but unassigned for PCRE2. This tool asks both engines
which code points each class escape matches (the reference through tokenizers' Split pre-tokenizer,
PCRE2 through ctypes) and writes, per escape, the code points to add to PCRE2's class (or the
whole class where PCRE2's has code points the reference's lacks). core/tokenizer/tokenizer_regex.c rewrites patterns with them before compiling. Rerun it when PCRE2 or
the reference changes.

It also writes the code points whose normalization the reference does not know (its normalizer's
Unicode tables are older than utf8proc's): by Unicode's stability rules those are characters newer
than its tables, which it treats as inert starters. tokenizer_text.c splits the text at them and
normalizes the pieces between with utf8proc.
"""
import ctypes
import ctypes.util
import os
import sys

from tokenizers import Regex, pre_tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, 'core', 'tokenizer', 'tokenizer_unicode.c')

GC = ['L', 'Lu', 'Ll', 'Lt', 'Lm', 'Lo', 'M', 'Mn', 'Mc', 'Me', 'N', 'Nd', 'Nl', 'No', 'P', 'Pc', 'Pd', 'Ps',
      'Pe', 'Pi', 'Pf', 'Po', 'S', 'Sm', 'Sc', 'Sk', 'So', 'Z', 'Zs', 'Zl', 'Zp', 'C', 'Cc', 'Cf', 'Co', 'Cn']
# escape name -> (reference pattern, PCRE2 pattern); a None PCRE2 pattern means "spell out the whole set"
CLASSES = [(g, '\\p{%s}' % g, '\\p{%s}' % g) for g in GC] + [
    ('s', '\\s', '\\s'),
    ('d', '\\d', '\\d'),
    ('h', '\\h', None),   # Oniguruma's \h is a hex digit (PCRE2's is horizontal space)
    ('w', '\\w', None),
]

CODEPOINTS = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
TEXT = ''.join(chr(c) for c in CODEPOINTS)
DATA = TEXT.encode('utf-8')
BYTE_TO_CP = {}
_off = 0
for _c in CODEPOINTS:
    BYTE_TO_CP[_off] = _c
    _off += len(chr(_c).encode('utf-8'))
BYTE_TO_CP[_off] = 0x110000


def reference_set(pattern):
    found = set()
    splitter = pre_tokenizers.Split(Regex('(?:%s)+' % pattern), 'removed', invert=True)
    for piece, _ in splitter.pre_tokenize_str(TEXT):
        found.update(range(ord(piece[0]), ord(piece[-1]) + 1))
    return found


class Pcre2:
    def __init__(self):
        name = ctypes.util.find_library('pcre2-8') or 'libpcre2-8.so.0'
        lib = ctypes.CDLL(name)
        self.lib = lib
        lib.pcre2_compile_8.restype = ctypes.c_void_p
        lib.pcre2_compile_8.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint32,
                                        ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p]
        lib.pcre2_match_data_create_from_pattern_8.restype = ctypes.c_void_p
        lib.pcre2_match_data_create_from_pattern_8.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.pcre2_match_8.restype = ctypes.c_int
        lib.pcre2_match_8.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                      ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p]
        lib.pcre2_get_ovector_pointer_8.restype = ctypes.POINTER(ctypes.c_size_t)
        lib.pcre2_get_ovector_pointer_8.argtypes = [ctypes.c_void_p]
        lib.pcre2_config_8.argtypes = [ctypes.c_uint32, ctypes.c_void_p]
        buf = ctypes.create_string_buffer(64)
        lib.pcre2_config_8(11, buf)   # PCRE2_CONFIG_VERSION
        self.version = buf.value.decode()
        lib.pcre2_config_8(10, buf)   # PCRE2_CONFIG_UNICODE_VERSION
        self.unicode = buf.value.decode()

    def set_of(self, pattern):
        pat = ('(?:%s)+' % pattern).encode()
        err, off = ctypes.c_int(), ctypes.c_size_t()
        code = self.lib.pcre2_compile_8(pat, len(pat), 0x00080000 | 0x00020000, ctypes.byref(err), ctypes.byref(off), None)
        if not code:
            raise RuntimeError('PCRE2 cannot compile ' + pattern)
        md = self.lib.pcre2_match_data_create_from_pattern_8(code, None)
        found, pos = set(), 0
        while True:
            rc = self.lib.pcre2_match_8(code, DATA, len(DATA), pos, 0, md, None)
            if rc < 0:
                break
            ov = self.lib.pcre2_get_ovector_pointer_8(md)
            a, b = ov[0], ov[1]
            found.update(range(BYTE_TO_CP[a], BYTE_TO_CP[b]))
            pos = b
        return found


class Utf8proc:
    def __init__(self):
        lib = ctypes.CDLL(ctypes.util.find_library('utf8proc') or 'libutf8proc.so.2')
        lib.utf8proc_version.restype = ctypes.c_char_p
        lib.utf8proc_unicode_version.restype = ctypes.c_char_p
        lib.utf8proc_get_property.restype = ctypes.POINTER(ctypes.c_int16)
        lib.utf8proc_get_property.argtypes = [ctypes.c_int32]
        for f in (lib.utf8proc_NFD, lib.utf8proc_NFKD, lib.utf8proc_NFC):
            f.restype = ctypes.c_void_p
            f.argtypes = [ctypes.c_char_p]
        self.lib = lib
        self.libc = ctypes.CDLL(None)
        self.libc.free.argtypes = [ctypes.c_void_p]
        self.version = '%s (Unicode %s)' % (lib.utf8proc_version().decode(), lib.utf8proc_unicode_version().decode())

    def ccc(self, c):
        return self.lib.utf8proc_get_property(c)[1]

    def map(self, fn, text):
        p = fn(text.encode('utf-8'))
        out = ctypes.cast(p, ctypes.c_char_p).value.decode('utf-8')
        self.libc.free(p)
        return out


def normalization_unknowns(u8):
    """Code points the reference's normalizer treats as inert but utf8proc does not."""
    from tokenizers import normalizers
    cps = [c for c in range(2, 0x110000) if not 0xD800 <= c <= 0xDFFF]
    joined = ''.join(chr(c) + '\x01' for c in cps)
    found = set()
    for ref_norm, fn in ((normalizers.NFD(), u8.lib.utf8proc_NFD), (normalizers.NFKD(), u8.lib.utf8proc_NFKD)):
        ref = ref_norm.normalize_str(joined).split('\x01')
        mine = u8.map(fn, joined).split('\x01')
        for i, c in enumerate(cps):
            if ref[i] != mine[i]:
                found.add(c)
                d = u8.map(u8.lib.utf8proc_NFD, chr(c))
                if u8.map(u8.lib.utf8proc_NFC, d) == chr(c) and len(d) > 1:
                    # a primary composite newer than the reference: by Unicode's composition policy
                    # its parts are new too; check rather than trust
                    for part in d:
                        if ord(part) < 0x10000 and u8.ccc(ord(part)) == 0:
                            raise SystemExit('review: U+%04X composes from old-looking U+%04X' % (c, ord(part)))
                        found.add(ord(part))
    # combining classes: the reference reorders c around marks of class 1, 230 and 240 only if c is a
    # non-starter for it
    nfd = normalizers.NFD()
    probe = ''.join('\x01' + chr(c) + '\u0334' + '\x01\u0301' + chr(c) + '\x01\u0345' + chr(c) for c in cps)
    segs = nfd.normalize_str(probe).split('\x01')[1:]
    for i, c in enumerate(cps):
        ch = chr(c)
        ref_nonstarter = segs[3 * i] != ch + '\u0334' or segs[3 * i + 1] != '\u0301' + ch or segs[3 * i + 2] != '\u0345' + ch
        if nfd.normalize_str(ch) == ch and (u8.ccc(c) != 0) != ref_nonstarter:
            if ref_nonstarter:
                raise SystemExit('review: U+%04X is a non-starter only for the reference' % c)
            found.add(c)
    return found


def case_and_mark_deltas(u8):
    """Lowercase mappings and combining-mark tests where the reference differs from utf8proc."""
    from tokenizers import normalizers
    lib = u8.lib
    lib.utf8proc_tolower.restype = ctypes.c_int32
    lib.utf8proc_tolower.argtypes = [ctypes.c_int32]
    lib.utf8proc_category.restype = ctypes.c_int
    lib.utf8proc_category.argtypes = [ctypes.c_int32]
    cps = [c for c in range(2, 0x110000) if not 0xD800 <= c <= 0xDFFF]
    joined = ''.join(chr(c) + '\x01' for c in cps)
    lower = normalizers.Lowercase().normalize_str(joined).split('\x01')
    stripped = normalizers.StripAccents().normalize_str(joined).split('\x01')
    lower_delta, mark_flip = [], set()
    for i, c in enumerate(cps):
        mine = 'i\u0307' if c == 0x130 else chr(lib.utf8proc_tolower(c))
        if lower[i] != mine:
            if len(lower[i]) != 1:
                raise SystemExit('review: lowercase of U+%04X is %d characters' % (c, len(lower[i])))
            lower_delta.append((c, ord(lower[i])))
        is_mark = lib.utf8proc_category(c) in (6, 7, 8)   # Mn, Mc, Me
        if (stripped[i] == '') != is_mark:
            mark_flip.add(c)
    return lower_delta, mark_flip


def ranges(cps):
    out = []
    for c in sorted(cps):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


def c_array(name, rs):
    if not rs:
        return 'static const uint32_t %s[1] = {0};\n' % name
    body = ', '.join('0x%X, 0x%X' % (a, b) for a, b in rs)
    lines, line = [], ''
    for part in body.split(', '):
        if len(line) + len(part) > 110:
            lines.append(line)
            line = ''
        line += part + ', '
    lines.append(line)
    return 'static const uint32_t %s[] = {\n  %s\n};\n' % (name, '\n  '.join(l.rstrip() for l in lines))


def main():
    import tokenizers
    pcre = Pcre2()
    rows, arrays = [], []
    for name, ref_pat, pcre_pat in CLASSES:
        ref = reference_set(ref_pat)
        if pcre_pat is not None:
            mine = pcre.set_of(pcre_pat)
            if mine - ref:
                # PCRE2 has code points the reference lacks: spell the class out in full instead
                print('%-4s PCRE2 has %d code points more: spelled out' % (name, len(mine - ref)), file=sys.stderr)
                pcre_pat = None
        if pcre_pat is None:
            add = ranges(ref)
        else:
            add = ranges(ref - mine)
        print('%-4s add %6d code points in %4d ranges' % (name, sum(b - a + 1 for a, b in add), len(add)),
              file=sys.stderr)
        arrays.append(c_array('add_%s' % name, add))
        rows.append('  {"%s", %s, add_%s, %d},' % (
            name, 'NULL' if pcre_pat is None else '"%s"' % pcre_pat.replace('\\', '\\\\'), name, len(add)))
    u8 = Utf8proc()
    unknown = ranges(normalization_unknowns(u8))
    print('normalization: %d code points in %d ranges unknown to the reference' % (sum(b - a + 1 for a, b in unknown),
                                                                                 len(unknown)), file=sys.stderr)
    arrays.append(c_array('norm_inert', unknown))
    lower_delta, mark_flip = case_and_mark_deltas(u8)
    flips = ranges(mark_flip)
    print('lowercase: %d mappings differ; combining marks: %d code points differ' % (len(lower_delta), len(mark_flip)),
          file=sys.stderr)
    arrays.append(c_array('lower_delta', lower_delta))
    arrays.append(c_array('mark_flip', flips))
    with open(OUT, 'w') as f:
        f.write('/* tokenizer_unicode.c — GENERATED by tools/make_tokenizer_unicode.py; do not edit.\n'
                ' *\n'
                ' * Per regex class escape: the code-point ranges the reference (tokenizers %s, Oniguruma) matches\n'
                ' * but PCRE2 %s (Unicode %s) does not (add). A NULL base means the add list is the whole\n'
                ' * class (used where PCRE2 matches code points the reference does not). */\n' % (tokenizers.__version__, pcre.version, pcre.unicode))
        f.write('#include "internal.h"\n#include "tokenizer/tokenizer_unicode.h"\n\n')
        f.write(''.join(arrays))
        f.write('\nconst tok_uclass pmp_tok_uclasses[] = {\n%s\n  {NULL, NULL, NULL, 0},\n};\n' % '\n'.join(rows))
        f.write('\n/* Code points the reference\'s normalizer does not know (inert starters for it), against\n'
                ' * utf8proc %s. */\n' % u8.version)
        f.write('const uint32_t *const pmp_tok_norm_inert = norm_inert;\nconst int pmp_tok_norm_inert_count = %d;\n'
                % len(unknown))
        f.write('\n/* Lowercase mappings (code point, lowercase) where the reference differs from utf8proc, and\n'
                ' * code points whose "is a combining mark" answer (StripAccents) is the opposite of utf8proc\'s. */\n')
        f.write('const uint32_t *const pmp_tok_lower_delta = lower_delta;\nconst int pmp_tok_lower_delta_count = %d;\n'
                % len(lower_delta))
        f.write('const uint32_t *const pmp_tok_mark_flip = mark_flip;\nconst int pmp_tok_mark_flip_count = %d;\n'
                % len(flips))
    print('wrote', OUT, file=sys.stderr)


if __name__ == '__main__':
    main()
