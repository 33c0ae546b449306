"""Writes shared/swift-flags/ms-swift-<version>.json from the INSTALLED ms-swift's own argument parsers.

    .venv-swift/<version>/bin/python tools/swift-flags/dump_flags.py [--out DIR]

For each command (megatron sft, megatron export, swift export, swift infer, swift eval) it imports the argument
dataclass the CLI entry point parses and builds the same HfArgumentParser ms-swift builds, both through
agent/src/preflight/swift_argcheck.py (one definition of "ms-swift's parser" for the tables and for the node
check), then walks parser._actions. Nothing is instantiated (no __post_init__). Format: TABLES.md section 1.
"""
import argparse
import enum
import importlib.util
import json
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def load_argcheck():
    path = os.path.join(REPO, 'agent', 'src', 'preflight', 'swift_argcheck.py')
    spec = importlib.util.spec_from_file_location('swift_argcheck', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def json_default(value):
    if isinstance(value, enum.Enum):
        value = value.value
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return str(value)


def annotations_of(cls):
    # HfArgumentParser rewrites dataclasses.Field.type in place (Optional[Union[dict, str]] -> str), so the
    # declared annotation is read from the classes themselves.
    out = {}
    for klass in reversed(cls.__mro__):
        out.update(getattr(klass, '__annotations__', {}) or {})
    return out


def type_name(action, annotation):
    from transformers.hf_argparser import string_to_bool
    if action.nargs == 0:
        return 'switch'
    if action.type is string_to_bool:
        return 'bool'
    if annotation is not None and 'dict' in str(annotation).lower():
        # Union[dict, str, None]: argparse keeps the string and ms-swift json-parses it (json_parse_to_dict).
        # Dict[str, Any]: argparse calls typing.Dict(value), which refuses every value (cli_usable false).
        return 'json'
    if action.type in (int, float, str):
        return action.type.__name__
    if action.type is None:
        return 'str'
    if action.choices is not None:
        return 'str'  # Literal/Enum: HfArgumentParser's make_choice_type_function
    return getattr(action.type, '__name__', str(action.type))


def flags_of(parser, cls):
    annotations = annotations_of(cls)
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        kind = type_name(action, annotations.get(action.dest))
        # exactly the option string without its `--`: a field named `_x` has the alias `---x`
        names = [o[2:] if o.startswith('--') else o[1:] for o in action.option_strings]
        primary = names[0]
        entry = {
            'name': primary,
            'type': kind,
            'list': action.nargs in ('+', '*'),
            'choices': [str(json_default(c)) for c in action.choices] if action.choices is not None else None,
            'default': None if kind == 'switch' else json_default(action.default),
            'required': bool(action.required),
        }
        if kind == 'bool':
            # nargs '?': `--flag` alone means true. Optional[bool] = None has nargs None: a value is required.
            entry['value_optional'] = action.nargs == '?'
        if kind == 'json' and action.type not in (str, None):
            entry['cli_usable'] = False
        if kind == 'switch':
            # HfArgumentParser's `--no_<x>` (store_false) for a bool field that defaults to True.
            entry['negates'] = action.dest
        ordered = {k: entry[k] for k in ('name', 'type', 'negates', 'value_optional', 'list', 'choices', 'default', 'required',
                                         'cli_usable')
                   if k in entry}
        out.append(ordered)
        for alias in names[1:]:
            alias_entry = dict(ordered)
            alias_entry['name'] = alias
            alias_entry['alias_of'] = primary
            out.append(alias_entry)
    return sorted(out, key=lambda e: e['name'])


def version_of(dist):
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default=os.path.join(REPO, 'shared', 'swift-flags'))
    opts = ap.parse_args()
    default_mlm = os.path.join(REPO, '.venv-swift', 'megatron-lm-core_r0.15.0')
    if 'MEGATRON_LM_PATH' not in os.environ and os.path.isdir(os.path.join(default_mlm, 'megatron')):
        os.environ['MEGATRON_LM_PATH'] = default_mlm  # extracted by venvs.sh; only 3.x reads it
    argcheck = load_argcheck()
    version = argcheck.swift_version()
    commands = {}
    for command in argcheck.COMMANDS:
        cli, by_major = argcheck.COMMANDS[command]
        try:
            cli, cls = argcheck.load_args_class(command)
        except argcheck.CannotJudge as e:
            print('dump_flags: %s: %s' % (cli, e), file=sys.stderr)
            raise SystemExit(1)
        parser = argcheck.build_parser(cls)
        commands[cli] = {'dataclass': '%s.%s' % (cls.__module__, cls.__qualname__), 'flags': flags_of(parser, cls)}
        print('dump_flags: ms-swift %s %s: %d flags' % (version, cli, len(commands[cli]['flags'])), file=sys.stderr)
    env = {'python': platform.python_version()}
    for dist in ('transformers', 'megatron-core', 'mcore-bridge', 'torch', 'peft', 'trl'):
        v = version_of(dist)
        if v is not None:
            env[dist.replace('-', '_')] = v
    core = sys.modules.get('megatron.core')
    mlm = os.environ.get('MEGATRON_LM_PATH')
    if mlm and core is not None and os.path.abspath(core.__file__).startswith(os.path.abspath(mlm)):
        # 3.x imports megatron from MEGATRON_LM_PATH, ahead of the megatron-core wheel
        env['megatron_core'] = core.__version__
    table = {'ms_swift': version, 'generated_by': 'tools/swift-flags/dump_flags.py', 'environment': env,
             'commands': commands}
    os.makedirs(opts.out, exist_ok=True)
    path = os.path.join(opts.out, 'ms-swift-%s.json' % version)
    with open(path, 'w') as f:
        f.write(json.dumps(table, indent=2) + '\n')
    print(path)


if __name__ == '__main__':
    main()
