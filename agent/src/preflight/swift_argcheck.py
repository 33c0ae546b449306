"""Checks an ms-swift command line with the INSTALLED ms-swift's own argument parser.

    python swift_argcheck.py <command> [argv...]
    python -c "<this file's text>" <command> [argv...]
    python swift_argcheck.py --batch <file.json>

<command> is megatron-sft, megatron-export, swift-export, swift-infer or swift-eval; argv is what follows
`megatron sft` / `swift export` ... on the rendered command line.

It builds the parser ms-swift builds (swift/utils/utils.py parse_args: HfArgumentParser over the pipeline's
args_class inside _patch_get_type_hints) and runs argparse on argv WITHOUT instantiating the dataclass: no
__post_init__, so no model download, no training, no distributed init. transformer_engine is stubbed for the
import only when it is not installed (ms-swift's megatron modules import it at import time: 3.x
swift/megatron/init.py _patch_transformer_engine, 4.x mcore_bridge/patcher.py), and only for importers inside
swift/mcore_bridge; nothing is installed and nothing outside this process changes.

Prints EXACTLY ONE JSON line on stdout:
  {"ms_swift": "4.6.0", "command": "megatron sft", "ok": false,
   "problems": [{"flag": "--num_workers", "message": "not a flag of ms-swift 4.6.0's megatron sft ..."}],
   "error": null}
ok is true when the parser takes argv exactly: no leftover string (ms-swift raises ValueError: remaining_argv,
swift/llm/base.py / swift/pipelines/base.py _parse_args), no type or choice error, and no flag matched only
through argparse's allow_abbrev prefix matching (argparse would silently take it as the longer flag).
error is non-null when it could not judge (ms-swift not importable, unknown command, crash): then ok is false,
problems is [] and the exit code is 3. Otherwise the exit code is 0.

--batch <file.json> (for tests): the file holds a JSON list of [command, [argv...]] pairs; ms-swift is imported
once and one JSON line per pair is printed, in order.

Stdlib only apart from ms-swift itself; Python >= 3.8. Never reads stdin, never writes files. ms-swift's own
logging goes to stderr.
"""
import argparse
import builtins
import contextlib
import difflib
import importlib
import io
import json
import os
import sys

# The argument class each CLI entry point parses, per major version.
# 3.x: swift/cli/_megatron/sft.py -> swift.megatron.megatron_sft_main -> swift/megatron/train/sft.py
#      MegatronSft.args_class = MegatronTrainArguments; export -> swift/megatron/export/export.py
#      MegatronExport.args_class; swift export/infer/eval -> swift/llm/{export,infer,eval}/*.py args_class.
# 4.x: swift/megatron/pipelines/train/sft.py MegatronSft.args_class = MegatronSftArguments;
#      swift/megatron/pipelines/export/export.py; swift/pipelines/{export,infer,eval}/*.py args_class.
COMMANDS = {
    'megatron-sft': ('megatron sft', {
        3: ('swift.megatron.argument', 'MegatronTrainArguments'),
        4: ('swift.megatron.arguments', 'MegatronSftArguments'),
    }),
    'megatron-export': ('megatron export', {
        3: ('swift.megatron.argument', 'MegatronExportArguments'),
        4: ('swift.megatron.arguments', 'MegatronExportArguments'),
    }),
    'swift-export': ('swift export', {
        3: ('swift.llm', 'ExportArguments'),
        4: ('swift.arguments', 'ExportArguments'),
    }),
    'swift-infer': ('swift infer', {
        3: ('swift.llm', 'InferArguments'),
        4: ('swift.arguments', 'InferArguments'),
    }),
    'swift-eval': ('swift eval', {
        3: ('swift.llm', 'EvalArguments'),
        4: ('swift.arguments', 'EvalArguments'),
    }),
}


class CannotJudge(Exception):
    pass


class _ParseError(Exception):
    pass


def swift_version():
    try:
        from importlib.metadata import version
        return version('ms-swift')
    except Exception:
        pass
    try:
        import swift
        return getattr(swift, '__version__', 'unknown')
    except ImportError as e:
        raise CannotJudge('ms-swift is not installed for %s: %s' % (sys.executable, e))


def _have_module(name):
    try:
        import importlib.util
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@contextlib.contextmanager
def _transformer_engine_stub():
    """While ms-swift is imported and only when transformer_engine is absent: swift.*/mcore_bridge importers
    get a MagicMock for `transformer_engine...` (megatron.core keeps seeing "no TE" through its own
    try/except), and the TE classes megatron.core leaves as None get empty placeholder classes, because
    ms-swift 3.x setattr()s on them (swift/megatron/init.py _patch_TELinear / _patch_TEGroupedLinear).
    Same idea as the GPU test fixture shared/swift-gpu/shim/sitecustomize.py, but limited to the import."""
    if _have_module('transformer_engine'):
        yield
        return
    from unittest.mock import MagicMock
    real_import = builtins.__import__
    patched = []

    def patch_te_placeholders():
        if patched:
            return
        patched.append(True)
        try:
            te_ext = importlib.import_module('megatron.core.extensions.transformer_engine')
        except Exception:
            return
        for name in [n for n in dir(te_ext) if n.startswith('TE')]:
            value = getattr(te_ext, name)
            if value is None or isinstance(value, MagicMock):
                setattr(te_ext, name, type(name, (), {}))

    def hook(name, globals=None, locals=None, fromlist=(), level=0):
        importer = (globals or {}).get('__name__', '') or ''
        from_swift = importer.startswith('swift') or importer.startswith('mcore_bridge')
        if level == 0 and name.split('.')[0] == 'transformer_engine' and from_swift:
            return MagicMock(name=name)
        if importer.startswith('swift.megatron') and 'megatron' in sys.modules:
            patch_te_placeholders()
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = hook
    try:
        yield
    finally:
        builtins.__import__ = real_import


def load_args_class(command):
    """Imports ms-swift and returns (cli name, argument dataclass)."""
    if command not in COMMANDS:
        raise CannotJudge('unknown command %r; expected one of %s' % (command, ', '.join(sorted(COMMANDS))))
    cli, by_major = COMMANDS[command]
    version = swift_version()
    try:
        major = int(version.split('.')[0])
    except ValueError:
        raise CannotJudge('cannot read the major version of ms-swift %r' % version)
    if major not in by_major:
        raise CannotJudge('ms-swift %s: no known argument class for %s' % (version, cli))
    module_name, class_name = by_major[major]
    # ms-swift 3.x clones Megatron-LM into its cache unless MEGATRON_LM_PATH is set
    # (swift/megatron/init.py init_megatron_env); a preflight check must not reach the network.
    if major == 3 and module_name.startswith('swift.megatron') and 'MEGATRON_LM_PATH' not in os.environ:
        cached = _cached_megatron_lm()
        if cached is None:
            raise CannotJudge('ms-swift %s imports Megatron-LM from MEGATRON_LM_PATH or its git cache, and neither '
                              'exists here: set MEGATRON_LM_PATH to a Megatron-LM checkout (branch core_r0.15.0)'
                              % version)
        os.environ['MEGATRON_LM_PATH'] = cached
    try:
        with contextlib.redirect_stdout(sys.stderr), _transformer_engine_stub():
            module = importlib.import_module(module_name)
    except Exception as e:
        raise CannotJudge('cannot import %s from ms-swift %s: %s: %s' % (module_name, version, type(e).__name__, e))
    cls = getattr(module, class_name, None)
    if cls is None:
        raise CannotJudge('ms-swift %s has no %s.%s' % (version, module_name, class_name))
    return cli, cls


def _cached_megatron_lm():
    # swift/llm/model/utils.py git_clone_github: <modelscope cache>/_github/Megatron-LM
    try:
        from modelscope.hub.utils.utils import get_cache_dir
        path = os.path.join(get_cache_dir(), '_github', 'Megatron-LM')
    except Exception:
        path = os.path.join(os.path.expanduser('~'), '.cache', 'modelscope', 'hub', '_github', 'Megatron-LM')
    return path if os.path.isdir(os.path.join(path, 'megatron')) else None


def build_parser(cls):
    """The parser ms-swift builds (swift/utils/utils.py parse_args)."""
    from transformers import HfArgumentParser
    patch = contextlib.nullcontext()
    try:
        from swift.utils.utils import _patch_get_type_hints
        patch = _patch_get_type_hints()
    except ImportError:
        pass
    with patch:
        parser = HfArgumentParser([cls])

    def error(message):
        raise _ParseError(message)

    # argparse reports type/choice errors through error(), which would sys.exit(2).
    parser.error = error
    return parser


def _option_strings(parser):
    return parser._option_string_actions


def _is_flag(token):
    # '-1' and '-.5' are values, not flags
    return token.startswith('-') and len(token) > 1 and not (token[1:2].isdigit() or token[1:2] == '.')


def _split_option(token):
    return token.split('=', 1)[0] if '=' in token else token


def _abbreviation_problems(parser, argv):
    """A `--x` that is not exactly an option string but that argparse's allow_abbrev would take as the one flag
    starting with it."""
    problems = []
    if not getattr(parser, 'allow_abbrev', True):
        return problems
    options = _option_strings(parser)
    for token in argv:
        if token == '--' or not _is_flag(token):
            continue
        opt = _split_option(token)
        if opt in options:
            continue
        matches = sorted({options[o].dest: o for o in options if o.startswith(opt)}.values())
        if len(matches) == 1:
            problems.append({'flag': opt,
                             'message': 'only an abbreviation of %s; write the whole flag name' % matches[0]})
        elif len(matches) > 1:
            problems.append({'flag': opt, 'message': 'an ambiguous abbreviation of %s; write the whole flag name'
                             % ', '.join(matches[:5])})
    return problems


def _suggest(parser, opt):
    name = opt.lstrip('-')
    # field names only: HfArgumentParser's --dashed-aliases would repeat each suggestion
    names = sorted({o[2:] for o in _option_strings(parser) if o.startswith('--') and '-' not in o[2:]})
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    longer = [n for n in names if n.endswith('_' + name) or n.startswith(name + '_')]
    for n in longer:
        if n not in close:
            close.append(n)
    if not close:
        return ''
    return ' (did you mean %s?)' % ' or '.join('--' + n for n in close[:3])


def _as_written(parser, opt, argv):
    """argparse names an action by its first option string (`--lr_decay_style`): name it as the argv wrote it
    (`--lr-decay-style`, HfArgumentParser's dashed alias, or the `=` form)."""
    action = _option_strings(parser).get(opt)
    if action is None:
        return opt
    for token in argv:
        if _split_option(token) in action.option_strings:
            return _split_option(token)
    return opt


def _drop_option(argv, opt):
    """argv without the first occurrence of opt and the values that follow it."""
    for i, token in enumerate(argv):
        if _split_option(token) == opt:
            j = i + 1
            if '=' not in token:
                while j < len(argv) and not _is_flag(argv[j]):
                    j += 1
            return argv[:i] + argv[j:]
    return None


def check(parser, cli, version, argv):
    label = "ms-swift %s's %s" % (version, cli)
    problems = _abbreviation_problems(parser, argv)
    abbreviated = {p['flag'] for p in problems}
    # Abbreviations are reported above: parse the rest without them.
    remaining = list(argv)
    for opt in abbreviated:
        while True:
            nxt = _drop_option(remaining, opt)
            if nxt is None:
                break
            remaining = nxt
    # argparse stops at the first type/choice error: note it, drop that flag, parse again.
    for _ in range(len(argv) + 1):
        try:
            with contextlib.redirect_stdout(sys.stderr), contextlib.redirect_stderr(io.StringIO()):
                _, leftovers = parser.parse_known_args(remaining)
        except _ParseError as e:
            message = str(e)
            flag = None
            if message.startswith('argument '):
                head, _, rest = message[len('argument '):].partition(': ')
                flag = _as_written(parser, head.split('/')[0], remaining)
                message = rest or message
            problems.append({'flag': flag or '', 'message': message})
            nxt = _drop_option(remaining, flag) if flag else None
            if nxt is None or nxt == remaining:
                break
            remaining = nxt
            continue
        i = 0
        while i < len(leftovers):
            token = leftovers[i]
            opt = _split_option(token)
            if _is_flag(token):
                # the values that follow an unknown flag are left over with it
                while i + 1 < len(leftovers) and not _is_flag(leftovers[i + 1]):
                    i += 1
                if opt not in abbreviated:
                    problems.append({'flag': opt, 'message': 'not a flag of %s%s' % (label, _suggest(parser, opt))})
            else:
                problems.append({'flag': token, 'message': 'a value that no flag of %s takes' % label})
            i += 1
        break
    return problems


def result(version, cli, problems, error=None):
    return {'ms_swift': version, 'command': cli, 'ok': error is None and not problems,
            'problems': [] if error else problems, 'error': error}


def main(args):
    if args[:1] == ['--batch']:
        if len(args) != 2:
            print(json.dumps(result(None, None, [], 'usage: swift_argcheck.py --batch <file.json>')))
            return 3
        with open(args[1]) as f:
            jobs = json.load(f)
    else:
        if not args:
            print(json.dumps(result(None, None, [], 'usage: swift_argcheck.py <command> [argv...]')))
            return 3
        jobs = [[args[0], args[1:]]]
    version = None
    parsers = {}
    code = 0
    for command, argv in jobs:
        cli = COMMANDS.get(command, (command, None))[0]
        try:
            version = version or swift_version()
            if command not in parsers:
                cli, cls = load_args_class(command)
                parsers[command] = build_parser(cls)
            out = result(version, cli, check(parsers[command], cli, version, list(argv)))
        except CannotJudge as e:
            out, code = result(version, cli, [], str(e)), 3
        except Exception as e:  # crash: say so in the one JSON line rather than with a traceback
            out, code = result(version, cli, [], '%s: %s' % (type(e).__name__, e)), 3
        print(json.dumps(out), flush=True)
    return code


if __name__ == '__main__':
    # Run as a file or through `python -c "<text>"`: either way sys.argv[0] is the script (or '-c').
    sys.exit(main(sys.argv[1:]))
