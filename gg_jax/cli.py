"""The command line of every entry point: one `error:` line and exit status 1 for what a user fixes.

`train.py` and `evaluate.py` (absl flags) start with `run(main)`; the `python -m gg_jax.*`
tools (argparse) with `run_tool(main)`. Both print every `gg_jax.errors.UserError` (a
config value, a missing dataset or checkpoint, a damaged file, a failed save, ...) as one
`error: ...` line on stderr and exit with status 1, without a traceback. `run` also:
  - answers `--help` (`-h`, `-?`, `--helpshort`) and `--helpfull` with the usage and exit 0,
    before anything else is parsed or imported (absl's own help flags exit 1);
  - turns a flag that cannot be parsed, an override of a config field that does not exist
    (with ml_collections' "did you mean") and a config file that does not load into one line.
`start_devices()` is what both entry points do before JAX touches a device. Imports absl only.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags

from gg_jax.errors import UserError

SHORT_HELP = ("-h", "-?", "--help", "-help", "--helpshort", "-helpshort")
FULL_HELP = ("--helpfull", "-helpfull")


def fail(message: str) -> None:
    """Prints `error: message` on stderr and exits with status 1."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def _exit_on_user_error(error: UserError) -> None:
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Skip the interpreter's shutdown: after a failed save, the asyncio coroutines of Orbax's
    # writers print tracebacks while they are torn down. Everything of ours is closed by now.
    os._exit(1)


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one `error:` line (and exit status 1), like
    every other error of the command line, instead of the usage and a `prog: error:` line."""

    def error(self, message: str):
        fail(f"{message} (see {self.prog} --help)")


def run_tool(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """`sys.exit(main(argv))` of a `python -m gg_jax.*` tool, with every `UserError` as one line
    and the library logs a user cannot act on left out."""
    from gg_jax.training import logs

    logs.quiet_library_logs()
    try:
        code = main(argv)
    except UserError as e:
        _exit_on_user_error(e)
    sys.exit(code or 0)


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


def _config_files(argv: list[str]) -> dict[str, str]:
    """{flag name: path} of the `--NAME=FILE.py` arguments (the config files being loaded)."""
    out = {}
    for arg in _flag_args(argv):
        name, _, value = arg.lstrip("-").partition("=")
        if value.endswith(".py") and "." not in name:
            out[name] = value
    return out


def _config_file_error(argv: list[str], error: BaseException) -> str | None:
    """One line for a config file that does not load (missing, a syntax error, no `get_config`,
    `get_config` raising): the file and line where it failed; None if `error` is not that."""
    files = _config_files(argv)
    if not files:
        return None
    while (error.__cause__ or error.__context__) is not None and not isinstance(error, SyntaxError):
        error = error.__cause__ or error.__context__  # Down to what the config file raised.
    name, path = next(iter(files.items()))
    detail = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {detail[-1] if detail else ''}".rstrip(": ")
    if isinstance(error, SyntaxError):
        return f"cannot load --{name}={path}: {error.filename}, line {error.lineno}: SyntaxError: {error.msg}"
    if isinstance(error, AttributeError) and "get_config" in str(error):
        return f"cannot load --{name}={path}: the file has no get_config() function (it must return the config)"
    real = {os.path.realpath(p) for p in files.values()}
    frames = [f for f in traceback.extract_tb(error.__traceback__) if os.path.realpath(f.filename) in real]
    where = f"{frames[-1].filename}, line {frames[-1].lineno}: " if frames else ""
    return f"cannot load --{name}={path}: {where}{text}"


def _unset_fields(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without its `--config.FIELD=None` overrides, those `config.FIELD` paths): absl
    cannot parse None for a typed field, so they are set after parsing (and `run` takes them
    out of `sys.argv`, which ml_collections reads for the overrides)."""
    kept, unset = [], []
    for i, arg in enumerate(argv):
        name, _, value = arg.lstrip("-").partition("=")
        if i and arg.startswith("--") and value == "None" and "." in name:
            unset.append(name)
        else:
            kept.append(arg)
    return kept, unset


_UNSET: list[str] = []  # The `--config.FIELD=None` overrides `run` took out of sys.argv.


def _set_none(path: str) -> None:
    flag, *fields = path.split(".")
    node = flags.FLAGS[flag].value
    for field in fields[:-1]:
        node = node[field]
    if fields[-1] not in node:
        fail(f"--{path}: the config has no field {fields[-1]!r} (configs/default.py lists the fields)")
    node[fields[-1]] = None


def parse_flags(argv: list[str]) -> list[str]:
    """`absl.flags.FLAGS(argv)`, with parse errors and config files that do not load as one
    `error:` line and exit status 1. `--config.FIELD=None` sets a field to None (a model option
    then takes the model's default)."""
    argv, unset = _unset_fields(argv)
    unset += _UNSET
    try:
        rest = flags.FLAGS(argv)
        for path in unset:
            _set_none(path)
        return rest
    except flags.Error as e:
        # ml_collections reports what `get_config` raised as a flag error "whilst parsing config file".
        loading = "config file" in str(e) and (e.__cause__ or e.__context__) is not None
        fail((loading and _config_file_error(argv, e)) or f"{e} (see --help)")
    except (AttributeError, KeyError) as e:
        message = _unknown_field(e, argv) or _config_file_error(argv, e)
        if message is None:
            raise
        fail(message)
    except Exception as e:  # Whatever a config file raised while it was loaded.
        message = _config_file_error(argv, e)
        if message is None:
            raise
        fail(message)
    raise AssertionError("unreachable")


def config_value(holder, argv: Sequence[str]):
    """The value of a `config_flags.DEFINE_config_file` flag. Unexpected positional arguments,
    and a config file that cannot be loaded (missing, unreadable) are one `error:` line and
    exit status 1."""
    if len(argv) > 1:
        fail(f"unexpected arguments {list(argv[1:])} (flags are --name=value; see --help)")
    try:
        value = holder.value
        value.keys()  # A config file that failed to load gives an object that raises on use.
        return value
    except OSError as e:
        cause = e.__cause__ or e
        detail = [line.strip() for line in str(cause).splitlines() if line.strip()]
        fail(f"cannot load --{holder.name}: {detail[-1] if detail else cause}")


def start_devices() -> None:
    """Before anything touches a device: `jax.distributed` as the flags ask (see
    `gg_jax.training.distributed_flags`), then the library logs a user cannot act on quieted."""
    from gg_jax.training import distributed_flags, logs

    distributed_flags.initialize()
    logs.quiet_library_logs()


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

    sys.argv[:], unset = _unset_fields(sys.argv)
    _UNSET[:] = unset

    def checked_main(argv):
        try:
            return main(argv)
        except UserError as e:
            _exit_on_user_error(e)
        except KeyboardInterrupt:  # Ctrl-C where the trainer does not handle it (it saves and exits 130).
            print(
                "error: interrupted (Ctrl-C); the checkpoints already completed are kept: rerun the same command to "
                "resume from the latest.",
                file=sys.stderr,
            )
            sys.exit(128 + 2)

    app.run(checked_main, flags_parser=parse_flags)
