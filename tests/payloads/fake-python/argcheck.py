"""A stand-in for agent/src/preflight/swift_argcheck.py (the real one needs ms-swift): the same
command line (`argcheck.py <command> [argv...]`, reached through the `good`/`broken` wrappers when the
agent runs `<python> -c <swift_argcheck.py> <command> ...`) and the same one JSON line. Like ms-swift
4.6.0 it refuses `--num_workers` (did you mean --dataloader_num_workers?); every other flag is taken.
The version is the stub `swift` package's."""
import json
import sys

COMMANDS = {"megatron-sft": "megatron sft", "megatron-export": "megatron export", "swift-export": "swift export",
            "swift-infer": "swift infer", "swift-eval": "swift eval"}
REFUSED = {"--num_workers": "--dataloader_num_workers"}


def main(args):
    import swift
    version = swift.__version__
    if not args or args[0] not in COMMANDS:
        print(json.dumps({"ms_swift": version, "command": None, "ok": False, "problems": [],
                          "error": "unknown command %r" % (args[:1],)}))
        return 3
    cli = COMMANDS[args[0]]
    problems = [{"flag": a, "message": "not a flag of ms-swift %s's %s (did you mean %s?)" % (version, cli, REFUSED[a])}
                for a in args[1:] if a in REFUSED]
    print(json.dumps({"ms_swift": version, "command": cli, "ok": not problems, "problems": problems, "error": None}))
    return 0


sys.exit(main(sys.argv[1:]))
