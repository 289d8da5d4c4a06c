"""What `train.py` and `evaluate.py` share on the command line (imports absl only).

`run(main)` replaces `absl.app.run(main)`:
  - `--help` (`-h`, `-?`, `--helpshort`) and `--helpfull` print the usage and exit 0, before
    anything else is parsed or imported (absl's own help flags exit 1);
  - a flag that cannot be parsed, an override of a config field that does not exist (with
    ml_collections' "did you mean"), and every `gg_jax.errors.UserError` that `main` raises
    print one `error: ...` on stderr and exit 1, without a traceback.
`config_value(holder)` reads a config flag, turning a config file that cannot be found
into the same one-line error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app, flags

from gg_jax.errors import UserError

SHORT_HELP = ("-h", "-?", "--help", "-help", "--helpshort", "-helpshort")
FULL_HELP = ("--helpfull", "-helpfull")


def fail(message: str) -> None:
    """Prints `error: message` on stderr and exits with status 1."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def _flag_args(argv: list[str]) -> list[str]:
    args = list(argv[1:])
    return args[: args.index("--")] if "--" in args else args


def _unknown_field(error: Exception, argv: list[str]) -> str | None:
    """The one-line message for ml_collections' error on an override of a missing field, or
    None if `error` is not that (a locked ConfigDict raises AttributeError(KeyError(text)),
    text = "'field'" and possibly a line 'Did you mean "x" instead of "field"?')."""
    inner = error.args[0] if error.args and isinstance(error.args[0], KeyError) else error
    text = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return None
    field = lines[0].strip("'\"")
    for arg in _flag_args(argv):
        name = arg.lstrip("-").split("=", 1)[0]
        if "." in name and field in name.split(".")[1:]:
            hint = f" {lines[1]}" if len(lines) > 1 else ""
            return f"--{name}: the config has no field {field!r}.{hint} (configs/default.py lists the fields)"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """`absl.flags.FLAGS(argv)`, with parse errors as one `error:` line and exit status 1."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{e} (see --help)")
    except (AttributeError, KeyError) as e:
        message = _unknown_field(e, argv)
        if message is None:
            raise
        fail(message)
    raise AssertionError("unreachable")


def config_value(holder):
    """The value of a `config_flags.DEFINE_config_file` flag; a config file that cannot be
    loaded (missing, unreadable) is one `error:` line and exit status 1."""
    try:
        value = holder.value
        value.keys()  # A config file that failed to load gives an object that raises on use.
        return value
    except OSError as e:
        cause = e.__cause__ or e
        detail = [line.strip() for line in str(cause).splitlines() if line.strip()]
        fail(f"cannot load --{holder.name}: {detail[-1] if detail else cause}")


def run(main: Callable[[list[str]], object]) -> None:
    """`absl.app.run(main)` with instant help (exit 0) and one-line user errors (exit 1)."""
    args = _flag_args(sys.argv)
    if any(a in FULL_HELP for a in args):
        app.usage(shorthelp=False, writeto_stdout=True)
        sys.exit(0)
    if any(a in SHORT_HELP for a in args):
        app.usage(shorthelp=True, writeto_stdout=True)
        print("Try --helpfull to get a list of all flags.")
        sys.exit(0)

    def checked_main(argv):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            # Skip the interpreter's shutdown: after a failed save, the asyncio coroutines of
            # Orbax's writers print tracebacks while they are torn down. Everything of ours is
            # closed by now.
            os._exit(1)

    app.run(checked_main, flags_parser=parse_flags)
