#!/usr/bin/env python3
"""How many of the `cohort` CLI's own error messages a test asserts the text of.

A message is the format string of an error the CLI crate makes itself
(`bail!`, `anyhow!`, `ensure!`, `.context(...)`, `.with_context(|| format!(...))`,
`Err(format!(...))` and `.ok_or_else(|| format!(...))` of the flag parsers clap
calls, `#[error("...")]` of its thiserror enums) in controller/cli/src and its
subdirectories, outside `#[cfg(test)] mod`s; messages that are only a
placeholder (`"{}"`, passing on the controller's words) are not counted. Its fixed
text is what lies between the `{...}` placeholders. The CLI's other stderr lines
(`eprintln!`: warnings, plan problems, progress) are counted apart, likewise.

A message is covered when a test asserts a piece of that fixed text: a string
literal given to `contains(...)`, `starts_with(...)` or `ends_with(...)` (or
to a test helper whose name ends so, e.g. `stderr_contains(...)`), or the
format string of a `format!` given to them (each of its own fixed pieces
apart), in the tests (tests/tests/**/*.rs, controller/cli/tests/**/*.rs, the
`#[cfg(test)]` modules of controller/cli/src) is 12 characters or more of one
piece, or holds a whole piece of 20 or more. The
match is by text only: `-v` lists each message with the literal that matched, to
be read. A literal that also occurs in the source of the controller, the agent
or the shared crates is not counted (the test may be asserting their message).
Run from the repository root.
"""
import glob, re, sys

LIT = r'"((?:[^"\\]|\\[\s\S])*)"'

def unescape(s):
    s = re.sub(r'\\\n\s*', '', s)               # Rust string continuation
    return s.replace('\\"', '"').replace('\\n', '\n').replace('\\\\', '\\')

# The test module: `#[cfg(test)]` (and other attributes) before `mod`; a
# `#[cfg(test)]` on a single item elsewhere in the file does not cut it.
TEST_MOD = re.compile(r'#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*mod\s')

def split_test(path):
    text = open(path, encoding='utf-8').read()
    m = TEST_MOD.search(text)
    return (text, '') if m is None else (text[:m.start()], text[m.start():])

# Every .rs file of the CLI crate's sources, subdirectories included (a module
# split into a directory, `foo/mod.rs`, `foo/bar.rs`).
CLI_SOURCES = sorted(glob.glob('controller/cli/src/**/*.rs', recursive=True))

ERRORS = (r'(?:bail!|anyhow!|ensure!\([^,]*,|\.context|\.with_context\(\s*\|\|\s*\{?\s*format!'
          # A flag parser's refusal (clap prints it after "invalid value ... for '--flag'").
          r'|Err\(\s*format!|\.ok_or_else\(\s*\|\|\s*format!|\.map_err\(\s*\|[^|]*\|\s*format!'
          # The Display of a thiserror variant.
          r'|#\[error)\(?\s*')
STDERR = r'eprintln!\(\s*'

def formats(pattern):
    found = []  # (file:line, format string)
    for path in CLI_SOURCES:
        code, _ = split_test(path)
        for m in re.finditer(pattern + LIT, code):
            fmt = unescape(m.group(1))
            if not re.sub(r'\{[^}]*\}', '', fmt).strip(' :;-'):
                continue                         # only placeholders
            line = code.count('\n', 0, m.start()) + 1
            found.append((f'{path}:{line}', fmt))
    return found

tests = []
for path in sorted(glob.glob('tests/tests/**/*.rs', recursive=True)
                   + glob.glob('controller/cli/tests/**/*.rs', recursive=True)) + CLI_SOURCES:
    if path.startswith('controller/cli/src/'):
        _, test = split_test(path)
    else:
        test = open(path, encoding='utf-8').read()
    for m in re.finditer(r'(?:contains|starts_with|ends_with)\(\s*&?(format!\(\s*)?' + LIT, test):
        lit = unescape(m.group(2))
        # `contains(&format!("port {} on ... in use", port))`: each fixed piece is a literal.
        tests.extend([p for p in re.split(r'\{[^}]*\}', lit) if p.strip()] if m.group(1) else [lit])

# Words that the other programs also write (controller, agent, shared code) may
# be asserted of their messages: such a literal is not taken as the CLI's.
others = ''.join(open(p, encoding='utf-8').read() for p in
                 glob.glob('controller/src/**/*.rs', recursive=True) + glob.glob('agent/src/**/*.rs', recursive=True)
                 + glob.glob('shared/**/src/**/*.rs', recursive=True))

def covered(fmt):
    pieces = [p.strip() for p in re.split(r'\{[^}]*\}', fmt) if p.strip()]
    for lit in tests:
        lit = lit.strip()
        if lit in others:
            continue
        for p in pieces:
            if (len(lit) >= 12 and lit in p) or (len(p) >= 20 and p in lit):
                return lit
    return None

def report(what, pattern):
    distinct = {}
    for where, fmt in formats(pattern):
        distinct.setdefault(fmt, []).append(where)
    hits = {fmt: covered(fmt) for fmt in distinct}
    if '-v' in sys.argv:
        for fmt, where in distinct.items():
            mark = 'covered' if hits[fmt] else 'not    '
            print(f'{mark} {where[0]}: {fmt!r}' + (f'  <- {hits[fmt]!r}' if hits[fmt] else ''))
    n = sum(1 for h in hits.values() if h)
    print(f'{n} of {len(distinct)} distinct {what} are asserted by a test')

report('CLI error messages', ERRORS)
# Also: the other lines the CLI writes to stderr with eprintln! (warnings, plan
# problems, progress such as "submitted job ..."), counted apart.
report('other stderr lines of the CLI (eprintln!)', STDERR)
