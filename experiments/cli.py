"""What every binary of experiments/ shares: `run(main)`, its `if __name__ == "__main__"` line.

A user error prints one line (what is wrong and what to do, prefixed with the binary's name) or
two (a mistyped flag: the second says where the flags are listed) and exits 2; the traceback is
behind `--verbose` or MAMBA2_JAX_VERBOSE=1. User errors are the library's
`mamba2_jax.errors.UserError` (config values, data or checkpoints that do not match, ...),
FileNotFoundError and its kin for paths, absl's UsageError, and flag errors: an unknown flag, an
unknown config field (`--config.totl_steps=3`: "unknown config field totl_steps in
configs/train.py; did you mean total_steps?"), a `--config.x=y` without the `--config=` it
overrides, a config file that does not exist. Any other exception is a bug and keeps its
traceback; Ctrl-C prints "interrupted" and exits 130.

Also: relative config paths that do not exist in the working directory are read from the
project (`--config=configs/train.py:tiny` and the defaults work from any directory once the
project is installed, scripts/setup.sh), and jax's INFO lines about the backends it probes and
does not find ("Unable to initialize backend 'tpu'", expected on a CPU or GPU host) are dropped
(they stay with --verbose). `cleanup_on_failure(path)` removes an output directory that this run
created and left empty.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import shutil
import sys
from pathlib import Path

from absl import app, flags
from ml_collections.config_flags import config_flags as mlc_config_flags

from mamba2_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
VERBOSE_ENV = "MAMBA2_JAX_VERBOSE"
USER_ERRORS = (
  UserError,
  app.UsageError,
  FileNotFoundError,
  FileExistsError,
  NotADirectoryError,
  IsADirectoryError,
  PermissionError,
)
EXIT_USER_ERROR = 2

flags.DEFINE_bool("verbose", False, f"tracebacks for user errors too (or {VERBOSE_ENV}=1)")


def verbose(argv=None) -> bool:
  """--verbose or MAMBA2_JAX_VERBOSE=1 (read from argv: flags may not have parsed yet)."""
  if os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes", "on"):
    return True
  on = False
  for a in argv if argv is not None else sys.argv:
    m = re.fullmatch(r"--?(no)?verbose(?:=(.*))?", a)
    if m:
      on = not m.group(1) and (m.group(2) or "true").lower() in ("1", "true", "t", "yes")
  return on


def run(main, configs: dict[str, str] | None = None) -> None:
  """absl's app.run(main) with one-line user errors (exit 2) and quiet expected jax logs.

  `configs`: {config flag name: its default, e.g. "configs/train.py:tiny"}, passed as
  `--name=default` when the command line has none. (A config flag defined with a default is
  loaded when it is defined, at import, before any error could be reported; so the binaries
  define theirs with None and give the default here.)"""
  prog = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "main"
  if prog == "__main__":
    prog = main.__module__.rsplit(".", 1)[-1]
  loud = verbose()
  if not loud:
    logging.getLogger("jax._src.xla_bridge").addFilter(_drop_missing_backends)
  argv = list(sys.argv)
  for name, default in (configs or {}).items():
    if _config_arg(argv, name)[1] is None:
      argv.insert(1, f"--{name}={default}")
  sys.argv = _with_project_configs(argv)
  app.run(_guarded(main, prog, loud), flags_parser=lambda argv: _parse_flags(argv, prog, loud))


def fail(prog: str, message: str, hint: str | None = None) -> None:
  """Prints `prog: message` (and `hint`) to stderr and exits 2."""
  print(f"{prog}: {_one_line(message)}", file=sys.stderr)
  if hint:
    print(hint, file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


@contextlib.contextmanager
def cleanup_on_failure(path):
  """Removes `path` if the block fails, this run created it and it holds no file."""
  existed = os.path.exists(path)
  try:
    yield
  except BaseException:
    if not existed and os.path.isdir(path) and not any(f for _, _, f in os.walk(path)):
      shutil.rmtree(path, ignore_errors=True)
    raise


# ------------------------------------------------------------------------------------------------
def _drop_missing_backends(record: logging.LogRecord) -> bool:
  return not (
    record.levelno < logging.WARNING and str(record.msg).startswith("Unable to initialize backend")
  )


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def _message(e: BaseException) -> str:
  if isinstance(e, OSError) and e.filename and e.strerror and not isinstance(e, UserError):
    return f"{e.filename}: {e.strerror}"
  return str(e) or type(e).__name__


def _guarded(main, prog: str, loud: bool):
  def guarded_main(argv):
    try:
      return main(argv)
    except KeyboardInterrupt:
      if loud:
        raise
      print(f"{prog}: interrupted", file=sys.stderr)
      sys.exit(130)
    except USER_ERRORS as e:
      if loud:
        raise
      hint = (
        None if isinstance(e, app.UsageError) else f"(the traceback: --verbose or {VERBOSE_ENV}=1)"
      )
      fail(prog, f"error: {_message(e)}", hint)

  return guarded_main


def _config_flags() -> dict:
  fv = flags.FLAGS
  return {n: fv[n] for n in fv if mlc_config_flags.is_config_flag(fv[n])}


def _config_arg(argv, name):
  """(index, value) of --NAME=VALUE or --NAME VALUE in argv (index: where VALUE is), else
  (-1, None)."""
  for i, a in enumerate(argv[1:], 1):
    m = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", a)
    if m and m.group(1):
      return i, m.group(2)
    if m:
      return (i + 1, argv[i + 1]) if i + 1 < len(argv) else (-1, None)
  return -1, None


def _overrides(argv, name) -> list[str]:
  out = []
  for a in argv[1:]:
    m = re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", a)
    if m:
      out.append(m.group(1))
  return out


def _project_path(value: str) -> str:
  path, sep, arg = value.partition(":")
  if path and not os.path.isabs(path) and not os.path.exists(path) and (ROOT / path).is_file():
    return f"{ROOT / path}{sep}{arg}"
  return value


def _with_project_configs(argv: list[str]) -> list[str]:
  """Relative config paths missing from the working directory, read from the project instead."""
  for name in _config_flags():
    i, value = _config_arg(argv, name)
    if value is not None:
      new = _project_path(value)
      if new != value:
        argv[i] = argv[i][: len(argv[i]) - len(value)] + new
  return argv


def _config_hint(argv, name, flag) -> str:
  """The --NAME= to add: the flag's help with <x> filled from --x=VALUE in argv."""
  hint = flag.help or f"<{name} file>"
  return re.sub(r"<(\w+)>", lambda m: _config_arg(argv, m.group(1))[1] or m.group(0), hint)


def _config_problem(argv) -> str | None:
  """What is wrong with the config flags of argv (None when nothing is found)."""
  for name, flag in _config_flags().items():
    i, value = _config_arg(argv, name)
    fields = _overrides(argv, name)
    if value is None:
      if fields:
        return (
          f"--{name}.{fields[0]} overrides a field of --{name}, which is not given; add "
          f"--{name}={_config_hint(argv, name, flag)}"
        )
      continue
    path = value
    try:
      config = flag.parser.parse(path)
    except Exception:  # noqa: BLE001 - get_config() raised: the flag error says so
      continue
    if type(config).__name__ == "_ErrorConfig":
      where = {os.getcwd(), str(ROOT)}
      return f"--{name}: no config file {path.partition(':')[0]} (in {' or '.join(sorted(where))})"
    for field in fields:
      problem = _unknown_field(config, field, path.partition(":")[0])
      if problem:
        return problem
  return None


def _unknown_field(config, field: str, file: str) -> str | None:
  node, parts = config, field.split(".")
  for k, part in enumerate(parts):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part in keys:
      node = node[part]
      continue
    close = difflib.get_close_matches(part, [str(x) for x in keys], n=1)
    known = (
      f"did you mean {'.'.join([*parts[:k], close[0], *parts[k + 1 :]])}?"
      if close
      else (f"its fields: {', '.join(map(str, keys))}" if keys else "it has no fields")
    )
    return f"unknown config field {field} in {file}; {known}"
  return None


def _flag_problem(e: flags.Error) -> str:
  if isinstance(e, flags.UnrecognizedFlagError):
    name = e.flagname
    close = difflib.get_close_matches(name, list(flags.FLAGS), n=1)
    return f"unknown flag --{name}" + (f"; did you mean --{close[0]}?" if close else "")
  text = str(e)
  required = re.search(r"Flag --(\S+) must have a value other than None", text)
  if required:
    return f"--{required.group(1)} is required"
  if "Error whilst parsing config file" in text:  # the config's get_config() raised
    last = [ln.strip() for ln in text.splitlines() if ln.strip()][-1]
    return re.sub(r"^[A-Za-z_.]*(Error|Exception): ", "", last)
  return text


def _parse_flags(argv, prog: str, loud: bool):
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    fail(prog, _config_problem(argv) or _flag_problem(e), "(--helpshort lists the flags)")
  except Exception:  # noqa: BLE001 - ml_collections raises KeyError / AttributeError / IOError
    problem = None if loud else _config_problem(argv)
    if problem is None:
      raise
    fail(prog, problem)
  problem = (
    _config_problem(argv)
    if any(type(f.value).__name__ == "_ErrorConfig" for f in _config_flags().values())
    else None
  )
  if problem:
    fail(prog, problem)
  return rest
