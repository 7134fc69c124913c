"""Command line: ``specdec generate``, ``specdec bench`` (and any command registered in :data:`COMMANDS`).

Each command lives in its own module, imported only when it runs: ``specdec --help`` and argument errors cost no
torch import. A command module defines ``HELP`` (one line), ``add_arguments(parser)`` (light: no heavy imports) and
``run(args) -> int``. Errors the user can fix (bad flags, prompt, model, drafter, checkpoint, too long a request)
are printed as one ``specdec: error: ...`` line with exit status 2; Ctrl-C exits with status 130 and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from specdec.app.args import HelpFormatter

# command name -> module (``HELP``, ``add_arguments``, ``run``); a server adds "serve" here.
COMMANDS = {
    "generate": "specdec.app.cmd_generate",
    "bench": "specdec.app.cmd_bench",
    "serve": "specdec.server.cmd_serve",
    "simulate": "specdec.app.cmd_simulate",
    "certify": "specdec.app.cmd_certify",
    "calibrate": "specdec.app.cmd_calibrate",
}
USER_ERRORS = (ValueError, KeyError, FileNotFoundError)


def version() -> str:
    from specdec.app.model_cache import package_version

    return package_version()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description="Speculative decoding with token trees.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"specdec {version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module_name)
    return parser


def error_line(err: BaseException) -> str:
    """One line: the message's first line (a KeyError's quotes removed)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return (str(text).strip().splitlines() or [type(err).__name__])[0]


def is_user_error(err: BaseException) -> bool:
    from specdec.kv_cache import OutOfBlocks

    return isinstance(err, (*USER_ERRORS, OutOfBlocks))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args._module).run(args) or 0
    except KeyboardInterrupt:
        print("\nspecdec: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not is_user_error(err):
            raise
        print(f"specdec: error: {error_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
