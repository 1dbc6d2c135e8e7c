#!/usr/bin/env python3
"""Writes the fixtures of spec/chat_template_spec.lua (pmp.chat_template), from the reference implementation.

  python3 tools/make_chat_template_fixtures.py [--tokenizers /work/shared/tokenizers] [--out spec/fixtures/chat_templates]

cases.jsonl: {"config": name, "tokenizer_config": {chat_template, bos_token, ...}} for each tokenizer (qwen3, llama3,
  deepseek_v3), then for each tokenizer and conversation the exact output of
  AutoTokenizer.from_pretrained(dir).apply_chat_template(messages, tokenize=False, **kwargs), or the error.
  {"template": name, "case": case, "messages": [...], "kwargs": {...}, "output": text | "error": message}
jinja_cases.jsonl: language-feature cases rendered with the Jinja environment transformers builds for chat
  templates (trim_blocks, lstrip_blocks, loopcontrols, its tojson/raise_exception/namespace).
  {"name": name, "template": source, "vars": {...}, "output": text | "error": message, "error_type": type}
Needs transformers and jinja2 (versions are recorded in the first line of each file).
"""
import argparse
import json
import os
import sys

import jinja2
import transformers
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import _compile_jinja_template

TOKENIZERS = ["qwen3", "llama3", "deepseek_v3"]

SYS = {"role": "system", "content": "You are a helpful assistant."}
U1 = {"role": "user", "content": "What is 2+2?"}
A1 = {"role": "assistant", "content": "2+2 is 4."}
U2 = {"role": "user", "content": "And 3+3?"}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. Zürich"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]

TOOL_CONV = [
    SYS,
    {"role": "user", "content": "What's the weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}
        ],
    },
    {"role": "tool", "content": '{"temperature": 21}'},
    {"role": "tool", "content": '{"humidity": 40}'},
    {"role": "assistant", "content": "It is 21°C in Paris."},
]

TOOL_CONV_STR_ARGS = [
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Bergen"}'}},
        ],
    },
    {"role": "tool", "content": "-3C"},
    {"role": "assistant", "content": "Cold."},
]

GEN = {"add_generation_prompt": True}

# (case name, messages, kwargs)
CASES = [
    ("single_user", [U1], {}),
    ("single_user_gen", [U1], GEN),
    ("system_user_gen", [SYS, U1], GEN),
    ("multi_turn", [SYS, U1, A1, U2], {}),
    ("multi_turn_gen", [SYS, U1, A1, U2], GEN),
    ("no_system_multi_turn_gen", [U1, A1, U2], GEN),
    ("ends_with_assistant", [U1, A1], {}),
    ("think_history_gen", [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nreasoning one\n</think>\n\nAnswer one."},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "<think>\nreasoning two\n</think>\n\nAnswer two."},
        {"role": "user", "content": "Q3"},
    ], GEN),
    ("think_last_assistant", [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nlet me think\n</think>\n\nThe answer."},
    ], {}),
    ("reasoning_content_field", [
        U1,
        {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
    ], {}),
    ("enable_thinking_false_gen", [SYS, U1], {"add_generation_prompt": True, "enable_thinking": False}),
    ("enable_thinking_true_gen", [U1], {"add_generation_prompt": True, "enable_thinking": True}),
    ("unicode", [
        {"role": "system", "content": "Tu es un assistant 🤖 — réponds en français."},
        {"role": "user", "content": "Привет! 你好 ﬁ café\u00a0\t"},
        {"role": "assistant", "content": "こんにちは 👋🏽 \"quoted\" \\ back"},
    ], GEN),
    ("empty_content", [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}, {"role": "user", "content": " "}], GEN),
    ("whitespace_content", [{"role": "user", "content": "  padded  \n\n"}, {"role": "assistant", "content": "\n answer \n"}], {}),
    ("multi_system", [{"role": "system", "content": "Rule A."}, {"role": "system", "content": "Rule B."}, U1], GEN),
    ("tools_gen", [SYS, U1], {"tools": TOOLS, "add_generation_prompt": True}),
    ("tool_calls", TOOL_CONV, {"tools": TOOLS}),
    ("tool_calls_no_tools_arg", TOOL_CONV, {}),
    ("tool_calls_string_args_gen", TOOL_CONV_STR_ARGS, GEN),
]


def plain_cases():
    """Language-feature cases: (name, template, vars)."""
    c = []

    def add(name, template, **vars):
        c.append((name, template, vars))

    # output, literals, escapes
    add("text_only", "hello world")
    add("trailing_newline_dropped", "a\n")
    add("two_trailing_newlines", "a\n\n")
    add("crlf_normalised", "a\r\nb\rc")
    add("string_escapes", r"""{{ 'a\nb\t\'q\' \"d\" \\ \x41 \u00e9 \U0001F600 \d' }}""")
    add("double_quoted", '{{ "it\'s" }}|{{ \'say "hi"\' }}')
    add("adjacent_strings", "{{ 'a' 'b' \"c\" }}")
    add("numbers", "{{ 1 }} {{ 1.5 }} {{ 1_000 }} {{ 1e3 }} {{ 2.50 }} {{ -3 }} {{ 0.1 + 0.2 }} {{ 1e20 * 10 }} {{ 1/3 }}")
    add("constants", "{{ true }} {{ True }} {{ false }} {{ none }} {{ None }}")
    add("list_dict_repr", "{{ [1, 'a', none, true, 2.0] }} {{ {'k': 'v', 'n': [1]} }} {{ (1, 'x') }} {{ (1,) }} {{ [] }} {{ {} }}")
    add("repr_quotes", "{{ [\"it's\", 'a\"b', 'x\\ny'] }}")
    add("undefined_renders_empty", "[{{ missing }}][{{ d.missing }}][{{ l[5] }}]", d={"a": 1}, l=[1])
    # whitespace control and trim/lstrip blocks
    add("trim_blocks", "{% if true %}\nyes\n{% endif %}\ndone")
    add("lstrip_blocks", "  {% if true %}\n    x\n  {% endif %}\nend")
    add("lstrip_not_for_vars", "  {{ 'v' }}\n  {% if true %}t{% endif %}")
    add("lstrip_after_text", "ab  {% if true %}x{% endif %}")
    add("minus_strips", "a   \n  {%- if true -%}  \n  b  \n  {%- endif -%}\n  c")
    add("var_minus", "a \n {{- 'x' -}} \n b")
    add("plus_disables_lstrip", "  {%+ if true %}x{% endif %}")
    add("plus_disables_trim", "{% if true +%}\nx{% endif %}")
    add("comments", "a {# comment #}\nb\n  {# own line #}\nc{#- strip -#}   d")
    add("comment_multiline", "x\n{# line1\nline2 #}\ny")
    add("raw_block", "{% raw %}{{ not evaluated }}{% endraw %}")
    add("indented_template", "{%- for m in ms %}\n    {{- m }}\n    {%- if not loop.last %}, {% endif %}\n{%- endfor %}\n", ms=["a", "b", "c"])
    # if / for / set
    add("if_elif_else", "{% for x in [1, 2, 3] %}{% if x == 1 %}one{% elif x == 2 %}two{% else %}many{% endif %};{% endfor %}")
    add("loop_vars", "{% for x in 'abc' %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.revindex }}{{ loop.revindex0 }};{% endfor %}")
    add("loop_prev_next", "{% for x in [1,2,3] %}{{ loop.previtem }}<{{ x }}>{{ loop.nextitem }}|{% endfor %}")
    add("loop_cycle", "{% for x in range(5) %}{{ loop.cycle('a', 'b') }}{% endfor %}")
    add("for_else", "{% for x in [] %}x{% else %}empty{% endfor %}")
    add("for_if_filter", "{% for x in range(10) if x is odd %}{{ x }}{{ loop.length }},{% endfor %}")
    add("for_unpack_items", "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}", d={"z": 1, "a": 2, "m": 3})
    add("for_dict_keys", "{% for k in d %}{{ k }}{% endfor %}", d={"z": 1, "a": 2})
    add("nested_loops", "{% for a in [1,2] %}{% for b in [3,4] %}{{ loop.index }}{{ a }}{{ b }} {% endfor %}{{ loop.index }}|{% endfor %}")
    add("break_continue", "{% for x in range(10) %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 5 %}{% break %}{% endif %}{{ x }}{% endfor %}")
    add("set_scoping_in_loop", "{% set c = 0 %}{% for i in range(3) %}{{ c }}{% set c = c + 1 %}{{ c }}{% endfor %}[{{ c }}]")
    add("set_in_if_leaks", "{% if true %}{% set y = 5 %}{% endif %}{{ y }}")
    add("set_loop_fresh", "{% for i in range(3) %}{% if i == 1 %}{% set y = 5 %}{% endif %}[{{ y }}]{% endfor %}")
    add("namespace", "{% set ns = namespace(total=0, names=[]) %}{% for x in [1,2,3] %}{% set ns.total = ns.total + x %}{% endfor %}{{ ns.total }}")
    add("namespace_tuple_unpack", "{% set a, b = [1, 2] %}{{ a }}{{ b }}{% set c, d = 'xy' %}{{ d }}{{ c }}")
    add("set_block", "{% set x %}inner {{ 1 + 1 }}{% endset %}[{{ x }}]")
    add("set_block_filter", "{% set x | upper %}abc{% endset %}{{ x }}")
    add("macro", "{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('A') }} {{ greet('B', '?') }} {{ greet(punct='.', name='C') }}")
    add("macro_sees_globals", "{% set g = 'G' %}{% macro m() %}{{ g }}{{ v }}{% endmacro %}{{ m() }}", v="V")
    add("generation_block", "a{% generation %}b{{ 'c' }}{% endgeneration %}d")
    add("filter_block", "{% filter upper %}abc {{ 'd' }}{% endfilter %}")
    # operators
    add("arithmetic", "{{ 7 + 2 }} {{ 7 - 2 }} {{ 7 * 2 }} {{ 7 / 2 }} {{ 8 / 2 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 2 ** 10 }} {{ 2 ** -1 }} {{ 7.5 // 2 }}")
    add("precedence", "{{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }} {{ -2 ** 2 }} {{ 2 * 3 ~ 4 }} {{ 'a' ~ 'b' | upper }} {{ not 1 == 2 }}")
    add("error_concat_binds_tighter_than_plus", "{{ 1 + 1 ~ 1 + 1 }}")
    add("string_ops", "{{ 'a' + 'b' }} {{ 'ab' * 3 }} {{ 'x' ~ 1 ~ none ~ true }} {{ [1] + [2, 3] }} {{ [0] * 3 }}")
    add("comparisons", "{{ 1 == 1.0 }} {{ '1' == 1 }} {{ [1, 2] == [1, 2] }} {{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ 'a' < 'b' }} {{ 2 >= 2 }} {{ 1 != 2 }} {{ true == 1 }} {{ none == none }}")
    add("in_operator", "{{ 'b' in 'abc' }} {{ 2 in [1, 2] }} {{ 'k' in d }} {{ 'z' not in d }} {{ 'x' in missing }}", d={"k": 1})
    add("and_or_values", "{{ 0 or 'x' }} {{ 'a' and 'b' }} {{ '' and 'b' }}|{{ none or [] }} {{ 1 and 0 }}")
    add("ternary", "{{ 'y' if 1 else 'n' }} {{ 'y' if 0 else 'n' }} [{{ 'y' if 0 }}] {{ 'a' if false else 'b' if true else 'c' }}")
    add("filter_binds_tighter", "{{ '<' + ' x ' | trim + '>' }} {{ ms | length - 1 }} {{ -3 | abs }}", ms=[1, 2, 3])
    add("not_precedence", "{{ not x is defined }} {{ not 0 and 1 }} {{ not (0 and 1) }}")
    # access
    add("attr_and_item", "{{ d.a }} {{ d['a'] }} {{ l[0] }} {{ l[-1] }} {{ l.0 }} {{ s[1] }} {{ d.n.x }} {{ d['n']['x'] }}", d={"a": 1, "n": {"x": "deep"}}, l=[10, 20], s="héllo")
    add("slicing", "{{ 'abcdef'[::-1] }} {{ [1,2,3,4][1:] }} {{ 'abcdef'[1:4] }} {{ 'abcdef'[::2] }} {{ [1,2,3][:-1] }} {{ 'héllo'[1:3] }} {{ [1,2,3,4,5][-2:] }} {{ [1,2,3,4,5][3:0:-1] }}")
    add("dict_get_items", "{{ d.get('a') }} {{ d.get('zz') }} {{ d.get('zz', 'dflt') }} {{ d.items() | list }} {{ d.keys() | list }} {{ d.values() | list }}", d={"a": 1, "b": 2})
    add("dict_items_key", "{{ d['items'] }} {{ d.items() | list }} {{ d.get('get') }}", d={"items": "value", "get": 1})
    # string methods
    add("str_methods", "{{ s.startswith('He') }} {{ s.endswith('!') }} {{ s.startswith(('x', 'H')) }} {{ s.upper() }} {{ s.lower() }} {{ s.replace('l', 'L') }} {{ s.replace('l', 'L', 1) }}", s="Hello!")
    add("str_split", "{{ 'a b  c '.split() }} {{ 'a,b,,c'.split(',') }} {{ 'a,b,c'.split(',', 1) }} {{ 'a<x>b<x>c'.split('<x>')[-1] }} {{ 'a,b,c'.rsplit(',', 1) }}")
    add("str_strip", "[{{ '  x  '.strip() }}][{{ '\\n\\nx\\n'.strip('\\n') }}][{{ 'xxhixx'.lstrip('x') }}][{{ 'xxhixx'.rstrip('x') }}][{{ '\\u3000 x\\u00a0'.strip() }}]")
    add("str_misc", "{{ 'hello world'.title() }} {{ 'hello'.capitalize() }} {{ 'abc'.find('c') }} {{ 'abc'.find('z') }} {{ 'a-b-c'.count('-') }} {{ '-'.join(['a', 'b']) }} {{ '{} and {}'.format(1, 'x') }}")
    add("qwen_think_split", "{% set c = m.split('</think>')[-1].lstrip('\\n') %}{% set r = m.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}[{{ r }}][{{ c }}]", m="<think>\nI think.\n</think>\n\nAnswer")
    # filters
    add("filter_trim", "[{{ '  a b  ' | trim }}][{{ 'xxaxx' | trim('x') }}][{{ none | trim }}]")
    add("filter_length", "{{ 'héllo' | length }} {{ [1, 2] | length }} {{ d | length }} {{ missing | length }} {{ [1,2] | count }}", d={"a": 1})
    add("filter_case", "{{ 'aBc' | upper }} {{ 'aBc' | lower }} {{ 'hello world' | title }} {{ 'hELLO' | capitalize }}")
    add("filter_default", "{{ missing | default('d') }} {{ none | default('d') }} {{ none | default('d', true) }} [{{ '' | default('d') }}] {{ '' | default('d', boolean=true) }} {{ 'v' | d('x') }}")
    add("filter_join", "{{ [1, 2, 3] | join }} {{ [1, 2, 3] | join(', ') }} {{ users | join('/', attribute='name') }}", users=[{"name": "a"}, {"name": "b"}])
    add("filter_first_last", "{{ [1, 2, 3] | first }} {{ [1, 2, 3] | last }} {{ 'abc' | first }} {{ 'abc' | last }} [{{ [] | first }}]")
    add("filter_list_string", "{{ 'ab' | list }} {{ (1, 2) | list }} {{ 1 | string }} {{ [1, 'a'] | string }} {{ d | list }}", d={"x": 1, "y": 2})
    add("filter_items", "{% for k, v in d | items %}{{ k }}:{{ v }},{% endfor %}{{ missing | items | list }}", d={"b": 1, "a": 2})
    add("filter_replace", "{{ 'aaa' | replace('a', 'b') }} {{ 'aaa' | replace('a', 'b', 2) }}")
    add("filter_select", "{{ ms | selectattr('role', 'equalto', 'user') | map(attribute='content') | list }} {{ ms | rejectattr('role', 'eq', 'user') | list | length }} {{ ms | selectattr('x', 'defined') | list | length }} {{ ms | selectattr('x') | list | length }}",
        ms=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "x": 1}, {"role": "user", "content": "c"}])
    add("filter_select_tests", "{{ [1, 2, 3, 4] | select('odd') | list }} {{ [1, 2, 3, 4] | reject('even') | list }} {{ [0, 1, '', 'a'] | select | list }} {{ ['a', 'B'] | map('upper') | list }}")
    add("filter_misc", "{{ [3, 1, 2] | sort }} {{ [3, 1, 2] | sort(reverse=true) }} {{ [1, 2, 1] | unique | list }} {{ [1, 2] | reverse | list }} {{ 'abc' | reverse }} {{ '42' | int + 1 }} {{ 2.7 | int }} {{ 3 | float }} {{ -5 | abs }} {{ [1, 2, 3] | sum }} {{ [4, 9, 2] | max }} {{ [4, 9, 2] | min }} {{ 2.567 | round(2) }} {{ 'line1\\nline2' | indent(2) }}")
    add("filter_format", "{{ '%s-%d' | format('a', 3) }} {{ 'x=%s' % 5 }}")
    add("tojson_default", "{{ d | tojson }}", d={"b": 1, "a": [1, 2.5, "é\n\"\\", None, True], "c": {}, "e": []})
    add("tojson_indent", "{{ d | tojson(indent=2) }}", d={"b": 1, "a": [1, {"x": None}], "c": {}, "e": []})
    add("tojson_options", "{{ d | tojson(ensure_ascii=true) }} {{ d | tojson(sort_keys=true) }} {{ d | tojson(separators=(',', ':')) }} {{ 'x' | tojson }} {{ 1.0 | tojson }} {{ none | tojson }}", d={"z": "é😀", "a": 1})
    add("tojson_tool_schema", "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}", tools=TOOLS)
    # tests
    add("tests_basic", "{{ x is defined }} {{ missing is defined }} {{ missing is undefined }} {{ n is none }} {{ n is not none }} {{ missing is not none }} {{ x is string }} {{ 1 is string }}", x="s", n=None)
    add("tests_types", "{{ d is mapping }} {{ l is mapping }} {{ l is iterable }} {{ 's' is iterable }} {{ 1 is iterable }} {{ l is sequence }} {{ 1 is number }} {{ 1.5 is float }} {{ 1 is integer }} {{ true is boolean }} {{ false is false }} {{ true is true }} {{ 1 is true }} {{ range is callable }}", d={"a": 1}, l=[1])
    add("tests_compare", "{{ 3 is odd }} {{ 4 is even }} {{ 9 is divisibleby 3 }} {{ 9 is divisibleby(2) }} {{ 1 is eq 1 }} {{ 1 is equalto(2) }} {{ 2 is gt 1 }} {{ 'a' is in 'abc' }} {{ none is sameas none }} {{ 'abc' is lower }}")
    # globals
    add("range", "{{ range(3) | list }} {{ range(1, 4) | list }} {{ range(10, 0, -3) | list }}")
    add("dict_global", "{{ dict(a=1, b='x') | tojson }}")
    add("raise_exception", "{% if true %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}")
    # errors
    add("error_undefined_attr", "{{ missing.attr }}")
    add("error_undefined_arith", "{{ missing + 1 }}")
    add("error_type_concat", "{{ 'a' + 1 }}")
    add("error_syntax_line", "line one\n{% if x %}\nline three\n{% endfor %}\n")
    add("error_unclosed", "a\n{% for x in y %}\nb")
    add("error_unknown_filter", "{{ x | nosuchfilter }}")
    add("error_bad_expression", "{{ 1 + }}")
    add("error_ns_assign", "{% set x = 1 %}{% set x.a = 2 %}")
    return c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizers", default="/work/shared/tokenizers")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "spec", "fixtures", "chat_templates"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    header = {"generator": "tools/make_chat_template_fixtures.py", "transformers": transformers.__version__,
              "jinja2": jinja2.__version__}

    n = 0
    with open(os.path.join(args.out, "cases.jsonl"), "w", encoding="utf-8") as f:
        f.write(json.dumps(header, ensure_ascii=False) + "\n")
        for name in TOKENIZERS:
            # the parts of tokenizer_config.json that apply_chat_template reads, so the spec runs without them
            with open(os.path.join(args.tokenizers, name, "tokenizer_config.json"), encoding="utf-8") as cf:
                cfg = json.load(cf)
            keep = {k: cfg[k] for k in ("chat_template", "bos_token", "eos_token", "unk_token", "pad_token") if k in cfg}
            f.write(json.dumps({"config": name, "tokenizer_config": keep}, ensure_ascii=False) + "\n")
        for name in TOKENIZERS:
            tok = AutoTokenizer.from_pretrained(os.path.join(args.tokenizers, name))
            for case, messages, kwargs in CASES:
                rec = {"template": name, "case": case, "messages": messages, "kwargs": kwargs}
                try:
                    rec["output"] = tok.apply_chat_template(messages, tokenize=False, **kwargs)
                except Exception as e:  # noqa: BLE001 - the error is the expected result
                    rec["error"] = str(e)
                    rec["error_type"] = type(e).__name__
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
    print(f"cases.jsonl: {n} cases", file=sys.stderr)

    n = 0
    with open(os.path.join(args.out, "jinja_cases.jsonl"), "w", encoding="utf-8") as f:
        f.write(json.dumps(header, ensure_ascii=False) + "\n")
        for name, template, vars in plain_cases():
            rec = {"name": name, "template": template, "vars": vars}
            try:
                rec["output"] = _compile_jinja_template(template).render(**vars)
            except Exception as e:  # noqa: BLE001
                rec["error"] = str(e)
                rec["error_type"] = type(e).__name__
                if getattr(e, "lineno", None) is not None:
                    rec["error_line"] = e.lineno
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    print(f"jinja_cases.jsonl: {n} cases", file=sys.stderr)


if __name__ == "__main__":
    main()
